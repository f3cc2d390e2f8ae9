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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from deft_clean.backbone import autocast, is_conv
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig, from_dict, to_dict
from deft_clean.errors import ConfigError
from deft_clean.progress import Reporter, SilentReporter

FORMAT_VERSION = 1
_CONFIG_FILE, _HEAD_FILE, _TOWER_FILE = "classifier.json", "head.safetensors", "tower.safetensors"
TUNE_MODES = ("full", "lora", "linear")
_PREDICT_DATA = DataConfig(min_per_class=0)  # class sizes do not matter when only predicting


def feature_tower(backbone: Any) -> nn.Module:
    """The module mapping a normalised batch (B, 3, S, S) to features (B, E).

    ``embed.image_tower(pooled=True)`` decides: a timm trunk's pooled output when the tower's head only
    projects (the offline backbone's fresh projection would lose information), else ``model.visual``
    (= ``encode_image`` without normalisation).
    """
    from deft_clean.embed import image_tower

    tower = image_tower(backbone.model, pooled=True)
    return tower if isinstance(tower, nn.Module) else backbone.model.visual


def prepare_tower(
    backbone: Any, config: FinetuneConfig, lora_targets: Sequence[str] | None = None
) -> nn.Module:
    """The feature tower with requires_grad set for ``config.tune`` (LoRA via ``adapters.apply_peft``).

    ``config.tune`` is one of :data:`TUNE_MODES` (checked by ``finetune``). 'full' trains every tower
    parameter, 'lora' adds peft LoRA on ``lora_targets`` (default: ``backbone.lora_targets``; a saved
    classifier passes the ones it was trained with) plus the backbone's ``always_train`` parameters,
    'linear' freezes the tower. The text tower never trains.
    """
    from deft_clean.adapters import apply_peft

    peft = "lora" if config.tune == "lora" else "none"
    targets = ",".join(lora_targets) if lora_targets else None
    apply_peft(
        backbone,
        DetectConfig(
            peft=peft, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_targets=targets
        ),
    )
    tower = feature_tower(backbone)
    if config.tune != "lora":
        tower.requires_grad_(config.tune == "full")
    return tower


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

        Preprocessing is ``augment.gpu_augment(train=False)``: resize to ``image_size``, normalise,
        exactly as in training's feature pass and in ``detect``.
        """
        x = batch.to(self.device, non_blocking=True)
        x = x if x.dtype == torch.uint8 else x.float() * 255.0  # gpu_augment scales by 1/255
        features = eval_features(self.tower, x, self.info["mean"], self.info["std"], self.image_size)
        return torch.softmax(self.fc(features), dim=1)  # (B, K)

    def predict_images(
        self,
        images: torch.Tensor,
        *,
        batch_size: int = 256,
        reporter: Reporter = SilentReporter(),
    ) -> np.ndarray:
        """Probabilities (N, K) float32 for a uint8 image cache (N, 3, S, S); one host copy at the end."""
        chunks = []
        with reporter.task("Predicting", total=len(images)):
            for start in range(0, len(images), batch_size):
                chunks.append(self.predict_batch(images[start : start + batch_size]))
                reporter.advance(min(batch_size, len(images) - start))
        if not chunks:
            return np.zeros((0, len(self.class_ids)), dtype=np.float32)
        return torch.cat(chunks).cpu().numpy()

    def _as_tensor(self, images: torch.Tensor | Sequence[Image.Image | str | Path]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.unsqueeze(0) if images.dim() == 3 else images
        from deft_clean.images import decode_square, square, to_rgb

        arrays = [
            square(to_rgb(item), self.image_size)
            if isinstance(item, Image.Image)
            else decode_square(Path(item), self.image_size)
            for item in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8

    def save(self, out_dir: str | Path) -> Path:
        """Write ``classifier.json``, the head and the changed tower tensors to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.tower.state_dict()
        tower_state = {k: state[k].detach().contiguous().cpu() for k in self.tower_keys}
        save_file(tower_state, str(out / _TOWER_FILE))
        save_file({k: v.contiguous().cpu() for k, v in self.fc.state_dict().items()}, str(out / _HEAD_FILE))
        (out / _CONFIG_FILE).write_text(json.dumps(self.info, indent=2, sort_keys=True) + "\n")
        return out


@torch.no_grad()
def eval_features(
    tower: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int
) -> torch.Tensor:
    """Un-augmented features (B, E) float32 of a (B, 3, S, S) batch (uint8 scale) on the tower's device.

    Preprocessing is ``augment.gpu_augment(train=False)`` (resize to ``size``, normalise), as in ``detect``;
    bf16 autocast on CUDA, channels_last for convolutional towers there.
    """
    from deft_clean.augment import gpu_augment

    x = gpu_augment(images, mean=mean, std=std, out_size=size, train=False)
    if x.device.type == "cuda" and is_conv(tower):
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        return tower(x).float()


def changed_tower_keys(tower: nn.Module) -> list[str]:
    """State-dict keys a saved classifier must carry: trainable parameters and all buffers."""
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in tower.named_buffers()}
    return [k for k in tower.state_dict() if k in trainable or k in buffers]


