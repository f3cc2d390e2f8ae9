"""Fine-tune a classifier on the rows DeFT kept, with TeS or plain cross-entropy: the training story.

``finetune`` reads the data like ``detect`` (decode once into a uint8 cache staged for the device,
augment on the device, bf16 autocast on CUDA, no host sync inside a step), picks the training rows
from a flags file, trains a linear head (and the tower for ``--tune full``/``lora``) with SGD + cosine
schedule (the loop is :mod:`deft_clean.finetune_loop`), and returns/saves a
:class:`~deft_clean.classifier.Classifier` (the saved model's story is
in ``classifier.py``). For TeS it also builds the fixed text classifier and the projection head
(:class:`deft_clean.tes.ClassifierHead`), which are used in training only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from deft_clean.backbone import Backbone, input_size
from deft_clean.checkpoint import Checkpoint, checkpoint_path, run_key
from deft_clean.classifier import Classifier, build_tower, changed_tower_keys, classifier_info, evaluate
from deft_clean.config import BackboneConfig, DataConfig, FinetuneConfig, resolve_backbone
from deft_clean.data import Manifest, load_manifest
from deft_clean.distributed import World, runs_distributed, world_from_env
from deft_clean.embed import stage
from deft_clean.errors import ConfigError
from deft_clean.files import check_output, releases_outputs
from deft_clean.finetune_loop import check_process_shares, train_classifier
from deft_clean.offline import OFFLINE_NOTE
from deft_clean.preflight import refuse_one_class
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.results import confident_suggestions, read_results
from deft_clean.runtime import (
    StagedImages,
    cuda_autotune,
    is_conv,
    seeded,
)
from deft_clean.tes import ClassifierHead


@dataclass(frozen=True)
class FinetuneResult:
    """What ``finetune`` returns: the classifier and the facts of the run."""

    classifier: Classifier
    n_train: int  # rows trained on
    n_dropped: int  # flagged rows left out
    n_relabelled: int  # flagged rows trained on with their suggested label
    metrics: dict[str, Any] | None  # on the test split, when one was given
    out_dir: Path | None


@releases_outputs
@runs_distributed
def finetune(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    data: DataConfig = DataConfig(),
    backbone: BackboneConfig = BackboneConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
    flags: str | Path | None = None,
    out: str | Path | None = None,
    test_dir: str | Path | None = None,
    test_csv: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter = SilentReporter(),
) -> FinetuneResult:
    """Train a classifier on ``data_dir`` (rows a ``flags`` file marks clean, or all rows).

    ``backbone.model`` None: the backbone recorded in the flags file (else the default). ``out`` saves
    the classifier (and ``metrics.json`` when ``test_dir`` is given); it is checked before any work
    (:func:`check_output`: an existing non-empty folder is refused unless ``overwrite``). With ``out``,
    each epoch ends with a checkpoint beside it; ``resume`` continues a killed run from it.
    """
    config, world = finetune, world_from_env()
    if out is not None:
        inputs = [data_dir, labels_csv, flags, test_dir, test_csv, data.classes_file]
        world.on_main(lambda: check_output(out, inputs=inputs, overwrite=overwrite, kind="folder"))
    flags_df = world.together(lambda: read_results(flags)) if flags is not None else None
    recorded = (flags_df.attrs.get("configs", {}) if flags_df is not None else {}).get("backbone")
    bcfg = resolve_backbone(backbone, recorded)
    manifest = load_manifest(  # validation keeps the pixels it decodes at this size: one decode per image
        data_dir, labels_csv, config=data, image_size=input_size(bcfg), num_workers=config.num_workers,
        reporter=reporter, world=world,
    )  # fmt: skip
    refuse_one_class(manifest, source=str(labels_csv or data_dir))
    rows, labels, n_dropped, n_relabelled = select_training_rows(
        manifest, flags_df, config, flags_name=f"'{flags}'"
    )
    check_process_shares(config, world, world.owners(len(manifest))[rows], reporter)
    built, tower = world.together(lambda: build_tower(bcfg, config))  # load_classifier rebuilds it so
    _log_notes(built.notes, reporter)
    device = next(tower.parameters()).device
    head = _head(built, tower, manifest, config, device).to(device)
    images, owners = _stage_own(manifest, rows, built, tower, config, reporter, world)
    world.broadcast_tensors([p for p in [*tower.parameters(), *head.parameters()] if p.requires_grad])
    checkpoint = _checkpoint(out, (data, bcfg, config), manifest, flags, len(rows), resume, reporter, world)
    with cuda_autotune(device, tower):
        train_classifier(
            tower, head, images, torch.from_numpy(labels), config, reporter, checkpoint, (world, owners)
        )
    world.broadcast_tensors([*tower.buffers(), *head.buffers()])  # BatchNorm statistics: rank 0's
    info = classifier_info(built, bcfg, config, manifest)
    counts = {"rows": len(rows), "dropped": n_dropped, "relabelled": n_relabelled, "world_size": world.size}
    info["training"] = dict(counts, fingerprint=manifest.fingerprint, flags=flags and str(flags))
    classifier = Classifier(tower, head.fc, info, changed_tower_keys(tower))
    metrics = _evaluate_and_save(classifier, data, out, test_dir, test_csv, reporter, world)
    if checkpoint is not None and world.is_main:
        checkpoint.remove()
    return FinetuneResult(
        classifier, len(rows), n_dropped, n_relabelled, metrics, None if out is None else Path(out)
    )


def _stage_own(
    manifest: Manifest,
    rows: np.ndarray,
    built: Backbone,
    tower: nn.Module,
    config: FinetuneConfig,
    reporter: Reporter,
    world: World,
) -> tuple[StagedImages, np.ndarray]:
    """The images of the training ``rows`` this process validated (and kept), staged on the tower's device,
    and the process owning each of ``rows`` (all 0 in one process)."""
    device = next(tower.parameters()).device
    owners = world.owners(len(manifest))[rows]
    own = rows[owners == world.rank]
    images = stage(manifest, built, device, rows=own, num_workers=config.num_workers, reporter=reporter)
    images.channels_last = device.type == "cuda" and is_conv(tower)
    return images, owners


def _log_notes(notes: tuple[str, ...], reporter: Reporter) -> None:
    """The backbone's warnings, but the offline one: it is about detection, and TeS trains the towers it
    needs anyway."""
    for note in notes:
        if note != OFFLINE_NOTE:
            reporter.log(note, "warning")


def _checkpoint(
    out: str | Path | None,
    configs: tuple[object, ...],
    manifest: Manifest,
    flags: str | Path | None,
    rows: int,
    resume: bool,
    reporter: Reporter,
    world: World,
) -> Checkpoint | None:
    """The epoch checkpoint beside ``out`` (none without ``out``), keyed by the run's configs, input
    fingerprint, flags file and row count (and the number of processes under torchrun), so a
    checkpoint of another run is never resumed."""
    if out is None:
        return None
    key = run_key(configs, manifest.fingerprint, flags=None if flags is None else str(flags), rows=rows)
    if world.active:
        key["world_size"] = world.size
    return Checkpoint(checkpoint_path(Path(out)), key, resume=resume, reporter=reporter)


def _head(
    built: Backbone, tower: nn.Module, manifest: Manifest, config: FinetuneConfig, device: torch.device
) -> ClassifierHead:
    """The classifier head: TeS's is initialised from the class names' text features, CE's at random;
    its initial weights follow --seed, as the tower's do."""
    texts = (
        text_classifier(built, manifest.prompt_names(), config.template_list)
        if config.method == "tes"
        else None
    )
    with seeded(config.seed):
        dim = _feature_dim(tower, built.image_size, device)
        return ClassifierHead(dim, len(manifest.class_ids), texts, config.tau)


