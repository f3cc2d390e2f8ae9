"""Outputs are checked before any work, never overwrite an input, refuse existing ones without
--overwrite, are locked against a concurrent run, and a failed write leaves nothing behind."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deft_clean import files
from deft_clean.cli import app
from deft_clean.errors import OutputError
from deft_clean.files import atomic_file, atomic_folder, check_output, releases_outputs

REPO = Path(__file__).parents[1]
DETECT = importlib.import_module("deft_clean.detect")  # the module (the package's `detect` is the function)


@pytest.fixture(autouse=True)
def _no_leftover_locks():
    """Every test starts and ends without locks held by this process."""
    yield
    files._release_all()


def test_an_input_is_refused_even_with_overwrite(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n", encoding="utf-8")
    with pytest.raises(OutputError, match="is an input of this run"):
        check_output(tmp_path / "." / "labels.csv", inputs=[None, labels], overwrite=True)
    assert labels.read_text(encoding="utf-8") == "path,label\n"


def test_an_existing_file_needs_overwrite(tmp_path):
    out = tmp_path / "flags.parquet"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists") as caught:
        check_output(out)
    assert "--overwrite" in caught.value.hint
    assert check_output(out, overwrite=True) == out


def test_folder_and_file_kinds(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a folder; a file is expected"):
        check_output(tmp_path / "empty", overwrite=True)
    with pytest.raises(OutputError, match="is a file; a folder is expected"):
        check_output(tmp_path / "file", kind="folder", overwrite=True)
    with pytest.raises(OutputError, match="already exists and is not empty"):
        check_output(tmp_path / "full", kind="folder")
    assert check_output(tmp_path / "empty", kind="folder") == tmp_path / "empty"
    assert check_output(tmp_path / "full", kind="folder", overwrite=True) == tmp_path / "full"


def test_missing_parents_are_created_but_not_under_a_file(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "out.parquet")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OutputError, match="is a file, so no folder can be made under it"):
        check_output(tmp_path / "blocker" / "sub" / "out.parquet")


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs a Linux /proc")
def test_proc_is_not_writable():
    with pytest.raises(OutputError, match="cannot be written"):
        check_output("/proc/deft-results.parquet")


def test_no_room_for_the_estimate(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10_000, 9_000, 1_000))
    with pytest.raises(OutputError, match=r"needs about 5 KB; '.*' has 1 KB free"):
        check_output(tmp_path / "out.parquet", estimated_bytes=5_000)


def _as_nobody() -> list[str] | None:
    """A command prefix running as uid/gid 65534, or None when this process cannot switch users."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.skipif(_as_nobody() is None, reason="switching to a non-root user needs root and setpriv")
