"""The bundled example (README command 1) is valid input and its truth file matches its labels."""

from pathlib import Path

import numpy as np
import pandas as pd

from deft_clean.config import DataConfig
from deft_clean.data import load_labels, load_manifest

EXAMPLE = Path(__file__).parents[1] / "examples" / "fashion-mnist"


def test_example_passes_validation_with_its_classes():
    manifest = load_manifest(
        EXAMPLE, EXAMPLE / "labels.csv", config=DataConfig(classes_file=str(EXAMPLE / "classes.txt"))
    )
    assert len(manifest) == 300 and manifest.readable.all()
    assert len(manifest.class_ids) == 10 and manifest.class_names[0] == "T-shirt or top"
    assert np.bincount(manifest.labels, minlength=10).min() >= 2


def test_truth_marks_exactly_the_rows_whose_label_differs():
    manifest = load_manifest(
        EXAMPLE, EXAMPLE / "labels.csv", config=DataConfig(classes_file=str(EXAMPLE / "classes.txt"))
    )
    true = load_labels(EXAMPLE / "truth.csv", manifest)
    flagged = pd.read_csv(EXAMPLE / "truth.csv")["is_noisy"].to_numpy(bool)
    assert ((true != manifest.labels) == flagged).all()
    assert flagged.sum() == 60  # 20% planted, as the README says
