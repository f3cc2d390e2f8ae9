"""Many classes (``--text-classes``): step time and detection agreement, text-class sampling on and off.

``timing``: DeFT training steps for K classes, with every class encoded (off: the full softmax) and
with the step's classes only (on: ``--text-classes``). Reports the text side alone (the prompts'
forward + backward) and the whole step (one ``train_detector`` epoch on random images / its steps),
the median of ``--repeats`` rounds that time off and on back to back (with ``--shared-prefix both``, a
causal tower's shared prompt prefix and whole prompts too); with ``--memory``, the peak resident memory
that one step adds, each measured in a fresh process::

    python -m benchmarks.text_classes timing --model offline --classes 10 100 1000
    python -m benchmarks.text_classes timing --model ViT-B-16 --batch-size 8 --classes 10 100 1000 \
        --shared-prefix both

``agreement``: DeFT on planted K-class features with noisy labels (:func:`planted_features`), with
the full softmax (also from a second training seed: ``off-reseeded``) and with sampling; F1 of the flags
and AUROC of ``1 - p_clean`` against the truth (the
K-class *image* set is ``python -m benchmarks.run --dataset synthetic --classes K``)::

    python -m benchmarks.text_classes agreement --classes 100 --noise 0.2 --modes off off-reseeded on

Each prints a table and writes JSON to ``--out`` (default ``runs/text_classes/<command>.json``,
untracked). Speed does not depend on weight or pixel values, so random weights and images are fine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.metrics import detection_metrics
from deft_clean.backbone import load_backbone
from deft_clean.config import BackboneConfig, DetectConfig
from deft_clean.deft_model import DeftModel
from deft_clean.detect import score_detector
from deft_clean.results import Scores
from deft_clean.runtime import StagedImages
from deft_clean.text_sampling import step_classes
from deft_clean.training import LabelledImages, train_detector

DEFAULT_OUT = Path("runs/text_classes")
OFF = 1_000_000  # a --text-classes above any K: every class encoded, the full softmax
RESEED = 1000  # agreement mode off-reseeded: the second full run's training seed is the seed + this


def _setup(
    args: argparse.Namespace, classes: int, cap: int
) -> tuple[DeftModel, LabelledImages, DetectConfig]:
    """A DeFT model for ``classes`` random class names and ``args.steps`` batches of random images."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(model=args.model, device="cpu"))
    config, _ = DetectConfig(
        peft=args.peft, batch_size=args.batch_size, epochs=2, warmup_epochs=1, text_classes=cap
    ).resolved(cuda=False, rows=args.steps * args.batch_size)  # the lr (and 'auto') a CPU run would use
    names = [f"species {k}" for k in range(classes)]
    net = DeftModel(backbone, names, config, generator=torch.Generator().manual_seed(0))
    n, size = args.steps * args.batch_size, backbone.image_size
    cache = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    labels = np.random.default_rng(0).integers(0, classes, n)
    data = _labelled(cache, labels, backbone.mean, backbone.std, size)
    return net, data, config


def _labelled(cache: torch.Tensor, labels: np.ndarray, mean, std, size: int) -> LabelledImages:
    """All rows of ``cache`` on the CPU with their ``labels``."""
    rows = np.arange(len(labels))
    staged = StagedImages(cache, rows, mean=mean, std=std, size=size, device=torch.device("cpu"))
    return LabelledImages(staged, labels)


def _text_seconds(net: DeftModel, config: DetectConfig, batch: int) -> float:
    """One forward + backward of the prompts a step encodes (random given/complementary labels)."""
    k = net.prompts.n_cls
    labels = torch.randint(0, k, (batch,))
    classes = step_classes(labels, (labels + 1) % k, k, config.text_classes)
    started = time.perf_counter()
    pos, neg = net.prompts(classes)
    (pos.sum() + neg.sum()).backward()
    return time.perf_counter() - started


def _time_once(args: argparse.Namespace, classes: int, cap: int, shared: bool) -> dict[str, float]:
    load = os.getloadavg()[0]
    net, data, config = _setup(args, classes, cap)
    net.prompts.shared_prefix = net.prompts.shared_prefix and shared  # False: whole prompts per class
    facts = {
        "load": load,
        "shared": float(net.prompts.shared_prefix),
        "tokens": net.prompts.token_ids.shape[1],
    }
    with torch.no_grad():
        net.prompts(torch.arange(min(net.prompts.n_cls, 8)))  # the first call pays one-off costs
    text = _text_seconds(net, config, args.batch_size)
    if args.text_only:
        return {"text_s": text, "step_s": float("nan"), **facts}
    history = train_detector(net, data, config)  # epoch 1 (warm-up CE) runs the first steps: not timed
    return {"text_s": text, "step_s": history[1]["seconds"] / args.steps, **facts}


