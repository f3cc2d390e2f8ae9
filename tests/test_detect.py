"""detect(): end to end on generated images with planted wrong labels, with the tiny random backbone.

Behaviour settings (found reliable for ``test-tiny``, whose towers are random): a frozen image tower
(``peft='none'``: features computed once), class-specific contexts (a random text tower cannot steer
one shared context towards four arbitrary directions), 20 epochs with 5 warm-up epochs, batch 8,
lr 0.1. At seed 0 this finds all 35 planted errors among 200 images with no false alarm (seeds 0-4 as
well; seed 5 fails to place one class's positive prompt).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LogLines, stage_configs
from PIL import Image

from deft_clean import transitions
from deft_clean.backbone import load_backbone
from deft_clean.config import BackboneConfig, DetectConfig
from deft_clean.crossfit import EpochAverage, Evidence, fold_plan, logged_verdict
from deft_clean.data import load_manifest
from deft_clean.deft_model import DeftModel, load_detector
from deft_clean.detect import default_out, detect, fit_and_score, score_detector
from deft_clean.embed import stage
from deft_clean.errors import ConfigError, TrainingError
from deft_clean.results import COLUMNS, read_results
from deft_clean.runtime import seed_everything
from deft_clean.training import LabelledImages, train_detector

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
BEHAVIOUR = dict(
    model="test-tiny", device="cpu", peft="none", class_specific_ctx=True, epochs=20, warmup_epochs=5,
    batch_size=8, lr=0.1, seed=0,
)  # fmt: skip
QUICK = dict(model="test-tiny", device="cpu", peft="none", epochs=2, warmup_epochs=1, batch_size=8, n_ctx=4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is fastest, and avoids spin-waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(root: Path, per_class: int, noise: float = 0.2, seed: int = 0) -> tuple[Path, Path, Path]:
    """Solid colour classes with pixel noise; ``noise`` of the labels flipped to another class.

    Returns (data_dir, labels.csv, truth.csv); rows are shuffled so the CSV order is not class order.
    """
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = []
    for k, (name, rgb) in enumerate(COLOURS.items()):
        for _ in range(per_class):
            pixels = np.array(rgb, float) + rng.normal(0, 25, 3) + rng.normal(0, 30, (40, 40, 3))
            given = names[(k + rng.integers(1, len(names))) % len(names)] if rng.random() < noise else name
            rows.append((np.clip(pixels, 0, 255).astype(np.uint8), given, name))
    order = rng.permutation(len(rows))
    labels, truth = ["path,label"], ["path,label"]
    (root / "img").mkdir(parents=True)
    for i, j in enumerate(order):
        pixels, given, true = rows[j]
        Image.fromarray(pixels).save(root / "img" / f"{i:04d}.png")
        labels.append(f"img/{i:04d}.png,{given}")
        truth.append(f"img/{i:04d}.png,{true}")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    (root / "truth.csv").write_text("\n".join(truth) + "\n")
    return root, root / "labels.csv", root / "truth.csv"


@pytest.fixture(scope="module")
def behaviour(tmp_path_factory):
    root, labels, truth = make_dataset(tmp_path_factory.mktemp("colours"), per_class=50)
    result = detect(root, labels, truth_csv=truth, **stage_configs("detect", **BEHAVIOUR))
    return result.frame, labels, truth, result


def test_finds_planted_label_errors(behaviour):
    frame, _, truth_csv, _ = behaviour
    truth = pd.read_csv(truth_csv)
    wrong = (frame["given_label"].astype(str) != truth["label"]).to_numpy()
    flagged = frame["is_noisy"].to_numpy(dtype=bool)
    precision = (flagged & wrong).sum() / flagged.sum()
    recall = (flagged & wrong).sum() / wrong.sum()
    assert wrong.sum() == 35 and precision >= 0.9 and recall >= 0.9
    metrics = frame.attrs["detect"]["truth"]
    assert metrics["precision"] == pytest.approx(precision) and metrics["recall"] == pytest.approx(recall)


def test_selection_switches_on_after_warmup(behaviour):
    epochs = behaviour[0].attrs["detect"]["epochs"]
    assert [e["selected_fraction"] for e in epochs[:5]] == [1.0] * 5  # warm-up: CE on every sample
    assert 0.7 < epochs[-1]["selected_fraction"] < 0.95  # then only the ones judged clean (~82% are)


def test_results_file_schema_order_and_columns(behaviour):
    frame, labels_csv, _, _ = behaviour
    written = read_results(default_out(labels_csv))
    assert list(written.columns) == [c for c in COLUMNS if c != "probs"]  # probs: predict only
    assert written["path"].tolist() == pd.read_csv(labels_csv)["path"].tolist()  # input order kept
    pd.testing.assert_series_equal(written["p_clean"], frame["p_clean"])
    assert sorted(written["noise_rank"].tolist()) == list(range(1, len(written) + 1))
    by_rank = written.sort_values("noise_rank")
    assert by_rank["clean_score"].is_monotonic_increasing  # ranks follow the score that decides the flag
    ranked_flags = by_rank["is_noisy"].to_numpy(dtype=bool)
    assert ranked_flags[: ranked_flags.sum()].all()  # every flagged row ranks before every kept row
    assert (written["is_noisy"] == (written["clean_score"] < 0)).all() and written["clean_score"].between(
        -1, 1
    ).all()
    noisy = written["is_noisy"].to_numpy(dtype=bool)
    assert (written["predicted_label"].astype(str) != written["given_label"].astype(str))[noisy].all()
    expected = np.where(noisy, written["predicted_label"].astype(str), written["given_label"].astype(str))
    assert (written["suggested_label"].astype(str).to_numpy() == expected).all()
    assert ((written["predicted_prob"] > 0.25) & (written["predicted_prob"] <= 1)).all()
    assert written["margin"].between(-2, 2).all() and (written["fold"] == -1).all()  # in-sample: one model


def test_metadata_counts_and_timings(behaviour):
    frame, _, _, result = behaviour
    summary = frame.attrs["detect"]
    assert result.summary.to_dict() == summary  # the typed summary is what the file records
    assert result.summary.n_flagged == summary["n_flagged"] and result.summary.timings.total_s > 0
    classes = {c["id"]: c for c in summary["classes"]}
    assert set(classes) == set(COLOURS) and sum(c["n"] for c in classes.values()) == 200
    for cid, c in classes.items():
        in_class = frame["given_label"].astype(str) == cid
        assert c["flagged"] == int(frame.loc[in_class, "is_noisy"].sum())
        assert c["noise_rate"] == pytest.approx(c["flagged"] / c["n"])
    assert summary["n_flagged"] == int(frame["is_noisy"].sum())
    assert summary["timings"]["total_s"] >= summary["timings"]["train_s"] > 0
    assert summary["images_per_s"] > 0 and len(summary["epochs"]) == 20
    assert frame.attrs["configs"]["detect"]["epochs"] == 20


def test_same_seed_same_results_and_unreadable_rows(tmp_path):
    root, labels, _ = make_dataset(tmp_path / "d", per_class=6)
    (root / "img" / "0003.png").write_bytes(b"not a png")
    runs = [
        detect(
            root,
            labels,
            out=tmp_path / f"r{i}.parquet",
            **stage_configs("detect", on_bad_image="skip", **QUICK),
        ).frame
        for i in range(2)
    ]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    bad = runs[0].iloc[3]
    assert bad["status"] == "unreadable" and pd.isna(bad["is_noisy"]) and pd.isna(bad["noise_rank"])
    assert np.isnan(bad["p_clean"]) and pd.isna(bad["predicted_label"])
    assert runs[0]["noise_rank"].dropna().sort_values().tolist() == list(range(1, 24))
    assert runs[0].attrs["detect"]["n_unreadable"] == 1


def test_lora_detector_saves_and_reloads(tmp_path):
    root, labels, _ = make_dataset(tmp_path / "d", per_class=4)
    options = dict(QUICK, peft="lora", lora_rank=2, epochs=1)
    frame = detect(
        root,
        labels,
        out=tmp_path / "r.parquet",
        save_model=tmp_path / "det",
        **stage_configs("detect", **options),
    ).frame
    assert {p.name for p in (tmp_path / "det").iterdir()} == {"detector.json", "prompts.pt", "lora"}
    net, meta = load_detector(tmp_path / "det")
    assert meta["class_ids"] == sorted(COLOURS) and meta["configs"]["detect"]["peft"] == "lora"
    saved_targets = meta["configs"]["detect"]["lora_targets"].split(",")  # the defaults, written out
    assert sorted(saved_targets) == sorted(load_backbone(BackboneConfig(model="test-tiny")).lora_targets)
    lora = [p for n, p in net.model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # trained (B starts at zero) and reloaded
    manifest = load_manifest(root, labels)
    images = stage(manifest, load_backbone(BackboneConfig(model="test-tiny")), torch.device("cpu"))
    data = LabelledImages(images, manifest.labels)
    rescored = score_detector(net, data, DetectConfig(**meta["configs"]["detect"]))
    np.testing.assert_allclose(rescored.p_clean, frame["p_clean"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("peft", ["lora", "vpt"])
def test_a_tuned_towers_probe_reads_the_tower_as_it_was_before_tuning(tmp_path, monkeypatch, peft):
    root, labels, _ = make_dataset(tmp_path / "d", per_class=4)
    probed, log = [], LogLines()

    def recording(*args, **kwargs):
        probed.append(kwargs["untuned"])
        return fit_and_score(*args, **kwargs)

    monkeypatch.setattr(importlib.import_module("deft_clean.detect"), "fit_and_score", recording)
    options = dict(QUICK, peft=peft, lora_rank=2, vpt_len=2, epochs=1)
    detect(root, labels, out=tmp_path / "r.parquet", save_model=tmp_path / "det", reporter=log,
           **stage_configs("detect", **options))  # fmt: skip
    net, _ = load_detector(tmp_path / "det")  # trained adapters or prompts
    seed_everything(DetectConfig().seed)  # the random tower detect drew
    backbone = load_backbone(BackboneConfig(model="test-tiny"))
    plain = DeftModel(backbone, ["a"], DetectConfig(peft="none"))
    manifest = load_manifest(root, labels)
    pixels = stage(manifest, backbone, torch.device("cpu")).images_at(
        torch.arange(len(manifest)), train=False
    )
    with torch.no_grad():
        frozen, tuned = plain.trunk_features(pixels), net.model.encode_image(pixels)
    assert not torch.allclose(frozen, tuned, atol=1e-3)  # tuning moved the tower
    torch.testing.assert_close(probed[0], frozen)  # the probe's features did not move with it
    assert any(
        line.startswith("Linear probe: a ridge fit on the untuned tower's features") for line in log.lines
    )


def test_flag_rule_dual_flags_and_ranks_by_p_clean(tmp_path):
    root, labels, _ = make_dataset(tmp_path / "d", per_class=6)
    margin, dual = (
        detect(
            root, labels, out=tmp_path / f"{rule}.parquet", **stage_configs("detect", flag_rule=rule, **QUICK)
        ).frame
        for rule in ("margin", "dual")
    )
    pd.testing.assert_series_equal(margin["p_clean"], dual["p_clean"])  # same model, same scores
    np.testing.assert_array_equal(dual["is_noisy"].to_numpy(bool), (dual["p_clean"] <= 0.5).to_numpy())
    np.testing.assert_array_equal(margin["is_noisy"].to_numpy(bool), (margin["clean_score"] < 0).to_numpy())
    for frame, key in ((margin, "clean_score"), (dual, "p_clean")):
        assert frame.sort_values("noise_rank")[key].is_monotonic_increasing
    assert (margin["is_noisy"] != dual["is_noisy"]).any()  # the rule changed something here


def test_crossfit_never_scores_a_row_with_a_model_that_saw_its_label(tmp_path, monkeypatch):
    root, labels, _ = make_dataset(tmp_path / "d", per_class=6)
    trained_on = []  # the samples each fold model trains on, in call order (fold 0, 1, 2)

    def recording(net, data, config, **kwargs):
        trained_on.append(set(data.index.tolist()))
        return train_detector(net, data, config, **kwargs)

    monkeypatch.setattr(importlib.import_module("deft_clean.detect"), "train_detector", recording)
    log = LogLines()
    options = dict(QUICK, scoring="crossfit", folds=3, peft="auto")
    frame = detect(
        root, labels, out=tmp_path / "r.parquet", reporter=log, **stage_configs("detect", **options)
    ).frame
    fold = frame["fold"].to_numpy(dtype=np.int64)
    assert sorted(set(fold)) == [0, 1, 2] and len(trained_on) == 3
    for k, seen in enumerate(trained_on):
        scored = set(np.flatnonzero(fold == k).tolist())
        assert scored and not (seen & scored)  # the fold's model never saw the labels of the rows it scored
        assert seen | scored == set(range(len(frame)))  # and trained on every other row
    assert frame.attrs["configs"]["detect"]["scoring"] == "crossfit" and {
        e["fold"] for e in frame.attrs["detect"]["epochs"]
    } == {0, 1, 2}
    assert frame.attrs["configs"]["detect"]["peft"] == "none"  # auto on a CPU, recorded as what ran
    assert any("--peft auto chose 'none'" in line for line in log.lines)
    assert any(line.startswith("Most frequent wrong labels by the class transitions: ") for line in log.lines)
    assert any(
        line.startswith("Linear probe: a ridge fit on the untuned tower's features") for line in log.lines
    )
    votes = [line for line in log.lines if line.startswith("Neighbour votes: ")]
    assert len(votes) == 1 and votes[0].endswith("weigh 0.125 in its class probabilities.")  # 0.5 of 1/4


def test_beyond_the_class_cap_the_log_says_the_margin_alone_flags(monkeypatch):
    monkeypatch.setattr(transitions, "MAX_CLASSES", 2)
    monkeypatch.setattr(importlib.import_module("deft_clean.crossfit"), "MAX_CLASSES", 2)
    probs = np.tile([[0.6, 0.3, 0.1]], (6, 1))
    average = EpochAverage(probs, np.full_like(probs, 0.9), np.zeros(6), 1)
    log, labels = LogLines(), np.array([0, 0, 1, 1, 2, 2])
    evidence = Evidence({}, None, ["a", "b", "c"])
    scores = logged_verdict(average, labels, np.full(6, -1), evidence, DetectConfig(probe_weight=0), log)
    assert log.lines == ["Class transitions are not estimated above 2 classes: the margin alone flags."]
    assert scores.is_noisy.tolist() == [False, False, True, True, True, True]


def test_fold_plan_is_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [9, 6, 4])
    fold = fold_plan(labels, 3, seed=1)
    for k in range(3):
        counts = np.bincount(fold[labels == k], minlength=3)
        assert counts.max() - counts.min() <= 1  # each class dealt evenly over the folds
    np.testing.assert_array_equal(fold, fold_plan(labels, 3, seed=1))
    assert (fold_plan(labels, 1, seed=1) == -1).all()


def test_auto_settings_follow_the_device_and_the_rows():
    cpu, notes = DetectConfig().resolved(cuda=False, rows=2000)
    assert (cpu.peft, cpu.batch_size, cpu.lr) == ("none", 250, 0.0593) and "chose 'none'" in notes[0]
    small, _ = DetectConfig().resolved(cuda=False, rows=300)  # a frozen tower keeps ~8 steps per epoch
    assert (small.batch_size, small.lr) == (64, 0.03)
    huge, _ = DetectConfig().resolved(cuda=False, rows=50_000)
    assert (huge.batch_size, huge.lr) == (256, 0.06)
    gpu, _ = DetectConfig().resolved(cuda=True, rows=2000)
    assert (gpu.peft, gpu.batch_size, gpu.lr) == ("lora", 64, 0.03)
    kept, notes = DetectConfig(peft="vpt", batch_size=32, lr=0.01).resolved(cuda=False, rows=2000)
    assert (kept.peft, kept.batch_size, kept.lr) == ("vpt", 32, 0.01) and notes == []


def test_truth_for_some_rows_only(tmp_path):
    root, labels, truth = make_dataset(tmp_path / "d", per_class=4)
    lines = truth.read_text().splitlines()
    (tmp_path / "part.csv").write_text("\n".join(lines[:5]) + "\n")  # header + 4 rows
    result = detect(
        root,
        labels,
        out=tmp_path / "r.parquet",
        truth_csv=tmp_path / "part.csv",
        **stage_configs("detect", **QUICK),
    )
    assert result.frame.attrs["detect"]["truth"]["n"] == 4 and result.summary.truth["n"] == 4


@pytest.mark.parametrize(
    ("change", "option"),
    [({"warmup_epochs": 3, "epochs": 2}, "--warmup-epochs"), ({"threshold": 1.0}, "--threshold"),
     ({"lr_schedule": "linear"}, "--lr-schedule"), ({"peft": "full"}, "--peft"),
     ({"flag_rule": "any"}, "--flag-rule"), ({"class_balance": "yes"}, "--class-balance"),
     ({"num_workers": -1}, "--num-workers"), ({"vpt_len": 0}, "--vpt-len")],
)  # fmt: skip
def test_invalid_options_are_refused(change, option):
    with pytest.raises(ConfigError, match=option):
        DetectConfig(**change)


def test_default_out(tmp_path):
    assert default_out(tmp_path / "labels.csv") == tmp_path / "labels.deft.parquet"
    assert default_out(None) == Path("deft_results.parquet")


def test_cli_detect_writes_results_and_summary(tmp_path, wide_console):
    from typer.testing import CliRunner

    from deft_clean.cli import app

    root, labels, truth = make_dataset(tmp_path / "d", per_class=4)
    args = [
        "detect",
        str(root),
        str(labels),
        "--truth",
        str(truth),
        "--model",
        "test-tiny",
        "--device",
        "cpu",
    ]
    args += ["--peft", "none", "--epochs", "1", "--batch-size", "8", "--n-ctx", "4", "--seed", "3"]
    result = CliRunner().invoke(app, [*args, "--class-balance", "on", "--report"])
    assert result.exit_code == 0, result.output
    written = read_results(tmp_path / "d" / "labels.deft.parquet")
    page = (tmp_path / "d" / "labels.deft.html").read_text()  # --report: the page beside the results
    assert f"<span id='n-flagged'>{int(written['is_noisy'].sum())}</span>" in page
    assert "caught <b>" in page and " s on cpu" in page  # --truth and detect's time reach the report
    assert len(written) == 16 and written.attrs["configs"]["detect"]["seed"] == 3
    assert written.attrs["configs"]["detect"]["class_balance"] == "on"
    assert (
        "flagged:" in result.output
        and "precision" in result.output
        and "labels.deft.parquet" in result.output
        and "report: " in result.output  # where the page is, as `deft-clean report` says
    )


def test_class_balance_auto_means_a_tuned_tower():
    assert [DetectConfig(peft=p).balances for p in ("lora", "vpt", "none")] == [True, True, False]
    assert DetectConfig(peft="none", class_balance="on").balances
    assert not DetectConfig(peft="lora", class_balance="off").balances


def test_adapters_get_their_own_learning_rate():
    assert DetectConfig(lr=0.03).adapter_peak_lr(conv=False) == pytest.approx(
        0.03
    )  # ViT towers: the authors'
    assert DetectConfig(lr=0.03).adapter_peak_lr(conv=True) == pytest.approx(0.003)  # conv towers: a tenth
    assert DetectConfig(lr=0.03, adapter_lr=0.01).adapter_peak_lr(conv=True) == pytest.approx(0.01)
    backbone = load_backbone(BackboneConfig(model="test-tiny"))
    config = DetectConfig(peft="lora", lr=0.05, adapter_lr=0.002)
    groups = DeftModel(backbone, ["a", "b"], config).param_groups(config)
    assert [g["peak_lr"] for g in groups] == [0.05, 0.002]
    assert all(
        "lora_" in n for n, p in backbone.model.named_parameters() if any(p is q for q in groups[1]["params"])
    )
    prompts_only = DeftModel(
        load_backbone(BackboneConfig(model="test-tiny")), ["a", "b"], DetectConfig(peft="none")
    )
    assert [g["peak_lr"] for g in prompts_only.param_groups(DetectConfig(peft="none", lr=0.03))] == [0.03]


def test_cli_detect_reports_bad_options(tmp_path):
    from typer.testing import CliRunner

    from deft_clean.cli import app

    root, labels, _ = make_dataset(tmp_path / "d", per_class=2)
    result = CliRunner().invoke(
        app, ["detect", str(root), str(labels), "--model", "test-tiny", "--epochs", "0"]
    )
    assert result.exit_code == 1 and "--epochs 0 is invalid" in result.output


def test_diverged_training_fails_loudly_and_writes_nothing(tmp_path):
    root, labels, _ = make_dataset(tmp_path / "d", per_class=4)
    out = tmp_path / "r.parquet"
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*No results were written.") as caught:
        detect(root, labels, out=out, **stage_configs("detect", **{**QUICK, "lr": 1e30}))
    assert "--lr (this run: 1e+30)" in caught.value.hint
    assert not out.exists()
