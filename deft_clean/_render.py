"""Everything the terminal shows: the only module that imports rich."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
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

from deft_clean.distributed import is_main
from deft_clean.errors import DataError, DeftCleanError

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from deft_clean.data import Manifest
    from deft_clean.finetune import FinetuneResult
    from deft_clean.summary import DetectResult

console = Console(stderr=True, quiet=not is_main())  # under torchrun only the main process prints


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
        cells = (p.path or "", p.message, p.fix or "")
        table.add_row("" if p.row is None else str(p.row), *(escape(c) for c in cells))
    console.print(table)
    print_error(error)


def print_error(error: DeftCleanError) -> None:
    """One line for the user: the message, then the hint."""
    console.print(f"[bold red]error:[/bold red] {escape(error.message)}")
    if error.hint:
        console.print(f"[yellow]hint:[/yellow] {escape(error.hint)}")


def _count(n: int, noun: str) -> str:
    """'1 class', '2 classes', '1 row', '0 rows'."""
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{n} {noun if n == 1 else plural}"


def print_interrupted() -> None:
    """Ctrl-C: one line (no traceback); outputs are written atomically, so nothing partial is left."""
    console.print(
        "[bold red]interrupted:[/bold red] stopped by Ctrl-C; no output was written (detect keeps a "
        "checkpoint of its last finished epoch: run it again with --resume to continue)."
    )


def print_backbones(rows: list[dict[str, Any]]) -> None:
    """``deft-clean backbones``: the registry as a table on stdout."""
    table = Table(title="Backbones (any name from open_clip.list_models() works too)")
    for column in ("name", "kind", "image size", "aligned", "LoRA targets (image tower)"):
        table.add_column(column, no_wrap=True)
    table.add_column("notes")
    for row in rows:
        aligned = "yes" if row["aligned"] else "[bold red]NO[/bold red]"
        cells = (row["name"], row["kind"], str(row["image_size"]), aligned, row["lora_targets"], row["notes"])
        table.add_row(*cells)
    Console(width=max(Console().width, 160)).print(table)


def print_exported(path: Path, model: str | None) -> None:
    """``deft-clean export-backbone`` closing line: the folder, its size, how to load it back."""
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    console.print(f"[bold green]exported:[/bold green] {path} ({size:.0f} MB)")
    console.print(f"load it with: --model {model} --pretrained local-dir:{path}")


def print_manifest_summary(manifest: Manifest, max_classes: int = 40) -> None:
    """``deft-clean check`` output: images per class (the smallest ones when there are many), a summary."""
    readable = manifest.readable
    counts = [int(((manifest.labels == k) & readable).sum()) for k in range(len(manifest.class_ids))]
    skipped = [int(((manifest.labels == k) & ~readable).sum()) for k in range(len(manifest.class_ids))]
    order = list(range(len(counts)))
    if len(order) > max_classes:
        order = sorted(order, key=lambda k: counts[k])[:max_classes]
    caption = f"the {len(order)} smallest of {len(counts)} classes" if len(order) < len(counts) else None
    table = Table(title="Images per class", caption=caption)
    table.add_column("class id")
    table.add_column("name")
    table.add_column("images", justify="right")
    table.add_column("unreadable (skipped)", justify="right")
    for k in order:
        table.add_row(manifest.class_ids[k], manifest.class_names[k], str(counts[k]), str(skipped[k] or ""))
    console.print(table)
    console.print(
        f"[bold green]ok:[/bold green] {_count(len(manifest), 'row')}, {_count(len(counts), 'class')}, "
        f"{sum(skipped)} unreadable skipped (kept as status=unreadable); all checks passed."
    )


def print_finetune_summary(result: FinetuneResult) -> None:
    """``deft-clean finetune`` closing lines: rows used, test accuracy (worst classes), where it was saved."""
    console.print(
        f"[bold green]trained:[/bold green] {result.n_train} rows "
        f"({result.n_dropped} flagged rows dropped, {result.n_relabelled} relabelled)."
    )
    if result.metrics is not None:
        metrics = result.metrics
        worst = sorted((v, k) for k, v in metrics["per_class_accuracy"].items() if v is not None)[:5]
        listed = ", ".join(f"{k} {v:.1%}" for v, k in worst)
        console.print(
            f"test accuracy {metrics['accuracy']:.2%} on {metrics['n']} images; lowest classes: {listed}"
        )
    if result.out_dir is not None:
        console.print(f"saved to {result.out_dir} (load with deft_clean.load_classifier)")


def print_predict_summary(frame: pd.DataFrame, out: Path) -> None:
    """``deft-clean predict`` closing line: rows, agreement with any given labels, the output file."""
    ok = frame["status"] == "ok"
    labelled = ok & frame["given_label"].notna()
    agree = ""
    if labelled.any():
        share = (frame["predicted_label"] == frame["given_label"])[labelled].mean()
        agree = f"{share:.1%} agree with the given labels; "
    console.print(f"[bold green]predicted:[/bold green] {int(ok.sum())} images; {agree}written to {out}")


def print_detect_summary(result: DetectResult, max_classes: int = 30) -> None:
    """``deft-clean detect`` closing summary: flagged share per class, time, throughput, truth metrics."""
    summary = result.summary
    classes = sorted(summary.classes, key=lambda c: -c.noise_rate)
    shown = classes[:max_classes]
    caption = f"the {len(shown)} noisiest of {len(classes)} classes" if len(shown) < len(classes) else None
    table = Table(title="Flagged labels per class (given label)", caption=caption)
    for column, justify in (("class", "left"), ("images", "right"), ("flagged", "right"), ("rate", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for c in shown:
        table.add_row(escape(str(c.name)), str(c.n), str(c.flagged), f"{c.noise_rate:.1%}")
    console.print(table)
    timings = summary.timings
    console.print(
        f"[bold green]flagged:[/bold green] {summary.n_flagged} of {summary.n_scored} images "
        f"({summary.flagged_fraction:.1%}); {summary.n_unreadable} unreadable. "
        f"Time {timings.total_s:.1f}s (data and backbone {timings.prepare_s:.1f}s, features "
        f"{timings.features_s:.1f}s, training {timings.train_s:.1f}s at "
        f"{summary.images_per_s:,.0f} img/s on {summary.device})."
    )
    truth = summary.truth
    if truth is not None:
        console.print(
            f"vs --truth ({truth['n']} rows): caught {truth['n_caught']} of the {truth['n_wrong']} wrong "
            f"labels; precision {truth['precision']:.3f}, recall {truth['recall']:.3f}, F1 {truth['f1']:.3f}"
        )
    console.print(f"results: {escape(str(result.out))} (noise_rank 1 = most likely wrong)")


def print_report(report: Any) -> None:
    """``deft-clean report``: where the page is, its size, and how much of the flagged set it shows."""
    hidden = report.n_flagged - report.n_shown
    missing = f"; {report.n_missing_images} images not found" if report.n_missing_images else ""
    console.print(
        f"[bold green]report:[/bold green] {escape(str(report.path))} ({report.size_bytes / 1e6:.1f} MB, "
        f"{report.seconds:.1f} s): {report.n_shown:,} of {report.n_flagged:,} flagged images shown"
        + (f", {hidden:,} not shown (--max-tiles)" if hidden else "")
        + f"{missing}. Open it in a browser; it needs no network."
    )


def print_export(summary: Any, config: Any) -> None:
    """``deft-clean export``: the files written and what was accepted or left for review."""
    files = ", ".join(escape(str(f)) for f in summary.files)
    if config.to == "csv":
        console.print(
            f"[bold green]corrected:[/bold green] {summary.n_changed:,} of {summary.n_flagged:,} flagged "
            f"rows relabelled (predicted_prob >= {config.accept_above}); {summary.n_for_review:,} left in "
            f"review.csv; the other {summary.n_rows - summary.n_flagged:,} rows unchanged. Wrote {files}."
        )
    else:
        console.print(
            f"[bold green]label studio:[/bold green] {summary.n_for_review:,} tasks (the flagged rows, most "
            f"likely wrong first). Wrote {files}: create a project with the config, import the tasks."
        )


def print_imported(summary: Any) -> None:
    """``deft-clean import-review``: how many decisions were applied and how many labels they changed."""
    console.print(
        f"[bold green]applied:[/bold green] {summary.n_flagged:,} reviewed tasks, {summary.n_changed:,} "
        f"labels changed; the other rows of the {summary.n_rows:,} unchanged. "
        f"Wrote {escape(str(summary.files[0]))}."
    )
