"""``detect()``: find wrong labels with DeFT, then score every image with the final model.

Reads top to bottom: load and validate the data → build the backbone → decode every image once →
train positive/negative prompts (+ the image-tower tuning) on the given, noisy labels → score all
readable images in a separate pass over the *un-augmented* images with the final model → write the
results file (one row per input row, input order) and, optionally, the learned detector.

The training loop itself is :mod:`deft_clean.training`; here are the run around it and which model
scores which row (:mod:`deft_clean.crossfit`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from deft_clean.adapters import untuned_trunk
from deft_clean.backbone import Backbone, input_size, load_backbone_on
from deft_clean.checkpoint import Checkpoint, checkpoint_path, run_key
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, resolve_backbone
from deft_clean.crossfit import IN_SAMPLE, EpochAverage, Evidence, fold_plan, logged_verdict, verdict
from deft_clean.data import Manifest, load_labels, load_manifest
from deft_clean.deft_model import DeftModel, save_detector
from deft_clean.distributed import World, runs_distributed, world_from_env
from deft_clean.embed import stage
from deft_clean.errors import ConfigError, TrainingError
from deft_clean.files import check_output, refuse_input, releases_outputs
from deft_clean.preflight import refuse_unfit
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.report import build_report
from deft_clean.results import Scores, result_frame, run_metadata, write_results
from deft_clean.runtime import StagedImages, cuda_autotune, feature_pass, seed_everything
from deft_clean.scoring import (
    training_failure,
)
from deft_clean.summary import DetectResult, run_summary
from deft_clean.training import Block, LabelledImages, embed_rows, score_into, train_detector, trunk_cache

DEFAULT_OUT = "deft_results.parquet"


@releases_outputs
@runs_distributed
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
    report: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter = SilentReporter(),
) -> DetectResult:
    """Flag likely wrong labels; write the results (one row per input row), return them with the summary.

    ``out``: default :func:`default_out`. ``truth_csv`` (verified path,label of some or all rows) adds
    precision/recall/F1; ``save_model`` keeps the detector; ``report`` writes ``<out>.html``. Outputs are
    checked before any work: an existing one is refused unless ``overwrite``, an input always. Each epoch
    ends with a checkpoint beside ``out``; ``resume`` continues a killed run from it to the same result.
    """
    backbone = resolve_backbone(backbone)
    clock = {"start": time.perf_counter()}
    _refuse_crossfit_resume(detect, resume)
    world = world_from_env()
    out_path, page = world.on_main(
        lambda: _check_outputs(data_dir, labels_csv, data, out, truth_csv, save_model, report, overwrite)
    )
    manifest = _read_data(data_dir, labels_csv, data, backbone, detect, reporter, world)
    _refuse_unfit(manifest, (out_path, page), backbone, detect, source=str(labels_csv or data_dir))
    truth = load_labels(truth_csv, manifest, allow_missing=True) if truth_csv is not None else None
    seed_everything(detect.seed)
    built, device = world.together(lambda: load_backbone_on(backbone))
    config, choices = detect.resolved(cuda=device.type == "cuda", rows=int(manifest.readable.sum()))
    _log_notes(reporter, built.notes, choices)
    rows, images, samples, net = _prepare(manifest, built, device, config, reporter, world)
    clock["prepared"] = time.perf_counter()
    with cuda_autotune(device, built.model.visual):
        trunk, untuned = _features(net, images, samples, config, world, reporter)
        clock["features"] = time.perf_counter()  # the frozen-tower pass, or a tuned tower's untuned one
        checkpoint = _checkpoint(out_path, (data, backbone, config), manifest, resume, reporter, world)
        scores, history = fit_and_score(net, samples, config, trunk=trunk, untuned=untuned, reporter=reporter,
                                        checkpoint=checkpoint, world=world)  # fmt: skip
        clock["trained"] = clock["scored"] = time.perf_counter()  # scoring passes run inside training
    _refuse_failed_training(history, scores, samples, net, built, config)
    frame = result_frame(manifest, rows, scores)
    summary = run_summary(manifest, frame, history, clock, device, built, truth)
    configs = {"data": data, "backbone": backbone, "detect": config}
    extra = {"detect": summary.to_dict(), "world_size": world.size}
    metadata = run_metadata(manifest=manifest, configs=configs, extra=extra)
    world.on_main(lambda: (write_results(frame, out_path, metadata=metadata), checkpoint.remove()))
    if save_model is not None:  # one writer; a failed write stops every process with its message
        world.on_main(lambda: _save(net, save_model, backbone, config, manifest))
    html = page and world.on_main(  # the report reads the results file, as `deft-clean report` does
        lambda: build_report(out_path, page, truth_csv=truth_csv, overwrite=overwrite, reporter=reporter)
    )
    frame.attrs.update(metadata, out=str(out_path))
    return DetectResult(frame, summary, out_path, html)


def _read_data(
    data_dir: str | Path,
    labels_csv: str | Path | None,
    data: DataConfig,
    backbone: BackboneConfig,
    detect: DetectConfig,
    reporter: Reporter,
    world: World,
) -> Manifest:
    """The validated rows of this process; validation keeps the pixels it decodes at the backbone's input
    size, so each image is decoded once."""
    return load_manifest(
        data_dir, labels_csv, config=data, image_size=input_size(backbone), num_workers=detect.num_workers,
        reporter=reporter, world=world,
    )  # fmt: skip


def _check_outputs(
    data_dir: str | Path,
    labels_csv: str | Path | None,
    data: DataConfig,
    out: str | Path | None,
    truth_csv: str | Path | None,
    save_model: str | Path | None,
    report: bool,
    overwrite: bool,
) -> tuple[Path, Path | None]:
    """The results path and the report page's (``report``: the results' name with suffix .html), after
    :func:`check_output` accepted them and ``save_model`` (the results sized from the CSV)."""
    inputs = [data_dir, labels_csv, truth_csv, data.classes_file]
    table_bytes = (
        Path(labels_csv).stat().st_size if labels_csv is not None and Path(labels_csv).is_file() else 0
    )
    out_path = check_output(
        out if out is not None else default_out(labels_csv), inputs=inputs, overwrite=overwrite,
        estimated_bytes=2 * table_bytes,
    )  # fmt: skip
    if save_model is not None:
        hint = "The model is a folder of its own, e.g. --save-model runs/detector."
        refuse_input(
            Path(save_model), [out_path], option="--save-model", what="the same path as --out", hint=hint
        )
        check_output(save_model, inputs=inputs, overwrite=overwrite, kind="folder", option="--save-model")
    page = out_path.with_suffix(".html") if report else None
    if page is not None:
        hint = "--report writes the results' name with suffix .html: give --out another suffix (.parquet)."
        refuse_input(page, [out_path], option="--report", what="the same path as --out", hint=hint)
        check_output(page, inputs=inputs, overwrite=overwrite, option="--report")
    return out_path, page


def _refuse_unfit(
    manifest: Manifest,
    outputs: tuple[Path, Path | None],
    backbone: BackboneConfig,
    config: DetectConfig,
    source: str,
) -> None:
    """After reading the data, before any model work: the results (and report page) must not overwrite
    an image, and the data must pass detect's rules (:mod:`deft_clean.preflight`)."""
    images = manifest.files()
    for path, option in zip(outputs, ("--out", "--report"), strict=True):
        if path is not None:
            refuse_input(path, images, option=option, what="an image of this run")
    refuse_unfit(manifest, backbone, config, source=source)


