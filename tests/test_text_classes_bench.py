"""benchmarks/text_classes.py: the synthetic K-class image set and the planted features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks.text_classes import planted_features, synthetic_classes


def test_synthetic_classes_writes_k_classes_with_exact_noise(tmp_path):
    labels, truth, classes = synthetic_classes(tmp_path, 12, per_class=5, noise=0.2, seed=3)
    given, true = pd.read_csv(labels), pd.read_csv(truth)
    assert len(given) == len(true) == 60 and (given["path"] == true["path"]).all()
    assert (given["label"] != true["label"]).sum() == 12  # round(0.2 * 60) flips, never to the same class
    assert true["label"].value_counts().tolist() == [5] * 12
    assert len(classes.read_text().splitlines()) == 12
    first = np.asarray(Image.open(tmp_path / true["path"][0]))
    assert first.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="classes 101"):
        synthetic_classes(tmp_path, 101)


def test_planted_features_cluster_by_true_class():
    features, given, truth = planted_features(20, 8, per_class=10, noise=0.3, seed=0)
    assert features.shape == (200, 8) and (given != truth).sum() == 60
    centres = np.stack([features[truth == k].mean(0).numpy() for k in range(20)])
    nearest = np.argmax(features.numpy() @ centres.T, axis=1)
    assert (nearest == truth).mean() > 0.95
