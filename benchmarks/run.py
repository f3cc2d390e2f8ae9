"""Benchmark entry point: plant noise in a dataset, run detectors, write one JSON record per result row.

    python -m benchmarks.run --dataset cifar10 --noise sym:0.2,sym:0.4 --method deft,cleanlab,knn \\
        --model offline --device cuda --deft-opts peft=none,epochs=10
    python -m benchmarks.run --subset 2000 --seeds 0,1,2 --noise sym:0.4,instance:0.4 --method cleanlab,knn
    python -m benchmarks.run --smoke          # a few hundred images, test-tiny, every method (CI)

Records go to ``--results-dir`` as ``<dataset>-<subset>_<noise>_<method>_<model>_s<seed>.json``: by default
``<cache-dir>/results`` (ignored by git); only an explicit ``--results-dir benchmarks/results`` adds to the
tracked records, and a smoke run refuses that. ``python -m benchmarks.report`` turns records into markdown
tables (mean ± sd over seeds). Each seed draws its own subset and noise. The exit code is 1 when any
method failed (its record says why).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import datasets
from benchmarks.methods import METHODS, Context, Row, measure, slug
from benchmarks.metrics import CLEAN_SET_METRICS, METRIC_NAMES, detection_metrics
from benchmarks.noise import plant_noise
from benchmarks.report import markdown_tables
from deft_clean.config import DEFAULT_MODEL, BackboneConfig
from deft_clean.results import package_versions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
TRACKED_RESULTS = REPO / "benchmarks" / "results"
FEATURE_METHODS = {"cleanlab", "knn", "small-loss"}
RECORD_METRICS = (*METRIC_NAMES, *CLEAN_SET_METRICS, "n_flagged", "n_noisy")
PACKAGES = ("deft-clean", "torch", "open_clip_torch", "cleanlab", "scikit-learn", "timm", "numpy")


def parse_options(text: str | None) -> dict[str, Any]:
    """``'peft=none,epochs=10,lr=0.01'`` → ``{'peft': 'none', 'epochs': 10, 'lr': 0.01}`` (int, float,
    true/false and null are converted; 'none' stays a string: it is a value of --peft)."""
    options: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"option '{item}' is not KEY=VALUE (in '{text}')")
        lowered = raw.strip().lower()
        value: Any = {"true": True, "false": False, "null": None}.get(lowered, raw.strip())
        for convert in (int, float):
            if isinstance(value, str):
                try:
                    value = convert(value)
                except ValueError:
                    pass
        options[key.strip()] = value
    return options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--dataset", default="cifar10", choices=datasets.DATASETS)
    add(
        "--classes",
        type=int,
        default=None,
        help="With --dataset synthetic: a many-class set of K classes (2..100), for --text-classes runs.",
    )
    add("--noise", default="sym:0.4", help="Comma-separated: sym:R, asym:R, instance:R, file:PATH.")
    add("--method", default=",".join(METHODS), help=f"Comma-separated subset of: {', '.join(METHODS)}.")
    add("--subset", type=int, default=None, help="Stratified random subset of N images (default: all).")
    add("--seed", type=int, default=0, help="Seed for the subset, the noise and every method.")
    add("--seeds", default=None, help="Comma-separated seeds, run one after another (overrides --seed).")
    add("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="Folder holding cifar10/ (../shared/data).")
    add(
        "--cache-dir",
        type=Path,
        default=REPO / "benchmarks" / "cache",
        help="Materialised datasets + features.",
    )
    add("--results-dir", type=Path, default=None, help="Where JSON records go (default <cache-dir>/results).")
    add("--model", default=DEFAULT_MODEL, help="Backbone for every method (deft-clean --model).")
    add("--pretrained", default=BackboneConfig.pretrained, help="Weights tag / checkpoint (--pretrained).")
    add("--device", default=BackboneConfig.device, help="'auto', 'cpu' or 'cuda[:N]'.")
    add("--deft-opts", default="", help="detect() options, e.g. peft=none,epochs=10.")
    add(
        "--finetune-opts", default="", help="Overrides for the CE fine-tune of the gmm method, e.g. epochs=2."
    )
    add(
        "--folds",
        type=int,
        default=5,
        help="Cross-validation folds of the probe baselines and instance noise.",
    )
    add("--knn-k", type=int, default=None, help="Neighbours for the kNN baseline (default: chosen per run).")
    add("--batch-size", type=int, default=256, help="Batch size of the frozen-feature pass.")
    add("--smoke", action="store_true", help="Quick CI run: 200 images, test-tiny, every method, 1 epoch.")
    args = parser.parse_args(argv)
    args.noise = [n for n in args.noise.split(",") if n]
    args.method = [m for m in args.method.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s] if args.seeds else [args.seed]
    if args.classes is not None and args.dataset != "synthetic":
        parser.error("--classes K builds the synthetic many-class set: pass --dataset synthetic with it")
    if args.smoke and args.results_dir is not None and _inside(args.results_dir, TRACKED_RESULTS):
        parser.error(f"--smoke records are not measurements; pass a --results-dir outside {TRACKED_RESULTS}")
    args.results_dir = args.results_dir or args.cache_dir / "results"
    unknown = sorted(set(args.method) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for noise in args.noise:
        try:
            datasets.parse_noise(noise)
        except ValueError as error:
            parser.error(str(error))
    return args


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents


def apply_smoke(args: argparse.Namespace) -> None:
    """Shrink a run to CI size: CIFAR-10 (synthetic images when absent), 200 images, the random tiny
    backbone on CPU, one training epoch."""
    has_cifar = (args.data_root / "cifar10" / "train.parquet").is_file()
    args.dataset = "cifar10" if has_cifar else "synthetic"
    args.subset, args.model, args.pretrained, args.device = 200, "test-tiny", None, "cpu"
    args.deft_opts = ",".join(
        filter(None, ["epochs=1,warmup_epochs=0,batch_size=32,num_workers=1", args.deft_opts])
    )
    args.finetune_opts = ",".join(
        filter(None, ["epochs=1,batch_size=32,lr=0.01,num_workers=1", args.finetune_opts])
    )


def make_record(
    args: argparse.Namespace, seed: int, noisy: datasets.NoisySet, row: Row, cost: dict
) -> dict[str, Any]:
    """The JSON record of one result row: setting, metrics against the planted truth, cost, versions."""
    n = len(noisy.given)
    extra = dict(row.extra)
    feature_s = extra.pop("feature_s", 0.0)
    peaks = [p for p in (cost["peak_gpu_mb"], extra.pop("feature_peak_gpu_mb", None)) if p is not None]
    metrics = (
        {}
        if row.detection is None
        else detection_metrics(row.detection.flags, row.detection.scores, noisy.truth)
    )
    return {
        "dataset": noisy.dataset.name,
        "subset": args.subset,
        "n": n,
        "noise": noisy.noise,
        "noise_rate": float(noisy.truth.mean()),
        "method": row.method,
        "variant": _variant(args, row.method),
        "status": row.status,
        "backbone": {"model": args.model, "pretrained": args.pretrained, "device": args.device},
        "seed": seed,
        **{k: metrics.get(k) for k in RECORD_METRICS},
        "wall_s": cost["wall_s"],
        "feature_s": feature_s,
        "images_per_s": n / max(cost["wall_s"] + feature_s, 1e-9),
        "peak_gpu_mb": max(peaks) if peaks else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "host": platform.node(),
        "options": extra,
        "versions": package_versions(PACKAGES),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _variant(args: argparse.Namespace, method: str) -> str:
    """The user's options for a trained method (``--deft-opts``/``--finetune-opts``); '' for the others."""
    if method.startswith("deft"):
        return args.deft_opts or ""
    if method.startswith("ce-"):
        return args.finetune_opts or ""
    return ""


