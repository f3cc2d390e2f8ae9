"""The `deft-clean` command line. Each command: options → config → one API call → render.

No logic lives here: defaults come from `deft_clean.config`, errors are
`DeftCleanError`s mapped to one line and exit code 1 (data problems: a table, then exit 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from deft_clean import __version__
from deft_clean._render import RichReporter, print_error, print_manifest_summary, print_problems
from deft_clean.config import DataConfig
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


def _option(config_cls: type, name: str, *flags: str) -> Any:
    """A typer.Option whose default and help are the config field's (one source of truth)."""
    spec = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    return typer.Option(spec.default, *flags, help=spec.metadata.get("help"))


@app.command()
@_user_errors
def check(
    data_dir: Annotated[Path, typer.Argument(help="Folder with the images.", show_default=False)],
    labels_csv: Annotated[
        Path | None,
        typer.Argument(help="CSV: image path + label (omit: ImageFolder).", show_default=False),
    ] = None,
    image_col: str | None = _option(DataConfig, "image_col", "--image-col"),
    label_col: str | None = _option(DataConfig, "label_col", "--label-col"),
    classes_file: str | None = _option(DataConfig, "classes_file", "--classes"),
    min_per_class: int = _option(DataConfig, "min_per_class", "--min-per-class"),
    on_bad_image: str = _option(DataConfig, "on_bad_image", "--on-bad-image"),
    max_image_pixels: int | None = _option(DataConfig, "max_image_pixels", "--max-image-pixels"),
) -> None:
    """Validate a labelled image set (every image is decoded) and count images per class; no model needed."""
    from deft_clean.data import load_manifest

    config = DataConfig(
        image_col=image_col,
        label_col=label_col,
        classes_file=classes_file,
        min_per_class=min_per_class,
        on_bad_image=on_bad_image,
        max_image_pixels=max_image_pixels,
    )
    print_manifest_summary(load_manifest(data_dir, labels_csv, config=config, reporter=RichReporter()))
