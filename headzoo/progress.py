"""One look for every rich progress bar headzoo shows (on stderr, so --json stays clean)."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(*extra_columns) -> Progress:
    """A bar on a terminal; nothing when stderr is a file or pipe (logs and sweep cells stay readable)."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
