"""What the terminal shows: the one progress-bar factory, and raydiff's warnings as lines."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console, *, training: bool = False) -> Progress:
    """A bar per task, named by its description. `training`: time remaining and the task's
    `info` field (latest losses, tokens/s), left on screen when done; otherwise time elapsed,
    cleared when done."""
    if training:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), console=console, transient=False)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def fmt(value) -> str:
    """A table cell: floats to four places, booleans as yes/no, None and NaN as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@contextlib.contextmanager
def warnings_as_lines(console: Console) -> Iterator[None]:
    """While inside: raydiff's own warnings (a damaged checkpoint skipped, a sampler setting
    clamped) as one line each on `console`; any other library's keep Python's usual form."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("raydiff."):
            console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning (and the filters) on the way out
        warnings.showwarning = show
        yield
