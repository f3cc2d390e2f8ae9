"""What an epoch checkpoint costs: ``Checkpoint.save`` and the part that finds the frozen tensors that moved.

A DeFT model on a backbone (default: ``offline``) takes one training step on random images, so LoRA
and the heads move, then ``Checkpoint.save`` runs ``--saves`` times, as at the ends of as many epochs.
Each save is timed whole and in its ``_moved`` part (which tensors to save); the first save and the
median of the later ones are reported, per ``--peft``::

    python -m benchmarks.checkpoint_cost --json /tmp/checkpoint-cost.json

Run it against two checkouts (``PYTHONPATH=...``) to compare versions; it uses ``DeftModel``,
``Checkpoint`` and the backbone registry only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deft_clean.backbone import load_backbone
from deft_clean.checkpoint import Checkpoint
from deft_clean.config import BackboneConfig, DetectConfig
from deft_clean.deft_model import DeftModel


def _timed(function, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def measure(model: str, peft: str, saves: int, folder: Path) -> dict:
    """Seconds of the first and the later saves (whole, and their ``_moved`` part) for one tuning."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(model=model, device="cpu"))
    config = DetectConfig(peft=peft, batch_size=8, lr=0.01).resolved(cuda=False, rows=80)[0]
    net = DeftModel(backbone, [f"class {k}" for k in range(10)], config)
    optimizer = torch.optim.SGD(net.param_groups(config), lr=0.01, momentum=0.9)
    generators = [torch.Generator().manual_seed(0)]
    saver, probe = (Checkpoint(folder / f"{peft}-{k}", {"peft": peft}, resume=False) for k in range(2))
    for checkpoint in (saver, probe):  # the fingerprint of the frozen tensors, before training
        checkpoint.restore(net, optimizer, generators)
    net.train()
    images = torch.randn(8, 3, backbone.image_size, backbone.image_size)
    positive, _ = net.similarities(net.image_features(images))
    positive.logsumexp(dim=1).mean().backward()
    optimizer.step()
    whole = [_timed(saver.save, epoch + 1, [], net, optimizer, generators) for epoch in range(saves)]
    moved = [_timed(probe._moved, net) for _ in range(saves)]
    params = sum(t.numel() for t in net.parameters())
    return {
        "model": model, "peft": peft, "parameters": params, "saves": saves,
        "first_moved_s": moved[0], "later_moved_s": statistics.median(moved[1:]),
        "first_save_s": whole[0], "later_save_s": statistics.median(whole[1:]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--peft", nargs="+", default=["none", "lora"])
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        records = [measure(args.model, peft, args.saves, Path(folder)) for peft in args.peft]
    head = ("model", "peft", "_moved 1st", "_moved later", "save 1st", "save later")
    print("{:<10} {:<6} {:>11} {:>13} {:>9} {:>11}".format(*head))
    for r in records:
        print(
            f"{r['model']:<10} {r['peft']:<6} {r['first_moved_s']:>11.3f} {r['later_moved_s']:>13.3f} "
            f"{r['first_save_s']:>9.3f} {r['later_save_s']:>11.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
