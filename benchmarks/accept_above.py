"""How right are the suggestions ``export --to csv`` would apply, at each ``--accept-above`` threshold?

For flags files whose truth is known, count the suggestions accepted at each threshold (flagged, suggestion
differs from the given label, ``predicted_prob`` >= P) and how many of them equal the true label::

    python -m benchmarks.accept_above runs/fashion-mnist/flags.parquet:examples/fashion-mnist/truth.csv \\
        benchmarks/cache/cifar10-2000-s0/deft-flags/labels_sym-0.4_s0_offline_peft_none.parquet:\\
benchmarks/cache/cifar10-2000-s0/truth.csv

Prints a markdown table and writes it as JSON (``--out``, default benchmarks/results/accept-above.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from deft_clean import read_results
from deft_clean.report import truth_labels
from deft_clean.results import confident_suggestions

HEADER = "| accept-above | accepted | right | precision | right labels broken | wrong labels before → after |"
RULE = "|---|---|---|---|---|---|"
THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def measure(flags: Path, truth_csv: Path) -> list[dict]:
    """One row per threshold: accepted suggestions, how many are right, and what that does to the labels."""
    frame = read_results(flags)
    truth = truth_labels(frame, truth_csv)
    given = frame["given_label"].cat.codes.to_numpy(np.int64)
    suggested = frame["suggested_label"].cat.codes.to_numpy(np.int64)
    known = truth >= 0
    wrong = known & (truth != given)
    rows = []
    for threshold in THRESHOLDS:
        take = confident_suggestions(frame, threshold) & known
        right = int((take & (suggested == truth)).sum())
        rows.append(
            {
                "accept_above": threshold,
                "accepted": int(take.sum()),
                "right": right,
                "precision": right / max(int(take.sum()), 1),
                "broke_a_right_label": int((take & ~wrong).sum()),
                "wrong_labels": int(wrong.sum()),
                "wrong_labels_after": int(wrong.sum()) - right + int((take & ~wrong).sum()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="FLAGS.parquet:TRUTH.csv")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accept-above.json"))
    args = parser.parse_args()
    record = {}
    for pair in args.pairs:
        flags, truth = pair.split(":", 1)
        record[flags] = measure(Path(flags), Path(truth))
        print(f"\n#### {flags}\n")
        print(HEADER + "\n" + RULE)
        for r in record[flags]:
            print(
                f"| {r['accept_above']} | {r['accepted']} | {r['right']} | {r['precision']:.3f} | "
                f"{r['broke_a_right_label']} | {r['wrong_labels']} → {r['wrong_labels_after']} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
