"""How long does ``deft-clean report`` take, and how large is the page, on 50,000 rows?

Synthesises a results file over all 50,000 CIFAR-10 train images (written once as JPEG files by
``benchmarks.datasets.materialise``): 40% symmetric noise planted, p_clean drawn from Beta(2, 8) for the
wrong labels and Beta(8, 2) for the right ones, flagged at p_clean <= 0.5, the suggestion the true label
for 70% of the wrong rows. Then times :func:`deft_clean.report.build_report` at each ``--max-tiles``::

    OMP_NUM_THREADS=1 python -m benchmarks.report_scale --max-tiles 1000,5000

Prints a markdown table; writes JSON to benchmarks/results/report-scale_cifar10-50000.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from benchmarks.datasets import materialise, symmetric_noise
from benchmarks.run import DEFAULT_DATA_ROOT, REPO
from deft_clean.config import ReportConfig
from deft_clean.data import Manifest
from deft_clean.report import build_report
from deft_clean.results import Scores, result_frame, run_metadata, write_results

OUT_NAME = "report-scale_cifar10-50000.json"


def synthetic_flags(root: Path, paths: list[str], truth: np.ndarray, ids: list[str], out: Path) -> Path:
    """A results file over ``paths`` with planted noise and plausible scores (see the module docstring)."""
    rng = np.random.default_rng(0)
    k = len(ids)
    given = symmetric_noise(truth, 0.4, k, seed=0)
    wrong = given != truth
    p_clean = np.where(wrong, rng.beta(2, 8, len(truth)), rng.beta(8, 2, len(truth))).astype(np.float32)
    flagged = p_clean <= 0.5
    guess = np.where(rng.random(len(truth)) < 0.7, truth, (given + rng.integers(1, k, len(truth))) % k)
    predicted = np.where(flagged, np.where(guess == given, (given + 1) % k, guess), given)
    scores = Scores(
        p_clean, p_clean - 0.5, flagged, predicted, rng.uniform(0.3, 1, len(truth)).astype(np.float32)
    )
    manifest = Manifest(
        data_dir=root, paths=paths, labels=given, class_ids=ids, class_names=ids,
        readable=np.ones(len(paths), bool), fingerprint={"source": "synthetic"},
    )  # fmt: skip
    frame = result_frame(manifest, np.arange(len(paths)), scores)
    return write_results(frame, out, metadata=run_metadata(manifest=manifest, configs={}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tiles", default="1000,5000", help="Comma-separated caps to time.")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / "cache")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/report-scale_cifar10-50000.json"
    )
    args = parser.parse_args()
    data = materialise("cifar10", data_root=DEFAULT_DATA_ROOT, cache_dir=args.cache_dir)
    ids = [line.split(",")[0] for line in data.classes_file.read_text().splitlines() if line]
    flags = synthetic_flags(
        data.root, list(data.paths), data.labels, ids, args.cache_dir / "report-scale" / "flags.parquet"
    )
    rows = []
    print("| rows | flagged | max-tiles | build s | page MB |\n|---|---|---|---|---|")
    for cap in (int(c) for c in args.max_tiles.split(",")):
        config = ReportConfig(max_tiles=cap)
        report = build_report(flags, flags.with_name(f"report-{cap}.html"), config=config)
        row = {"rows": report.n_rows, "flagged": report.n_flagged, "max_tiles": cap, "shown": report.n_shown}
        rows.append({**row, "seconds": round(report.seconds, 2), "mb": round(report.size_bytes / 1e6, 2)})
        print(f"| {row['rows']:,} | {row['flagged']:,} | {cap:,} | {report.seconds:.1f} | {rows[-1]['mb']} |")
    record = {
        "rows": rows,
        "host": platform.node(),
        "cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15": os.getloadavg(),  # the machine is shared: times grow with the load
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