def _log_notes(reporter: Reporter, warnings: tuple[str, ...], choices: list[str]) -> None:
    """The backbone's warnings and the choices made for this run (e.g. --peft auto), in the run's log."""
    for note in warnings:
        reporter.log(note, level="warning")
    for note in choices:
        reporter.log(note, level="info")


def _checkpoint(
    out_path: Path,
    configs: tuple[object, ...],
    manifest: Manifest,
    resume: bool,
    reporter: Reporter,
    world: World,
) -> Checkpoint:
    """The run's epoch checkpoint beside ``out_path``, keyed by its configs and input fingerprint (and the
    number of processes under torchrun: image augmentation draws differ with it)."""
    key = run_key(configs, manifest.fingerprint, **({"world_size": world.size} if world.active else {}))
    return Checkpoint(checkpoint_path(out_path), key, resume=resume, reporter=reporter)


def _prepare(
    manifest: Manifest,
    built: Backbone,
    device: torch.device,
    config: DetectConfig,
    reporter: Reporter,
    world: World,
) -> tuple[np.ndarray, StagedImages, LabelledImages, DeftModel]:
    """The readable rows, this process's share of their images staged for ``device`` (decoded once; all
    of them in one process), the rows with their labels, and the untrained detector (the same
    weights in every process)."""
    rows = np.flatnonzero(manifest.readable)
    owners = world.owners(len(manifest))[rows]  # the process that validated (and kept) each row's image
    own = np.flatnonzero(owners == world.rank)
    staged = rows if not world.active else rows[own]
    images = stage(manifest, built, device, rows=staged, num_workers=config.num_workers, reporter=reporter)
    held = images if not world.active else Block(images, int(own[0]) if len(own) else 0, len(rows))
    samples = LabelledImages(held, manifest.labels[rows], owners)
    generator = torch.Generator().manual_seed(config.seed)
    net = DeftModel(built, manifest.prompt_names(), config, generator=generator)
    world.broadcast_tensors([p for p in net.parameters() if p.requires_grad])
    return rows, images, samples, net