def _evaluate_and_save(
    classifier: Classifier,
    data: DataConfig,
    out: str | Path | None,
    test_dir: str | Path | None,
    test_csv: str | Path | None,
    reporter: Reporter,
    world: World,
) -> dict[str, Any] | None:
    """Test-set metrics (with ``test_dir``; each process scores its block), then the classifier saved
    to ``out`` with ``metrics.json`` in the same atomic folder, by the main process."""
    metrics = None
    if test_dir is not None:
        test_data = dataclasses.replace(data, min_per_class=0)
        metrics = evaluate(
            classifier, test_dir, test_csv, data_config=test_data, reporter=reporter, world=world
        )
    if out is not None:
        extra = {"metrics.json": json.dumps(metrics, indent=2) + "\n"} if metrics is not None else {}
        world.on_main(lambda: classifier.save(out, extra_files=extra))
    return metrics


class TrainingRows(NamedTuple):
    """Which rows ``finetune`` trains on and with which labels."""

    rows: np.ndarray  # (M,) int64 row indices into the manifest
    labels: np.ndarray  # (M,) int64 class indices (given, or suggested for relabelled rows)
    n_dropped: int  # flagged rows left out
    n_relabelled: int  # flagged rows kept with their suggested label


def select_training_rows(
    manifest: Manifest, flags: pd.DataFrame | None, config: FinetuneConfig, *, flags_name: str = "flags file"
) -> TrainingRows:
    """Readable rows minus those ``flags`` marks noisy (``--clean-only``), or relabelled (``--relabel``).

    ``--relabel`` keeps a flagged row with its ``suggested_label`` when the suggestion is the detector's
    prediction, differs from the given label, and ``predicted_prob >= relabel_threshold``; other flagged
    rows are dropped. Without ``flags`` every readable row is used with its given label.
    """
    readable = np.asarray(manifest.readable, dtype=bool)
    labels = np.asarray(manifest.labels, dtype=np.int64).copy()
    if flags is None:
        if config.clean_only or config.relabel:
            raise ConfigError(
                "--clean-only and --relabel need a flags file.",
                hint="Run `deft-clean detect DATA_DIR [LABELS_CSV] --out flags.parquet`, "
                "then pass --flags flags.parquet.",
            )
        return TrainingRows(np.flatnonzero(readable), labels[readable], 0, 0)
    _check_flags_match(manifest, flags, flags_name)
    if not (config.clean_only or config.relabel):
        raise ConfigError(
            f"--flags {flags_name} was given without --clean-only or --relabel.",
            hint="Add --clean-only to drop the flagged rows (or --relabel), "
            "or leave out --flags to train on all rows.",
        )
    noisy = flags["is_noisy"].fillna(False).to_numpy(dtype=bool) & readable
    relabel = np.zeros(len(labels), dtype=bool)
    if config.relabel:
        relabel = noisy & confident_suggestions(flags, config.relabel_threshold)
        labels[relabel] = flags["suggested_label"].cat.codes.to_numpy()[relabel]
    keep = (readable & ~noisy) | relabel
    if keep.sum() < 2:
        raise ConfigError(
            f"{flags_name} marks {int(noisy.sum())} of {int(readable.sum())} readable rows noisy: "
            f"{int(keep.sum())} left to train on.",
            hint="Check the flags file belongs to this data, re-run detect with a lower --threshold, "
            "or use --relabel.",
        )
    return TrainingRows(
        np.flatnonzero(keep), labels[keep], int(noisy.sum() - relabel.sum()), int(relabel.sum())
    )


