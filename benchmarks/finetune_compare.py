"""Does training on DeFT's clean subset, with TeS, recover the accuracy of clean labels?

Four classifiers on the same noisy CIFAR-10 training set, same backbone, tuning mode and epochs, scored
on held-out CIFAR-10 test images:

    (a) CE on all noisy labels   (b) CE on the DeFT-clean rows   (c) TeS on the DeFT-clean rows
    (d) CE on the true labels (upper bound)

Everything goes through the public API (``deft_clean.detect``, ``deft_clean.finetune``)::

    python -m benchmarks.finetune_compare --subset 2000 --test 1000 --tune linear --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.datasets import materialise, symmetric_noise, write_noisy_labels
from benchmarks.methods import call_detect
from benchmarks.run import parse_options
from deft_clean.config import BackboneConfig, DataConfig, FinetuneConfig
from deft_clean.finetune import finetune


def write_test_split(data_root: Path, cache_dir: Path, n: int, class_ids: tuple[str, ...]) -> Path:
    """The first ``n`` CIFAR-10 test images as JPEG files + ``labels.csv``; returns the CSV."""
    root = cache_dir / f"cifar10-test-{n}"
    csv = root / "labels.csv"
    if csv.is_file():
        return csv
    table = pq.read_table(data_root / "cifar10" / "test.parquet", columns=["index", "label", "jpeg"])
    order = np.argsort(table.column("index").to_numpy())[:n]
    (root / "images").mkdir(parents=True, exist_ok=True)
    labels, jpegs = table.column("label").to_numpy(), table.column("jpeg")
    lines = ["path,label"]
    for i in order:
        (root / "images" / f"{i}.jpg").write_bytes(jpegs[int(i)].as_py())
        lines.append(f"images/{i}.jpg,{class_ids[labels[i]]}")
    csv.write_text("\n".join(lines) + "\n")
    return csv


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / "cache")
    parser.add_argument("--subset", type=int, default=None, help="Training images (default: all 50k).")
    parser.add_argument("--test", type=int, default=10_000, help="Test images (first N of the test split).")
    parser.add_argument("--noise", type=float, default=0.4, help="Symmetric noise rate.")
    parser.add_argument("--model", default="offline")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune", default="linear")
    parser.add_argument("--deft-opts", default="peft=none", help="detect() options, key=value,...")
    parser.add_argument(
        "--flags", type=Path, default=None, help="Reuse this detect results file (same data and noise)."
    )
    parser.add_argument(
        "--finetune-opts", default="epochs=10,lr=0.5", help="finetune() options, key=value,..."
    )
    parser.add_argument("--out", type=Path, default=None, help="Record folder (default <cache-dir>/results).")
    args = parser.parse_args()
    args.out = args.out or args.cache_dir / "results"

    data = materialise("cifar10", data_root=args.data_root, cache_dir=args.cache_dir, subset=args.subset)
    given = symmetric_noise(data.labels, args.noise, len(data.class_ids), args.seed)
    noisy = write_noisy_labels(data, given, f"sym:{args.noise}", args.seed)
    test_csv = write_test_split(args.data_root, args.cache_dir, args.test, data.class_ids)
    backbone = {"model": args.model, "pretrained": args.pretrained, "device": args.device}
    common = {"data": DataConfig(classes_file=str(data.classes_file)), "backbone": BackboneConfig(**backbone)}
    work = args.cache_dir / f"finetune-compare-{data.root.name}"
    started = time.perf_counter()
    flags = args.flags or work / "flags.parquet"
    if args.flags is None:
        options = {"seed": args.seed, **parse_options(args.deft_opts)}
        call_detect(
            data.root,
            noisy.labels_csv,
            out=flags,
            backbone=common["backbone"],
            classes_file=data.classes_file,
            options=options,
        )
    detect_s = time.perf_counter() - started

    runs = {
        "a: CE, all noisy labels": (noisy.labels_csv, None, {"method": "ce"}),
        "b: CE, DeFT-clean rows": (noisy.labels_csv, flags, {"method": "ce", "clean_only": True}),
        "c: TeS, DeFT-clean rows": (noisy.labels_csv, flags, {"method": "tes", "clean_only": True}),
        "d: CE, true labels": (data.root / "truth.csv", None, {"method": "ce"}),
    }
    rows = []
    for name, (labels_csv, flags_file, extra) in runs.items():
        started = time.perf_counter()
        config = FinetuneConfig(tune=args.tune, seed=args.seed, **extra, **parse_options(args.finetune_opts))
        result = finetune(
            data.root, labels_csv, flags=flags_file, out=work / name[0], test_dir=test_csv.parent,
            test_csv=test_csv, finetune=config, overwrite=True, **common,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        rows.append(
            {"run": name, "n_train": result.n_train, "accuracy": result.metrics["accuracy"], "s": seconds}
        )
        print(f"{name:28s} train rows {result.n_train:6d}  test accuracy {result.metrics['accuracy']:.4f}")

    record = {
        "dataset": data.root.name, "noise": f"sym:{args.noise}", "n_test": args.test, "tune": args.tune,
        "backbone": backbone, "deft_opts": args.deft_opts, "flags": args.flags,
        "finetune_opts": args.finetune_opts, "detect_s": detect_s, "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"finetune-compare_{data.root.name}_sym-{args.noise}_{args.tune}_{args.model}.json"
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
