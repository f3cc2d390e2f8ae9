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
from pathlib import Path

import numpy as np
import torch

from deft_clean.backbone import Backbone, input_size, load_backbone_on
from deft_clean.checkpoint import Checkpoint, checkpoint_path
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, resolve_backbone, to_dict
from deft_clean.data import Manifest, load_labels, load_manifest
from deft_clean.deft_model import DeftModel, save_detector
from deft_clean.embed import stage
from deft_clean.errors import TrainingError
from deft_clean.files import check_output, refuse_input, releases_outputs
from deft_clean.preflight import refuse_unfit
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
from deft_clean.text_sampling import step_classes, to_local

DEFAULT_OUT = "deft_results.parquet"


@releases_outputs
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
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter = SilentReporter(),
) -> DetectResult:
    """Flag likely wrong labels in an image set; write the results (one row per input row) and return them.

    ``out`` defaults to ``<labels stem>.deft.parquet`` beside ``labels_csv``, or ``deft_results.parquet``
    in the working directory for an ImageFolder. ``truth_csv`` (path,label of verified labels for some
    or all rows) adds precision/recall/F1 of the flags to the summary. ``save_model`` writes the
    learned prompts and adapters (see :mod:`deft_clean.deft_model`). The result holds the table (its
    metadata in ``frame.attrs``, as :func:`deft_clean.results.read_results` returns it), the typed
    summary and the path written. Outputs are checked before any work (:func:`check_output`): an existing
    one is refused unless ``overwrite``, an input always. Each epoch ends with a checkpoint beside ``out``
    (:mod:`deft_clean.checkpoint`); ``resume`` continues a killed run from it to the same result.
    """
    config, backbone = detect, resolve_backbone(backbone)
    clock = {"start": time.perf_counter()}
    out_path = _check_outputs(data_dir, labels_csv, data, out, truth_csv, save_model, overwrite)
    size = input_size(backbone)  # validation keeps the pixels it decodes at this size: one decode per image
    manifest = load_manifest(
        data_dir, labels_csv, config=data, image_size=size, num_workers=config.num_workers, reporter=reporter
    )
    refuse_input(out_path, manifest.files(), what="an image")
    refuse_unfit(manifest, backbone, config, source=str(labels_csv or data_dir))
    truth = load_labels(truth_csv, manifest, allow_missing=True) if truth_csv is not None else None
    seed_everything(config.seed)
    built, device = load_backbone_on(backbone)
    for note in built.notes:
        reporter.log(note, level="warning")
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
        key = {"configs": [to_dict(c) for c in (data, backbone, config)], "input": manifest.fingerprint}
        checkpoint = Checkpoint(checkpoint_path(out_path), key, resume=resume, reporter=reporter)
        history = train_detector(net, samples, config, trunk=trunk, reporter=reporter, checkpoint=checkpoint)
        clock["trained"] = time.perf_counter()
        scores = score_detector(net, samples, config, trunk=trunk, reporter=reporter)
        clock["scored"] = time.perf_counter()
    _refuse_failed_training(history, scores, samples, net, built, config)
    frame = result_frame(manifest, rows, scores)
    summary = run_summary(manifest, frame, history, clock, device, built, truth)
    configs = {"data": data, "backbone": backbone, "detect": config}
    metadata = run_metadata(manifest=manifest, configs=configs, extra={"detect": summary.to_dict()})
    write_results(frame, out_path, metadata=metadata)
    checkpoint.remove()
    if save_model is not None:
        _save(net, save_model, backbone, config, manifest)
    frame.attrs.update(metadata, out=str(out_path))
    return DetectResult(frame, summary, out_path)


def _check_outputs(
    data_dir: str | Path,
    labels_csv: str | Path | None,
    data: DataConfig,
    out: str | Path | None,
    truth_csv: str | Path | None,
    save_model: str | Path | None,
    overwrite: bool,
) -> Path:
    """The results path, after :func:`check_output` accepted it and ``save_model`` (sized from the CSV)."""
    inputs = [data_dir, labels_csv, truth_csv, data.classes_file]
    table_bytes = (
        Path(labels_csv).stat().st_size if labels_csv is not None and Path(labels_csv).is_file() else 0
    )
    out_path = check_output(
        out if out is not None else default_out(labels_csv), inputs=inputs, overwrite=overwrite,
        estimated_bytes=2 * table_bytes,
    )  # fmt: skip
    if save_model is not None:
        check_output(
            save_model, inputs=[*inputs, out_path], overwrite=overwrite, kind="folder", option="--save-model"
        )
    return out_path


