"""benchmarks/text_classes.py: the synthetic K-class image set and the planted features."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import datasets, run, text_classes
from benchmarks.text_classes import planted_features


def test_many_class_set_materialises_k_classes_with_exact_noise(tmp_path):
    data = datasets.materialise("synthetic", data_root=tmp_path, cache_dir=tmp_path, seed=3, classes=12)
    assert data.root.name == "synthetic-k12-all" and len(data.paths) == 240
    assert np.bincount(data.labels).tolist() == [20] * 12
    assert len(data.class_ids) == 12 and data.class_names[11] == "class 011"
    given = datasets.symmetric_noise(data.labels, 0.2, 12, seed=3)
    assert (given != data.labels).sum() == 48  # round(0.2 * 240) flips, never to the same class
    first = np.asarray(Image.open(data.root / data.paths[0]))
    top, bottom = first[:16].reshape(-1, 3).mean(0), first[16:].reshape(-1, 3).mean(0)
    assert np.abs(top - bottom).max() < 20  # class 0: the same palette colour on both halves
    second = np.asarray(Image.open(data.root / data.paths[11]))  # class 11: colours 1 and 1
    assert np.abs(second[:16].reshape(-1, 3).mean(0) - top).max() > 50
    with pytest.raises(ValueError, match="--classes 101"):
        datasets.load_source("synthetic", tmp_path, classes=101)


def test_run_refuses_classes_without_the_synthetic_dataset():
    with pytest.raises(SystemExit):
        run.parse_args(["--dataset", "cifar10", "--classes", "100"])


def test_planted_features_cluster_by_true_class():
    features, given, truth = planted_features(20, 8, per_class=10, noise=0.3, seed=0)
    assert features.shape == (200, 8) and (given != truth).sum() == 60
    centres = np.stack([features[truth == k].mean(0).numpy() for k in range(20)])
    nearest = np.argmax(features.numpy() @ centres.T, axis=1)
    assert (nearest == truth).mean() > 0.95


def test_timing_runs_a_sampled_and_a_full_step_on_the_tiny_backbone(tmp_path):
    """The timing command trains real steps with the config a CPU run resolves (lr decided at run time)."""
    out = tmp_path / "timing.json"
    text_classes.main(
        ["timing", "--model", "test-tiny", "--classes", "40", "--batch-size", "8", "--steps", "2"]
        + ["--text-classes", "16", "--repeats", "1", "--shared-prefix", "both", "--out", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    variants = {(row["sampling"], row["encoded"], row["shared_prefix"]) for row in rows}
    assert variants == {("off", 40, False), ("off", 40, True), ("on", 16, False), ("on", 16, True)}
    assert all(row["classes"] == 40 and row["step_s"] > 0 and row["load_1min"] >= 0 for row in rows)


def test_agreement_summary_gives_each_modes_difference_to_the_full_run_per_seed():
    rows = [
        {"seed": seed, "sampling": mode, "auroc": value}
        for seed, values in ((0, (0.80, 0.82, 0.85)), (1, (0.90, 0.86, 0.91)))
        for mode, value in zip(("off", "off-reseeded", "on"), values, strict=True)
    ]
    summary = text_classes._agreement_summary(rows, "auroc", ["off", "off-reseeded", "on"])
    assert summary["off_mean"] == pytest.approx(0.85) and summary["off_sd"] == pytest.approx(0.0707, abs=1e-4)
    assert summary["off-reseeded_minus_off_mean"] == pytest.approx(-0.01)  # +0.02 and -0.04
    assert summary["off-reseeded_minus_off_max_abs"] == pytest.approx(0.04)
    assert summary["on_minus_off_mean"] == pytest.approx(0.03) and summary[
        "on_minus_off_sd"
    ] == pytest.approx(0.02828, abs=1e-4)
    assert "off_minus_off_mean" not in summary
