"""Parquet input: a table (or a folder of them) with an image column and a label column, as DATA_DIR."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import stage_configs
from PIL import Image
from typer.testing import CliRunner

from deft_clean.classifier import predict
from deft_clean.cli import app
from deft_clean.config import DataConfig
from deft_clean.data import load_manifest
from deft_clean.detect import detect
from deft_clean.errors import DataError
from deft_clean.finetune import finetune
from deft_clean.report import build_report

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
QUICK = dict(model="test-tiny", device="cpu", peft="none", epochs=1, warmup_epochs=0, batch_size=8, n_ctx=4)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Unpacked images go to a per-test cache, not the user's."""
    monkeypatch.setenv("DEFT_CLEAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _jpeg(rgb: tuple[int, int, int], seed: int) -> bytes:
    pixels = np.clip(np.array(rgb) + np.random.default_rng(seed).normal(0, 20, (24, 24, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _cifar_like(path: Path, n: int = 24, *, start: int = 0, broken: int | None = None) -> list[str]:
    """A table like ../shared/data/cifar10/*.parquet: index, label (int8), label_name, jpeg (binary)."""
    names = list(COLOURS)
    labels = [(start + i) % 3 for i in range(n)]
    jpegs = [_jpeg(COLOURS[names[k]], start + i) for i, k in enumerate(labels)]
    if broken is not None:
        jpegs[broken] = b"not a jpeg"
    table = pa.table(
        {
            "index": pa.array(range(start, start + n), pa.int32()),
            "label": pa.array(labels, pa.int8()),
            "label_name": pa.array([names[k] for k in labels]).dictionary_encode(),
            "jpeg": pa.array(jpegs, pa.binary()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return [names[k] for k in labels]


def test_a_table_reads_like_a_labels_csv_with_rows_named_by_index(tmp_path) -> None:
    names = _cifar_like(tmp_path / "train.parquet")
    manifest = load_manifest(tmp_path / "train.parquet", config=DataConfig(label_col="label_name"))
    assert manifest.paths == [str(i) for i in range(24)]
    assert [manifest.class_ids[k] for k in manifest.labels] == names
    assert manifest.fingerprint["source"] == "parquet" and manifest.fingerprint["image_col"] == "jpeg"
    assert manifest.readable.all() and manifest.file(5).read_bytes()[:2] == b"\xff\xd8"  # the JPEG as stored
    integer = load_manifest(tmp_path / "train.parquet")  # default label column: the int8 'label'
    assert integer.class_ids == ["0", "1", "2"]


def test_a_folder_of_tables_is_one_table_and_hf_image_structs_work(tmp_path) -> None:
    _cifar_like(tmp_path / "data" / "train-00000-of-00002.parquet", n=6)
    _cifar_like(tmp_path / "data" / "train-00001-of-00002.parquet", n=6, start=6)
    manifest = load_manifest(tmp_path / "data", config=DataConfig(label_col="label_name"))
    assert len(manifest) == 12 and manifest.paths[-1] == "11"
    # Hugging Face's Image feature: a struct of bytes and path (here one row by path, relative to the table)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "a.jpg").write_bytes(_jpeg(COLOURS["red"], 1))
    cells = [{"bytes": _jpeg(COLOURS["blue"], k), "path": None} for k in range(4)] + [
        {"bytes": None, "path": "a.jpg"}
    ]
    pq.write_table(pa.table({"image": cells, "label": ["blue"] * 4 + ["red"]}), tmp_path / "hf" / "t.parquet")
    hf = load_manifest(tmp_path / "hf" / "t.parquet", config=DataConfig(min_per_class=1))
    assert hf.class_ids == ["blue", "red"] and hf.readable.all()


def test_hugging_face_class_names_become_the_class_names(tmp_path) -> None:
    """``datasets`` stores a ClassLabel's names in the schema metadata; the prompts need them."""
    import json

    cells = [{"bytes": _jpeg(rgb, k), "path": None} for k, rgb in enumerate(COLOURS.values())] * 2
    table = pa.table({"image": cells, "label": pa.array([0, 1, 2] * 2, pa.int64())})
    features = {"image": {"_type": "Image"}, "label": {"names": list(COLOURS), "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "hf.parquet")
    manifest = load_manifest(tmp_path / "hf.parquet")
    assert manifest.class_ids == ["0", "1", "2"] and manifest.class_names == ["red", "green", "blue"]
    assert manifest.labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_table_problems_are_reported_like_csv_problems(tmp_path) -> None:
    _cifar_like(tmp_path / "t.parquet", broken=3)
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "t.parquet")
    assert [(p.kind, p.path) for p in caught.value.problems] == [("unreadable", "3")]
    skipped = load_manifest(tmp_path / "t.parquet", config=DataConfig(on_bad_image="skip"))
    assert not skipped.readable[3] and skipped.readable.sum() == 23
    with pytest.raises(DataError, match="no label column \\('klass'\\); the table has: index, label"):
        load_manifest(tmp_path / "t.parquet", config=DataConfig(label_col="klass"))


def test_detect_finetune_predict_and_check_take_a_table(tmp_path) -> None:
    table = tmp_path / "train.parquet"
    _cifar_like(table)
    data = {"label_col": "label_name"}
    result = detect(table, out=tmp_path / "flags.parquet", **stage_configs("detect", **data, **QUICK))
    frame = result.frame
    assert frame["path"].tolist() == [str(i) for i in range(24)] and frame["p_clean"].notna().all()
    assert frame.attrs["input"]["source"] == "parquet"
    assert build_report(tmp_path / "flags.parquet").n_missing_images == 0  # thumbnails from the cache
    options = stage_configs("finetune", **data, model="test-tiny", device="cpu", tune="linear", epochs=1,
                            batch_size=8, clean_only=True)  # fmt: skip
    trained = finetune(table, flags=tmp_path / "flags.parquet", out=tmp_path / "model", **options)
    assert trained.n_dropped == int(frame["is_noisy"].sum())
    predictions = predict(tmp_path / "model", table, data=DataConfig(**data), out=tmp_path / "pred.parquet")
    assert predictions["path"].tolist() == [str(i) for i in range(24)]
    run = CliRunner().invoke(app, ["check", str(table), "--label-col", "label_name"])
    assert run.exit_code == 0 and "24 rows" in run.output
