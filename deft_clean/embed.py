"""Frozen image features: one un-augmented pass of every image through the image tower.

Used by ``detect --peft none`` and by the benchmark baselines (cleanlab, kNN, small-loss), so all of
them see exactly the same pixels: the decode-once cache (``images.build_image_cache`` at the
backbone's input size) normalised by ``augment.gpu_augment(train=False)``.

``pooled=True`` returns the tower's pooled features *before* its projection head when that head is a
plain linear layer on a timm trunk (open_clip ``TimmModel``, e.g. the ``offline`` backbone, whose
projection is freshly initialised): a random 1280→D projection only loses information. Other towers
(CLIP ViTs, whose projection is trained) give ``encode_image`` either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deft_clean.config import BackboneConfig, DataConfig, split_options
from deft_clean.progress import Reporter, SilentReporter

if TYPE_CHECKING:
    from deft_clean.backbone import Backbone
    from deft_clean.data import Manifest


def image_tower(model: torch.nn.Module, *, pooled: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function mapping a normalised batch (B, 3, S, S) to features (B, D) (not yet L2-normalised).

    With ``pooled`` and a timm trunk whose head only projects (no attention pooling), the trunk's own
    pooled output (B, trunk.num_features); otherwise ``model.encode_image``.
    """
    visual = getattr(model, "visual", None)
    head = getattr(visual, "head", None)
    trunk = getattr(visual, "trunk", None)
    if pooled and trunk is not None and head is not None and "pool" not in dict(head.named_children()):
        return trunk
    return model.encode_image


@torch.no_grad()
def embed_images(
    data: Manifest | str | Path,
    backbone: Backbone,
    *,
    labels_csv: str | Path | None = None,
    batch_size: int = 256,
    pooled: bool = False,
    cache_dir: Path | None = None,
    num_workers: int = 0,
    reporter: Reporter = SilentReporter(),
) -> np.ndarray:
    """L2-normalised image features, float32 (N, D), rows in the manifest's input order.

    ``data`` is a :class:`Manifest` or a data directory (read with ``load_manifest(data, labels_csv)``).
    Images are not augmented; on CUDA the tower runs under bf16 autocast. Unreadable rows
    (``manifest.readable == False``) get the features of a black image; callers drop them.
    """
    from deft_clean.augment import gpu_augment
    from deft_clean.backbone import autocast
    from deft_clean.data import load_manifest
    from deft_clean.images import build_image_cache

    manifest = data if not isinstance(data, (str, Path)) else load_manifest(data, labels_csv)
    images = build_image_cache(
        manifest, backbone.image_size, cache_dir=cache_dir, num_workers=num_workers, reporter=reporter
    )
    model = backbone.model
    device = next(model.parameters()).device
    tower = image_tower(model, pooled=pooled)
    was_training = model.training
    model.eval()
    chunks = []
    with reporter.task("Embedding images", total=len(images)):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            batch = gpu_augment(
                batch, mean=backbone.mean, std=backbone.std, out_size=backbone.image_size, train=False
            )
            with autocast(device):
                features = tower(batch)  # (B, D)
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
            reporter.advance(len(batch))
    model.train(was_training)
    return torch.cat(chunks).numpy()


def embed(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    out: str | Path | None = None,
    pooled: bool = False,
    batch_size: int = 256,
    reporter: Reporter = SilentReporter(),
    **options: Any,
) -> np.ndarray:
    """Read and validate a labelled image set, build the backbone, return :func:`embed_images` (N, D).

    ``options`` are fields of DataConfig and BackboneConfig (e.g. ``model``, ``pretrained``, ``device``).
    ``out`` also saves the array as ``.npy`` (written under a temporary name, then renamed); rows follow
    the input order of ``labels_csv`` (or the ImageFolder listing).
    """
    from deft_clean.backbone import load_backbone, resolve_device
    from deft_clean.data import load_manifest

    data_config, backbone_config = split_options(options, DataConfig, BackboneConfig)
    manifest = load_manifest(data_dir, labels_csv, config=data_config, reporter=reporter)
    backbone = load_backbone(backbone_config)
    backbone.model.to(resolve_device(backbone_config.device))
    features = embed_images(manifest, backbone, batch_size=batch_size, pooled=pooled, reporter=reporter)
    if out is not None:
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial.npy")
        np.save(partial, features)
        os.replace(partial, target)
    return features
