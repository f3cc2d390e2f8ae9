"""detect under torchrun: 2 processes with gloo on the CPU, on the test-tiny backbone.

With a frozen image tower (``--peft none``, the CPU default) every process holds the trunk features of
every row (each computes its share, then they are gathered), draws the same global batches and
computes the loss of the whole batch, so N processes take exactly the steps of one: the flags must be
identical and the scores equal to float rounding (tolerance 1e-5). With a tuned tower each process
augments its own images with a generator of its own, so the random streams differ from one process;
the gradient arithmetic that makes the steps equal is tested directly on spawned processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import LogLines, stage_configs
from distributed_worker import step_of_one_process
from test_detect import make_dataset

import deft_clean
from deft_clean.classifier import load_classifier, predict
from deft_clean.config import FinetuneConfig
from deft_clean.detect import detect
from deft_clean.distributed import World
from deft_clean.errors import ConfigError, OutputError
from deft_clean.finetune import finetune
from deft_clean.finetune_loop import check_process_shares
from deft_clean.results import read_results

REPO = Path(deft_clean.__file__).resolve().parents[1]
OPTIONS = dict(
    model="test-tiny", device="cpu", peft="none", class_specific_ctx=True, epochs=6, warmup_epochs=2,
    batch_size=8, lr=0.1, n_ctx=4, seed=0,
)  # fmt: skip


def cli_args(data: Path, out: Path, **options: object) -> list[str]:
    """``detect`` arguments for the colour set in ``data`` with ``options`` (flags for True)."""
    args = ["detect", str(data), str(data / "labels.csv"), "--out", str(out)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, launcher: tuple[str, ...] = ("--standalone", "--nproc-per-node", "2")) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "deft_clean", *args]


def run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout)


def one_process(data: Path, out: Path, **options: object) -> pd.DataFrame:
    return detect(data, data / "labels.csv", out=out, **stage_configs("detect", **options)).frame


def assert_same_run(written: pd.DataFrame, reference: pd.DataFrame, labels_csv: Path) -> None:
    """Same schema, every input row in input order, the same flags; scores equal to float rounding."""
    assert list(written.columns) == list(reference.columns)
    assert written["path"].tolist() == pd.read_csv(labels_csv)["path"].tolist()
    assert written["is_noisy"].tolist() == reference["is_noisy"].tolist()
    assert written["noise_rank"].tolist() == reference["noise_rank"].tolist()
    for column in ("p_clean", "clean_score", "predicted_prob"):
        np.testing.assert_allclose(written[column], reference[column], atol=1e-5)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root, _, _ = make_dataset(tmp_path_factory.mktemp("colours") / "data", per_class=12)
    return root


def test_blocks_deal_every_row_once():
    for n in (0, 1, 5, 7, 100):
        for size in (1, 2, 3, 4):
            blocks = [World(rank, size).block(n) for rank in range(size)]
            rows = np.concatenate([np.arange(*block) for block in blocks])
            assert rows.tolist() == list(range(n))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1
            for rank, (a, b) in enumerate(blocks):
                assert (World(rank, size).owners(n)[a:b] == rank).all()


def test_one_process_needs_no_process_group():
    world = World()
    local = torch.ones(3, 2, requires_grad=True)
    assert world.gather_rows(local, np.zeros(3, dtype=np.int64)) is local
    assert world.on_main(lambda: 7) == 7 and world.together(lambda: 8) == 8
    with pytest.raises(OutputError):
        world.on_main(lambda: (_ for _ in ()).throw(OutputError("exists")))
    assert not dist.is_initialized()


def test_gathered_batch_takes_the_step_of_one_process(tmp_path):
    # uneven shares, then a batch of which rank 0 holds nothing (the worker module imports only torch)
    mp.spawn(
        step_of_one_process, args=(str(tmp_path / "store"), [[0, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1]]), nprocs=2
    )


def test_bad_image_on_one_process_stops_both(colours, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colours / "img", data / "img")
    lines = (colours / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join([*lines, "img/missing.png,red"]) + "\n")  # rank 1's block
    done = run(torchrun(*cli_args(data, tmp_path / "flags.parquet", **OPTIONS)))
    assert done.returncode != 0
    assert done.stderr.count("Problems in") == 1 and "missing.png" in done.stderr  # found by rank 1,
    assert "image file not found" in done.stderr  # printed once, by rank 0
    assert "exitcode  : 2" in done.stderr  # the data error's code (torchrun stops whichever is later)
    assert "Traceback" not in done.stderr.split("torch/distributed/elastic")[0]  # a message, no traceback
    assert not (tmp_path / "flags.parquet").exists()


@pytest.fixture(scope="module")
def second_block_missing(colours, tmp_path_factory) -> Path:
    """The colour set and as many rows of missing images after it: the second process reads no image."""
    data = tmp_path_factory.mktemp("half") / "data"
    shutil.copytree(colours / "img", data / "img")
    lines = (colours / "labels.csv").read_text().splitlines()
    missing = [f"img/missing{i}.png,red" for i in range(len(lines) - 1)]
    (data / "labels.csv").write_text("\n".join([*lines, *missing]) + "\n")
    return data


def test_process_without_a_readable_image_takes_the_steps_of_one(second_block_missing, tmp_path):
    # its share of the frozen features is empty (0, F); gathered, they are one process's
    data, options = second_block_missing, dict(OPTIONS, on_bad_image="skip")
    done = run(torchrun(*cli_args(data, tmp_path / "flags.parquet", **options)))
    assert done.returncode == 0, done.stderr[-3000:]
    written = read_results(tmp_path / "flags.parquet")
    assert_same_run(written, one_process(data, tmp_path / "one.parquet", **options), data / "labels.csv")
    assert written["status"].tolist()[-48:] == ["unreadable"] * 48


def test_linear_finetune_with_a_process_without_images(second_block_missing, tmp_path):
    data, options = second_block_missing, dict(FINETUNE, tune="linear", on_bad_image="skip")
    done = run(torchrun(*finetune_args(data, tmp_path / "model", **options)))
    assert done.returncode == 0, done.stderr[-3000:]
    one = finetune(data, data / "labels.csv", out=tmp_path / "one", **stage_configs("finetune", **options))
    trained = load_classifier(tmp_path / "model", device="cpu")
    for got, want in zip(trained.fc.parameters(), one.classifier.fc.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_tuned_finetune_refuses_a_process_without_images(second_block_missing, tmp_path):
    data = second_block_missing
    options = dict(FINETUNE, tune="full", method="ce", on_bad_image="skip")
    done = run(torchrun(*finetune_args(data, tmp_path / "model", **options)))
    assert done.returncode != 0
    assert "process 1 holds 0 training rows" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr.split("torch/distributed/elastic")[0]
    assert not (tmp_path / "model").exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [int(item[5:]) for item in environ if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_killed_process_stops_the_run_and_resume_finishes_it(colours, tmp_path):
    out = tmp_path / "flags.parquet"
    options = dict(OPTIONS, epochs=30)
    launcher = subprocess.Popen(
        torchrun(*cli_args(colours, out, **options)), env=environment(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    checkpoint = out.with_name(out.name + ".checkpoint")
    deadline = time.monotonic() + 90
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = {_rank_of(child): child for child in _children(launcher.pid)}
    os.kill(ranks[1], signal.SIGKILL)  # mid-run: after the first epoch's checkpoint, long before the last
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode != 0 and "SIGKILL" in stderr
    assert not out.exists() and checkpoint.exists()  # nothing written; the last epoch kept for --resume
    assert not list(tmp_path.glob("*.partial"))
    done = run(torchrun(*cli_args(colours, out, **options), "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and done.stderr.count("flagged:") == 1  # only rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flags.parquet"]  # no checkpoint, lock, partial
    written = read_results(out)
    reference = one_process(colours, tmp_path / "one.parquet", **options)  # killed and resumed as 2 =
    assert_same_run(written, reference, colours / "labels.csv")  # one process, never interrupted
    assert written.attrs["world_size"] == 2 and reference.attrs["world_size"] == 1
    assert written.attrs["configs"]["detect"]["batch_size"] == 8  # the global batch


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_localhost_crossfit(colours, tmp_path):
    out = tmp_path / "flags.parquet"
    options = dict(OPTIONS, scoring="crossfit", folds=2)  # every fold trains with both processes
    rendezvous = (
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"localhost:{_free_port()}",
        "--rdzv-id",
        "h14",
    )
    nodes = [
        subprocess.Popen(
            torchrun(
                *cli_args(colours, out, **options),
                launcher=("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), *rendezvous),
            ),
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    errors = [node.communicate(timeout=120)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "".join(errors).count("flagged:") == 1  # the process of rank 0 prints, on its node
    written = read_results(out)
    assert written.attrs["world_size"] == 2 and (written["fold"] >= 0).all()
    reference = one_process(colours, tmp_path / "one.parquet", **options)
    assert_same_run(written, reference, colours / "labels.csv")


@pytest.mark.parametrize("dataset", ["colours", "second_block_missing"])
def test_tuned_tower_probe_sees_every_row_under_two_processes(dataset, request, tmp_path):
    # each process computes the untuned features of its own images (the second process none, when its
    # block is unreadable); gathered, the probe fits every row exactly as in one process (its penalty and
    # agreement), though training draws other batches
    data = request.getfixturevalue(dataset)
    options = dict(OPTIONS, peft="lora", lora_rank=2, epochs=2, warmup_epochs=1, on_bad_image="skip")
    done = run(torchrun(*cli_args(data, tmp_path / "two.parquet", **options)))
    assert done.returncode == 0, done.stderr[-3000:]
    log = LogLines()
    detect(data, data / "labels.csv", out=tmp_path / "one.parquet", reporter=log,
           **stage_configs("detect", **options))  # fmt: skip
    fitted = re.compile(r"Linear probe: a ridge fit .*?\(penalty (\S+) chosen .*? it agrees with (\d+%)")
    one = [fitted.search(line).groups() for line in log.lines if fitted.search(line)]
    two = fitted.findall(" ".join(done.stderr.split()))  # the log as printed, rewrapped
    assert len(one) == 1 and two == one


FINETUNE = dict(model="test-tiny", device="cpu", epochs=3, batch_size=8, lr=0.5, seed=0)


def finetune_args(data: Path, out: Path, **options: object) -> list[str]:
    args = ["finetune", str(data), str(data / "labels.csv"), "--out", str(out)]
    return args + [
        item for name, value in options.items() for item in ("--" + name.replace("_", "-"), str(value))
    ]


def test_finetune_then_predict_under_two_processes(colours, tmp_path):
    model = tmp_path / "model"
    done = run(torchrun(*finetune_args(colours, model, tune="linear", **FINETUNE)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no checkpoint or lock left
    reference = finetune(
        colours,
        colours / "labels.csv",
        out=tmp_path / "one",
        **stage_configs("finetune", tune="linear", **FINETUNE),
    )
    trained = load_classifier(model, device="cpu")
    for got, want in zip(trained.fc.parameters(), reference.classifier.fc.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # the steps of one process
    assert trained.info["training"]["world_size"] == 2

    out = tmp_path / "pred" / "pred.parquet"
    done = run(torchrun("predict", str(model), str(colours), str(colours / "labels.csv"), "--out", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("predicted:") == 1 and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    written = read_results(out)
    expected = predict(model, colours, colours / "labels.csv", out=tmp_path / "one.parquet")
    assert written["path"].tolist() == pd.read_csv(colours / "labels.csv")["path"].tolist()
    assert written["predicted_label"].tolist() == expected["predicted_label"].tolist()
    np.testing.assert_allclose(np.stack(written["probs"]), np.stack(expected["probs"]), atol=1e-6)
    assert written.attrs["world_size"] == 2
    assert read_results(tmp_path / "one.parquet").attrs["world_size"] == 1


def test_finetune_tuned_tower_under_two_processes(colours, tmp_path):
    # each process draws batch/2 of its own images per step: other batches than one process, so the
    # check is that it learns the colours (chance is 1/4) and saves one complete classifier
    model = tmp_path / "model"
    options = dict(FINETUNE, tune="full", method="ce", epochs=4, lr=0.05)
    done = run(torchrun(*finetune_args(colours, model, **options), "--test-dir", str(colours), "--test-csv",
                        str(colours / "labels.csv")))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in model.iterdir()) == [
        "classifier.json", "head.safetensors", "metrics.json", "tower.safetensors",
    ]  # fmt: skip
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.5 and metrics["n"] == 48


def test_tuned_batch_must_split_evenly():
    config, even, log = FinetuneConfig(tune="full", batch_size=7), np.repeat([0, 1], 10), LogLines()
    with pytest.raises(ConfigError, match="--batch-size 7 is the global batch; with 2 processes"):
        check_process_shares(config, World(0, 2), even, log)
    check_process_shares(FinetuneConfig(tune="linear", batch_size=7), World(0, 2), even, log)  # no split
    check_process_shares(config, World(), np.zeros(20, dtype=np.int64), log)
    assert log.lines == []


def test_tuned_tower_needs_a_share_of_rows_in_every_process():
    config, log = FinetuneConfig(tune="full", batch_size=8), LogLines()
    check_process_shares(config, World(0, 2), np.repeat([0, 1], [12, 10]), log)  # 16 rows, as in one
    assert log.lines == []
    check_process_shares(config, World(0, 2), np.repeat([0, 1], [16, 4]), log)  # 8 rows; one: 16
    assert log.lines == [
        "Each epoch trains on 8 of the 20 training rows: with --tune full each process takes 4 of its own "
        "images per step, and process 1 holds 4 training rows (its block of the CSV, less unreadable and "
        "dropped rows; the processes hold 16, 4). Fewer processes would train on more of them."
    ]
    with pytest.raises(ConfigError, match=r"process 1 holds 3 training rows .* hold 16, 3\)"):
        check_process_shares(config, World(1, 2), np.repeat([0, 1], [16, 3]), log)
    linear = FinetuneConfig(tune="linear", batch_size=8)
    check_process_shares(linear, World(0, 2), np.repeat([0, 1], [16, 0]), log)
    assert len(log.lines) == 1
