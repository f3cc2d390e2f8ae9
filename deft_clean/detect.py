"""``detect()``: find wrong labels with DeFT, then score every image with the final model.

Reads top to bottom: load and validate the data → build the backbone → decode every image once →
train positive/negative prompts (+ the image-tower tuning) on the given, noisy labels → score all
readable images in a separate pass over the *un-augmented* images with the final model → write the
results file (one row per input row, input order) and, optionally, the learned detector.

Data path: the uint8 image cache is staged for the device by :class:`deft_clean.runtime.StagedImages`,
batches are drawn by index with seeded generators and augmented on the device; the loop never waits
on the device except once per epoch, to read the epoch's loss and timing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deft_clean.backbone import Backbone, input_size, load_backbone_on
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, resolve_backbone
from deft_clean.crossfit import IN_SAMPLE, EpochAverage, fold_plan, score_pass, verdict
from deft_clean.data import Manifest, load_labels, load_manifest
from deft_clean.deft_model import DeftModel, save_detector
from deft_clean.embed import stage
from deft_clean.errors import TrainingError
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.results import Scores, result_frame, run_metadata, write_results
from deft_clean.runtime import StagedImages, autocast, cosine_lr, cuda_autotune, feature_pass, seed_everything
from deft_clean.scoring import (
    clean_probability,
    complementary_labels,
    deft_loss,
    select_clean,
    training_failure,
)
from deft_clean.summary import DetectResult, run_summary

DEFAULT_OUT = "deft_results.parquet"


def detect(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    data: DataConfig = DataConfig(),
    backbone: BackboneConfig = BackboneConfig(),
    detect: DetectConfig = DetectConfig(),
    out: str | Path | None = None,
    truth_csv: str | Path | None = None,
    save_model: str | Path | None = None,
    reporter: Reporter = SilentReporter(),
) -> DetectResult:
    """Flag likely wrong labels in an image set; write the results (one row per input row) and return them.

    ``out`` defaults to ``<labels stem>.deft.parquet`` beside ``labels_csv``, or ``deft_results.parquet``
    in the working directory for an ImageFolder. ``truth_csv`` (path,label of verified labels for some
    or all rows) adds precision/recall/F1 of the flags to the summary. ``save_model`` writes the
    learned prompts and adapters (see :mod:`deft_clean.deft_model`). The result holds the table (its
    metadata in ``frame.attrs``, as :func:`deft_clean.results.read_results` returns it), the typed
    summary and the path written.
    """
    backbone = resolve_backbone(backbone)
    clock = {"start": time.perf_counter()}
    size = input_size(backbone)  # validation keeps the pixels it decodes at this size: one decode per image
    manifest = load_manifest(
        data_dir, labels_csv, config=data, image_size=size, num_workers=detect.num_workers, reporter=reporter
    )
    truth = load_labels(truth_csv, manifest, allow_missing=True) if truth_csv is not None else None
    seed_everything(detect.seed)
    built, device = load_backbone_on(backbone)
    config, choices = detect.resolved(cuda=device.type == "cuda", rows=int(manifest.readable.sum()))
    for note in [*built.notes, *choices]:
        reporter.log(note, level="warning" if note in built.notes else "info")
    rows = np.flatnonzero(manifest.readable)
    images = stage(manifest, built, device, rows=rows, num_workers=config.num_workers, reporter=reporter)
    samples = LabelledImages(images, manifest.labels[rows])
    clock["prepared"] = time.perf_counter()
    net = DeftModel(
        built, manifest.prompt_names(), config, generator=torch.Generator().manual_seed(config.seed)
    )
    with cuda_autotune(device, built.model.visual):
        trunk = trunk_cache(net, images, 2 * config.batch_size) if net.caches_features else None
        clock["features"] = time.perf_counter()  # the frozen-tower pass (``--peft none``), else ~0
        scores, history = fit_and_score(net, samples, config, trunk=trunk, reporter=reporter)
        clock["trained"] = clock["scored"] = time.perf_counter()  # scoring passes run inside training
    _refuse_failed_training(history, scores, samples, net, built, config)
    frame = result_frame(manifest, rows, scores)
    summary = run_summary(manifest, frame, history, clock, device, built, truth)
    configs = {"data": data, "backbone": backbone, "detect": config}
    metadata = run_metadata(manifest=manifest, configs=configs, extra={"detect": summary.to_dict()})
    out_path = Path(out) if out is not None else default_out(labels_csv)
    write_results(frame, out_path, metadata=metadata)
    if save_model is not None:
        _save(net, save_model, backbone, config, manifest)
    frame.attrs.update(metadata, out=str(out_path))
    return DetectResult(frame, summary, out_path)


def _refuse_failed_training(
    history: list[dict[str, float]],
    scores: Scores,
    samples: LabelledImages,
    net: DeftModel,
    backbone: Backbone,
    config: DetectConfig,
) -> None:
    """Raise TrainingError (nothing is written) when :func:`training_failure` finds a fold's model failed."""
    failure = None
    for fold in sorted({record["fold"] for record in history}):
        failure = failure or training_failure(
            [record for record in history if record["fold"] == fold],
            scores.predicted,
            samples.labels_np,
            num_classes=net.prompts.n_cls,
            collapse=not backbone.random_weights,
        )
    if failure is not None:
        raise TrainingError(
            f"DeFT training failed: {failure}. No results were written.",
            hint=f"Lower --adapter-lr and --lr (this run: {config.lr}) or --epochs, or use --peft none (a "
            "frozen image tower cannot collapse); with a larger --batch-size, raise --lr less than in "
            "proportion.",
        )


