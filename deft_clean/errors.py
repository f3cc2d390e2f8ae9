"""One exception family for everything a user can cause.

The library raises these and never prints or exits; the CLI maps each to a one-line message
(with the hint) and a non-zero exit code. Every message says what was wrong, the value seen,
and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass


class DeftCleanError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


@dataclass(frozen=True)
class Problem:
    """One data problem: where it is (file and/or CSV row) and what is wrong.

    ``row`` is the 1-based line number in the CSV file (the header is line 1), or ``None`` when
    the problem concerns a whole file or an ImageFolder entry.
    """

    kind: str
    message: str
    path: str | None = None
    row: int | None = None
    fix: str | None = None

    def location(self) -> str:
        parts = []
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.path is not None:
            parts.append(f"'{self.path}'")
        return " ".join(parts) if parts else "-"

    def __str__(self) -> str:
        text = f"{self.location()}: {self.message}"
        return f"{text} {self.fix}" if self.fix else text


class DataError(DeftCleanError):
    """The input data has problems; ``problems`` lists every one found in a single pass."""

    def __init__(self, problems: list[Problem], source: str = "input") -> None:
        self.problems = list(problems)
        self.source = source
        kinds = sorted({p.kind for p in self.problems})
        summary = f"{len(self.problems)} problem(s) in {source}: {', '.join(kinds)}"
        first = f" First: {self.problems[0]}" if self.problems else ""
        super().__init__(summary + "." + first)


class ConfigError(DeftCleanError):
    """An option value is invalid or options contradict each other."""


class OutputError(DeftCleanError):
    """An output cannot or must not be written (exists, is an input, unwritable, no room); exit code 2."""


class BackboneError(DeftCleanError):
    """A backbone cannot be built or its weights cannot be loaded."""


class MissingExtraError(DeftCleanError):
    """An optional dependency is not installed; the hint names the pip extra."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed.",
            hint=f"Install it with: pip install 'deft-clean[{extra}]'",
        )


class TrainingError(DeftCleanError):
    """Training produced a model that cannot be trusted (diverged or collapsed); nothing is written."""


class ProcessLostError(DeftCleanError):
    """Under torchrun, another process of the run stopped (killed, out of memory, its own failure)."""
