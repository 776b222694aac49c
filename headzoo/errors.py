"""The one exception type the CLI turns into a one-line message and a non-zero exit, and the one a run's record
names when a head breaks its contract at run time."""


class HeadzooError(ValueError):
    """Bad input or an unusable environment, said in one line."""


class ContractViolation(RuntimeError):
    """A head broke the contract during a run (non-finite loss, K > C, a prediction outside [0, C)):
    the run's record says so with status `error`."""