def _save(
    net: DeftModel, folder: str | Path, backbone: BackboneConfig, config: DetectConfig, manifest: Manifest
) -> None:
    save_detector(
        net,
        folder,
        backbone_config=backbone,
        detect_config=config,
        class_ids=manifest.class_ids,
        class_names=manifest.class_names,
    )


def default_out(labels_csv: str | Path | None) -> Path:
    """``<labels stem>.deft.parquet`` beside the CSV, or ``deft_results.parquet`` in the working directory."""
    if labels_csv is None:
        return Path(DEFAULT_OUT)
    labels_csv = Path(labels_csv)
    return labels_csv.with_name(f"{labels_csv.stem}.deft.parquet")


class LabelledImages:
    """The staged images of the readable rows and their given labels ``labels_np`` (N,), on the device too."""

    def __init__(self, images: StagedImages | _Subset, labels_np: np.ndarray) -> None:
        self.images, self.labels_np, self.device = images, labels_np, images.device
        self.labels = torch.from_numpy(labels_np).to(images.device)
        self.index = getattr(images, "index", np.arange(len(labels_np)))  # samples of the full set held here

    def __len__(self) -> int:
        return len(self.labels_np)

    def subset(self, index: np.ndarray) -> LabelledImages:
        """The samples ``index`` (M,) of this set (a view: nothing is copied or moved)."""
        return LabelledImages(_Subset(self.images, np.asarray(index)), self.labels_np[index])


