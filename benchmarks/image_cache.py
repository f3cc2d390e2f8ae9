"""The decoded-image cache across runs: what a second run on unchanged images saves.

For each image set, ``load_manifest(image_size=S)`` (validation, which decodes every image at the
backbone's input size and keeps the pixels) is timed three ways: with ``--image-cache off`` (decode
only), the first run with a fresh cache folder (decode + store the file), and the second run (read
the file and check its CRC instead of decoding). ``--full`` also times README command 1 (``deft-clean
detect`` on the bundled Fashion-MNIST example) end to end, twice, with one fresh cache folder::

    python -m benchmarks.image_cache --full --json benchmarks/results/image-cache.json

Image sets: the bundled example (300 PNGs, 28x28) and 2,000 CIFAR-10 JPEGs (32x32, from
../shared/data, written once under benchmarks/cache). Prints a table; ``--json`` writes the records.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import datasets
from deft_clean.backbone import input_size
from deft_clean.config import BackboneConfig, DataConfig
from deft_clean.data import load_manifest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fashion-mnist"
README_1 = [
    "detect", str(EXAMPLE), str(EXAMPLE / "labels.csv"), "--classes", str(EXAMPLE / "classes.txt"),
    "--truth", str(EXAMPLE / "truth.csv"),
]  # fmt: skip


def _timed_load(data_dir: Path, labels: Path | None, config: DataConfig, size: int) -> float:
    start = time.perf_counter()
    load_manifest(data_dir, labels, config=config, image_size=size)
    return time.perf_counter() - start


def time_loads(name: str, data_dir: Path, labels: Path | None, classes: Path, size: int, work: Path) -> dict:
    """Seconds for validation with the cache off, on its first run (decode + store) and second (read)."""
    folder = work / f"cache-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    off = DataConfig(classes_file=str(classes), image_cache="off")
    on = DataConfig(classes_file=str(classes), image_cache=str(folder))
    record = {"images": name, "size": size, "off_s": _timed_load(data_dir, labels, off, size)}
    record["first_s"] = _timed_load(data_dir, labels, on, size)
    record["second_s"] = _timed_load(data_dir, labels, on, size)
    record["cache_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
    record["n"] = len(load_manifest(data_dir, labels, config=off))
    return record


def time_readme(work: Path) -> dict:
    """README command 1 end to end (a subprocess, as a user runs it), twice with one fresh cache folder."""
    env = {**os.environ, "DEFT_CLEAN_CACHE": str(work / "readme-cache")}
    shutil.rmtree(work / "readme-cache", ignore_errors=True)
    record: dict = {"images": "README command 1 (detect, end to end)"}
    for run in ("first_s", "second_s"):
        out = work / f"readme-{run}.parquet"
        out.unlink(missing_ok=True)
        start = time.perf_counter()
        done = subprocess.run(
            ["deft-clean", *README_1, "--out", str(out)], env=env, capture_output=True, text=True, check=False
        )
        record[run] = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"deft-clean detect failed:\n{done.stdout}\n{done.stderr}")
        lines = (done.stdout + done.stderr).splitlines()
        record[run.replace("_s", "_log")] = [line for line in lines if "decoded" in line]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="Also time README command 1 end to end, twice.")
    parser.add_argument("--n", type=int, default=2000, help="CIFAR-10 images (default 2000).")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deft-image-cache")
    parser.add_argument("--json", type=Path, help="Write the records here.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    size = input_size(BackboneConfig(model="offline"))
    records = [
        time_loads("fashion-mnist example", EXAMPLE, EXAMPLE / "labels.csv", EXAMPLE / "classes.txt", size,
                   args.workdir),
    ]  # fmt: skip
    cifar = datasets.materialise(
        "cifar10", data_root=REPO.parent / "shared" / "data", cache_dir=REPO / "benchmarks" / "cache",
        subset=args.n,
    )  # fmt: skip
    root = cifar.root
    records.append(
        time_loads(f"cifar10 {args.n}", root, root / "truth.csv", root / "classes.txt", size, args.workdir)
    )
    if args.full:
        records.append(time_readme(args.workdir))
    print(f"{'images':<40} {'off':>8} {'first':>8} {'second':>8}")
    for r in records:
        off = f"{r['off_s']:.2f}" if "off_s" in r else "-"
        print(f"{r['images']:<40} {off:>8} {r['first_s']:>8.2f} {r['second_s']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
