"""The `deft-clean` command line. Each command: options → config → one API call → render.

No logic lives here: defaults come from `deft_clean.config`, errors are
`DeftCleanError`s mapped to one line and exit code 1 (data problems: a table, then exit 2).
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

from deft_clean import __version__
from deft_clean._render import RichReporter, print_error, print_manifest_summary, print_problems
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig
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
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """Find wrong labels in image datasets and train a model without them."""


_FLAGS = {"classes_file": "--classes"}  # field names whose flag is not simply --field-name


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def config_options(*config_classes: type, only: set[str] | None = None, **overrides: Any) -> Callable[[F], F]:
    """Give a command one option per field of ``config_classes`` and pass their values as ``options``.

    Defaults and help come from the dataclass fields (one source of truth), so every command that takes
    a stage's options takes all of them the same way. ``only`` restricts the fields; ``overrides`` maps a
    field to its own ``typer.Option`` (e.g. a ``--model`` whose default is read from another file). The
    wrapped command receives ``options``: the values, without ``model``/``pretrained`` left at None.
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "options"]
        names = []
        for cls in config_classes:
            hints = typing.get_type_hints(cls)
            for spec in dataclasses.fields(cls):
                if only is not None and spec.name not in only:
                    continue
                default = overrides.get(spec.name) or typer.Option(
                    spec.default, _flag(spec.name), help=spec.metadata.get("help")
                )
                kind = inspect.Parameter.KEYWORD_ONLY
                params.append(
                    inspect.Parameter(spec.name, kind, default=default, annotation=hints[spec.name])
                )
                names.append(spec.name)

        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            unset = {"model", "pretrained"}  # None means: take it from elsewhere (flags file, default)
            options = {k: v for k, v in values.items() if not (k in unset and v is None)}
            return func(*args, options=options, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


@app.command()
@_user_errors
@config_options(DataConfig)
def check(
    data_dir: Annotated[Path, typer.Argument(help="Folder with the images.", show_default=False)],
    labels_csv: Annotated[
        Path | None,
        typer.Argument(help="CSV: image path + label (omit: ImageFolder).", show_default=False),
    ] = None,
    *,
    options: dict[str, Any],  # filled by @config_options
) -> None:
    """Validate a labelled image set (every image is decoded) and count images per class; no model needed."""
    from deft_clean.data import load_manifest

    config = DataConfig(**options)
    print_manifest_summary(load_manifest(data_dir, labels_csv, config=config, reporter=RichReporter()))


@app.command("detect")
@_user_errors
@config_options(DataConfig, BackboneConfig, DetectConfig)
def detect_command(
    data_dir: Annotated[Path, typer.Argument(help="Folder with the images.", show_default=False)],
    labels_csv: Annotated[
        Path | None, typer.Argument(help="CSV: image path + label (omit: ImageFolder).", show_default=False)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Results Parquet (default: <labels stem>.deft.parquet, or ./deft_results.parquet)."
        ),
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help="CSV path,label of verified labels: report precision/recall/F1."),
    ] = None,
    save_model: Annotated[
        Path | None, typer.Option("--save-model", help="Folder for the learned prompts and adapters.")
    ] = None,
    *,
    options: dict[str, Any],  # filled by @config_options
) -> None:
    """Flag likely wrong labels with DeFT (dual text prompts + LoRA on a CLIP-style backbone)."""
    from deft_clean._render import print_detect_summary
    from deft_clean.detect import detect

    frame = detect(
        data_dir,
        labels_csv,
        out=out,
        truth_csv=truth,
        save_model=save_model,
        reporter=RichReporter(),
        **options,
    )
    print_detect_summary(frame)


@app.command("backbones")
@_user_errors
def backbones_command() -> None:
    """List the built-in backbones: kind, image size, whether the towers are aligned, default LoRA targets."""
    from deft_clean._render import print_backbones
    from deft_clean.backbone import list_backbones

    print_backbones(list_backbones())


