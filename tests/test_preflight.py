"""`check` runs every rule `detect` runs: each dataset `detect` refuses, `check` reports the same way."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from conftest import write_image
from typer.testing import CliRunner

from deft_clean.cli import app

DETECT = importlib.import_module("deft_clean.detect")
LONG_NAME = " ".join(["very"] * 40) + " long class"


def _dataset(root: Path, labels: list[str], *, missing: int | None = None) -> Path:
    """``root/img/k.png`` per label (``missing``: that row's file is not written) and ``root/labels.csv``."""
    lines = ["path,label"]
    for k, label in enumerate(labels):
        if k != missing:
            write_image(root / "img" / f"{k}.png", seed=k)
        lines.append(f"img/{k}.png,{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "labels.csv"


def _classes(root: Path, text: str) -> str:
    (root / "classes.txt").write_text(text, encoding="utf-8")
    return str(root / "classes.txt")


# name -> (labels, missing row, extra options builder, the problem kind both must name)
CASES = {
    "one class": (["cat"] * 4, None, lambda root: [], "one_class"),
    "one class with images, another empty": (
        ["cat"] * 4,
        None,
        lambda root: ["--classes", _classes(root, "cat\ndog\n"), "--min-per-class", "0"],
        "one_class",
    ),
    "class name too long for the text tower": (
        ["a", "a", "b", "b"],
        None,
        lambda root: ["--classes", _classes(root, f"a,{LONG_NAME}\nb,bird\n")],
        "long_class_name",
    ),
    "class name fits only with fewer contexts": (
        ["a", "a", "b", "b"],
        None,
        lambda root: ["--classes", _classes(root, "a," + " ".join(["word"] * 30) + "\nb,bird\n")],
        "long_class_name",
    ),
    "missing image": (["a", "a", "b", "b"], 1, lambda root: [], "missing_file"),
    "unknown label": (
        ["a", "a", "b", "c"],
        None,
        lambda root: ["--classes", _classes(root, "a\nb\n"), "--min-per-class", "1"],
        "unknown_label",
    ),
    "small class": (["a", "a", "b"], None, lambda root: [], "small_class"),
    "empty label": (["a", "a", "b", "b", ""], None, lambda root: [], "empty_label"),
}


def _summary(output: str) -> str:
    """The one-line error ('N problem(s) in SOURCE: kinds. First: ...'), whitespace normalised."""
    text = " ".join(output.split())
    return text[text.index("error:") :]


@pytest.mark.parametrize("case", list(CASES))
def test_check_reports_every_refusal_of_detect(case, tmp_path, monkeypatch, wide_console):
    labels, missing, extra, kind = CASES[case]
    root = tmp_path / "data"
    csv = _dataset(root, labels, missing=missing)
    options = [*extra(root), "--model", "test-tiny"]
    monkeypatch.setattr(DETECT, "load_backbone_on", lambda *a: pytest.fail("detect built the model"))
    detect_args = ["detect", str(root), str(csv), "--out", str(tmp_path / "f.parquet"), "--n-ctx", "16"]
    refused = CliRunner().invoke(app, [*detect_args, *options])
    checked = CliRunner().invoke(app, ["check", str(root), str(csv), "--n-ctx", "16", *options])
    assert refused.exit_code == 2 and checked.exit_code == 2, (refused.output, checked.output)
    assert kind in _summary(refused.output)
    assert _summary(checked.output) == _summary(refused.output)
    assert not (tmp_path / "f.parquet").exists()


def test_a_name_that_fits_with_fewer_contexts_passes_check(tmp_path, wide_console):
    root = tmp_path / "data"
    csv = _dataset(root, ["a", "a", "b", "b"])
    classes = _classes(root, "a," + " ".join(["word"] * 30) + "\nb,bird\n")
    args = ["check", str(root), str(csv), "--classes", classes, "--model", "test-tiny"]
    assert CliRunner().invoke(app, [*args, "--n-ctx", "4"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--n-ctx", "16"])
    assert result.exit_code == 2
    assert "needs 49 tokens with 16 context vectors; the text tower of 'test-tiny' takes 40" in " ".join(
        result.output.split()
    )
    assert "--n-ctx" in result.output and "--classes file" in result.output


def test_one_class_message_says_why(tmp_path, wide_console):
    root = tmp_path / "data"
    csv = _dataset(root, ["cat"] * 3)
    result = CliRunner().invoke(app, ["check", str(root), str(csv), "--model", "test-tiny"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "1 class with readable images ('cat'); DeFT needs at least 2" in text


def test_one_class_from_a_forgotten_csv_says_how_the_folder_was_read(tmp_path, wide_console):
    root = tmp_path / "data"
    _dataset(root, ["a", "a", "b", "b"])  # images under data/img/, labels in data/labels.csv
    result = CliRunner().invoke(app, ["check", str(root), "--model", "test-tiny"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "1 class with readable images ('img')" in text
    assert "Without a labels CSV, DATA_DIR is read as an ImageFolder: each subfolder is a class." in text


def test_finetune_refuses_one_class_with_checks_message_before_training(tmp_path, wide_console, monkeypatch):
    finetune = importlib.import_module("deft_clean.finetune")  # the module, not the package's function
    root = tmp_path / "data"
    csv = _dataset(root, ["cat"] * 3)
    monkeypatch.setattr(finetune, "build_tower", lambda *a: pytest.fail("training started"))
    out = tmp_path / "model"
    args = ["finetune", str(root), str(csv), "--model", "test-tiny"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    check = CliRunner().invoke(app, ["check", str(root), str(csv), "--model", "test-tiny"])
    assert result.exit_code == check.exit_code == 2, result.output
    message = "1 class with readable images ('cat'); DeFT needs at least 2"
    assert message in " ".join(result.output.split()) and message in " ".join(check.output.split())
    assert not out.exists()
