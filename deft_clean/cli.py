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


def _given(values: dict[str, Any], *config_classes: type) -> dict[str, Any]:
    """The command's values that are fields of ``config_classes``; None for model/pretrained = not given."""
    names = {f.name for cls in config_classes for f in dataclasses.fields(cls)}
    unset = {"model", "pretrained"}
    return {k: v for k, v in values.items() if k in names and not (k in unset and v is None)}


@app.command("detect")
@_user_errors
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
    model: str = _option(BackboneConfig, "model", "--model"),
    pretrained: str | None = _option(BackboneConfig, "pretrained", "--pretrained"),
    device: str = _option(BackboneConfig, "device", "--device"),
    cache_dir: str | None = _option(BackboneConfig, "cache_dir", "--cache-dir"),
    n_ctx: int = _option(DetectConfig, "n_ctx", "--n-ctx"),
    ctx_init: str | None = _option(DetectConfig, "ctx_init", "--ctx-init"),
    class_specific_ctx: bool = _option(DetectConfig, "class_specific_ctx", "--class-specific-ctx"),
    peft: str = _option(DetectConfig, "peft", "--peft"),
    lora_rank: int = _option(DetectConfig, "lora_rank", "--lora-rank"),
    lora_alpha: float = _option(DetectConfig, "lora_alpha", "--lora-alpha"),
    lora_dropout: float = _option(DetectConfig, "lora_dropout", "--lora-dropout"),
    lora_targets: str | None = _option(DetectConfig, "lora_targets", "--lora-targets"),
    vpt_len: int = _option(DetectConfig, "vpt_len", "--vpt-len"),
    epochs: int = _option(DetectConfig, "epochs", "--epochs"),
    warmup_epochs: int = _option(DetectConfig, "warmup_epochs", "--warmup-epochs"),
    batch_size: int = _option(DetectConfig, "batch_size", "--batch-size"),
    lr: float = _option(DetectConfig, "lr", "--lr"),
    lr_schedule: str = _option(DetectConfig, "lr_schedule", "--lr-schedule"),
    momentum: float = _option(DetectConfig, "momentum", "--momentum"),
    weight_decay: float = _option(DetectConfig, "weight_decay", "--weight-decay"),
    strict: bool = _option(DetectConfig, "strict", "--strict"),
    threshold: float = _option(DetectConfig, "threshold", "--threshold"),
    seed: int = _option(DetectConfig, "seed", "--seed"),
    num_workers: int = _option(DetectConfig, "num_workers", "--num-workers"),
    image_col: str | None = _option(DataConfig, "image_col", "--image-col"),
    label_col: str | None = _option(DataConfig, "label_col", "--label-col"),
    classes_file: str | None = _option(DataConfig, "classes_file", "--classes"),
    min_per_class: int = _option(DataConfig, "min_per_class", "--min-per-class"),
    on_bad_image: str = _option(DataConfig, "on_bad_image", "--on-bad-image"),
    max_image_pixels: int | None = _option(DataConfig, "max_image_pixels", "--max-image-pixels"),
) -> None:
    """Flag likely wrong labels with DeFT (dual text prompts + LoRA on a CLIP-style backbone)."""
    from deft_clean._render import print_detect_summary
    from deft_clean.detect import detect

    options = _given(locals(), DataConfig, BackboneConfig, DetectConfig)
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
def export_backbone_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write: config, weights, tokenizer.")],
    half: Annotated[bool, typer.Option("--half", help="Store the weights in fp16 (half the size).")] = False,
    model: str = _option(BackboneConfig, "model", "--model"),
    pretrained: str | None = _option(BackboneConfig, "pretrained", "--pretrained"),
    cache_dir: str | None = _option(BackboneConfig, "cache_dir", "--cache-dir"),
) -> None:
    """Save a backbone as a self-contained folder; load it anywhere with --pretrained local-dir:DIR.

    This is how air-gapped machines get a backbone: export it where the weights are (e.g. the offline
    backbone, which is NOT aligned like CLIP, or a CLIP tag you downloaded), copy the folder over.
    """
    from deft_clean._render import print_exported
    from deft_clean.backbone import export_backbone

    config = BackboneConfig(model=model, pretrained=pretrained, cache_dir=cache_dir)
    print_exported(export_backbone(config, out, half=half), model)


