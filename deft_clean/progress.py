"""How long-running library code reports progress without printing.

The library never prints (see docs/architecture.md). Functions that run for more than a few
seconds take a ``reporter`` argument; the CLI passes a rich implementation (``_render.py``),
the Python API defaults to :class:`SilentReporter`. Log messages go through the standard
``logging`` module under the ``deft_clean`` logger as well, so API users can see them.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

logger = logging.getLogger("deft_clean")


class Reporter(Protocol):
    """Receives progress from library code. Implementations must be cheap to call."""

    def task(self, description: str, total: int | None) -> AbstractContextManager[Any]:
        """Context manager around one phase (an epoch, a decoding pass) of ``total`` units."""

    def advance(self, n: int = 1, **fields: float) -> None:
        """``n`` more units done in the current task; ``fields`` are live figures (loss, img/s)."""

    def log(self, message: str, level: str = "info") -> None:
        """A line for the run's log ('info' or 'warning')."""


class SilentReporter:
    """The default: progress is dropped, log lines go to the ``deft_clean`` logger."""

    def task(self, description: str, total: int | None) -> AbstractContextManager[Any]:
        return nullcontext()

    def advance(self, n: int = 1, **fields: float) -> None:
        return None

    def log(self, message: str, level: str = "info") -> None:
        logger.log(logging.WARNING if level == "warning" else logging.INFO, message)
