"""A detect or finetune run killed after some epochs continues with --resume to the result of an
uninterrupted run."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest
import torch
from conftest import stage_configs
from typer.testing import CliRunner

from deft_clean.checkpoint import checkpoint_path
from deft_clean.cli import app
from deft_clean.config import DataConfig
from deft_clean.detect import detect
from deft_clean.errors import ConfigError
from deft_clean.progress import SilentReporter

QUICK = dict(model="test-tiny", device="cpu", peft="lora", epochs=3, warmup_epochs=1, batch_size=4, n_ctx=4)
COLUMNS = ["path", "given_label", "is_noisy", "p_clean", "margin", "predicted_label", "noise_rank"]


class KilledAtEpoch(SilentReporter):
    """Raises KeyboardInterrupt (as Ctrl-C would) when epoch ``epoch`` starts."""

    def __init__(self, epoch: int, phase: str = "DeFT epoch") -> None:
        self.epoch, self.phase = epoch, phase

    def task(self, description: str, total: int | None) -> AbstractContextManager[Any]:
        if description.startswith(f"{self.phase} {self.epoch}/"):
            raise KeyboardInterrupt
        return super().task(description, total)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, request):
    """(data, csv, results frame) of a run that was never interrupted."""
    root = tmp_path_factory.mktemp("resume")
    from conftest import write_image

    lines = ["path,label"]
    for k in range(12):
        write_image(root / "data" / f"{k}.png", seed=k)
        lines.append(f"{k}.png,{'abc'[k % 3]}")
    csv = root / "labels.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    frame = detect(root / "data", csv, out=root / "whole.parquet", **stage_configs("detect", **QUICK)).frame
    return root / "data", csv, frame


@pytest.mark.parametrize("killed_at", [2, 3])
def test_a_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path, killed_at):
    data, csv, whole = uninterrupted
    out = tmp_path / "flags.parquet"
    options = stage_configs("detect", **QUICK)
    with pytest.raises(KeyboardInterrupt):
        detect(data, csv, out=out, reporter=KilledAtEpoch(killed_at), **options)
    assert not out.exists() and checkpoint_path(out).is_file()
    torch.manual_seed(12345)  # the resumed run must not depend on the global generator's state here
    resumed = detect(data, csv, out=out, resume=True, **options).frame
    assert not checkpoint_path(out).exists()  # removed once the results are written
    for column in COLUMNS:
        assert resumed[column].tolist() == whole[column].tolist(), column
    losses = [epoch["loss"] for epoch in resumed.attrs["detect"]["epochs"]]
    assert np.array_equal(losses, [epoch["loss"] for epoch in whole.attrs["detect"]["epochs"]])


def test_a_checkpoint_of_another_run_is_refused(uninterrupted, tmp_path):
    data, csv, _ = uninterrupted
    out = tmp_path / "flags.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect(data, csv, out=out, reporter=KilledAtEpoch(2), **stage_configs("detect", **QUICK))
    other = stage_configs("detect", **{**QUICK, "lr": 0.01})
    with pytest.raises(ConfigError, match="belongs to another run"):
        detect(data, csv, out=out, resume=True, **other)
    assert checkpoint_path(out).is_file()  # kept: the user may still resume with the right options


def test_where_decoded_images_are_kept_and_how_many_threads_decode_them_do_not_block_a_resume(
    uninterrupted, tmp_path
):
    data, csv, whole = uninterrupted
    out = tmp_path / "flags.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect(data, csv, out=out, reporter=KilledAtEpoch(2), **stage_configs("detect", **QUICK))
    moved = stage_configs("detect", **QUICK, image_cache=str(tmp_path / "elsewhere"), num_workers=3)
    resumed = detect(data, csv, out=out, resume=True, **moved).frame
    assert resumed["p_clean"].tolist() == whole["p_clean"].tolist()
    assert any((tmp_path / "elsewhere").iterdir())  # the new cache folder was used


def test_the_run_key_leaves_out_only_the_options_that_cannot_change_the_result():
    from deft_clean.checkpoint import run_key
    from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig

    def key(**options: Any) -> dict[str, Any]:
        data, stage = DataConfig(**options.pop("data", {})), options.pop("stage", DetectConfig())
        return run_key((data, BackboneConfig(model="test-tiny"), stage), {"csv_sha256": "0"})

    same = key(data={"image_cache": "off"}, stage=DetectConfig(num_workers=4))
    assert same == key()
    assert key(stage=FinetuneConfig(num_workers=2)) == key(stage=FinetuneConfig())
    assert key(data={"min_per_class": 3}) != key() and key(stage=DetectConfig(seed=1)) != key()


def test_without_resume_a_leftover_checkpoint_is_replaced_with_a_notice(uninterrupted, tmp_path, caplog):
    data, csv, whole = uninterrupted
    out = tmp_path / "flags.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect(data, csv, out=out, reporter=KilledAtEpoch(2), **stage_configs("detect", **QUICK))
    with caplog.at_level(logging.WARNING, logger="deft_clean"):
        again = detect(data, csv, out=out, **stage_configs("detect", **QUICK)).frame
    assert "holds an interrupted run; starting over (pass --resume to continue it)" in caplog.text
    assert again["p_clean"].tolist() == whole["p_clean"].tolist()
    assert not checkpoint_path(out).exists()


def test_cli_resume_option(uninterrupted, tmp_path):
    data, csv, whole = uninterrupted
    out = tmp_path / "flags.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect(data, csv, out=out, reporter=KilledAtEpoch(3), **stage_configs("detect", **QUICK))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()]
    result = CliRunner().invoke(app, ["detect", str(data), str(csv), "--out", str(out), "--resume", *flags])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "after epoch 2" in result.output


def test_a_frozen_tower_run_resumes_to_the_same_result(uninterrupted, tmp_path):
    data, csv, _ = uninterrupted
    options = stage_configs("detect", **{**QUICK, "peft": "none"})
    whole = detect(data, csv, out=tmp_path / "whole.parquet", **options).frame
    out = tmp_path / "flags.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect(data, csv, out=out, reporter=KilledAtEpoch(3), **options)
    resumed = detect(data, csv, out=out, resume=True, **options).frame
    for column in COLUMNS:
        assert resumed[column].tolist() == whole[column].tolist(), column


@pytest.mark.parametrize("tune", ["full", "linear"])
def test_a_killed_finetune_resumes_to_the_same_classifier(uninterrupted, tmp_path, tune):
    from safetensors.torch import load_file

    from deft_clean.finetune import finetune

    data, csv, _ = uninterrupted
    options = stage_configs("finetune", model="test-tiny", device="cpu", epochs=3, batch_size=4, tune=tune)
    torch.manual_seed(1)  # --seed alone decides: the global generator's state does not matter
    finetune(data, csv, out=tmp_path / "whole", **options)
    out = tmp_path / "killed"
    torch.manual_seed(2)
    with pytest.raises(KeyboardInterrupt):
        finetune(data, csv, out=out, reporter=KilledAtEpoch(3, "Fine-tuning (tes) epoch"), **options)
    assert not out.exists() and checkpoint_path(out).is_file()
    torch.manual_seed(12345)
    moved = {"data": DataConfig(image_cache="off"), **options}  # decoded pixels kept elsewhere: same run
    moved["finetune"] = dataclasses.replace(options["finetune"], num_workers=2)
    finetune(data, csv, out=out, resume=True, **moved)
    assert not checkpoint_path(out).exists()
    for name in ("tower.safetensors", "head.safetensors"):
        whole, resumed = load_file(tmp_path / "whole" / name), load_file(out / name)
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), name


def test_later_saves_sum_only_the_frozen_tensors_that_can_move(tmp_path, monkeypatch):
    from torch import nn

    from deft_clean import checkpoint as module
    from deft_clean.checkpoint import Checkpoint

    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    for name, parameter in net.named_parameters():
        parameter.requires_grad = name == "0.bias"  # one trained tensor; the rest frozen
    optimizer = torch.optim.SGD([net[0].bias], lr=0.1)
    saved = Checkpoint(tmp_path / "c", {}, resume=False)
    saved.restore(net, optimizer, [])
    summed: list[int] = []
    real = module._sum
    monkeypatch.setattr(module, "_sum", lambda t: summed.append(t.numel()) or real(t))
    with torch.no_grad():
        net[1].weight.add_(1.0)  # a frozen weight a forward changes in place: found by the full first scan
    saved.save(1, [], net, optimizer, [])
    first = torch.load(tmp_path / "c", weights_only=False)["params"]
    assert set(first) == {"0.bias", "1.weight"} and len(summed) == 8  # every frozen tensor checked once
    summed.clear()
    with torch.no_grad():
        net[1].weight.add_(1.0)
        net[2].running_mean.add_(1.0)  # buffers (BatchNorm statistics) are checked at every save
    net[0].weight = nn.Parameter(
        net[0].weight.detach() + 1, requires_grad=False
    )  # storage replaced (peft MHA)
    saved.save(2, [], net, optimizer, [])
    later = torch.load(tmp_path / "c", weights_only=False)["params"]
    assert set(later) == {"0.bias", "0.weight", "1.weight", "2.running_mean"}
    assert torch.equal(later["1.weight"], net[1].weight) and torch.equal(later["0.weight"], net[0].weight)
    assert len(summed) == 5  # 0.weight, 1.weight and the 3 buffers; not 1.bias, 2.weight nor 2.bias