def run_method(ctx: Context, noisy: datasets.NoisySet, name: str) -> list[tuple[Row, dict]]:
    """Run one method, timed; a failure becomes a row whose status carries the error."""
    with measure() as cost:
        try:
            rows = METHODS[name](ctx, noisy)
        except Exception as error:  # noqa: BLE001 - a benchmark records failures and goes on
            rows = [Row(name, None, status=f"error: {type(error).__name__}: {error}")]
    return [(row, cost) for row in rows]


def write_record(record: dict[str, Any], results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    subset = record["subset"] or "all"
    noise = record["noise"].replace(":", "-").replace("/", "_")
    model = Path(str(record["backbone"]["model"])).name
    variant = f"_{slug(record['variant'])}" if record.get("variant") else ""
    path = (
        results_dir
        / f"{record['dataset']}-{subset}_{noise}_{record['method']}{variant}_{model}_s{record['seed']}.json"
    )
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Every noise × method of one seed (its own subset and noise draw); records are written as they come."""
    try:
        dataset = datasets.materialise(
            args.dataset,
            data_root=args.data_root,
            cache_dir=args.cache_dir,
            subset=args.subset,
            seed=seed,
            classes=args.classes,
        )
    except datasets.DatasetUnavailable as error:
        print(f"skipping {args.dataset}: {error}", file=sys.stderr)
        return []
    ctx = Context(
        dataset,
        BackboneConfig(model=args.model, pretrained=args.pretrained, device=args.device),
        seed=seed,
        folds=args.folds,
        knn_k=args.knn_k,
        batch_size=args.batch_size,
        deft_options=parse_options(args.deft_opts),
        finetune_options=parse_options(args.finetune_opts),
    )
    if FEATURE_METHODS & set(args.method):
        ctx.features()  # one shared, separately timed pass (recorded as feature_s)
    if "zero-shot" in args.method and getattr(ctx.backbone(), "aligned", False):
        ctx.features(pooled=False)  # zero-shot compares projected embeddings with text embeddings
    records = []
    for noise in args.noise:
        noisy = plant_noise(dataset, noise, seed=seed, folds=args.folds)
        for name in args.method:
            for row, cost in run_method(ctx, noisy, name):
                records.append(make_record(args, seed, noisy, row, cost))
                write_record(records[-1], args.results_dir)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    records = [record for seed in args.seeds for record in run_seed(args, seed)]
    if not records:
        return 0
    print(markdown_tables(records))
    failed = [r for r in records if r["status"].startswith("error")]
    for record in failed:
        print(f"{record['method']} on {record['noise']}: {record['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
