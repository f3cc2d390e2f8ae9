"""The Typer glue every `deft-clean` command shares: config fields as options, library errors as one line.

``config_options`` turns the fields of the ``deft_clean.config`` dataclasses into typer options (default
and help read from the field) and hands the command the config objects built from them, so the rules stay
in the configs. ``user_errors`` turns a ``DeftCleanError`` into one rendered line (a table for data
problems) and an exit code, never a traceback. They live apart from ``cli`` so that module holds only the
commands: options → config objects → one API call → render.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from deft_clean import config
from deft_clean._render import print_error, print_interrupted, print_problems
from deft_clean.errors import DataError, DeftCleanError, OutputError

F = TypeVar("F", bound=Callable[..., Any])
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output (never an input of the run).")
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue a killed run from its checkpoint (<out>.checkpoint).")
]
FlagsFile = Annotated[
    Path, typer.Argument(help="Results Parquet from `deft-clean detect`.", show_default=False)
]


def user_errors(func: F) -> F:
    """Turn library exceptions into a readable message and a non-zero exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DataError as error:
            print_problems(error)
            raise typer.Exit(code=2) from None
        except OutputError as error:
            print_error(error)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            print_interrupted()
            raise typer.Exit(code=130) from None
        except DeftCleanError as error:
            print_error(error)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


# the keyword argument a command built with @config_options receives each config object as
_PARAMETER = {
    config.DataConfig: "data_config",
    config.BackboneConfig: "backbone_config",
    config.DetectConfig: "detect_config",
    config.FinetuneConfig: "finetune_config",
    config.ReportConfig: "report_config",
    config.ExportConfig: "export_config",
}


def config_options(*config_classes: type, only: set[str] | None = None) -> Callable[[F], F]:
    """Give a command one option per field of ``config_classes`` and pass it the config objects built.

    Defaults and help come from the dataclass fields (one source of truth), so every command that takes
    a stage's options takes all of them the same way. ``only`` restricts the fields shown (the others
    keep their defaults). Choice fields reach typer as plain strings, so the config, the one validator,
    refuses a bad value with its own message (exit code 1). The wrapped command receives one keyword
    argument per class: ``data_config``, ``backbone_config``, ``detect_config`` or ``finetune_config``;
    building them runs their checks.
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name not in _PARAMETER.values()]
        fields = {
            cls: [f for f in dataclasses.fields(cls) if only is None or f.name in only]
            for cls in config_classes
        }
        for cls, specs in fields.items():
            hints = typing.get_type_hints(cls)
            for spec in specs:
                option = typer.Option(spec.default, config.flag(spec.name), help=spec.metadata.get("help"))
                kind = inspect.Parameter.KEYWORD_ONLY
                hint = str if typing.get_origin(hints[spec.name]) is typing.Literal else hints[spec.name]
                params.append(inspect.Parameter(spec.name, kind, default=option, annotation=hint))

        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for cls, specs in fields.items():
                kwargs[_PARAMETER[cls]] = cls(**{spec.name: kwargs.pop(spec.name) for spec in specs})
            return func(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


# the options `check` takes: every data option, and the backbone and prompt fields its checks depend on
CHECK_FIELDS = {f.name for f in dataclasses.fields(config.DataConfig)} | {
    "model",
    "pretrained",
    "cache_dir",
    "n_ctx",
    "ctx_init",
}
