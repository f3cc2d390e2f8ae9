"""The methods the harness compares, each run through deft-clean's public API on one shared backbone.

A method is a function ``(Context, NoisySet) -> list[Row]`` (one method may give several rows, e.g. the
fine-tuned GMM also reports its "prediction ≠ label" rule). Frozen features are computed once per
(dataset, backbone, tower output) and cached on disk next to the images, so the feature-based baselines
share one pass; the time and peak GPU memory of that pass are stored beside them and added to every
record that used it (``feature_s``), so images/s stays an end-to-end figure.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import torch

from benchmarks import baselines
from benchmarks.baselines import Detection
from benchmarks.datasets import Dataset, NoisySet
from deft_clean.config import BackboneConfig, DataConfig


@dataclass
class Row:
    """One result line: a method's detection (None when it could not run, with ``status`` saying why)."""

    method: str
    detection: Detection | None
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)  # feature_s, peak_gpu_mb, options...


@dataclass
class Context:
    """Everything the methods share for one dataset: the backbone (built lazily) and feature caches."""

    dataset: Dataset
    backbone_config: BackboneConfig
    seed: int = 0
    folds: int = 5
    knn_k: int | None = None  # None: chosen per run by baselines.choose_k
    batch_size: int = 256
    deft_options: dict[str, Any] = field(default_factory=dict)
    finetune_options: dict[str, Any] = field(default_factory=dict)
    _backbone: Any = None
    _manifest: Any = None
    _out_of_sample: dict[str, baselines.OutOfSample] = field(default_factory=dict)

    def data_config(self) -> DataConfig:
        return DataConfig(classes_file=str(self.dataset.classes_file))

    def backbone(self) -> Any:
        if self._backbone is None:
            from deft_clean.backbone import load_backbone_on

            self._backbone, _ = load_backbone_on(self.backbone_config)
        return self._backbone

    def manifest(self) -> Any:
        """The dataset read through deft-clean's loader with its TRUE labels (labels don't matter here)."""
        if self._manifest is None:
            from deft_clean.data import load_manifest

            truth = self.dataset.root / "truth.csv"
            self._manifest = load_manifest(self.dataset.root, truth, config=self.data_config())
        return self._manifest

    def features(self, *, pooled: bool = True) -> tuple[np.ndarray, dict[str, float]]:
        """Frozen features (N, D), cached, and what they cost ({'feature_s', 'feature_peak_gpu_mb'})."""
        bcfg = self.backbone_config
        key = hashlib.sha1(f"{bcfg.model}|{bcfg.pretrained}".encode()).hexdigest()[:8]
        stem = f"features-{slug(bcfg.model)}-{key}-{'pooled' if pooled else 'embed'}"
        npy, meta = self.dataset.root / f"{stem}.npy", self.dataset.root / f"{stem}.json"
        if npy.is_file() and meta.is_file():
            return np.load(npy), json.loads(meta.read_text())
        from deft_clean.embed import embed_images

        backbone = self.backbone()  # built outside the timed pass
        with _measure() as cost:
            features = embed_images(self.manifest(), backbone, batch_size=self.batch_size, pooled=pooled)
        np.save(npy, features)
        summary = {"feature_s": cost["wall_s"], "feature_peak_gpu_mb": cost["peak_gpu_mb"]}
        meta.write_text(json.dumps(summary))
        return features, summary

    def out_of_sample(self, noisy: NoisySet) -> baselines.OutOfSample:
        """Cross-validated probe probabilities on the noisy labels, fitted once per noise setting and
        shared by cleanlab and small-loss (their time is recorded by whichever runs first)."""
        if noisy.noise not in self._out_of_sample:
            features, _ = self.features()
            self._out_of_sample[noisy.noise] = baselines.cross_val_probs(
                features, noisy.given, n_classes=len(self.dataset.class_ids), folds=self.folds, seed=self.seed
            )
        return self._out_of_sample[noisy.noise]


