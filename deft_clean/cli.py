"""The `deft-clean` command line. Each command: options → config → one API call → render.

No logic lives here: defaults come from `deft_clean.config`, errors are
`DeftCleanError`s mapped to one line and exit code 1 (data problems: a table, then exit 2).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from deft_clean import __version__
from deft_clean._render import print_error, print_problems
from deft_clean.errors import DataError, DeftCleanError

app = typer.Typer(
    name="deft-clean",
    help="Find wrong labels in image datasets (DeFT) and train on what is left (TeS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(func: F) -> F:
    """Turn library exceptions into a readable message and a non-zero exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DataError as error:
            print_problems(error)
            raise typer.Exit(code=2) from None
        except DeftCleanError as error:
            print_error(error)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deft-clean {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Find wrong labels in image datasets and train a model without them."""
