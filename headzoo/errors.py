"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class HeadzooError(ValueError):
    """Bad input or an unusable environment, said in one line."""
