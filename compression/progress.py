"""Rich progress bars for the long steps (export, calibration, evaluation).

Flow: the pipeline owns one :class:`ProgressReporter`; each step opens a task
with :meth:`ProgressReporter.task` and calls the returned ``advance`` function.
Bars go to stderr so that ``--json`` output on stdout stays machine-readable.

Invariant: a disabled reporter (tests, ``show_progress=False``) does no I/O at
all; steps never need to know whether bars are drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

Advance = Callable[[int], None]


def _noop(_: int) -> None:
    return None


class ProgressReporter:
    """Opens one rich progress bar per step, or nothing when disabled."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console if console is not None else Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        """Show a bar for one step.

        Args:
            description: Label shown left of the bar.
            total: Units of work, or ``None`` for a spinner without a total.

        Yields:
            A function that advances the bar by its argument.
        """
        if not self.enabled:
            yield _noop
            return
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        with progress:
            task_id = progress.add_task(description, total=total)

            def advance(amount: int) -> None:
                progress.advance(task_id, amount)

            yield advance
            if total is not None:
                progress.update(task_id, completed=total)
