"""The one exception type the CLI turns into a one-line message and a non-zero exit, and the one a run's record
names when a head breaks its contract at run time."""

OUT_OF_MEMORY_EXIT = 3  # `headzoo run` ran out of memory outside the training step; the sweep records `oom`


class HeadzooError(ValueError):
    """Bad input or an unusable environment, said in one line."""


class ContractViolation(RuntimeError):
    """A head broke the contract during a run (non-finite loss, K > C, a prediction outside [0, C)):
    the run's record says so with status `error`."""
