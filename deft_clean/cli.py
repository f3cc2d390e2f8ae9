"""The `deft-clean` command line. Each command: options → config objects → one API call → render.

No logic lives here: options, defaults and rules come from the `deft_clean.config` dataclasses (the
CLI builds them, they validate themselves), errors are `DeftCleanError`s mapped to one line and exit
code 1 (data problems: a table, then exit 2; an output that cannot or must not be written: exit 2;
Ctrl-C: one line, exit 130).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from deft_clean._render import (
    RichReporter,
    print_backbones,
    print_detect_summary,
    print_export,
    print_exported,
    print_finetune_summary,
    print_imported,
    print_manifest_summary,
    print_predict_summary,
    print_report,
)
from deft_clean.backbone import list_backbones
from deft_clean.backbone_export import export_backbone
from deft_clean.classifier import predict
from deft_clean.cli_options import CHECK_FIELDS, FlagsFile, Overwrite, Resume, config_options, user_errors
from deft_clean.config import (
    BackboneConfig,
    DataConfig,
    DetectConfig,
    ExportConfig,
    FinetuneConfig,
    ReportConfig,
    resolve_backbone,
)
from deft_clean.detect import detect
from deft_clean.embed import embed
from deft_clean.export import export_labels, import_review
from deft_clean.finetune import finetune
from deft_clean.preflight import check_dataset
from deft_clean.report import build_report
from deft_clean.version import __version__

app = typer.Typer(
    name="deft-clean",
    help="Find wrong labels in image datasets (DeFT) and train on what is left (TeS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


@app.command()
@user_errors
@config_options(DataConfig, BackboneConfig, DetectConfig, only=CHECK_FIELDS)
def check(
    data_dir: Annotated[Path, typer.Argument(help="Folder with the images.", show_default=False)],
    labels_csv: Annotated[
        Path | None,
        typer.Argument(help="CSV: image path + label (omit: ImageFolder).", show_default=False),
    ] = None,
    *,
    data_config: DataConfig,
    backbone_config: BackboneConfig,
    detect_config: DetectConfig,
) -> None:
    """Validate a labelled image set (every image is decoded) and count images per class; no training.

    Runs every check `detect` runs before training, for the --model and --n-ctx given.
    """
    manifest = check_dataset(
        data_dir, labels_csv, data=data_config, backbone=backbone_config, detect=detect_config,
        reporter=RichReporter(),
    )  # fmt: skip
    print_manifest_summary(manifest)


@app.command("detect")
@user_errors
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
    report: Annotated[
        bool, typer.Option("--report", help="Also write the HTML report beside the results (`report`).")
    ] = False,
    overwrite: Overwrite = False,
    resume: Resume = False,
    *,
    data_config: DataConfig,
    backbone_config: BackboneConfig,
    detect_config: DetectConfig,
) -> None:
    """Flag likely wrong labels with DeFT (dual text prompts + LoRA on a CLIP-style backbone)."""
    result = detect(
        data_dir, labels_csv, data=data_config, backbone=backbone_config, detect=detect_config, out=out,
        truth_csv=truth, save_model=save_model, report=report, overwrite=overwrite, resume=resume,
        reporter=RichReporter(),
    )  # fmt: skip
    print_detect_summary(result)
    if result.report is not None:
        print_report(result.report)


@app.command("backbones")
@user_errors
def backbones_command() -> None:
    """List the built-in backbones: kind, image size, whether the towers are aligned, default LoRA targets."""
    print_backbones(list_backbones())


@app.command("export-backbone")
@user_errors
@config_options(BackboneConfig, only={"model", "pretrained", "cache_dir"})
def export_backbone_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write: config, weights, tokenizer.")],
    half: Annotated[bool, typer.Option("--half", help="Store the weights in fp16 (half the size).")] = False,
    overwrite: Overwrite = False,
    *,
    backbone_config: BackboneConfig,
) -> None:
    """Save a backbone as a self-contained folder; load it anywhere with --pretrained local-dir:DIR.

    This is how air-gapped machines get a backbone: export it where the weights are (e.g. the offline
    backbone, which is NOT aligned like CLIP, or a CLIP tag you downloaded), copy the folder over.
    """
    print_exported(
        export_backbone(backbone_config, out, half=half, overwrite=overwrite),
        resolve_backbone(backbone_config).model,
    )


@app.command("finetune")
@user_errors
@config_options(DataConfig, BackboneConfig, FinetuneConfig)
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
    overwrite: Overwrite = False,
    resume: Resume = False,
    *,
    data_config: DataConfig,
    backbone_config: BackboneConfig,
    finetune_config: FinetuneConfig,
) -> None:
    """Fine-tune a classifier (TeS or CE) on the rows a flags file marks clean, or on every row."""
    result = finetune(
        data_dir, labels_csv, data=data_config, backbone=backbone_config, finetune=finetune_config,
        flags=flags, out=out, test_dir=test_dir, test_csv=test_csv, overwrite=overwrite, resume=resume,
        reporter=RichReporter(),
    )  # fmt: skip
    print_finetune_summary(result)


@app.command("predict")
@user_errors
@config_options(
    DataConfig,
    only={"image_col", "label_col", "on_bad_image", "max_image_pixels", "follow_links", "delimiter"},
)
def predict_command(
    out: Annotated[Path, typer.Option("--out", help="Predictions Parquet (atomic write, with metadata).")],
    model_dir: Annotated[Path, typer.Argument(help="Folder written by `deft-clean finetune --out`.")],
    data_dir: Annotated[Path, typer.Argument(help="Folder with the images.", show_default=False)],
    labels_csv: Annotated[
        Path | None,
        typer.Argument(
            help="CSV: image path + label (omit: an ImageFolder, or a plain folder of unlabelled images).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 256,
    device: Annotated[
        str | None, typer.Option("--device", help="'cpu' or 'cuda[:N]' (default: as trained, 'auto').")
    ] = None,
    overwrite: Overwrite = False,
    *,
    data_config: DataConfig,
) -> None:
    """Predict class probabilities for a folder of images with a fine-tuned classifier."""
    frame = predict(
        model_dir, data_dir, labels_csv, data=data_config, out=out, batch_size=batch_size, device=device,
        overwrite=overwrite, reporter=RichReporter(),
    )  # fmt: skip
    print_predict_summary(frame, out)


@app.command("embed")
@user_errors
@config_options(
    DataConfig,
    BackboneConfig,
    only={
        "image_col",
        "label_col",
        "classes_file",
        "on_bad_image",
        "max_image_pixels",
        "follow_links",
        "delimiter",
        "model",
        "pretrained",
        "device",
    },  # fmt: skip
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
    overwrite: Overwrite = False,
    *,
    data_config: DataConfig,
    backbone_config: BackboneConfig,
) -> None:
    """Write frozen, L2-normalised features of every image (un-augmented) to a .npy file."""
    features = embed(
        data_dir, labels_csv, data=data_config, backbone=backbone_config, out=out, pooled=pooled,
        batch_size=batch_size, overwrite=overwrite, reporter=RichReporter(),
    )  # fmt: skip
    skipped = int(np.isnan(features[:, 0]).sum()) if len(features) else 0
    note = f" ({skipped} unreadable rows are NaN)" if skipped else ""
    typer.echo(f"wrote {features.shape[0]} x {features.shape[1]} features to {out}{note}")


def _report(flags: Path, **kwargs: Any) -> None:
    """Build the HTML report of ``flags`` with progress and say where it is."""
    print_report(build_report(flags, reporter=RichReporter(), **kwargs))


@app.command("report")
@user_errors
@config_options(ReportConfig)
def report_command(
    flags: FlagsFile,
    out: Annotated[
        Path | None, typer.Option("--out", help="HTML file (default: the results file with suffix .html).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Folder the image paths are under (default: detect's)."),
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option(
            "--truth", help="CSV path,label of verified labels: precision/recall/F1, missed labels."
        ),
    ] = None,
    overwrite: Overwrite = False,
    *,
    report_config: ReportConfig,
) -> None:
    """Write one self-contained HTML page: summary, per-class charts and a gallery of the flagged images."""
    _report(flags, out=out, data_dir=data_dir, truth_csv=truth, config=report_config, overwrite=overwrite)


@app.command("export")
@user_errors
@config_options(ExportConfig)
def export_command(
    flags: FlagsFile,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the files (default: the results file's folder).")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="csv: the labels CSV to correct (default: detect's).")
    ] = None,
    overwrite: Overwrite = False,
    *,
    export_config: ExportConfig,
) -> None:
    """Export the flags: a corrected labels CSV + review.csv, or Label Studio tasks to review them."""
    exported = export_labels(flags, out, labels_csv=labels, config=export_config, overwrite=overwrite)
    print_export(exported, export_config)


@app.command("import-review")
@user_errors
@config_options(DataConfig, only={"image_col", "label_col"})
def import_review_command(
    review: Annotated[
        Path, typer.Argument(help="Label Studio export (JSON or JSON-MIN).", show_default=False)
    ],
    labels_csv: Annotated[Path, typer.Argument(help="The labels CSV to apply it to.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Corrected labels CSV to write.")],
    overwrite: Overwrite = False,
    *,
    data_config: DataConfig,
) -> None:
    """Apply a reviewer's Label Studio decisions to a labels CSV; rows never reviewed stay as they were."""
    print_imported(
        import_review(
            review, labels_csv, out, image_col=data_config.image_col, label_col=data_config.label_col,
            overwrite=overwrite,
        )
    )  # fmt: skip