def _features(
    net: DeftModel,
    images: StagedImages,
    samples: LabelledImages,
    config: DetectConfig,
    world: World,
    reporter: Reporter,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(trunk, untuned)``, each (N, F) for every sample or None (under torchrun each process computes its
    share and every process gets them all). A frozen tower's trunk features are computed once; they train
    its head and are the linear probe's features. A tuned tower (LoRA, VPT) runs every step, so it has no
    trunk; the probe gets the features the frozen tower would have from one more pass with the tuning off,
    which do not move as the tower trains (docs/benchmarks.md, "The probe on a tuned tower"). A tuned
    tower's ``untuned`` is None at ``--probe-weight 0``."""
    batch = 2 * config.batch_size
    if net.caches_features:
        trunk = world.gather_rows(trunk_cache(net, images, batch), samples.owners)
        return trunk, trunk
    tower = untuned_trunk(net.model, net.tuning)
    if config.probe_weight == 0 or tower is None:
        return None, None
    with net.tuning.untuned():
        untuned = feature_pass(
            tower, images, batch_size=batch, reporter=reporter, description="Untuned features"
        )
    return None, world.gather_rows(untuned, samples.owners)


def _refuse_crossfit_resume(config: DetectConfig, resume: bool) -> None:
    """Checkpoints hold one model's epochs; a cross-fitted run trains one model per fold."""
    if resume and config.scoring == "crossfit":
        raise ConfigError(
            "--resume continues runs with --scoring insample; a --scoring crossfit run is not checkpointed.",
            hint="Run it again without --resume.",
        )


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


def fit_and_score(
    net: DeftModel,
    samples: LabelledImages,
    config: DetectConfig,
    *,
    trunk: torch.Tensor | None = None,
    untuned: torch.Tensor | None = None,
    reporter: Reporter = SilentReporter(),
    checkpoint: Checkpoint | None = None,
    world: World = World(),
) -> tuple[Scores, list[dict[str, float]]]:
    """Train and score under ``config.scoring`` (:mod:`deft_clean.crossfit`): one model on every row, or
    one per fold restarted from the same weights, each scoring only rows it did not train on. Scores are
    averaged over each model's epochs after warm-up. Returns the scores and the per-epoch records (with
    the ``fold`` they belong to). ``checkpoint`` (in-sample scoring only: one model, one epoch count)
    saves the model and the running score average after every epoch, so a resumed run averages the same
    epochs as an uninterrupted one. ``world``: under torchrun every fold trains with every process, and
    each scoring pass is shared. ``trunk``, ``untuned``: :func:`_features` (no ``untuned``: no probe)."""
    folds = config.folds if config.scoring == "crossfit" else 1
    fold = fold_plan(samples.labels_np, folds, config.seed)
    initial = net.trainable_state()
    average = EpochAverage.empty(len(samples), net.prompts.n_cls)
    first_scored = min(config.warmup_epochs, config.epochs - 1)  # the last epoch at least
    history: list[dict[str, float]] = []
    embedded: dict[int, torch.Tensor] = {}  # fold → its rows' embeddings by its model (neighbour votes)
    for k in np.unique(fold):
        scored = np.flatnonzero(fold == k)
        train = np.arange(len(samples)) if k == IN_SAMPLE else np.flatnonzero(fold != k)
        net.restore(initial)
        part, target = EpochAverage.empty(len(scored), net.prompts.n_cls), samples.subset(scored)

        def after_epoch(epoch: int, part: EpochAverage = part, target: LabelledImages = target) -> None:
            if epoch >= first_scored:
                score_into(net, target, _rows(trunk, target.index), part, 2 * config.batch_size, world)

        if k != IN_SAMPLE:
            reporter.log(
                f"Cross-fitting: fold {k + 1}/{folds} trains on {len(train)} rows, scores {len(scored)}."
            )
        if checkpoint is not None and k == IN_SAMPLE:
            checkpoint.riders["scores"] = part
        records = train_detector(
            net,
            samples.subset(train),
            config,
            trunk=_rows(trunk, train),
            reporter=reporter,
            after_epoch=after_epoch,
            checkpoint=checkpoint if k == IN_SAMPLE else None,
            world=world,
        )
        history += [dict(record, fold=int(k)) for record in records]
        if config.neighbour_weight > 0:
            embedded[int(k)] = embed_rows(
                net, target, _rows(trunk, target.index), 2 * config.batch_size, world
            )
        average.place(scored, part.mean())
    evidence = Evidence(embedded, untuned, net.prompts.class_names)
    scores = logged_verdict(average, samples.labels_np, fold, evidence, config, reporter)
    return scores, history


def _rows(trunk: torch.Tensor | None, index: np.ndarray) -> torch.Tensor | None:
    return None if trunk is None else trunk[torch.from_numpy(index).to(trunk.device)]


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
        score_into(net, data, trunk, average, 2 * config.batch_size)
        reporter.advance(len(data))
    return verdict(average, data.labels_np, np.full(len(data), IN_SAMPLE), config)[0]