def _refuse_failed_training(
    history: list[dict[str, float]],
    scores: Scores,
    samples: LabelledImages,
    net: DeftModel,
    backbone: Backbone,
    config: DetectConfig,
) -> None:
    """Raise TrainingError (nothing is written) when :func:`training_failure` finds a failed model."""
    failure = training_failure(
        history,
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

    def __init__(self, images: StagedImages, labels_np: np.ndarray) -> None:
        self.images, self.labels_np, self.device = images, labels_np, images.device
        self.labels = torch.from_numpy(labels_np).to(images.device)

    def __len__(self) -> int:
        return len(self.labels_np)


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
    checkpoint: Checkpoint | None = None,
) -> list[dict[str, float]]:
    """Train prompts and tuning on the given labels; returns per-epoch dicts (loss, ce, neg, selected, img_s).

    Warm-up epochs: CE on every sample. Later epochs: CE on the samples the current model calls clean
    (in the same batch), pseudo-labels for the rest in the negative-prompt loss (:func:`deft_loss`).
    ``trunk``: features from :func:`trunk_cache` when the tower is frozen (computed here if not given).
    ``checkpoint``: saved after every epoch, and the epochs it holds are skipped when resuming.
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
    generators = [cpu_gen, dev_gen]
    start, history = checkpoint.restore(net, optimizer, generators) if checkpoint else (0, [])
    net.train()
    for epoch in range(start, config.epochs):
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
        if checkpoint is not None:
            checkpoint.save(epoch + 1, history, net, optimizer, generators)
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
        features = _features(net, data, index, trunk, train=True, generator=generator)
    complementary = complementary_labels(labels, net.prompts.n_cls, generator)
    # Many classes: encode only those the loss needs plus a sample (labels become columns of s±).
    classes = step_classes(labels, complementary, net.prompts.n_cls, config.text_classes, generator)
    if classes is not None:
        labels, complementary = to_local(classes, net.prompts.n_cls, labels, complementary)
    with autocast(data.device):
        s_pos, s_neg = net.similarities(features, net.prompts(classes))
    s_pos, s_neg = s_pos.float(), s_neg.float()  # (B, C) each; C = K without sampling
    selected = None
    if not warm:
        p_clean = clean_probability(s_pos.detach(), s_neg.detach())
        selected = select_clean(p_clean, labels, threshold=config.threshold, strict=config.strict)
    loss, ce, neg = deft_loss(s_pos, s_neg, labels, complementary, selected, balance=config.balances)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    count = torch.full((), float(len(index)), device=data.device)
    chosen = selected.sum().float() if selected is not None else count
    return torch.stack([loss.detach() * count, ce.detach() * count, neg.detach() * count, chosen])


@torch.no_grad()
def score_detector(
    net: DeftModel,
    data: LabelledImages,
    config: DetectConfig,
    *,
    trunk: torch.Tensor | None = None,
    reporter: Reporter = SilentReporter(),
) -> Scores:
    """Score every readable image once, un-augmented, with the final model (no training, no selection).

    Flags follow ``config.flag_rule``: the clean rule of training (``dual``), or that rule OR the positive
    prompts' prediction differing from the given label (``either``); scores and ranks are the same.
    """
    net.eval()
    if trunk is None and net.caches_features:
        trunk = trunk_cache(net, data.images, 2 * config.batch_size)
    parts: list[torch.Tensor] = []
    batch = 2 * config.batch_size
    with autocast(data.device):
        text = net.prompts.encode_all()  # (K, E) each, once: the prompts do not change while scoring
    with reporter.task("Scoring", total=len(data)):
        for start in range(0, len(data), batch):
            index = torch.arange(start, min(start + batch, len(data)))
            labels = data.labels[index.to(data.device)]
            with autocast(data.device):
                s_pos, s_neg = net.similarities(
                    _features(net, data, index, trunk, train=False, generator=None), text
                )
            s_pos, s_neg = s_pos.float(), s_neg.float()
            p_all = clean_probability(s_pos, s_neg)  # (B, K)
            rows = torch.arange(len(index), device=data.device)
            clean = select_clean(p_all, labels, threshold=config.threshold, strict=config.strict)
            margin = (s_pos - s_neg)[rows, labels] / net.scale
            prob, predicted = torch.softmax(s_pos, dim=1).max(dim=1)
            noisy = ~clean | (predicted != labels) if config.flag_rule == "either" else ~clean
            parts.append(
                torch.stack([p_all[rows, labels], margin, noisy.float(), predicted.float(), prob], 1)
            )
            reporter.advance(len(index))
    table = torch.cat(parts).cpu().numpy() if parts else np.zeros((0, 5), np.float32)
    return Scores(
        p_clean=table[:, 0].astype(np.float32),
        margin=table[:, 1].astype(np.float32),
        is_noisy=table[:, 2] > 0.5,
        predicted=table[:, 3].round().astype(np.int64),
        predicted_prob=table[:, 4].astype(np.float32),
    )