def build_info(backbone: Any, bcfg: BackboneConfig, fcfg: FinetuneConfig, manifest: Any) -> dict[str, Any]:
    """The ``classifier.json`` content that ``load_classifier`` needs (plus provenance)."""
    from deft_clean import __version__

    return {
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


def build_backbone(config: BackboneConfig, *, seed: int) -> Any:
    """``load_backbone`` under ``seed`` (so random parts come back identical on reload), on its device."""
    from deft_clean.backbone import load_backbone, resolve_device

    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = load_backbone(config)
    backbone.model.to(device)
    return backbone


def load_classifier(model_dir: str | Path, *, device: str | None = None) -> Classifier:
    """Rebuild a classifier saved by ``finetune(..., out=DIR)``; ``device`` overrides the saved one."""
    folder = Path(model_dir)
    config_file = folder / _CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(
            f"{folder} is not a saved classifier: {_CONFIG_FILE} is missing.",
            hint="Pass the --out directory of `deft-clean finetune`.",
        )
    info = json.loads(config_file.read_text())
    bvalues = dict(info["backbone"], **({"device": device} if device else {}))
    bcfg, fcfg = from_dict(BackboneConfig, bvalues), from_dict(FinetuneConfig, info["finetune"])
    backbone = build_backbone(bcfg, seed=fcfg.seed)
    tower = prepare_tower(backbone, fcfg, lora_targets=info.get("lora_targets"))
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


def _labelled_set(
    classifier: Classifier, data_dir: str | Path, labels_csv: str | Path | None, data_config: DataConfig
):
    """(manifest, labels (N,) as indices into the classifier's classes); unknown classes refused."""
    from deft_clean.data import load_manifest

    manifest = load_manifest(data_dir, labels_csv, config=data_config)
    index = {cid: k for k, cid in enumerate(classifier.class_ids)}
    unknown = sorted(set(manifest.class_ids) - set(index))
    if unknown:
        raise ConfigError(
            f"{labels_csv or data_dir} has classes the classifier was not trained on: "
            f"{', '.join(unknown[:10])}.",
            hint=f"The classifier knows: {', '.join(classifier.class_ids[:20])}.",
        )
    return manifest, np.array([index[manifest.class_ids[k]] for k in manifest.labels], dtype=np.int64)


def evaluate(
    classifier: Classifier,
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    data_config: DataConfig = _PREDICT_DATA,
    batch_size: int = 256,
    reporter: Reporter = SilentReporter(),
) -> dict[str, Any]:
    """:func:`classification_metrics` of ``classifier`` on a labelled split (readable rows only)."""
    from deft_clean.images import build_image_cache

    manifest, labels = _labelled_set(classifier, data_dir, labels_csv, data_config)
    images = build_image_cache(manifest, classifier.image_size, reporter=reporter)
    readable = torch.from_numpy(np.flatnonzero(manifest.readable))
    probs = classifier.predict_images(images[readable], batch_size=batch_size, reporter=reporter)
    return classification_metrics(probs, labels[manifest.readable], classifier.class_ids)


def predict(
    model: Classifier | str | Path,
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    out: str | Path | None = None,
    data_config: DataConfig = _PREDICT_DATA,
    batch_size: int = 256,
    device: str | None = None,
    reporter: Reporter = SilentReporter(),
) -> pd.DataFrame:
    """Class probabilities for every image of ``data_dir`` (ImageFolder, or ``labels_csv``).

    Columns: path, given_label, status, predicted_label, predicted_prob, probs (list of K floats in
    the classifier's class order). Unreadable rows (``on_bad_image='skip'``) get NA predictions.
    ``out`` writes the frame with ``results.write_results`` (atomic, with metadata).
    """
    from deft_clean.images import build_image_cache
    from deft_clean.results import base_frame, run_metadata, write_results

    classifier = model if isinstance(model, Classifier) else load_classifier(model, device=device)
    manifest, labels = _labelled_set(classifier, data_dir, labels_csv, data_config)
    images = build_image_cache(manifest, classifier.image_size, reporter=reporter)
    rows = np.flatnonzero(manifest.readable)
    probs = np.full((len(manifest), len(classifier.class_ids)), np.nan, dtype=np.float32)
    probs[rows] = classifier.predict_images(
        images[torch.from_numpy(rows)], batch_size=batch_size, reporter=reporter
    )
    frame = base_frame(manifest)
    frame["given_label"] = [classifier.class_ids[k] for k in labels]
    predicted = pd.Series([classifier.class_ids[k] for k in probs.argmax(axis=1)], dtype="string")
    frame["predicted_label"] = predicted.where(manifest.readable, pd.NA)
    frame["predicted_prob"] = probs.max(axis=1)
    frame["probs"] = list(probs)
    if out is not None:
        configs = {"finetune": classifier.info["finetune"], "backbone": classifier.info["backbone"]}
        extra = {
            "class_ids": classifier.class_ids,
            "class_names": classifier.class_names,
            "classifier": str(model),
        }
        write_results(frame, out, metadata=run_metadata(manifest=manifest, configs=configs, extra=extra))
    return frame