@app.command("finetune")
@_user_errors
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
    clean_only: bool = _option(FinetuneConfig, "clean_only", "--clean-only"),
    relabel: bool = _option(FinetuneConfig, "relabel", "--relabel"),
    relabel_threshold: float = _option(FinetuneConfig, "relabel_threshold", "--relabel-threshold"),
    method: str = _option(FinetuneConfig, "method", "--method"),
    tune: str = _option(FinetuneConfig, "tune", "--tune"),
    templates: str = _option(FinetuneConfig, "templates", "--templates"),
    tau: float = _option(FinetuneConfig, "tau", "--tau"),
    lambda_t: float = _option(FinetuneConfig, "lambda_t", "--lambda-t"),
    lambda_v: float = _option(FinetuneConfig, "lambda_v", "--lambda-v"),
    epochs: int = _option(FinetuneConfig, "epochs", "--epochs"),
    batch_size: int = _option(FinetuneConfig, "batch_size", "--batch-size"),
    lr: float = _option(FinetuneConfig, "lr", "--lr"),
    momentum: float = _option(FinetuneConfig, "momentum", "--momentum"),
    weight_decay: float = _option(FinetuneConfig, "weight_decay", "--weight-decay"),
    seed: int = _option(FinetuneConfig, "seed", "--seed"),
    lora_rank: int = _option(FinetuneConfig, "lora_rank", "--lora-rank"),
    lora_alpha: float = _option(FinetuneConfig, "lora_alpha", "--lora-alpha"),
    num_workers: int = _option(FinetuneConfig, "num_workers", "--num-workers"),
    model: Annotated[
        str | None, typer.Option("--model", help="Backbone (default: the one in --flags, else 'offline').")
    ] = None,
    pretrained: str | None = _option(BackboneConfig, "pretrained", "--pretrained"),
    device: str = _option(BackboneConfig, "device", "--device"),
    cache_dir: str | None = _option(BackboneConfig, "cache_dir", "--cache-dir"),
    image_col: str | None = _option(DataConfig, "image_col", "--image-col"),
    label_col: str | None = _option(DataConfig, "label_col", "--label-col"),
    classes_file: str | None = _option(DataConfig, "classes_file", "--classes"),
    min_per_class: int = _option(DataConfig, "min_per_class", "--min-per-class"),
    on_bad_image: str = _option(DataConfig, "on_bad_image", "--on-bad-image"),
    max_image_pixels: int | None = _option(DataConfig, "max_image_pixels", "--max-image-pixels"),
) -> None:
    """Fine-tune a classifier (TeS or CE) on the rows a flags file marks clean, or on every row."""
    from deft_clean._render import print_finetune_summary
    from deft_clean.finetune import finetune

    options = _given(locals(), DataConfig, BackboneConfig, FinetuneConfig)
    result = finetune(
        data_dir, labels_csv, flags=flags, out=out, test_dir=test_dir, test_csv=test_csv,
        reporter=RichReporter(), **options,
    )  # fmt: skip
    print_finetune_summary(result)


@app.command("predict")
@_user_errors
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
    image_col: str | None = _option(DataConfig, "image_col", "--image-col"),
    label_col: str | None = _option(DataConfig, "label_col", "--label-col"),
) -> None:
    """Predict class probabilities for a folder of images with a fine-tuned classifier."""
    from deft_clean._render import print_predict_summary
    from deft_clean.classifier import predict

    data_config = DataConfig(image_col=image_col, label_col=label_col, min_per_class=0)
    frame = predict(
        model_dir, data_dir, labels_csv, out=out, data_config=data_config, batch_size=batch_size,
        device=device, reporter=RichReporter(),
    )  # fmt: skip
    print_predict_summary(frame, out)


@app.command("embed")
@_user_errors
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
    model: str = _option(BackboneConfig, "model", "--model"),
    pretrained: str | None = _option(BackboneConfig, "pretrained", "--pretrained"),
    device: str = _option(BackboneConfig, "device", "--device"),
    image_col: str | None = _option(DataConfig, "image_col", "--image-col"),
    label_col: str | None = _option(DataConfig, "label_col", "--label-col"),
    classes_file: str | None = _option(DataConfig, "classes_file", "--classes"),
) -> None:
    """Write frozen, L2-normalised features of every image (un-augmented) to a .npy file."""
    from deft_clean.embed import embed

    options = _given(locals(), DataConfig, BackboneConfig)
    reporter = RichReporter()
    features = embed(
        data_dir, labels_csv, out=out, pooled=pooled, batch_size=batch_size, reporter=reporter, **options
    )
    typer.echo(f"wrote {features.shape[0]} x {features.shape[1]} features to {out}")