def test_unwritable_folder_as_a_non_root_user():
    folder = Path(tempfile.mkdtemp(prefix="deft-readonly-"))  # under /tmp, reachable by 'nobody'
    try:
        folder.chmod(0o755)  # root-owned: others may read, not write
        code = (
            "from deft_clean.files import check_output\n"
            "from deft_clean.errors import OutputError\n"
            "try:\n"
            f"    check_output({str(folder / 'out.parquet')!r})\n"
            "except OutputError as e:\n"
            "    print(e.message)\n"
        )
        run = subprocess.run(
            [*_as_nobody(), sys.executable, "-c", code],
            capture_output=True, text=True, cwd=folder, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "cannot be written: Permission denied in" in run.stdout
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(folder)


def test_a_concurrent_run_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    out = tmp_path / "flags.parquet"
    lock = tmp_path / ".flags.parquet.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(f"{sleeper.pid}\n")
        with pytest.raises(
            OutputError, match=f"being written by another deft-clean run \\(process {sleeper.pid}\\)"
        ):
            check_output(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    check_output(out)  # the owner is gone: its lock is stale
    assert lock.read_text().strip() == str(os.getpid())


def test_locks_are_released_when_the_run_ends_or_fails(tmp_path):
    @releases_outputs
    def run(fail: bool) -> None:
        check_output(tmp_path / "out.npy")
        assert (tmp_path / ".out.npy.lock").exists()
        if fail:
            raise RuntimeError("training failed")

    run(False)
    assert not (tmp_path / ".out.npy.lock").exists()
    with pytest.raises(RuntimeError):
        run(True)
    assert not (tmp_path / ".out.npy.lock").exists()


def test_a_full_disk_during_a_write_leaves_nothing(tmp_path):
    out = tmp_path / "out.parquet"
    with pytest.raises(OutputError, match=r"Writing '.*out.parquet' failed: no space left in"):
        with atomic_file(out) as partial:
            partial.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError, match="permission denied"):
        with atomic_folder(tmp_path / "model") as folder:
            (folder / "tower.safetensors").write_bytes(b"16 bytes of data")
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_failing_on_a_nearly_full_disk_says_so(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10_000, 9_990, 10))
    with pytest.raises(OutputError, match="no space left"):
        with atomic_folder(tmp_path / "model"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0")
    assert list(tmp_path.iterdir()) == []


def test_cli_detect_refuses_the_labels_csv_as_output_before_any_work(tmp_path, csv_dataset, monkeypatch):
    root, labels = csv_dataset
    before = labels.read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("data was read before the output was checked")

    monkeypatch.setattr(DETECT, "load_manifest", no_work)
    args = ["detect", str(root), str(labels), "--out", str(labels), "--overwrite", "--model", "test-tiny"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "is an input of this run" in " ".join(result.output.split())
    assert labels.read_bytes() == before


def test_cli_detect_refuses_an_image_of_the_data_set(tmp_path, csv_dataset, monkeypatch):
    root, labels = csv_dataset
    image = root / "img" / "0.png"
    before = image.read_bytes()
    monkeypatch.setattr(DETECT, "load_backbone_on", lambda *a: pytest.fail("model work started"))
    args = ["detect", str(root), str(labels), "--out", str(image), "--overwrite", "--model", "test-tiny"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "is an image of this run" in " ".join(result.output.split())
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    "command",
    [
        ["embed", "--out", "{out}", "{root}", "{labels}"],
        ["predict", "--out", "{out}", "{root}", "{root}", "{labels}"],
        ["finetune", "--out", "{folder}", "{root}", "{labels}"],
        ["export-backbone", "--out", "{folder}", "--model", "test-tiny"],
        ["detect", "{root}", "{labels}", "--out", "{out}"],
        ["detect", "{root}", "{labels}", "--out", "{new}", "--save-model", "{folder}"],
    ],
)
def test_every_command_refuses_an_existing_output_without_overwrite(tmp_path, csv_dataset, command):
    root, labels = csv_dataset
    out, folder = tmp_path / "old.parquet", tmp_path / "old-folder"
    out.write_bytes(b"keep me")
    folder.mkdir()
    (folder / "keep.txt").write_text("keep me")
    names = {"out": out, "folder": folder, "root": root, "labels": labels, "new": tmp_path / "new.parquet"}
    result = CliRunner().invoke(app, [part.format(**names) for part in command])
    assert result.exit_code == 2, result.output
    assert "already exists" in result.output and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me" and (folder / "keep.txt").read_text() == "keep me"
    assert not (tmp_path / "new.parquet").exists()


def test_a_hard_link_of_an_input_is_an_input(tmp_path, csv_dataset, monkeypatch):
    root, labels = csv_dataset
    os.link(labels, tmp_path / "linked.csv")
    with pytest.raises(OutputError, match="is an input of this run"):
        check_output(tmp_path / "linked.csv", inputs=[None, labels], overwrite=True)
    shutil.copy(labels, tmp_path / "copy.csv")  # a copy is another file: --overwrite may replace it
    assert check_output(tmp_path / "copy.csv", inputs=[labels], overwrite=True) == tmp_path / "copy.csv"
    image = root / "img" / "3.png"
    before = image.read_bytes()
    os.link(image, tmp_path / "linked.parquet")
    monkeypatch.setattr(DETECT, "load_backbone_on", lambda *a: pytest.fail("model work started"))
    args = ["detect", str(root), str(labels), "--out", str(tmp_path / "linked.parquet"), "--overwrite"]
    result = CliRunner().invoke(app, [*args, "--model", "test-tiny"])
    assert result.exit_code == 2, result.output
    assert "is an image of this run" in " ".join(result.output.split())
    assert image.read_bytes() == before


def test_save_model_equal_to_out_is_named_as_such(tmp_path, csv_dataset):
    root, labels = csv_dataset
    same = tmp_path / "run"
    args = ["detect", str(root), str(labels), "--model", "test-tiny"]
    result = CliRunner().invoke(app, [*args, "--out", str(same), "--save-model", str(same)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"--save-model '{same}' is the same path as --out" in text and "input" not in text


def _no_thumbnails(*args, **kwargs):
    raise AssertionError("images were read before the output was checked")


def test_report_output_is_checked_before_work_and_honours_overwrite(flags_case, tmp_path, monkeypatch):
    from deft_clean import report

    page = flags_case.flags.with_suffix(".html")
    page.write_text("keep me")
    runner = CliRunner()
    monkeypatch.setattr(report, "_thumbnails", _no_thumbnails)
    refused = runner.invoke(app, ["report", str(flags_case.flags)])
    assert refused.exit_code == 2 and "already exists" in refused.output and "--overwrite" in refused.output
    for target in (flags_case.labels_csv, flags_case.truth_csv, flags_case.flags):
        args = ["report", str(flags_case.flags), "--truth", str(flags_case.truth_csv), "--out", str(target)]
        refused = runner.invoke(app, [*args, "--overwrite"])
        assert refused.exit_code == 2 and "is an input of this run" in " ".join(refused.output.split())
    image = flags_case.root / "img" / "03.png"
    refused = runner.invoke(app, ["report", str(flags_case.flags), "--out", str(image), "--overwrite"])
    assert refused.exit_code == 2 and "is an input of this run" in " ".join(refused.output.split())
    assert page.read_text() == "keep me" and image.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.undo()
    done = runner.invoke(app, ["report", str(flags_case.flags), "--overwrite"])
    assert done.exit_code == 0, done.output
    assert page.read_text().startswith("<!doctype html>") and not list(tmp_path.glob(".*.lock"))


def test_export_outputs_are_checked_before_work_and_honour_overwrite(flags_case, tmp_path, monkeypatch):
    from deft_clean import export

    runner = CliRunner()
    first = runner.invoke(app, ["export", str(flags_case.flags)])
    assert first.exit_code == 0, first.output
    corrected = tmp_path / "corrected.csv"
    written = corrected.read_bytes()
    corrected.write_text("edited by hand")
    monkeypatch.setattr(export, "_user_table", _no_thumbnails)
    refused = runner.invoke(app, ["export", str(flags_case.flags)])
    assert refused.exit_code == 2 and "already exists" in refused.output and "--overwrite" in refused.output
    assert corrected.read_text() == "edited by hand"
    (tmp_path / "round2").mkdir()
    second_round = tmp_path / "round2" / "corrected.csv"  # correcting the file an earlier export wrote
    second_round.write_bytes(written)
    args = ["export", str(flags_case.flags), "--labels", str(second_round), "--out", str(second_round.parent)]
    refused = runner.invoke(app, [*args, "--overwrite"])
    assert refused.exit_code == 2 and "is an input of this run" in " ".join(refused.output.split())
    assert second_round.read_bytes() == written
    monkeypatch.undo()
    done = runner.invoke(app, ["export", str(flags_case.flags), "--overwrite"])
    assert done.exit_code == 0, done.output
    assert corrected.read_bytes() == written
    tasks = runner.invoke(app, ["export", str(flags_case.flags), "--to", "label-studio"])
    assert tasks.exit_code == 0, tasks.output
    again = runner.invoke(app, ["export", str(flags_case.flags), "--to", "label-studio"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_detect_report_page_is_checked_with_the_other_outputs_before_any_work(
    tmp_path, csv_dataset, monkeypatch, wide_console
):
    root, labels = csv_dataset
    page = labels.with_name("labels.deft.html")  # where --report writes: the results' name, suffix .html
    page.write_text("keep me")
    monkeypatch.setattr(DETECT, "load_manifest", lambda *a, **k: pytest.fail("data was read"))
    args = ["detect", str(root), str(labels), "--model", "test-tiny", "--report"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"--report '{page}' already exists" in text and "--overwrite" in text
    same = tmp_path / "flags.html"  # the results file itself would be the page
    result = CliRunner().invoke(app, [*args, "--out", str(same), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert f"--report '{same}' is the same path as --out" in " ".join(result.output.split())
    truth = tmp_path / "flags.html"
    truth.write_bytes(labels.read_bytes())
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "flags.parquet"), "--truth", str(truth)])
    assert result.exit_code == 2, result.output
    assert f"--report '{truth}' is an input of this run" in " ".join(result.output.split())
    assert truth.read_bytes() == labels.read_bytes()
    assert page.read_text() == "keep me" and not list(tmp_path.glob(".*.lock"))


def test_import_review_output_is_checked_before_work_and_honours_overwrite(flags_case, tmp_path, monkeypatch):
    import json

    from deft_clean import export

    review = tmp_path / "r.json"
    review.write_text(json.dumps([{"path": "img/02.png", "label": "cat"}]))
    out = tmp_path / "reviewed.csv"
    out.write_text("keep me")
    runner = CliRunner()
    monkeypatch.setattr(export, "_load_json", lambda *a: pytest.fail("the review was read"))
    args = ["import-review", str(review), str(flags_case.labels_csv), "--out"]
    refused = runner.invoke(app, [*args, str(out)])
    assert refused.exit_code == 2 and "already exists" in refused.output and "--overwrite" in refused.output
    for target in (flags_case.labels_csv, review):
        refused = runner.invoke(app, [*args, str(target), "--overwrite"])
        assert refused.exit_code == 2 and "is an input of this run" in " ".join(refused.output.split())
    assert out.read_text() == "keep me" and json.loads(review.read_text())[0]["label"] == "cat"
    before = flags_case.labels_csv.read_bytes()
    monkeypatch.undo()
    done = runner.invoke(app, [*args, str(out), "--overwrite"])
    assert done.exit_code == 0, done.output
    assert out.read_text().splitlines()[3].endswith("img/02.png,cat")
    assert flags_case.labels_csv.read_bytes() == before and not list(tmp_path.glob(".*.lock"))
