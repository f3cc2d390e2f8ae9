"""finetune / predict on a tiny random CLIP (test-tiny) with solid-colour classes, CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import stage_configs
from PIL import Image
from typer.testing import CliRunner

from deft_clean.classifier import classification_metrics, load_classifier, predict
from deft_clean.cli import app
from deft_clean.config import BackboneConfig, DataConfig, FinetuneConfig
from deft_clean.data import load_manifest
from deft_clean.errors import ConfigError
from deft_clean.finetune import finetune, select_training_rows
from deft_clean.results import base_frame, read_results, run_metadata, write_results
from deft_clean.runtime import cosine_lr

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
FAST = {"model": "test-tiny", "device": "cpu", "batch_size": 8, "num_workers": 1, "seed": 0}


def _colour_set(root: Path, per_class: int, seed: int, wrong: int = 0) -> Path:
    """root/labels.csv over solid-colour 16x16 PNGs; the first ``wrong`` rows get the next class's label."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = ["path,label"]
    for k, name in enumerate(names):
        for i in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 21, size=(16, 16, 3)), 0, 255)
            rel = f"{name}/{i}.png"
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(root / rel)
            label = names[(k + 1) % 3] if i < wrong else name
            lines.append(f"{rel},{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("colours")
    train_csv = _colour_set(base / "train", per_class=10, seed=0, wrong=2)
    test_csv = _colour_set(base / "test", per_class=4, seed=1)
    return {"train": base / "train", "train_csv": train_csv, "test": base / "test", "test_csv": test_csv}


def _flags(
    data_dir: Path, csv: Path, out: Path, noisy: np.ndarray, *, source_csv: Path | None = None
) -> Path:
    """A detector-style flags file: rows ``noisy`` flagged, suggested/predicted = true colour, prob 0.95."""
    manifest = load_manifest(data_dir, source_csv or csv)
    frame = base_frame(manifest)
    truth = [p.split("/")[0] for p in manifest.paths]
    frame["is_noisy"] = noisy
    frame["p_clean"] = np.where(noisy, 0.1, 0.9).astype(np.float32)
    frame["predicted_label"] = truth
    frame["predicted_prob"] = np.float32(0.95)
    given = frame["given_label"].astype("string")
    frame["suggested_label"] = pd.Series(truth, dtype="string").where(noisy, given)  # as detect writes it
    meta = run_metadata(manifest=manifest, configs={"backbone": BackboneConfig(model="test-tiny")})
    return write_results(frame, out, metadata=meta)


def _wrong_mask() -> np.ndarray:
    """The rows _colour_set(wrong=2) mislabelled: the first two of each class of 10."""
    return np.array([i < 2 for _ in range(3) for i in range(10)])


def test_cosine_lr_schedule() -> None:
    assert cosine_lr(0.1, 0 / 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50 / 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100 / 100) == pytest.approx(0.0)
    assert cosine_lr(0.1, 1.5) == pytest.approx(0.0)  # past the end: clamped, as finetune's last step


def test_metrics_hand_computed() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    metrics = classification_metrics(probs, np.array([0, 1, 1]), ["a", "b"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["per_class_accuracy"] == {"a": 1.0, "b": 0.5}
    assert metrics["confusion_matrix"] == [[1, 0], [1, 1]]


def test_select_clean_only_and_relabel(colours: dict[str, Path], tmp_path: Path) -> None:
    wrong = _wrong_mask()
    flags = read_results(_flags(colours["train"], colours["train_csv"], tmp_path / "f.parquet", wrong))
    manifest = load_manifest(colours["train"], colours["train_csv"])
    clean = select_training_rows(manifest, flags, FinetuneConfig(clean_only=True))
    assert list(clean.rows) == list(np.flatnonzero(~wrong))
    assert (clean.n_dropped, clean.n_relabelled) == (6, 0)
    relabelled = select_training_rows(manifest, flags, FinetuneConfig(relabel=True, relabel_threshold=0.9))
    assert len(relabelled.rows) == 30 and relabelled.n_relabelled == 6
    truth = [manifest.class_ids.index(path.split("/")[0]) for path in manifest.paths]
    assert list(relabelled.labels) == truth  # the suggested (true) colours replaced the wrong labels
    strict = select_training_rows(manifest, flags, FinetuneConfig(relabel=True, relabel_threshold=0.99))
    assert len(strict.rows) == 24 and strict.n_dropped == 6
    own = flags.copy()  # a flagged row whose best guess is its own label is dropped, not "relabelled"
    own.loc[0, ["suggested_label", "predicted_label"]] = own.loc[0, "given_label"]
    kept = select_training_rows(manifest, own, FinetuneConfig(relabel=True, relabel_threshold=0.9))
    assert 0 not in kept.rows and (kept.n_relabelled, kept.n_dropped) == (5, 1)


def test_flags_need_a_selection_mode(colours: dict[str, Path], tmp_path: Path) -> None:
    flags = read_results(
        _flags(colours["train"], colours["train_csv"], tmp_path / "f.parquet", _wrong_mask())
    )
    manifest = load_manifest(colours["train"], colours["train_csv"])
    with pytest.raises(ConfigError, match="--clean-only"):
        select_training_rows(manifest, flags, FinetuneConfig())
    with pytest.raises(ConfigError, match="need a flags file"):
        select_training_rows(manifest, None, FinetuneConfig(clean_only=True))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("tune", "half", "--tune 'half' is invalid. Use a value 'full', 'lora' or 'linear'"),
        ("lambda_v", 1.5, "--lambda-v"),
    ],
)
def test_bad_options_refused_before_loading(option: str, value: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        finetune(tmp_path / "does-not-exist", **stage_configs("finetune", **{option: value}))


def test_linear_probe_learns_colours_and_reloads_identically(
    colours: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "model"
    result = finetune(
        colours["train"],
        colours["train_csv"],
        flags=_flags(colours["train"], colours["train_csv"], tmp_path / "f.parquet", _wrong_mask()),
        out=out,
        test_dir=colours["test"],
        test_csv=colours["test_csv"],
        **stage_configs(
            "finetune", clean_only=True, tune="linear", method="tes", epochs=30, lr=0.5,
            **{k: v for k, v in FAST.items() if k != "model"},  # the backbone recorded in the flags file
        ),
    )  # fmt: skip
    assert result.classifier.info["backbone"]["model"] == "test-tiny"
    assert result.n_train == 24 and result.n_dropped == 6
    assert result.metrics is not None and result.metrics["accuracy"] >= 0.9  # chance is 1/3
    assert sorted(p.name for p in out.iterdir()) == [
        "classifier.json",
        "head.safetensors",
        "metrics.json",
        "tower.safetensors",
    ]
    images = sorted(str(p) for p in (colours["test"]).rglob("*.png"))
    reloaded = load_classifier(out, device="cpu")
    assert torch.equal(result.classifier(images), reloaded(images))
    assert reloaded.class_ids == ["blue", "green", "red"]
    frame = predict(out, colours["test"], colours["test_csv"], out=tmp_path / "pred.parquet")
    stored = read_results(tmp_path / "pred.parquet")
    assert list(stored.columns) == [
        "path",
        "given_label",
        "status",
        "predicted_label",
        "predicted_prob",
        "probs",
    ]
    assert (stored["predicted_label"] == stored["given_label"]).mean() >= 0.9
    assert np.allclose(np.stack(stored["probs"]).sum(1), 1.0, atol=1e-5)
    assert stored.attrs["configs"]["finetune"]["method"] == "tes"
    assert frame["predicted_prob"].to_numpy() == pytest.approx(np.stack(stored["probs"]).max(1))


def test_full_tuning_with_ce_trains_the_tower_and_saves_it(colours: dict[str, Path], tmp_path: Path) -> None:
    result = finetune(
        colours["train"], colours["train_csv"], out=tmp_path,
        **stage_configs("finetune", tune="full", method="ce", epochs=2, **FAST),
    )  # fmt: skip
    assert result.n_train == 30  # no flags: every row
    reloaded = load_classifier(tmp_path, device="cpu")
    assert len(reloaded.tower_keys) == len(result.classifier.tower.state_dict())
    batch = torch.rand(2, 3, 32, 32)
    assert torch.allclose(result.classifier(batch), reloaded(batch), atol=1e-6)


def test_lora_saves_only_adapters(colours: dict[str, Path], tmp_path: Path) -> None:
    result = finetune(
        colours["train"],
        colours["train_csv"],
        out=tmp_path,
        **stage_configs("finetune", tune="lora", epochs=1, **FAST),
    )
    keys = result.classifier.tower_keys
    assert keys and all("lora_" in k for k in keys)
    batch = torch.rand(2, 3, 20, 20)  # resized to the backbone's 32 px
    assert torch.allclose(result.classifier(batch), load_classifier(tmp_path, device="cpu")(batch), atol=1e-6)
    saved = json.loads((tmp_path / "classifier.json").read_text())["lora_targets"]
    assert saved == ["attn", "c_fc", "c_proj"]  # reloading uses these, whatever later defaults say


def _refused_clean_only(colours: dict[str, Path], flags: Path, tmp_path: Path, *extra: str) -> str:
    """Run ``finetune --flags FLAGS --clean-only`` expecting exit 1; returns the output on one line."""
    args = [
        "finetune",
        str(colours["train"]),
        str(colours["train_csv"]),
        "--flags",
        str(flags),
        "--clean-only",
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m"), *extra])
    assert result.exit_code == 1
    return " ".join(result.output.split())


def test_cli_refuses_flags_from_another_input(colours: dict[str, Path], tmp_path: Path) -> None:
    other_csv = tmp_path / "other.csv"
    other_csv.write_text(colours["train_csv"].read_text().replace("blue/9.png,blue\n", ""))
    flags = _flags(colours["train"], other_csv, tmp_path / "f.parquet", np.zeros(29, bool))
    text = _refused_clean_only(colours, flags, tmp_path, "--model", "test-tiny")
    assert "different input" in text and "fingerprint" in text and "29 rows" in text
    assert "deft-clean detect" in text


def test_cli_refuses_all_noisy_flags(colours: dict[str, Path], tmp_path: Path) -> None:
    flags = _flags(colours["train"], colours["train_csv"], tmp_path / "f.parquet", np.ones(30, bool))
    text = _refused_clean_only(colours, flags, tmp_path)
    assert "marks 30 of 30 readable rows noisy" in text and "--relabel" in text


def test_cli_finetune_then_predict(colours: dict[str, Path], tmp_path: Path) -> None:
    model_dir, pred = tmp_path / "m", tmp_path / "pred.parquet"
    args = ["finetune", str(colours["train"]), str(colours["train_csv"]), "--out", str(model_dir)]
    opts = [
        "--model",
        "test-tiny",
        "--device",
        "cpu",
        "--tune",
        "linear",
        "--epochs",
        "3",
        "--batch-size",
        "8",
    ]
    result = CliRunner().invoke(
        app, [*args, *opts, "--test-dir", str(colours["test"]), "--test-csv", str(colours["test_csv"])]
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and (model_dir / "metrics.json").is_file()
    result = CliRunner().invoke(app, ["predict", str(model_dir), str(colours["test"]), "--out", str(pred)])
    assert result.exit_code == 0, result.output
    assert len(read_results(pred)) == 12


def test_predict_classifies_a_plain_folder_of_unlabelled_images(
    colours: dict[str, Path], tmp_path: Path
) -> None:
    model = finetune(
        colours["train"], colours["train_csv"], **stage_configs("finetune", tune="linear", epochs=3, **FAST)
    ).classifier
    loose = tmp_path / "new"
    loose.mkdir()
    for k, name in enumerate(COLOURS):  # no CSV, no class folders: just images, one of them broken
        Image.new("RGB", (16, 16), COLOURS[name]).save(loose / f"{k}.png")
    (loose / "broken.jpg").write_bytes(b"not a jpeg")
    frame = predict(model, loose, data=DataConfig(on_bad_image="skip"), out=tmp_path / "p.parquet")
    assert frame["path"].tolist() == ["0.png", "1.png", "2.png", "broken.jpg"]
    assert frame["given_label"].isna().all() and frame["status"].tolist() == ["ok"] * 3 + ["unreadable"]
    assert frame["predicted_label"][:3].notna().all() and pd.isna(frame["predicted_label"][3])
    stored = read_results(tmp_path / "p.parquet")
    assert stored.attrs["input"]["source"] == "folder" and len(stored) == 4
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "m"), str(loose), "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 1 and "classifier.json" in " ".join(
        result.output.split()
    )  # no model saved there