def _check_flags_match(manifest: Manifest, flags: pd.DataFrame, flags_name: str) -> None:
    """Refuse a flags file made from another input (fingerprint, rows or classes differ)."""
    recorded = flags.attrs.get("input", {})
    keys = ("source", "csv_sha256", "listing_sha256", "table_sha256", "n_rows")
    theirs = {k: recorded.get(k) for k in keys if k in recorded or k in manifest.fingerprint}
    ours = {k: manifest.fingerprint.get(k) for k in theirs}
    fix = "Run `deft-clean detect` on this data to make a matching flags file, or pass the one made from it."
    if theirs != ours:
        raise ConfigError(
            f"{flags_name} was made from a different input: its fingerprint is {_short(theirs)}, "
            f"this data's is {_short(ours)}.",
            hint=fix,
        )
    if list(flags["path"]) != list(manifest.paths) or list(flags.attrs.get("class_ids", [])) != list(
        manifest.class_ids
    ):
        raise ConfigError(
            f"{flags_name} lists other images or classes than this data (input fingerprint matches).",
            hint=fix,
        )


def _short(fingerprint: dict[str, Any]) -> str:
    digest = fingerprint.get("csv_sha256") or fingerprint.get("listing_sha256") or "none"
    return f"{fingerprint.get('source')}:{str(digest)[:12]} ({fingerprint.get('n_rows')} rows)"


@torch.no_grad()
def _feature_dim(tower: nn.Module, image_size: int, device: torch.device) -> int:
    """E, the width of the tower's features, read off one dummy forward pass."""
    was_training = tower.training
    tower.eval()
    dim = tower(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1]
    tower.train(was_training)
    return int(dim)


@torch.no_grad()
def text_classifier(
    backbone: Backbone, class_prompts: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """The fixed TeS text classifier, (K, D) float32, L2-normalised.

    Each class name goes through every template (``FinetuneConfig.template_list``, or one string); the
    text tower's embeddings are normalised, averaged over templates and normalised again (CLIP's prompt
    ensembling).
    """
    patterns = [templates] if isinstance(templates, str) else list(templates)
    model = backbone.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = None
    for pattern in patterns:
        tokens = backbone.tokenizer([pattern.format(name) for name in class_prompts]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)  # (K, D)
        total = emb if total is None else total + emb
    model.train(was_training)
    return F.normalize(total, dim=-1)
