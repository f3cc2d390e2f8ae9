"""Results file: schema from COLUMNS, round trip (dtypes, categoricals, metadata), atomic write, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_clean import read_results
from deft_clean.config import DataConfig, DetectConfig
from deft_clean.data import Manifest
from deft_clean.errors import DeftCleanError
from deft_clean.results import COLUMNS, base_frame, run_metadata, schema_markdown, write_results

DOCS = Path(__file__).resolve().parents[1] / "docs" / "output-schema.md"


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return Manifest(
        data_dir=tmp_path,
        paths=["a.png", "b.png", "c.png", "d.png"],
        labels=np.array([0, 1, 1, 0]),
        class_ids=["7", "3", "12"],
        class_names=["golden_retriever", "cat", "unused"],
        readable=np.array([True, True, False, True]),
        fingerprint={"source": "csv", "csv_sha256": "ab" * 32, "n_rows": 4, "n_files": 3},
    )


@pytest.fixture
def scored(manifest: Manifest) -> pd.DataFrame:
    frame = base_frame(manifest)
    frame["is_noisy"] = pd.array([False, True, None, False], dtype="boolean")
    frame["clean_score"] = np.array([0.5, -0.4, np.nan, 0.1])
    frame["p_clean"] = np.array([0.9, 0.1, np.nan, 0.7])
    frame["margin"] = [0.2, -0.3, np.nan, 0.05]
    frame["predicted_label"] = ["7", "12", None, "7"]
    frame["predicted_prob"] = [0.8, 0.6, np.nan, 0.5]
    frame["suggested_label"] = [None, "12", None, None]
    frame["noise_rank"] = pd.array([2, 1, None, 3], dtype="Int64")
    frame["fold"] = pd.array([-1, -1, None, -1], dtype="Int64")
    return frame


def test_base_frame(manifest: Manifest) -> None:
    frame = base_frame(manifest)
    assert list(frame.columns) == ["path", "given_label", "status"]
    assert frame["path"].tolist() == manifest.paths
    assert frame["given_label"].tolist() == ["7", "3", "3", "7"]
    assert list(frame["given_label"].cat.categories) == ["7", "3", "12"]
    assert frame["status"].tolist() == ["ok", "ok", "unreadable", "ok"]


def test_round_trip_keeps_values_dtypes_categories_and_metadata(tmp_path, manifest, scored) -> None:
    configs = {"data": DataConfig(min_per_class=3), "detect": DetectConfig(seed=5)}
    meta = run_metadata(manifest=manifest, configs=configs, extra={"seed": 5})
    written = write_results(scored, tmp_path / "out" / "flags.parquet", metadata=meta)
    assert [p.name for p in written.parent.iterdir()] == ["flags.parquet"]
    back = read_results(written)
    assert list(back.columns) == [name for name in COLUMNS if name != "probs"]
    for name in back.columns:
        assert str(back[name].dtype) == COLUMNS[name][0], name
    for name in ("given_label", "predicted_label", "suggested_label"):
        assert list(back[name].cat.categories) == ["7", "3", "12"]  # unused class kept, class order kept
    assert back["suggested_label"].isna().tolist() == [True, False, True, True]
    assert back["p_clean"].dtype == np.float32 and np.isnan(back["p_clean"][2])
    assert back["noise_rank"].tolist()[:2] == [2, 1] and back["noise_rank"].isna()[2]
    assert back.attrs["class_ids"] == ["7", "3", "12"] and back.attrs["class_names"][0] == "golden_retriever"
    assert (
        back.attrs["configs"]["data"]["min_per_class"] == 3 and back.attrs["configs"]["detect"]["seed"] == 5
    )
    assert back.attrs["input"]["csv_sha256"] == "ab" * 32 and back.attrs["seed"] == 5
    assert back.attrs["schema_version"] == 1 and "low p_clean" in back.attrs["score_direction"].lower()
    assert {"torch", "open_clip_torch", "peft", "numpy", "pandas", "pyarrow", "python"} <= set(
        back.attrs["packages"]
    )


def test_probability_lists_round_trip(tmp_path, manifest) -> None:
    frame = base_frame(manifest)
    frame["probs"] = [np.array([0.5, 0.25, 0.25], np.float32)] * 2 + [np.full(3, np.nan, np.float32)] * 2
    path = write_results(frame, tmp_path / "p.parquet", metadata=run_metadata(manifest=manifest, configs={}))
    probs = np.stack(read_results(path)["probs"])
    assert probs.shape == (4, 3) and probs[0].tolist() == [0.5, 0.25, 0.25] and np.isnan(probs[3]).all()


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(
    tmp_path, manifest, scored, monkeypatch
) -> None:
    meta = run_metadata(manifest=manifest, configs={})
    target = write_results(base_frame(manifest), tmp_path / "flags.parquet", metadata=meta)
    before = target.read_bytes()

    def crash(table: pa.Table, where: Path, **kwargs) -> None:
        Path(where).write_bytes(b"PAR1 half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        write_results(scored, target, metadata=meta)
    assert [p.name for p in tmp_path.iterdir()] == ["flags.parquet"]
    assert target.read_bytes() == before


def test_write_refuses_unknown_columns_and_unknown_labels(tmp_path, manifest, scored) -> None:
    meta = run_metadata(manifest=manifest, configs={})
    with pytest.raises(DeftCleanError, match=r"unknown \['extra'\]"):
        write_results(scored.assign(extra=1), tmp_path / "x.parquet", metadata=meta)
    with pytest.raises(DeftCleanError, match="missing \\['status'\\]"):
        write_results(scored.drop(columns="status"), tmp_path / "x.parquet", metadata=meta)
    bad = scored.assign(predicted_label=["7", "dog", None, "7"])
    with pytest.raises(
        DeftCleanError, match="'predicted_label' holds labels that are not class ids, e.g. 'dog'"
    ):
        write_results(bad, tmp_path / "x.parquet", metadata=meta)
    assert not list(tmp_path.glob("*.parquet"))


def test_read_refuses_files_that_are_not_ours(tmp_path, manifest) -> None:
    with pytest.raises(DeftCleanError, match="not found"):
        read_results(tmp_path / "missing.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(DeftCleanError, match="not a readable Parquet file"):
        read_results(tmp_path / "text.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(DeftCleanError, match="not a deft-clean results file"):
        read_results(tmp_path / "other.parquet")
    meta = run_metadata(manifest=manifest, configs={}) | {"schema_version": 99}
    write_results(base_frame(manifest), tmp_path / "future.parquet", metadata=meta)
    with pytest.raises(DeftCleanError, match="schema 99"):
        read_results(tmp_path / "future.parquet")


def test_metadata_is_json_in_the_arrow_schema(tmp_path, manifest) -> None:
    meta = run_metadata(manifest=manifest, configs={"data": DataConfig()}, extra={"path": tmp_path})
    write_results(base_frame(manifest), tmp_path / "f.parquet", metadata=meta)
    raw = pq.read_schema(tmp_path / "f.parquet").metadata[b"deft_clean"]
    assert json.loads(raw)["path"] == str(tmp_path)


def test_docs_show_the_schema_generated_from_columns() -> None:
    table = schema_markdown()
    assert table.count("\n") == len(COLUMNS) + 2
    assert table in DOCS.read_text(encoding="utf-8")
