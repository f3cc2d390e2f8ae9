"""load_manifest: CSV and ImageFolder inputs, column detection, class order and names, load_labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deft_clean import load_manifest
from deft_clean.config import DataConfig
from deft_clean.data import class_order, load_labels
from deft_clean.errors import ConfigError, DataError
from deft_clean.tables import read_table


def test_csv_manifest_keeps_input_order_and_sorts_integer_classes_numerically(csv_dataset) -> None:
    root, csv_path = csv_dataset
    manifest = load_manifest(root, csv_path)
    assert manifest.data_dir == root.resolve()
    assert manifest.paths == [f"img/{k}.png" for k in range(6)]
    assert manifest.class_ids == ["2", "10"] and manifest.class_names == ["2", "10"]
    assert manifest.labels.dtype == np.int64
    assert manifest.labels.tolist() == [1, 0, 0, 1, 0, 1]
    assert manifest.readable.all() and len(manifest) == 6
    assert manifest.file(3) == root.resolve() / "img/3.png"
    fingerprint = manifest.fingerprint
    assert fingerprint["source"] == "csv" and len(fingerprint["csv_sha256"]) == 64
    assert (fingerprint["n_rows"], fingerprint["n_files"]) == (6, 6)


def test_image_folder_manifest(image_folder: Path) -> None:
    manifest = load_manifest(image_folder)
    assert manifest.paths == [
        "cat/c0.png",
        "cat/c1.png",
        "cat/c2.png",
        "dog/d0.jpg",
        "dog/d1.jpg",
        "dog/d2.jpg",
    ]
    assert manifest.class_ids == ["cat", "dog"]
    assert manifest.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert manifest.fingerprint["source"] == "imagefolder"
    before = manifest.fingerprint["listing_sha256"]
    (image_folder / "dog" / "d2.jpg").unlink()
    assert load_manifest(image_folder).fingerprint["listing_sha256"] != before


def test_image_folder_ignores_non_images_and_hidden_files(image_folder: Path, make_image) -> None:
    (image_folder / "cat" / "notes.txt").write_text("x")
    make_image(image_folder / "cat" / ".hidden.png")
    make_image(image_folder / ".trash" / "x.png")
    assert len(load_manifest(image_folder)) == 6


def test_empty_image_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_manifest(tmp_path)


def test_missing_data_dir_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_manifest(tmp_path / "nope")
    assert info.value.problems[0].path == str(tmp_path / "nope")


@pytest.mark.parametrize(
    ("header", "options"),
    [
        ("Image,Class", {}),
        ("filename,label", {}),
        ("id,file,extra,label", {}),
        ("picture,target", {"image_col": "picture", "label_col": "target"}),
    ],
)
def test_column_detection(tmp_path: Path, make_image, header: str, options: dict) -> None:
    make_image(tmp_path / "x.png")
    columns = header.split(",")
    values = {"Image": "x.png", "filename": "x.png", "file": "x.png", "picture": "x.png"}
    row = ",".join(values.get(c, "7" if c.lower() in ("class", "label", "target") else "zz") for c in columns)
    csv_path = tmp_path / "l.csv"
    csv_path.write_text(f"{header}\n{row}\n")
    (parsed,), _ = read_table(csv_path, **options)
    assert (parsed.line, parsed.path, parsed.label) == (2, "x.png", "7")


def test_semicolon_and_quoted_fields(tmp_path: Path) -> None:
    csv_path = tmp_path / "l.csv"
    csv_path.write_text('path;label\n"a;b.png";cat\n\n"c.png";"dog"\n')
    rows, _ = read_table(csv_path)
    assert [(r.line, r.path, r.label) for r in rows] == [(2, "a;b.png", "cat"), (4, "c.png", "dog")]


def test_missing_columns_suggest_nearest_names(tmp_path: Path) -> None:
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("image_path,labels\nx.png,1\n")
    with pytest.raises(DataError) as info:
        read_table(csv_path, label_col="lable")
    image, label = info.value.problems
    assert image.row == 1 and image.path == str(csv_path)
    assert (
        "no image path column" in image.message and "'image_path'" in image.fix and "--image-col" in image.fix
    )
    assert "'lable'" in label.message and "'labels'" in label.fix and "--label-col" in label.fix


def test_short_rows_become_empty_labels_with_their_line(tmp_path: Path, make_image) -> None:
    for k in range(3):
        make_image(tmp_path / f"{k}.png")
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("path,label\n0.png,a\n1.png\n2.png,a\n")
    with pytest.raises(DataError) as info:
        load_manifest(tmp_path, csv_path, config=DataConfig(min_per_class=1))
    (problem,) = info.value.problems
    assert (problem.kind, problem.row, problem.path) == ("empty_label", 3, "1.png")


def test_classes_file_sets_order_names_and_prompt_names(csv_dataset, tmp_path: Path) -> None:
    root, csv_path = csv_dataset
    classes = tmp_path / "classes.txt"
    classes.write_text("10, golden_retriever\n\n2,tabby_cat\n")
    manifest = load_manifest(root, csv_path, config=DataConfig(classes_file=str(classes)))
    assert manifest.class_ids == ["10", "2"]
    assert manifest.class_names == ["golden_retriever", "tabby_cat"]
    assert manifest.prompt_names() == ["golden retriever", "tabby cat"]
    assert manifest.labels.tolist() == [0, 1, 1, 0, 1, 0]


def test_class_in_classes_file_without_images_is_reported(csv_dataset, tmp_path: Path) -> None:
    root, csv_path = csv_dataset
    classes = tmp_path / "classes.txt"
    classes.write_text("2\n10\n33\n")
    with pytest.raises(DataError, match="class '33' has 0 readable"):
        load_manifest(root, csv_path, config=DataConfig(classes_file=str(classes)))
    config = DataConfig(classes_file=str(classes), min_per_class=0)
    assert load_manifest(root, csv_path, config=config).class_ids == ["2", "10", "33"]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["10", "2", "-1", "2"], ["-1", "2", "10"]),
        (["b", "a", "10"], ["10", "a", "b"]),
        (["1.5", "1"], ["1", "1.5"]),
    ],
)
def test_class_order(labels: list[str], expected: list[str]) -> None:
    assert class_order(labels) == expected


@pytest.mark.parametrize(
    ("option", "value"), [("on_bad_image", "ignore"), ("min_per_class", -1), ("max_image_pixels", 0)]
)
def test_invalid_options_raise_config_error(csv_dataset, option: str, value) -> None:
    root, csv_path = csv_dataset
    with pytest.raises(ConfigError, match=str(value)):
        load_manifest(root, csv_path, config=DataConfig(**{option: value}))


def test_load_labels_maps_ids_and_names_by_path(csv_dataset, tmp_path: Path) -> None:
    root, csv_path = csv_dataset
    manifest = load_manifest(root, csv_path)
    truth = tmp_path / "truth.csv"
    truth.write_text(
        "image,class\nimg/5.png,2\nimg/0.png,2\nimg/1.png,2\nimg/2.png,10\n./img/3.png,10\nimg/4.png,2\n"
    )
    assert load_labels(truth, manifest).tolist() == [0, 0, 1, 1, 0, 0]
    truth.write_text("image,class\nimg/0.png,2\nimg/1.png,7\n")
    with pytest.raises(DataError) as info:
        load_labels(truth, manifest)
    kinds = [(p.kind, p.path) for p in info.value.problems]
    assert ("unknown_label", "img/1.png") in kinds and ("missing_row", "img/5.png") in kinds
    assert len(kinds) == 5
    truth.write_text("image,class\nimg/0.png,2\nimg/3.png,10\nnot/in/manifest.png,2\n")
    assert load_labels(truth, manifest, allow_missing=True).tolist() == [0, -1, -1, 1, -1, -1]