def _peak_memory(args: argparse.Namespace, classes: int, cap: int, shared: bool) -> float:
    """MiB of resident memory one training step adds over the model's setup, in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.text_classes", "memory-probe", "--model", args.model]
    command += ["--peft", args.peft, "--batch-size", str(args.batch_size), "--classes", str(classes)]
    command += ["--shared-prefix", "on" if shared else "off"]
    probe = subprocess.run(command + ["--cap", str(cap)], capture_output=True, text=True, check=True)
    return float(probe.stdout.strip().splitlines()[-1])


def memory_probe(args: argparse.Namespace) -> None:
    """(subprocess of ``--memory``) print the peak resident memory (MiB) during one training step,
    above the resident memory before it: the kernel's high-water mark is reset after the setup."""
    args.steps = 1
    net, data, config = _setup(args, args.classes[0], args.cap)
    net.prompts.shared_prefix = net.prompts.shared_prefix and args.shared_prefix == "on"
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    train_detector(net, data, dataclasses.replace(config, epochs=1))
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def timing(args: argparse.Namespace) -> dict:
    """Each variant (sampling off/on × whole prompts/shared prefix) per K, the variants interleaved in
    every round so that a change in the machine's load hits them alike; a row is the median over rounds."""
    modes = {"off": OFF, "on": args.text_classes}
    modes = {mode: cap for mode, cap in modes.items() if args.sampling in (mode, "both")}
    prefixes = {"both": (False, True), "on": (True,), "off": (False,)}[args.shared_prefix]
    rows = []
    for k in args.classes:
        variants = [(mode, shared) for mode in modes for shared in prefixes]
        runs: dict[tuple[str, bool], list[dict[str, float]]] = {variant: [] for variant in variants}
        for _ in range(args.repeats):
            for mode, shared in variants:
                runs[mode, shared].append(_time_once(args, k, modes[mode], shared))
        for mode, shared in variants:
            encoded = min(k, max(modes[mode], 2 * args.batch_size))
            measured = runs[mode, shared]
            row = {
                "classes": k,
                "sampling": mode,
                "encoded": encoded,
                "shared_prefix": bool(measured[0]["shared"]),
            }
            row.update(prompt_tokens=int(measured[0]["tokens"]), repeats=args.repeats)
            row.update({key: statistics.median(r[key] for r in measured) for key in ("text_s", "step_s")})
            row["image_ms"] = 1000 * row["step_s"] / args.batch_size
            row["load_1min"] = statistics.mean(r["load"] for r in measured)
            if args.memory:
                row["peak_step_mib"] = _peak_memory(args, k, modes[mode], shared)
            rows.append(row)
            print(_format(row), flush=True)
    return {"rows": rows}


