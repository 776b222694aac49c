"""The built-in heads; each registers in the ``headzoo.heads`` entry-point group."""
