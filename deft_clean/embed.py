"""Frozen image features: one un-augmented pass of every image through the image tower.

Used by ``deft-clean embed`` and by the benchmark baselines (cleanlab, kNN, small-loss), so all of
them see exactly the same pixels as ``detect --peft none``: the decode-once cache at the backbone's
input size, through :func:`deft_clean.runtime.feature_pass`.

``pooled=True`` returns the tower's pooled features *before* its projection head when that head is a
plain linear layer on a timm trunk (open_clip ``TimmModel``, e.g. the ``offline`` backbone, whose
projection is freshly initialised): a random 1280→D projection only loses information. Other towers
(CLIP ViTs, whose projection is trained) give ``encode_image`` either way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deft_clean.backbone import Backbone, input_size, load_backbone_on
from deft_clean.config import BackboneConfig, DataConfig
from deft_clean.data import Manifest, load_manifest
from deft_clean.files import atomic_file, check_output, releases_outputs
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.runtime import StagedImages, feature_pass


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


def stage(
    manifest: Manifest,
    backbone: Backbone,
    device: torch.device,
    *,
    rows: np.ndarray | None = None,
    num_workers: int = 0,
    cache_dir: Path | None = None,
    reporter: Reporter = SilentReporter(),
) -> StagedImages:
    """Decode ``manifest``'s images of ``rows`` (default: all) once at the backbone's size and stage
    them for ``device``, normalised with the backbone's mean/std: what every stage feeds its tower
    with. Only the span of the cache from the first to the last of ``rows`` is staged (under torchrun,
    a process's block)."""
    rows = np.arange(len(manifest)) if rows is None else np.asarray(rows)
    cache = manifest.decode(
        backbone.image_size, rows=rows, num_workers=num_workers, cache_dir=cache_dir, reporter=reporter
    )
    first = int(rows.min()) if len(rows) else 0
    last = int(rows.max()) + 1 if len(rows) else 0
    return StagedImages(
        cache[first:last], rows - first, mean=backbone.mean, std=backbone.std, size=backbone.image_size,
        device=device,
    )  # fmt: skip


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
    if not isinstance(data, Manifest):
        data = load_manifest(data, labels_csv, image_size=backbone.image_size, reporter=reporter)
    manifest = data
    model = backbone.model
    device = next(model.parameters()).device
    images = stage(
        manifest, backbone, device, num_workers=num_workers, cache_dir=cache_dir, reporter=reporter
    )
    was_training = model.training
    model.eval()
    features = feature_pass(
        image_tower(model, pooled=pooled), images, batch_size=batch_size, reporter=reporter,
        description="Embedding images",
    )  # fmt: skip
    model.train(was_training)
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


@releases_outputs
def embed(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    data: DataConfig = DataConfig(),
    backbone: BackboneConfig = BackboneConfig(),
    out: str | Path | None = None,
    pooled: bool = False,
    batch_size: int = 256,
    overwrite: bool = False,
    reporter: Reporter = SilentReporter(),
) -> np.ndarray:
    """Read and validate a labelled image set, build the backbone, return :func:`embed_images` (N, D).

    Rows skipped as unreadable (``on_bad_image='skip'``) are NaN.
    ``out`` also saves the array as ``.npy`` (atomically); rows follow the input order of ``labels_csv``
    (or the ImageFolder listing); it is checked first (:func:`check_output`: an existing file is refused
    unless ``overwrite``).
    """
    if out is not None:
        check_output(out, inputs=[data_dir, labels_csv, data.classes_file], overwrite=overwrite)
    size = input_size(backbone)  # validation keeps the pixels it decodes at this size: one decode per image
    manifest = load_manifest(data_dir, labels_csv, config=data, image_size=size, reporter=reporter)
    built, _ = load_backbone_on(backbone)
    features = embed_images(manifest, built, batch_size=batch_size, pooled=pooled, reporter=reporter)
    features[~manifest.readable] = np.nan  # rows skipped with on_bad_image='skip': no features
    if out is not None:
        with atomic_file(out) as partial, open(partial, "wb") as handle:
            np.save(handle, features)
    return features
