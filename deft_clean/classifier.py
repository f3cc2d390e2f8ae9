"""The fine-tuned classifier (image tower + linear head): build, save/load, predict, evaluate.

A :class:`Classifier` is what ``finetune`` returns and ``load_classifier`` rebuilds: call it on a
float image batch or a list of PIL images/paths to get class probabilities ``(B, K)``.

Features ``(B, E)`` are the image tower's pooled output, not normalised (:func:`feature_tower`):
``encode_image(x)`` for CLIP towers, the timm trunk's pooled features for towers whose head is only
a projection (the ``offline`` backbone). A saved classifier is a small directory:

- ``classifier.json`` - FinetuneConfig, BackboneConfig, classes, preprocessing, versions, run facts;
- ``head.safetensors`` - the linear head ``fc`` (K x E);
- ``tower.safetensors`` - the tower tensors training changed: trainable parameters (all of them for
  ``--tune full``; LoRA's, plus any ``always_train`` ones in the tower, for ``lora``; none for
  ``linear``) and buffers (BatchNorm statistics). Everything else is rebuilt by ``load_backbone``
  under the run's seed, so randomly initialised parts (``test-tiny``, fresh heads) come back identical.

The folder is written atomically, with the shared saved-folder header (``files.write_description``).
``predict`` also classifies a plain folder of unlabelled images (no CSV, no class folders).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from deft_clean.adapters import apply_peft
from deft_clean.backbone import Backbone, load_backbone_on
from deft_clean.config import BackboneConfig, DataConfig, FinetuneConfig, from_dict, to_dict
from deft_clean.data import Manifest, has_loose_images, load_manifest, load_unlabelled
from deft_clean.distributed import World, runs_distributed, world_from_env
from deft_clean.embed import image_tower
from deft_clean.errors import ConfigError
from deft_clean.files import (
    atomic_folder,
    check_output,
    read_description,
    releases_outputs,
    write_description,
)
from deft_clean.images import decode_square, square, to_rgb
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.results import base_frame, run_metadata, write_results
from deft_clean.runtime import StagedImages, feature_pass, is_conv, seeded
from deft_clean.version import __version__

FORMAT, FORMAT_VERSION = "deft-clean-classifier", 1
_CONFIG_FILE, _HEAD_FILE, _TOWER_FILE = "classifier.json", "head.safetensors", "tower.safetensors"


def feature_tower(backbone: Backbone) -> nn.Module:
    """The module mapping a normalised batch (B, 3, S, S) to features (B, E).

    ``embed.image_tower(pooled=True)`` decides: a timm trunk's pooled output when the tower's head only
    projects (the offline backbone's fresh projection would lose information), else ``model.visual``
    (= ``encode_image`` without normalisation).
    """
    tower = image_tower(backbone.model, pooled=True)
    return tower if isinstance(tower, nn.Module) else backbone.model.visual


def build_tower(
    config: BackboneConfig, finetune: FinetuneConfig, lora_targets: Sequence[str] | None = None
) -> tuple[Backbone, nn.Module]:
    """The backbone (seeded by ``finetune.seed``, on its device) and its feature tower, trainable as
    ``finetune.tune`` says: 'full' every tower parameter, 'lora' peft LoRA on ``lora_targets``
    (default: the backbone's; a saved classifier passes the ones it was trained with) plus the
    backbone's ``always_train`` parameters, 'linear' none. The text tower never trains. ``finetune``
    and :func:`load_classifier` build it the same way, so random parts come back identical."""
    with seeded(finetune.seed):
        backbone, _ = load_backbone_on(config)
    apply_peft(backbone, finetune.tuning(tuple(lora_targets) if lora_targets else None))
    tower = feature_tower(backbone)
    if finetune.tune != "lora":
        tower.requires_grad_(finetune.tune == "full")
    return backbone, tower


class Classifier:
    """A trained image classifier: ``classifier(images) -> probabilities (B, K)``.

    ``images``: a float tensor (B, 3, H, W) in [0, 1] (resized to ``image_size`` if needed), a uint8
    tensor (B, 3, H, W), or a list of PIL images / file paths (decoded and centre-cropped like the
    training cache). Normalisation with the backbone's mean/std happens here. Returns (B, K) on the CPU.
    """

    def __init__(self, tower: nn.Module, fc: nn.Linear, info: dict[str, Any], tower_keys: Sequence[str]):
        self.tower, self.fc, self.info = tower.eval(), fc.eval(), info
        self.tower_keys = list(tower_keys)
        self.class_ids: list[str] = info["class_ids"]
        self.class_names: list[str] = info["class_names"]
        self.image_size: int = info["image_size"]
        self.device = next(fc.parameters()).device

    def __call__(self, images: torch.Tensor | Sequence[Image.Image | str | Path]) -> torch.Tensor:
        return self.predict_batch(self._as_tensor(images)).cpu()

    @torch.no_grad()
    def predict_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8, or float in [0, 1] -> probabilities (B, K) float32 on the model's device.

        Preprocessing is the one feature pass's (resize to ``image_size``, normalise), as in training.
        """
        x = batch if batch.dtype == torch.uint8 else batch.float() * 255.0  # staging scales by 1/255
        return self._probabilities(x.cpu(), np.arange(len(x)), batch_size=max(len(x), 1))

    def predict_images(
        self, images: torch.Tensor, *, batch_size: int = 256, reporter: Reporter = SilentReporter()
    ) -> np.ndarray:
        """Probabilities (N, K) float32 for a uint8 image cache (N, 3, S, S); one host copy at the end."""
        if len(images) == 0:
            return np.zeros((0, len(self.class_ids)), dtype=np.float32)
        rows = np.arange(len(images))
        return self._probabilities(images, rows, batch_size=batch_size, reporter=reporter).cpu().numpy()

    def _probabilities(
        self, cache: torch.Tensor, rows: np.ndarray, *, batch_size: int, reporter: Reporter = SilentReporter()
    ) -> torch.Tensor:
        """(N, K) on the model's device: the one feature pass over ``cache[rows]``, then the head."""
        staged = StagedImages(
            cache, rows, mean=self.info["mean"], std=self.info["std"], size=self.image_size,
            device=self.device, channels_last=is_conv(self.tower),
        )  # fmt: skip
        features = feature_pass(
            self.tower, staged, batch_size=batch_size, reporter=reporter, description="Predicting"
        )
        with torch.no_grad():
            return torch.softmax(self.fc(features), dim=1)

    def _as_tensor(self, images: torch.Tensor | Sequence[Image.Image | str | Path]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.unsqueeze(0) if images.dim() == 3 else images
        arrays = [
            square(to_rgb(item), self.image_size)
            if isinstance(item, Image.Image)
            else decode_square(Path(item), self.image_size)
            for item in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8

    def save(self, out_dir: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write ``classifier.json``, the head and the changed tower tensors to ``out_dir`` (atomically);
        ``extra_files`` (name -> text) are written into the same folder."""
        state = self.tower.state_dict()
        tower_state = {k: state[k].detach().contiguous().cpu() for k in self.tower_keys}
        with atomic_folder(out_dir) as folder:
            save_file(tower_state, str(folder / _TOWER_FILE))
            save_file(
                {k: v.contiguous().cpu() for k, v in self.fc.state_dict().items()}, str(folder / _HEAD_FILE)
            )
            body = {k: v for k, v in self.info.items() if k not in ("format", "format_version")}
            write_description(folder, _CONFIG_FILE, FORMAT, FORMAT_VERSION, body)
            for name, text in (extra_files or {}).items():
                (folder / name).write_text(text, encoding="utf-8")
        return Path(out_dir)


def changed_tower_keys(tower: nn.Module) -> list[str]:
    """State-dict keys a saved classifier must carry: trainable parameters and all buffers."""
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in tower.named_buffers()}
    return [k for k in tower.state_dict() if k in trainable or k in buffers]


def classifier_info(
    backbone: Backbone, bcfg: BackboneConfig, fcfg: FinetuneConfig, manifest: Manifest
) -> dict[str, Any]:
    """The ``classifier.json`` content that ``load_classifier`` needs (plus provenance)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deft_clean_version": __version__,
        "torch_version": torch.__version__,
        "finetune": to_dict(fcfg),
        "backbone": to_dict(bcfg),
        "class_ids": [str(c) for c in manifest.class_ids],
        "class_names": [str(c) for c in manifest.class_names],
        "image_size": int(backbone.image_size),
        "mean": [float(v) for v in backbone.mean],
        "std": [float(v) for v in backbone.std],
        "lora_targets": list(backbone.lora_targets) if fcfg.tune == "lora" else None,
    }


def load_classifier(model_dir: str | Path, *, device: str | None = None) -> Classifier:
    """Rebuild a classifier saved by ``finetune(..., out=DIR)``; ``device`` overrides the saved one."""
    folder = Path(model_dir)
    hint = "Pass the --out directory of `deft-clean finetune`."
    info = read_description(folder, _CONFIG_FILE, FORMAT, FORMAT_VERSION, hint=hint)
    bvalues = dict(info["backbone"], **({"device": device} if device else {}))
    bcfg, fcfg = from_dict(BackboneConfig, bvalues), from_dict(FinetuneConfig, info["finetune"])
    _, tower = build_tower(bcfg, fcfg, lora_targets=info.get("lora_targets"))
    tower_state = load_file(str(folder / _TOWER_FILE))
    missing = set(tower_state) - set(tower.state_dict())
    if missing:
        raise ConfigError(
            f"{folder / _TOWER_FILE} holds {len(missing)} tensor(s) the rebuilt tower lacks, "
            f"e.g. {min(missing)}.",
            hint="Load it with the deft-clean/open_clip versions recorded in classifier.json.",
        )
    tower.load_state_dict(tower_state, strict=False)
    head = load_file(str(folder / _HEAD_FILE))
    fc = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
    fc.load_state_dict(head)
    model_device = next(tower.parameters()).device
    return Classifier(tower, fc.to(model_device), info, list(tower_state))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_ids: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy (None for a class absent from ``labels``) and the confusion matrix.

    ``probs`` (N, K), ``labels`` (N,) int indices into ``class_ids``. ``confusion_matrix[i][j]`` counts
    images of class i predicted as class j.
    """
    k = len(class_ids)
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    per_class = {
        cid: (float(confusion[i, i] / support[i]) if support[i] else None) for i, cid in enumerate(class_ids)
    }
    return {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        "per_class_accuracy": per_class,
        "class_ids": list(class_ids),
        "confusion_matrix": confusion.tolist(),
    }


def _image_set(
    classifier: Classifier,
    data_dir: str | Path,
    labels_csv: str | Path | None,
    data_config: DataConfig,
    reporter: Reporter,
    world: World = World(),
) -> tuple[Manifest, np.ndarray]:
    """(manifest, labels (N,) as indices into the classifier's classes, -1 when unlabelled).

    A labels CSV or an ImageFolder gives labels (classes the classifier does not know are refused);
    a folder holding images itself (not only in class folders) is read as unlabelled images.
    ``world``: under torchrun each process decodes its block of rows.
    """
    data_config = dataclasses.replace(data_config, min_per_class=0)  # class sizes do not matter here
    size = classifier.image_size
    if labels_csv is None and has_loose_images(data_dir):
        manifest = load_unlabelled(
            data_dir, config=data_config, image_size=size, reporter=reporter, world=world
        )
        return manifest, np.full(len(manifest), -1, dtype=np.int64)
    manifest = load_manifest(
        data_dir, labels_csv, config=data_config, image_size=size, reporter=reporter, world=world
    )
    index = {cid: k for k, cid in enumerate(classifier.class_ids)}
    unknown = sorted(set(manifest.class_ids) - set(index))
    if unknown:
        raise ConfigError(
            f"{labels_csv or data_dir} has classes the classifier was not trained on: "
            f"{', '.join(unknown[:10])}.",
            hint=f"The classifier knows: {', '.join(classifier.class_ids[:20])}.",
        )
    return manifest, np.array([index[manifest.class_ids[k]] for k in manifest.labels], dtype=np.int64)


def _probabilities_of(
    classifier: Classifier, manifest: Manifest, batch_size: int, reporter: Reporter, world: World = World()
) -> np.ndarray:
    """(N, K) probabilities of every row, NaN for unreadable rows; under torchrun each process computes
    those of its block and every process gets them all."""
    rows = np.flatnonzero(manifest.readable)
    owners = world.owners(len(manifest))[rows]
    own = rows[owners == world.rank]
    cache = manifest.decode(classifier.image_size, rows=own, reporter=reporter)
    probs = np.full((len(manifest), len(classifier.class_ids)), np.nan, dtype=np.float32)
    found = torch.zeros(0, probs.shape[1], device=classifier.device)
    if len(own):
        span = cache[own[0] : own[-1] + 1]  # this process's block (all rows in one process)
        found = classifier._probabilities(span, own - own[0], batch_size=batch_size, reporter=reporter)
    if len(rows):
        probs[rows] = world.gather_rows(found, owners).cpu().numpy()
    return probs


def evaluate(
    classifier: Classifier,
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    data_config: DataConfig = DataConfig(),
    batch_size: int = 256,
    reporter: Reporter = SilentReporter(),
    world: World = World(),
) -> dict[str, Any]:
    """:func:`classification_metrics` of ``classifier`` on a labelled split (readable rows only); under
    torchrun (``world``) each process scores its block and every process gets the metrics."""
    manifest, labels = _image_set(classifier, data_dir, labels_csv, data_config, reporter, world)
    if (labels < 0).all():
        raise ConfigError(
            f"{data_dir} has no labels to evaluate against.", hint="Pass a labels CSV or an ImageFolder."
        )
    probs = _probabilities_of(classifier, manifest, batch_size, reporter, world)
    readable = manifest.readable
    return classification_metrics(probs[readable], labels[readable], classifier.class_ids)


@releases_outputs
@runs_distributed
def predict(
    model: Classifier | str | Path,
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    data: DataConfig = DataConfig(),
    out: str | Path | None = None,
    batch_size: int = 256,
    device: str | None = None,
    overwrite: bool = False,
    reporter: Reporter = SilentReporter(),
) -> pd.DataFrame:
    """Class probabilities for every image of ``data_dir``: a plain folder of images (unlabelled), an
    ImageFolder, or ``labels_csv``.

    Columns: path, given_label (NA when unlabelled), status, predicted_label, predicted_prob, probs
    (list of K floats in the classifier's class order). Unreadable rows (``on_bad_image='skip'``) get
    NA predictions. ``out`` writes the frame with ``results.write_results`` (atomic, with metadata); it is
    checked first (:func:`check_output`: an existing file is refused unless ``overwrite``).
    """
    world = world_from_env()
    if out is not None:
        inputs = [data_dir, labels_csv, data.classes_file, None if isinstance(model, Classifier) else model]
        world.on_main(lambda: check_output(out, inputs=inputs, overwrite=overwrite))
    classifier = (
        model
        if isinstance(model, Classifier)
        else world.together(lambda: load_classifier(model, device=device))
    )
    manifest, labels = _image_set(classifier, data_dir, labels_csv, data, reporter, world)
    probs = _probabilities_of(classifier, manifest, batch_size, reporter, world)
    ids = classifier.class_ids
    frame = base_frame(manifest)
    frame["given_label"] = pd.Series([ids[k] if k >= 0 else pd.NA for k in labels], dtype="string")
    predicted = pd.Series([ids[k] for k in np.nan_to_num(probs, nan=0.0).argmax(axis=1)], dtype="string")
    frame["predicted_label"] = predicted.where(manifest.readable, pd.NA)
    frame["predicted_prob"] = probs.max(axis=1)
    frame["probs"] = list(probs)
    if out is not None:
        configs = {"finetune": classifier.info["finetune"], "backbone": classifier.info["backbone"]}
        extra = {
            "class_ids": ids, "class_names": classifier.class_names, "classifier": str(model),
            "world_size": world.size,
        }  # fmt: skip
        metadata = run_metadata(manifest=manifest, configs=configs, extra=extra)
        world.on_main(lambda: write_results(frame, out, metadata=metadata))  # one writer
    return frame