@app.command("export-backbone")
@_user_errors
@config_options(BackboneConfig, only={"model", "pretrained", "cache_dir"})
def export_backbone_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write: config, weights, tokenizer.")],
    half: Annotated[bool, typer.Option("--half", help="Store the weights in fp16 (half the size).")] = False,
    *,
    options: dict[str, Any],  # filled by @config_options
) -> None:
    """Save a backbone as a self-contained folder; load it anywhere with --pretrained local-dir:DIR.

    This is how air-gapped machines get a backbone: export it where the weights are (e.g. the offline
    backbone, which is NOT aligned like CLIP, or a CLIP tag you downloaded), copy the folder over.
    """
    from deft_clean._render import print_exported
    from deft_clean.backbone import export_backbone

    config = BackboneConfig(**options)
    print_exported(export_backbone(config, out, half=half), config.model)


@app.command("finetune")
@_user_errors
@config_options(
    DataConfig,
    BackboneConfig,
    FinetuneConfig,
    model=typer.Option(None, "--model", help="Backbone (default: the one in --flags, else 'offline')."),
)
def finetune_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the classifier: weights, config, metrics.")],
    data_dir: Annotated[Path, typer.Argument(help="Folder with the training images.", show_default=False)],
    labels_csv: Annotated[
        Path | None, typer.Argument(help="CSV: image path + label (omit: ImageFolder).", show_default=False)
    ] = None,
    flags: Annotated[
        Path | None, typer.Option("--flags", help="Flags Parquet from `deft-clean detect` on this data.")
    ] = None,
    test_dir: Annotated[
        Path | None, typer.Option("--test-dir", help="Held-out labelled images: writes metrics.json.")
    ] = None,
    test_csv: Annotated[
        Path | None, typer.Option("--test-csv", help="Labels CSV of --test-dir (omit: ImageFolder).")
    ] = None,
    *,
    options: dict[str, Any],  # filled by @config_options
) -> None:
    """Fine-tune a classifier (TeS or CE) on the rows a flags file marks clean, or on every row."""
    from deft_clean._render import print_finetune_summary
    from deft_clean.finetune import finetune

    result = finetune(
        data_dir, labels_csv, flags=flags, out=out, test_dir=test_dir, test_csv=test_csv,
        reporter=RichReporter(), **options,
    )  # fmt: skip
    print_finetune_summary(result)


@app.command("predict")
@_user_errors
@config_options(DataConfig, only={"image_col", "label_col"})
def predict_command(
    out: Annotated[Path, typer.Option("--out", help="Predictions Parquet (atomic write, with metadata).")],
    model_dir: Annotated[Path, typer.Argument(help="Folder written by `deft-clean finetune --out`.")],
    data_dir: Annotated[Path, typer.Argument(help="Folder with the images.", show_default=False)],
    labels_csv: Annotated[
        Path | None, typer.Argument(help="CSV: image path + label (omit: ImageFolder).", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 256,
    device: Annotated[
        str | None, typer.Option("--device", help="'cpu' or 'cuda[:N]' (default: as trained, 'auto').")
    ] = None,
    *,
    options: dict[str, Any],  # filled by @config_options
) -> None:
    """Predict class probabilities for a folder of images with a fine-tuned classifier."""
    from deft_clean._render import print_predict_summary
    from deft_clean.classifier import predict

    data_config = DataConfig(**options, min_per_class=0)
    frame = predict(
        model_dir, data_dir, labels_csv, out=out, data_config=data_config, batch_size=batch_size,
        device=device, reporter=RichReporter(),
    )  # fmt: skip
    print_predict_summary(frame, out)


@app.command("embed")
@_user_errors
@config_options(
    DataConfig,
    BackboneConfig,
    only={"image_col", "label_col", "classes_file", "model", "pretrained", "device"},
)
def embed_command(
    out: Annotated[Path, typer.Option("--out", help="Features .npy, float32 (N, D), rows in input order.")],
    data_dir: Annotated[Path, typer.Argument(help="Folder with the images.", show_default=False)],
    labels_csv: Annotated[
        Path | None, typer.Argument(help="CSV: image path + label (omit: ImageFolder).", show_default=False)
    ] = None,
    pooled: Annotated[
        bool, typer.Option("--pooled", help="A timm tower's pooled features, before its projection head.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 256,
    *,
    options: dict[str, Any],  # filled by @config_options
) -> None:
    """Write frozen, L2-normalised features of every image (un-augmented) to a .npy file."""
    from deft_clean.embed import embed

    reporter = RichReporter()
    features = embed(
        data_dir, labels_csv, out=out, pooled=pooled, batch_size=batch_size, reporter=reporter, **options
    )
    typer.echo(f"wrote {features.shape[0]} x {features.shape[1]} features to {out}")
