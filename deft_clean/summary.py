"""What a detect run returns besides its table: a typed summary (counts, per-class noise rates, timings,
truth metrics), stored as the ``detect`` block of the results metadata and rendered by the CLI."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from deft_clean.backbone import Backbone
from deft_clean.data import Manifest
from deft_clean.report import Report
from deft_clean.scoring import flag_metrics


@dataclass(frozen=True)
class ClassSummary:
    """One class: readable images given this label, how many were flagged, their share."""

    id: str
    name: str
    n: int
    flagged: int
    noise_rate: float


@dataclass(frozen=True)
class Timings:
    """Seconds per phase: data and model preparation, the frozen or untuned feature pass, training, scoring,
    the whole run."""

    prepare_s: float
    features_s: float
    train_s: float
    score_s: float
    total_s: float


@dataclass(frozen=True)
class DetectSummary:
    """The facts of one detect run. ``epochs``: per-epoch records (loss, ce, neg, selected_fraction,
    seconds, img_s); ``truth``: :func:`deft_clean.scoring.flag_metrics` against ``--truth``, or None."""

    n_rows: int
    n_scored: int
    n_unreadable: int
    n_flagged: int
    flagged_fraction: float
    classes: list[ClassSummary]
    epochs: list[dict[str, float]]
    timings: Timings
    images_per_s: float
    device: str
    backbone: dict[str, Any]
    truth: dict[str, float | int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict, as stored under ``detect`` in the results metadata (no ``truth`` if None)."""
        values = dataclasses.asdict(self)
        if self.truth is None:
            del values["truth"]
        return values


@dataclass(frozen=True)
class DetectResult:
    """What ``detect()`` returns: the results table (as written, metadata in ``frame.attrs``), the
    summary, the file it was written to, and the HTML report when one was asked for (``report=True``)."""

    frame: pd.DataFrame
    summary: DetectSummary
    out: Path
    report: Report | None = None


def run_summary(
    manifest: Manifest,
    frame: pd.DataFrame,
    history: list[dict[str, float]],
    clock: dict[str, float],
    device: torch.device,
    backbone: Backbone,
    truth: np.ndarray | None,
) -> DetectSummary:
    """The summary of a run from its table, epoch history, phase clock and (optional) truth labels (N,)."""
    readable = manifest.readable
    flagged = frame["is_noisy"].fillna(False).to_numpy(dtype=bool)
    classes = []
    for k, (cid, name) in enumerate(zip(manifest.class_ids, manifest.class_names, strict=True)):
        in_class = readable & (manifest.labels == k)
        count, hits = int(in_class.sum()), int((flagged & in_class).sum())
        classes.append(ClassSummary(cid, name, count, hits, hits / max(count, 1)))
    timings = Timings(
        prepare_s=clock["prepared"] - clock["start"],
        features_s=clock["features"] - clock["prepared"],
        train_s=clock["trained"] - clock["features"],
        score_s=clock["scored"] - clock["trained"],
        total_s=time.perf_counter() - clock["start"],
    )
    metrics = None
    if truth is not None:
        known = readable & (truth >= 0)
        metrics = flag_metrics(flagged[known], (truth != manifest.labels)[known])
    return DetectSummary(
        n_rows=len(manifest),
        n_scored=int(readable.sum()),
        n_unreadable=int((~readable).sum()),
        n_flagged=int(flagged.sum()),
        flagged_fraction=float(flagged.sum() / max(int(readable.sum()), 1)),
        classes=classes,
        epochs=history,
        timings=timings,
        images_per_s=sum(h["img_s"] for h in history) / max(len(history), 1),
        device=str(device),
        backbone={"name": backbone.name, "aligned": backbone.aligned, "notes": list(backbone.notes)},
        truth=metrics,
    )