def _format(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def planted_features(
    classes: int, dim: int, *, per_class: int = 20, noise: float = 0.2, spread: float = 0.08, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Image features with a known class structure: ``(features (N, dim), given (N,), truth (N,))``.

    Class ``k`` is a random unit vector plus Gaussian noise of ``spread`` per dimension; ``noise`` of
    the labels (exactly ``round(noise · N)``) are flipped to a uniformly drawn other class.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(classes), per_class)
    features = centres[truth] + rng.normal(0, spread, (truth.size, dim))
    given = truth.copy()
    flips = rng.choice(truth.size, round(noise * truth.size), replace=False)
    given[flips] = (truth[flips] + rng.integers(1, classes, flips.size)) % classes
    return torch.tensor(features, dtype=torch.float32), given, truth


def agreement(args: argparse.Namespace) -> dict:
    """DeFT on planted features (``test-tiny``, frozen tower: only the prompts learn), full vs sampled,
    for each seed (the seed draws the features, the noise, the frozen tower and the training). Mode
    'off-reseeded' trains the full softmax again from another training seed (same data and tower; other
    prompt init, complementary labels, shuffling): its difference to 'off' is training's own noise."""
    every = {"off": (OFF, 0), "off-reseeded": (OFF, RESEED), "on": (args.text_classes, 0)}
    runs = [(mode, *every[mode]) for mode in args.modes]
    rows = []
    for seed in args.seeds:
        for mode, cap, offset in runs:
            started = time.perf_counter()
            scores, given, truth = _detect_planted(args, seed, cap, train_seed=seed + offset)
            row = {"seed": seed, "train_seed": seed + offset, "sampling": mode}
            row["text_classes"] = None if cap == OFF else cap
            row.update(detection_metrics(scores.is_noisy, 1 - scores.p_clean, given != truth))
            row["accuracy"] = float(np.mean(scores.predicted == truth))
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(_format(row), flush=True)
    summary = {metric: _agreement_summary(rows, metric, args.modes) for metric in ("f1", "auroc")}
    for metric, values in summary.items():
        print(metric, _format(values))
    return {"rows": rows, "summary": summary}


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _agreement_summary(rows: list[dict], metric: str, modes: list[str]) -> dict[str, float | None]:
    """Mean and seed-to-seed sd of ``metric`` per mode, and of each mode's per-seed difference to 'off'."""
    by_mode = {mode: [r[metric] for r in rows if r["sampling"] == mode] for mode in modes}
    summary: dict[str, float | None] = {}
    for mode, values in by_mode.items():
        summary[f"{mode}_mean"], summary[f"{mode}_sd"] = _mean_sd(values)
        if mode != "off" and "off" in by_mode:
            diffs = [b - a for a, b in zip(by_mode["off"], values, strict=True)]
            summary[f"{mode}_minus_off_mean"], summary[f"{mode}_minus_off_sd"] = _mean_sd(diffs)
            summary[f"{mode}_minus_off_max_abs"] = max(abs(d) for d in diffs)
    return summary


def _detect_planted(
    args: argparse.Namespace, seed: int, cap: int, *, train_seed: int
) -> tuple[Scores, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    backbone = load_backbone(BackboneConfig(model="test-tiny", device="cpu"))
    config = DetectConfig(
        peft="none", class_specific_ctx=True, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size, lr=args.lr, seed=train_seed, text_classes=cap,
    )  # fmt: skip
    k = args.classes[0]
    names = [f"class {c}" for c in range(k)]
    net = DeftModel(backbone, names, config, torch.Generator().manual_seed(train_seed))
    dim = net.trunk_features(torch.zeros(1, 3, backbone.image_size, backbone.image_size)).shape[1]
    trunk, given, truth = planted_features(k, dim, noise=args.noise, spread=args.spread, seed=seed)
    cache = torch.zeros(len(given), 3, 1, 1, dtype=torch.uint8)  # never read: the trunk is given
    data = _labelled(cache, given, (0.0,) * 3, (1.0,) * 3, 1)
    train_detector(net, data, config, trunk=trunk)
    return score_detector(net, data, config, trunk=trunk), given, truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("timing", "agreement", "memory-probe"))
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--peft", default="lora")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-classes", type=int, default=DetectConfig.text_classes)
    parser.add_argument("--steps", type=int, default=1, help="timing: training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampling", choices=("both", "on", "off"), default="both", help="timing: modes")
    parser.add_argument(
        "--shared-prefix", choices=("both", "on", "off"), default="on",
        help="timing: a causal tower's shared prefix run once (on) or whole prompts per class (off)",
    )  # fmt: skip
    parser.add_argument("--text-only", action="store_true", help="timing: the text side only")
    parser.add_argument("--memory", action="store_true", help="timing: also the peak memory of one step")
    parser.add_argument("--cap", type=int, default=OFF, help=argparse.SUPPRESS)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--modes", nargs="+", choices=("off", "off-reseeded", "on"), default=["off", "on"],
        help="agreement: the runs per seed (off-reseeded: the full softmax from another training seed)",
    )  # fmt: skip
    parser.add_argument("--spread", type=float, default=0.1, help="agreement: feature noise per dimension")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "memory-probe":
        memory_probe(args)
        return
    record = {"command": args.command, "args": {k: str(v) for k, v in vars(args).items()}}
    record["threads"] = torch.get_num_threads()
    record.update(timing(args) if args.command == "timing" else agreement(args))
    out = args.out or DEFAULT_OUT / f"{args.command}-{args.model}-{args.peft}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
