"""Reading a labels CSV never alters a value: standard quoting, labels kept exactly, warnings for typos."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import write_image
from typer.testing import CliRunner

from deft_clean.cli import app
from deft_clean.config import DataConfig
from deft_clean.data import load_manifest
from deft_clean.errors import ConfigError, DataError
from deft_clean.tables import read_table


def _csv(tmp_path: Path, text: str, n_images: int = 4) -> tuple[Path, Path]:
    root = tmp_path / "data"
    for k in range(n_images):
        write_image(root / f"{k}.png", seed=k)
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return root, path


def test_doubled_quotes_are_read_as_one_quote(tmp_path):
    text = 'path,label\n0.png,"green ""lime"""\n1.png,"green ""lime"""\n2.png,"a, b"\n3.png,"a, b"\n'
    root, path = _csv(tmp_path, text)
    rows, _ = read_table(path)
    assert [r.label for r in rows] == ['green "lime"', 'green "lime"', "a, b", "a, b"]
    manifest = load_manifest(root, path)
    assert manifest.class_ids == ["a, b", 'green "lime"']


def test_labels_keep_their_spaces_with_a_warning(tmp_path, caplog):
    root, path = _csv(tmp_path, "path,label\n0.png,cat \n1.png,cat \n2.png,dog\n3.png,dog\n")
    with caplog.at_level(logging.WARNING, logger="deft_clean"):
        manifest = load_manifest(root, path)
    assert manifest.class_ids == ["cat ", "dog"]
    assert "row 2: label 'cat ' has leading/trailing spaces; it is kept as written" in caplog.text


def test_labels_differing_only_by_case_are_two_classes_with_a_warning(tmp_path, caplog):
    root, path = _csv(tmp_path, "path,label\n0.png,Red\n1.png,Red\n2.png,red\n3.png,red\n")
    with caplog.at_level(logging.WARNING, logger="deft_clean"):
        manifest = load_manifest(root, path)
    assert manifest.class_ids == ["Red", "red"]
    assert "labels 'Red' (row 2), 'red' (row 4) differ only by case or spaces" in caplog.text


def test_clean_labels_give_no_warning(tmp_path, caplog):
    root, path = _csv(tmp_path, "path,label\n0.png,a\n1.png,a\n2.png,b\n3.png,b\n")
    with caplog.at_level(logging.WARNING, logger="deft_clean"):
        load_manifest(root, path)
    assert caplog.text == ""


def test_paths_lose_surrounding_spaces_labels_do_not(tmp_path):
    _, path = _csv(tmp_path, "path , label\n 0.png , a\n", n_images=1)
    (row,), _ = read_table(path)
    assert (row.path, row.label) == ("0.png", " a")


@pytest.mark.parametrize(
    ("text", "delimiter", "expected"),
    [
        ("path;label\nx.png;a,b\n", None, ("x.png", "a,b")),  # ';' is the header's separator
        ("path|label\nx.png|a;b\n", None, ("x.png", "a;b")),
        ("path\tlabel\nx.png\ta b\n", None, ("x.png", "a b")),
        ("path,label\nx.png,a;b\n", ";", ("x.png,label", None)),  # forced: the header is one column
        ("path\tlabel\nx.png\ta,b\n", "\t", ("x.png", "a,b")),
    ],
)
def test_delimiter_from_the_header_or_given(tmp_path, text, delimiter, expected):
    path = tmp_path / "l.csv"
    path.write_text(text, encoding="utf-8")
    if expected[1] is None:
        with pytest.raises(DataError, match="no image path column|no label column"):
            read_table(path, delimiter=delimiter)
        return
    (row,), _ = read_table(path, delimiter=delimiter)
    assert (row.path, row.label) == expected


def test_delimiter_option(tmp_path):
    assert DataConfig(delimiter="tab").separator == "\t"
    assert DataConfig(delimiter="\\t").separator == "\t"
    assert DataConfig(delimiter=";").separator == ";"
    with pytest.raises(ConfigError, match="--delimiter '::' is invalid"):
        DataConfig(delimiter="::")
    with pytest.raises(ConfigError, match="--delimiter '\"' is invalid"):
        DataConfig(delimiter='"')


def test_cli_check_reads_with_the_given_delimiter_and_warns(tmp_path, wide_console):
    root, path = _csv(tmp_path, "path|label\n0.png|Red\n1.png|Red\n2.png|red \n3.png|red \n")
    result = CliRunner().invoke(
        app, ["check", str(root), str(path), "--delimiter", "|", "--model", "test-tiny"]
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "label 'red ' has leading/trailing spaces" in text
    assert "differ only by case or spaces" in text