class _Subset:
    """Some samples of a :class:`StagedImages`: sample ``i`` here is sample ``index[i]`` there."""

    def __init__(self, images: StagedImages | _Subset, index: np.ndarray) -> None:
        self.images, self.device = images, images.device
        self.index = getattr(images, "index", np.arange(len(images)))[index]
        self._local = torch.from_numpy(index)

    def __len__(self) -> int:
        return len(self._local)

    def images_at(
        self, index: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.images.images_at(self._local[index.cpu()], train=train, generator=generator)


def trunk_cache(net: DeftModel, images: StagedImages, batch_size: int) -> torch.Tensor:
    """(N, F) frozen-trunk features of the un-augmented images, computed once (``net.caches_features``)."""
    return feature_pass(net.trunk_features, images, batch_size=batch_size)


def _features(
    net: DeftModel,
    data: LabelledImages,
    index: torch.Tensor,
    trunk: torch.Tensor | None,
    *,
    train: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, E) normalised image features for ``index``: from the trunk cache, or images through the tower."""
    if trunk is not None:
        return net.image_features(trunk=trunk[index.to(trunk.device, non_blocking=True)])
    return net.image_features(data.images.images_at(index, train=train, generator=generator))


def train_detector(
    net: DeftModel,
    data: LabelledImages,
    config: DetectConfig,
    *,
    trunk: torch.Tensor | None = None,
    reporter: Reporter = SilentReporter(),
    after_epoch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Train prompts and tuning on the given labels; returns per-epoch dicts (loss, ce, neg, selected, img_s).

    Warm-up epochs: CE on every sample. Later epochs: CE on the samples the current model calls clean
    (in the same batch), pseudo-labels for the rest in the negative-prompt loss (:func:`deft_loss`).
    ``trunk``: features from :func:`trunk_cache` when the tower is frozen (computed here if not given).
    ``after_epoch(epoch)`` (0-based) runs after each epoch with the model in eval mode.
    """
    device, n = data.device, len(data)
    cpu_gen = torch.Generator().manual_seed(config.seed)
    dev_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    optimizer = torch.optim.SGD(
        net.param_groups(config), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if trunk is None and net.caches_features:
        trunk = trunk_cache(net, data.images, 2 * config.batch_size)
    steps = math.ceil(n / config.batch_size)
    history = []
    net.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=cpu_gen)
        totals = torch.zeros(4, device=device)  # sums of loss, ce, neg over samples; selected count
        started = time.perf_counter()
        with reporter.task(f"DeFT epoch {epoch + 1}/{config.epochs}", total=n):
            for step in range(steps):
                progress = epoch / config.epochs
                if config.lr_schedule == "step":
                    progress = (epoch * steps + step) / (config.epochs * steps)
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(group["peak_lr"], progress)
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                warm = epoch < config.warmup_epochs
                totals += _train_step(
                    net, data, index, trunk, optimizer, config, warm=warm, generator=dev_gen
                )
                if step < steps - 1:
                    reporter.advance(len(index))
            loss_sum, ce_sum, neg_sum, chosen = totals.tolist()  # the one device sync of the epoch
            seconds = time.perf_counter() - started
            record = {
                "epoch": epoch + 1,
                "loss": loss_sum / n,
                "ce": ce_sum / n,
                "neg": neg_sum / n,
                "selected_fraction": chosen / n,
                "seconds": seconds,
                "img_s": n / seconds if seconds > 0 else float("nan"),
            }
            reporter.advance(len(index), loss=record["loss"], img_s=record["img_s"])
        history.append(record)
        if after_epoch is not None:
            net.eval()
            after_epoch(epoch)
            net.train()
    net.eval()
    return history


def _train_step(
    net: DeftModel,
    data: LabelledImages,
    index: torch.Tensor,
    trunk: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    config: DetectConfig,
    *,
    warm: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """One SGD step on samples ``index`` (B,); returns (4,) on the device: B·loss, B·ce, B·neg, #selected."""
    labels = data.labels[index.to(data.device, non_blocking=True)]
    with autocast(data.device):
        s_pos, s_neg = net.similarities(_features(net, data, index, trunk, train=True, generator=generator))
    s_pos, s_neg = s_pos.float(), s_neg.float()  # (B, K) each
    selected = None
    if not warm:
        p_clean = clean_probability(s_pos.detach(), s_neg.detach())
        selected = select_clean(p_clean, labels, threshold=config.threshold, strict=config.strict)
    complementary = complementary_labels(labels, net.prompts.n_cls, generator)
    loss, ce, neg = deft_loss(s_pos, s_neg, labels, complementary, selected, balance=config.balances)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    count = torch.full((), float(len(index)), device=data.device)
    chosen = selected.sum().float() if selected is not None else count
    return torch.stack([loss.detach() * count, ce.detach() * count, neg.detach() * count, chosen])


def fit_and_score(
    net: DeftModel,
    samples: LabelledImages,
    config: DetectConfig,
    *,
    trunk: torch.Tensor | None = None,
    reporter: Reporter = SilentReporter(),
) -> tuple[Scores, list[dict[str, float]]]:
    """Train and score under ``config.scoring`` (:mod:`deft_clean.crossfit`): one model on every row, or
    one per fold restarted from the same weights, each scoring only rows it did not train on. Scores are
    averaged over each model's epochs after warm-up. Returns the scores and the per-epoch records (with
    the ``fold`` they belong to)."""
    folds = config.folds if config.scoring == "crossfit" else 1
    fold = fold_plan(samples.labels_np, folds, config.seed)
    initial = net.trainable_state()
    average = EpochAverage.empty(len(samples), net.prompts.n_cls)
    first_scored = min(config.warmup_epochs, config.epochs - 1)  # the last epoch at least
    history: list[dict[str, float]] = []
    for k in np.unique(fold):
        scored = np.flatnonzero(fold == k)
        train = np.arange(len(samples)) if k == IN_SAMPLE else np.flatnonzero(fold != k)
        net.restore(initial)
        part, target = EpochAverage.empty(len(scored), net.prompts.n_cls), samples.subset(scored)

        def after_epoch(epoch: int, part: EpochAverage = part, target: LabelledImages = target) -> None:
            if epoch >= first_scored:
                _score_into(net, target, _rows(trunk, target.index), part, 2 * config.batch_size)

        if k != IN_SAMPLE:
            reporter.log(
                f"Cross-fitting: fold {k + 1}/{folds} trains on {len(train)} rows, scores {len(scored)}."
            )
        records = train_detector(
            net,
            samples.subset(train),
            config,
            trunk=_rows(trunk, train),
            reporter=reporter,
            after_epoch=after_epoch,
        )
        history += [dict(record, fold=int(k)) for record in records]
        mean = part.mean()
        average.probs[scored], average.p_clean[scored], average.margin[scored] = (
            mean.probs,
            mean.p_clean,
            mean.margin,
        )
    return verdict(average, samples.labels_np, fold, config), history


def _rows(trunk: torch.Tensor | None, index: np.ndarray) -> torch.Tensor | None:
    return None if trunk is None else trunk[torch.from_numpy(index).to(trunk.device)]


def _score_into(
    net: DeftModel, data: LabelledImages, trunk: torch.Tensor | None, average: EpochAverage, batch: int
) -> None:
    """Add one un-augmented pass of ``net`` over ``data`` to ``average``."""

    def similarities(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return net.similarities(_features(net, data, index, trunk, train=False, generator=None))

    score_pass(similarities, len(data), data.labels, average, net.scale, batch)


def score_detector(
    net: DeftModel,
    data: LabelledImages,
    config: DetectConfig,
    *,
    trunk: torch.Tensor | None = None,
    reporter: Reporter = SilentReporter(),
) -> Scores:
    """Score every readable image once, un-augmented, with ``net`` as it is (e.g. a saved detector)."""
    net.eval()
    if trunk is None and net.caches_features:
        trunk = trunk_cache(net, data.images, 2 * config.batch_size)
    average = EpochAverage.empty(len(data), net.prompts.n_cls)
    with reporter.task("Scoring", total=len(data)):
        _score_into(net, data, trunk, average, 2 * config.batch_size)
        reporter.advance(len(data))
    return verdict(average, data.labels_np, np.full(len(data), IN_SAMPLE), config)
