"""Messages and small behaviours a user meets: hints that name real options, Ctrl-C, --version, file modes."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import stage_configs, write_image
from typer.testing import CliRunner

from deft_clean import _render
from deft_clean.__main__ import main
from deft_clean.cli import app
from deft_clean.config import DataConfig
from deft_clean.data import load_manifest
from deft_clean.errors import DataError
from deft_clean.files import atomic_folder
from deft_clean.offline import OFFLINE_NOTE

REPO = Path(__file__).parents[1]


def _labelled(root: Path, n: int = 4, *, corrupt: int | None = None) -> Path:
    lines = ["path,label"]
    for k in range(n):
        file = root / f"{k}.png"
        if k == corrupt:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(b"not a png")
        else:
            write_image(file, seed=k)
        lines.append(f"{k}.png,{'ab'[k % 2]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "labels.csv"


def _text(result) -> str:
    return " ".join(result.output.split())


def test_embed_and_predict_take_on_bad_image_skip(tmp_path, wide_console):
    root = tmp_path / "data"
    csv = _labelled(root, 6, corrupt=2)
    out = tmp_path / "f.npy"
    args = ["embed", "--out", str(out), str(root), str(csv), "--model", "test-tiny", "--device", "cpu"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--on-bad-image skip" in _text(refused)
    result = CliRunner().invoke(app, [*args, "--on-bad-image", "skip"])
    assert result.exit_code == 0, result.output
    features = np.load(out)
    assert np.isnan(features[2]).all() and np.isfinite(np.delete(features, 2, axis=0)).all()
    assert "(1 unreadable rows are NaN)" in _text(result)
    predict_help = CliRunner().invoke(app, ["predict", "--help"], terminal_width=200)
    assert "--on-bad-image" in predict_help.output


def test_symlink_out_of_data_dir_says_so_and_follow_links_allows_it(tmp_path):
    store, root = tmp_path / "store", tmp_path / "data"
    csv = _labelled(root, 4)
    write_image(store / "blob.png", seed=9)
    (root / "0.png").unlink()
    (root / "0.png").symlink_to(store / "blob.png")
    with pytest.raises(DataError) as caught:
        load_manifest(root, csv)
    problem = caught.value.problems[0]
    target = store / "blob.png"
    assert problem.message == f"the path is inside DATA_DIR but is a symlink to '{target}', outside it"
    assert "--follow-links" in problem.fix
    manifest = load_manifest(root, csv, config=DataConfig(follow_links=True))
    assert manifest.readable.all() and manifest.paths[0] == "0.png"
    (store / "blob.png").unlink()  # a dangling link is refused even with --follow-links
    with pytest.raises(DataError, match="symlink"):
        load_manifest(root, csv, config=DataConfig(follow_links=True))


def test_a_windows_path_gets_a_hint_about_backslashes(tmp_path):
    root = tmp_path / "data"
    write_image(root / "sub" / "0.png")
    write_image(root / "sub" / "1.png", seed=1)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nsub\\0.png,a\nsub/1.png,a\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_manifest(root, csv, config=DataConfig(min_per_class=1))
    assert "Separate folders with '/', not a Windows '\\': 'sub/0.png' (that file exists)." in str(
        caught.value.problems[0]
    )


def test_a_csv_path_that_is_a_folder(tmp_path, wide_console):
    root = tmp_path / "data"
    _labelled(root)
    result = CliRunner().invoke(app, ["check", str(root), str(root), "--model", "test-tiny"])
    assert result.exit_code == 2
    assert "labels CSV is a folder" in _text(result) and "not found" not in _text(result)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_lr_must_be_a_finite_positive_number(tmp_path, value):
    root = tmp_path / "data"
    csv = _labelled(root)
    for command in ("detect", "finetune"):
        out = ["--out", str(tmp_path / "o")] if command == "finetune" else []
        result = CliRunner().invoke(app, [command, *out, str(root), str(csv), "--lr", value])
        assert result.exit_code == 1, result.output
        assert f"--lr {float(value)!r} is invalid. hint: Use a value that is a finite positive number." in (
            _text(result)
        )


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("deft_clean.cli"), "check_dataset", interrupted)
    result = CliRunner().invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 130
    lines = result.output.strip().splitlines()
    assert " ".join(lines).startswith("interrupted: stopped by Ctrl-C; no output was written")
    assert "--resume" in result.output and "Traceback" not in result.output


def test_ctrl_c_while_starting_prints_one_line(monkeypatch, capsys):
    class Loading:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "deft_clean.cli", Loading())
    monkeypatch.setattr(sys, "argv", ["deft-clean", "check", "."])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 130
    assert capsys.readouterr().err == "interrupted: stopped by Ctrl-C while starting; nothing was written.\n"


def test_version_does_not_import_torch():
    code = "import sys; from deft_clean.__main__ import main; main(); print('torch' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", code, "--version"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
    )  # fmt: skip
    version = importlib.import_module("deft_clean.version").__version__
    assert run.stdout.split("\n")[:2] == [f"deft-clean {version}", "False"]


def test_counts_are_singular_for_one():
    assert [_render._count(n, "class") for n in (0, 1, 2)] == ["0 classes", "1 class", "2 classes"]
    assert _render._count(1, "row") == "1 row"


def test_saved_weights_follow_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as folder:
            save_file({"w": torch.zeros(2)}, str(folder / "tower.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "model" / "tower.safetensors").stat().st_mode & 0o777 == 0o644


def test_finetune_does_not_warn_about_detection(tmp_path, monkeypatch):
    finetune_module = importlib.import_module("deft_clean.finetune")
    build = finetune_module.build_tower

    def with_offline_note(*args, **kwargs):
        built, tower = build(*args, **kwargs)
        return dataclasses.replace(built, notes=(*built.notes, OFFLINE_NOTE)), tower

    class Recorder:
        def __init__(self):
            self.lines = []

        def task(self, description, total):
            return _Null()

        def advance(self, n=1, **fields):
            pass

        def log(self, message, level="info"):
            self.lines.append(message)

    monkeypatch.setattr(finetune_module, "build_tower", with_offline_note)
    root = tmp_path / "data"
    csv = _labelled(root, 4)
    reporter = Recorder()
    options = stage_configs(
        "finetune", model="test-tiny", device="cpu", epochs=1, batch_size=2, tune="linear"
    )
    finetune_module.finetune(root, csv, reporter=reporter, **options)
    assert reporter.lines and OFFLINE_NOTE not in reporter.lines  # the random-weights note is still shown


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