class PhaseLog:
    """A progress reporter for unattended runs (a GPU lease, a background job): one line per finished
    phase (checking and decoding the images, a feature pass, each training epoch) with its wall time and
    rate, flushed at once, so the log of a run killed at a time limit still says how far it got and how
    fast it went. Work between phases (detect's scoring after each epoch) shows in the clock times."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._done: list[int] = []  # units done, one entry per open (possibly nested) phase

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[None]:
        self._done.append(0)
        start = time.perf_counter()
        ended = "in"
        try:
            yield
        except BaseException:
            ended = "interrupted after"
            raise
        finally:
            seconds, done = time.perf_counter() - start, self._done.pop()
            rate = done / max(seconds, 1e-9)
            self._line(f"{description}: {done:,} {ended} {seconds:.1f} s ({rate:,.0f}/s)")

    def advance(self, n: int = 1, **fields: float) -> None:
        if self._done:
            self._done[-1] += n

    def log(self, message: str, level: str = "info") -> None:
        self._line(f"{level}: {message}")

    def _line(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=self.stream, flush=True)


def slug(text: str | None) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


class _measure:
    """Context manager filling a dict with wall seconds and peak CUDA memory (MB; None off CUDA)."""

    def __enter__(self) -> dict[str, Any]:
        self.result: dict[str, Any] = {}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self.result

    def __exit__(self, *exc: object) -> None:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        self.result["wall_s"] = time.perf_counter() - self.start
        self.result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def measure() -> _measure:
    """``with measure() as cost: ...`` → ``cost['wall_s']``, ``cost['peak_gpu_mb']``."""
    return _measure()


def run_cleanlab(ctx: Context, noisy: NoisySet) -> list[Row]:
    _, cost = ctx.features()
    oos = ctx.out_of_sample(noisy)
    extra = dict(cost, folds=ctx.folds, chosen_c=oos.chosen_c)
    return [Row("cleanlab", baselines.cleanlab_baseline(oos.probs, noisy.given), extra=extra)]


def run_knn(ctx: Context, noisy: NoisySet) -> list[Row]:
    features, cost = ctx.features()
    detection, k = baselines.knn_baseline(features, noisy.given, k=ctx.knn_k)
    return [Row("knn", detection, extra=dict(cost, k=k, k_chosen=ctx.knn_k is None))]


def run_small_loss(ctx: Context, noisy: NoisySet) -> list[Row]:
    _, cost = ctx.features()
    oos = ctx.out_of_sample(noisy)
    rate = float(noisy.truth.mean())
    det = baselines.small_loss_baseline(oos.probs, noisy.given, rate=rate)
    return [
        Row("small-loss", det, extra=dict(cost, oracle_rate=rate, folds=ctx.folds, chosen_c=oos.chosen_c))
    ]


def run_zero_shot(ctx: Context, noisy: NoisySet) -> list[Row]:
    backbone = ctx.backbone()
    if not getattr(backbone, "aligned", False):
        return [Row("zero-shot", None, status="not aligned")]
    from deft_clean.finetune import text_classifier

    features, cost = ctx.features(pooled=False)
    texts = text_classifier(backbone, ctx.manifest().prompt_names(), "a photo of a {}.").float().cpu().numpy()
    probs = baselines.zero_shot_probs(features, texts)
    return [Row("zero-shot", baselines.mismatch_baseline(probs, noisy.given), extra=cost)]


def run_gmm(ctx: Context, noisy: NoisySet) -> list[Row]:
    """Fine-tune the image tower with plain CE on the noisy labels (``deft_clean.finetune``), then split the
    un-augmented per-sample losses with a two-component GMM; also report "prediction ≠ label"."""
    from deft_clean.config import FinetuneConfig
    from deft_clean.finetune import finetune

    options = {"method": "ce", "tune": "full", "epochs": 4, "lr": 0.05, "batch_size": 256, "seed": ctx.seed}
    options.update(ctx.finetune_options)
    bcfg = ctx.backbone_config
    result = finetune(
        ctx.dataset.root,
        noisy.labels_csv,
        data=ctx.data_config(),
        backbone=bcfg,
        finetune=FinetuneConfig(**options),
    )
    images = ctx.manifest().decode(result.classifier.image_size)
    probs_np = result.classifier.predict_images(images, batch_size=256).astype(np.float64)  # (N, K)
    losses = -np.log(np.clip(probs_np[np.arange(len(noisy.given)), noisy.given], 1e-12, None))
    extra = {"finetune_options": options}
    return [
        Row("ce-gmm", baselines.gmm_baseline(losses, seed=ctx.seed), extra=extra),
        Row("ce-mismatch", baselines.mismatch_baseline(probs_np, noisy.given), extra=extra),
    ]


def call_detect(
    data_dir: Path,
    labels_csv: Path,
    *,
    out: Path,
    backbone: BackboneConfig,
    classes_file: Path,
    options: dict[str, Any],
) -> pd.DataFrame:
    """The harness's one call into ``deft_clean.detect`` (``run_deft`` and ``finetune_compare`` both use
    it): the shared backbone, the dataset's classes and a ``--deft-opts`` dict become its arguments."""
    from deft_clean.config import DataConfig, DetectConfig
    from deft_clean.detect import detect

    data = DataConfig(classes_file=str(classes_file))
    # overwrite: a rerun of the same method replaces its cached flags
    return detect(
        data_dir,
        labels_csv,
        out=out,
        overwrite=True,
        data=data,
        backbone=backbone,
        detect=DetectConfig(**options),
        reporter=PhaseLog(),
    ).frame


def run_deft(ctx: Context, noisy: NoisySet) -> list[Row]:
    """``deft_clean.detect`` with the harness's backbone and ``--deft-opts``: is_noisy and noise_rank."""
    options = {"seed": ctx.seed, **ctx.deft_options}
    # Kept beside the materialised dataset (the cache, not the results): other rules and thresholds
    # can be read from the same run later, and finetune_compare can reuse it (--flags).
    tag = slug(",".join(f"{k}={v}" for k, v in sorted(ctx.deft_options.items())) or "defaults")
    model = slug(ctx.backbone_config.model)
    out = ctx.dataset.root / "deft-flags" / f"{noisy.labels_csv.stem}_{model}_{tag}.parquet"
    frame = call_detect(
        ctx.dataset.root,
        noisy.labels_csv,
        out=out,
        backbone=ctx.backbone_config,
        classes_file=ctx.dataset.classes_file,
        options=options,
    )
    if "path" in frame.columns:  # align on path in case the tool reorders rows
        frame = frame.set_index("path").loc[list(ctx.dataset.paths)].reset_index()
    flags = frame["is_noisy"].to_numpy(dtype=bool)
    scores = -frame["noise_rank"].to_numpy(
        dtype=np.float64
    )  # the product's own ranking (rank 1 = most wrong)
    # The same run, read with the classifier rule instead of the dual-prompt one: flag when the positive
    # prompts' prediction differs from the given label (the ranking is unchanged).
    mismatch = (frame["predicted_label"].astype(str) != frame["given_label"].astype(str)).to_numpy()
    extra = {"deft_options": options}
    return [
        Row("deft", Detection(flags, scores), extra=extra),
        Row("deft-mismatch", Detection(mismatch, scores), extra=extra),
    ]


METHODS: dict[str, Callable[[Context, NoisySet], list[Row]]] = {
    "deft": run_deft,
    "cleanlab": run_cleanlab,
    "knn": run_knn,
    "small-loss": run_small_loss,
    "gmm": run_gmm,
    "zero-shot": run_zero_shot,
}
