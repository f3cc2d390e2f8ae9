"""Validation: every problem reported at once, each naming its CSV row and file; exit code 2 from the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from deft_clean.cli import app
from deft_clean.config import DataConfig
from deft_clean.data import load_manifest
from deft_clean.errors import DataError

runner = CliRunner()


@pytest.fixture
def bad_dataset(tmp_path: Path, make_image) -> tuple[Path, Path, Path]:
    """One of each row-level problem at once: (data_dir, labels.csv, classes.txt)."""
    root = tmp_path / "data"
    for name in ("a/1.png", "a/2.png", "b/1.png", "b/2.png", "b/3.png", "c/1.png"):
        make_image(root / name, seed=len(name))
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "a" / "notimage.png").write_bytes(b"this is not a png")
    jpeg = make_image(root / "a" / "trunc.jpg", size=(64, 48)).read_bytes()
    (root / "a" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    outside = make_image(tmp_path / "outside.png")
    os.symlink(outside, root / "a" / "link.png")
    rows = [
        "a/1.png,a",  # line 2
        "a/2.png,a",
        "a/missing.png,a",  # 4: missing file
        "a/zero.png,a",  # 5: 0 bytes
        "a/trunc.jpg,a",  # 6: truncated
        "a/notimage.png,a",  # 7: unreadable
        "a/1.png,a",  # 8: duplicate of row 2
        "b/1.png,b",
        "b/2.png,b",
        "b/3.png,zebra",  # 11: label not in --classes
        "c/1.png,c",  # 12: class c has 1 image < 2
        "../outside.png,b",  # 13: '..'
        f"{outside},b",  # 14: absolute
        "a/link.png,b",  # 15: symlink out
    ]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    classes = tmp_path / "classes.txt"
    classes.write_text("a,apple\nb,banana_split\nc\n", encoding="utf-8")
    return root, csv_path, classes


def test_check_reports_every_problem_at_once(bad_dataset, wide_console) -> None:
    root, csv_path, classes = bad_dataset
    result = runner.invoke(app, ["check", str(root), str(csv_path), "--classes", str(classes)])
    assert result.exit_code == 2, result.output
    out = result.output
    for name in (
        "a/missing.png",
        "a/zero.png",
        "a/trunc.jpg",
        "a/notimage.png",
        "b/3.png",
        "c/1.png",
        "../outside.png",
        str(Path(str(root)).parent / "outside.png"),
        "a/link.png",
    ):
        assert name in out, name
    for phrase in (
        "not found",
        "empty (0 bytes)",
        "truncated",
        "cannot decode",
        "same image as row 2",
        "'zebra' is not in --classes",
        "class 'c' has 1",
        "through '..'",
        "absolute path",
        "is a symlink to",
    ):
        assert phrase in out, phrase
    assert "error: 10 problem(s)" in out


def test_problems_name_row_and_file(bad_dataset) -> None:
    root, csv_path, classes = bad_dataset
    with pytest.raises(DataError) as info:
        load_manifest(root, csv_path, config=DataConfig(classes_file=str(classes)))
    where = {(p.kind, p.row, p.path) for p in info.value.problems}
    assert ("missing_file", 4, "a/missing.png") in where
    assert ("empty_file", 5, "a/zero.png") in where
    assert ("unreadable", 6, "a/trunc.jpg") in where
    assert ("unreadable", 7, "a/notimage.png") in where
    assert ("duplicate", 8, "a/1.png") in where
    assert ("unknown_label", 11, "b/3.png") in where
    assert ("small_class", 12, "c/1.png") in where
    assert {p.row for p in info.value.problems if p.kind == "unsafe_path"} == {13, 14, 15}
    assert [p.row for p in info.value.problems] == sorted(p.row for p in info.value.problems)


def test_skip_keeps_bad_images_as_unreadable_rows(tmp_path: Path, make_image) -> None:
    root = tmp_path / "data"
    for name in ("a/1.png", "a/2.png", "b/1.png", "b/2.png"):
        make_image(root / name)
    (root / "b" / "zero.png").write_bytes(b"")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "file,class\na/1.png,a\nb/zero.png,b\na/2.png,a\nb/gone.png,b\nb/1.png,b\nb/2.png,b\n"
    )
    with pytest.raises(DataError):
        load_manifest(root, csv_path)
    manifest = load_manifest(root, csv_path, config=DataConfig(on_bad_image="skip"))
    assert manifest.paths == ["a/1.png", "b/zero.png", "a/2.png", "b/gone.png", "b/1.png", "b/2.png"]
    assert manifest.readable.tolist() == [True, False, True, False, True, True]
    assert manifest.labels.tolist() == [0, 1, 0, 1, 1, 1]
    assert manifest.fingerprint["n_rows"] == 6 and manifest.fingerprint["n_files"] == 4


def test_skip_still_enforces_min_per_class_on_readable_rows(tmp_path: Path, make_image) -> None:
    root = tmp_path / "data"
    make_image(root / "a/1.png")
    make_image(root / "a/2.png")
    make_image(root / "b/1.png")
    (root / "b" / "bad.png").write_bytes(b"junk")
    config = DataConfig(on_bad_image="skip")
    with pytest.raises(DataError) as info:
        load_manifest(root, config=config)
    (problem,) = info.value.problems
    assert problem.kind == "small_class" and "class 'b' has 1 readable" in problem.message
    assert load_manifest(root, config=DataConfig(on_bad_image="skip", min_per_class=1)).readable.sum() == 3


def test_symlink_inside_data_dir_is_allowed(tmp_path: Path, make_image) -> None:
    root = tmp_path / "data"
    make_image(root / "a/1.png")
    make_image(root / "store/x.png")
    os.symlink(root / "store/x.png", root / "a/2.png")
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("path,label\na/1.png,a\na/2.png,a\n./a/../store/x.png,b\nstore/x.png,b\n")
    with pytest.raises(DataError) as info:  # the same file twice through different spellings
        load_manifest(root, csv_path)
    assert [(p.kind, p.row) for p in info.value.problems] == [("duplicate", 5)]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", ["labels CSV is empty"]),
        (b"path,label\n", ["header but no rows"]),
        ("path,label\nimg/0.png,caf\u00e9\n".encode("latin-1"), ["not UTF-8", "line 2"]),
        (b"img_path,lbl\nimg/0.png,2\n", ["no image path column", "'img_path'", "no label column", "'lbl'"]),
    ],
)
def test_file_level_problems_via_cli(tmp_path: Path, csv_dataset, wide_console, content, expected) -> None:
    root, _ = csv_dataset
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    result = runner.invoke(app, ["check", str(root), str(bad)])
    assert result.exit_code == 2, result.output
    assert "bad.csv" in result.output
    for text in expected:
        assert text in result.output, text


def test_bad_csv_and_bad_classes_file_are_reported_together(tmp_path: Path, csv_dataset) -> None:
    root, _ = csv_dataset
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"")
    classes = tmp_path / "classes.txt"
    classes.write_text("2\n10\n2\n")
    with pytest.raises(DataError) as info:
        load_manifest(root, bad, config=DataConfig(classes_file=str(classes)))
    assert [(p.kind, p.row) for p in info.value.problems] == [("empty_csv", None), ("duplicate_class", 3)]


def test_decompression_bomb_is_an_error_and_the_flag_lifts_it(
    tmp_path: Path, make_image, wide_console
) -> None:
    root = tmp_path / "data"
    for k in range(2):
        make_image(root / "a" / f"{k}.png")
    make_image(root / "b" / "huge.png", size=(100, 100))  # 10,000 px
    make_image(root / "b" / "ok.png")
    before = Image.MAX_IMAGE_PIXELS
    for limit in (6_000, 1_000):  # PIL's warning range (1-2x the limit) and its error range (> 2x)
        with pytest.raises(DataError) as info:
            load_manifest(root, config=DataConfig(max_image_pixels=limit))
        (problem,) = info.value.problems
        assert (problem.kind, problem.path) == ("too_large", "b/huge.png")
        assert "--max-image-pixels" in problem.fix
    assert Image.MAX_IMAGE_PIXELS == before
    result = runner.invoke(app, ["check", str(root), "--max-image-pixels", "6000"])
    assert result.exit_code == 2 and "b/huge.png" in result.output and "decompression" in result.output
    result = runner.invoke(app, ["check", str(root), "--max-image-pixels", "20000"])
    assert result.exit_code == 0, result.output
    assert "4 rows, 2 classes" in result.output


def test_check_summary_on_clean_data(csv_dataset, wide_console) -> None:
    root, csv_path = csv_dataset
    result = runner.invoke(app, ["check", str(root), str(csv_path)])
    assert result.exit_code == 0, result.output
    assert "6 rows, 2 classes, 0 unreadable skipped" in result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith(("│ 2 ", "│ 10 "))]
    assert [line.split()[1] for line in lines] == ["2", "10"]  # numeric class order, not '10' < '2'


def test_invalid_option_is_a_one_line_error(csv_dataset) -> None:
    root, csv_path = csv_dataset
    result = runner.invoke(app, ["check", str(root), str(csv_path), "--on-bad-image", "ignore"])
    assert result.exit_code == 1
    assert "--on-bad-image 'ignore' is invalid. hint: Use a value 'error' or 'skip'" in " ".join(
        result.output.split()
    )
