"""Everything the terminal shows: the only module that imports rich."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from deft_clean.errors import DataError, DeftCleanError

console = Console(stderr=True)


class RichReporter:
    """A :class:`deft_clean.progress.Reporter` drawing rich progress bars with rate and ETA."""

    def __init__(self, unit: str = "img") -> None:
        self.unit = unit
        self._progress: Progress | None = None
        self._task: Any = None

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[None]:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._progress = progress
        with progress:
            self._task = progress.add_task(description, total=total, rate="", extra="")
            try:
                yield
            finally:
                self._progress = None

    def advance(self, n: int = 1, **fields: float) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task, n)
        speed = self._progress.tasks[self._task].speed
        rate = f"{speed:,.0f} {self.unit}/s" if speed else ""
        extra = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
        self._progress.update(self._task, rate=rate, extra=extra)

    def log(self, message: str, level: str = "info") -> None:
        style = "yellow" if level == "warning" else "dim"
        prefix = "warning: " if level == "warning" else ""
        console.print(f"[{style}]{prefix}{message}[/{style}]")


def print_problems(error: DataError) -> None:
    """Every data problem as one table row naming the row and file, then a one-line summary."""
    table = Table(title=f"Problems in {error.source}", show_lines=False)
    table.add_column("row", justify="right")
    table.add_column("file")
    table.add_column("problem", style="red")
    table.add_column("what to do")
    for p in error.problems:
        table.add_row("" if p.row is None else str(p.row), p.path or "", p.message, p.fix or "")
    console.print(table)
    print_error(error)


def print_error(error: DeftCleanError) -> None:
    """One line for the user: the message, then the hint."""
    console.print(f"[bold red]error:[/bold red] {error.message}")
    if error.hint:
        console.print(f"[yellow]hint:[/yellow] {error.hint}")
