"""Markdown tables from benchmark JSON records: one table per (dataset, size, noise, backbone) setting.

Each row is one method (and variant) over every seed it ran: a cell is ``mean ± sd`` (sample sd) when
there are several seeds, the value itself for one; ``seeds`` says how many. ``time s`` is the method's
wall time plus the shared frozen-feature pass it used (so it is detect's wall time for deft).

    python -m benchmarks.report benchmarks/results/*.json                 # print
    python -m benchmarks.report benchmarks/results/*.json --out table.md  # also write to a file

Within a setting, rows follow the method order of ``ORDER``; a record that did not run shows its status.
When several records share a setting, method and variant (re-runs), the newest (``created``) wins. A
variant (the run's ``--deft-opts``/``--finetune-opts``) shows in brackets after the method name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ("deft", "deft-mismatch", "cleanlab", "knn", "small-loss", "ce-gmm", "ce-mismatch", "zero-shot")
COLUMNS = (
    ("method", "method"),
    ("seeds", "seeds"),
    ("f1", "F1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("clean_precision", "kept P"),
    ("clean_recall", "kept R"),
    ("n_flagged", "flagged"),
    ("time_s", "time s"),
    ("peak_gpu_mb", "peak GPU MB"),
)
FRACTIONS = ("f1", "precision", "recall", "auroc", "auprc", "clean_precision", "clean_recall")


def summarise(values: list[float | None]) -> tuple[float, float | None] | None:
    """(mean, sample sd) of the values present; sd is None for a single value; None when none are."""
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return None
    return float(present.mean()), float(present.std(ddof=1)) if present.size > 1 else None


def _cell(key: str, values: list[Any]) -> str:
    summary = summarise(values)
    if summary is None:
        return "–"
    mean, sd = summary
    if key in FRACTIONS:
        text, spread = f"{mean:.3f}", f"{sd:.3f}" if sd is not None else ""
    else:
        text = f"{mean:,.1f}" if mean < 100 else f"{mean:,.0f}"
        spread = "" if sd is None else (f"{sd:,.1f}" if sd < 100 else f"{sd:,.0f}")
    return f"{text} ± {spread}" if spread else text


def _time(record: dict[str, Any]) -> float | None:
    if record.get("wall_s") is None:
        return None
    return record["wall_s"] + (record.get("feature_s") or 0.0)


def _setting(record: dict[str, Any]) -> tuple[str, ...]:
    backbone = record["backbone"]
    return (
        record["dataset"],
        str(record["n"]),
        record["noise"],
        f"{backbone['model']}" + (f" ({backbone['pretrained']})" if backbone.get("pretrained") else ""),
    )


def variant(record: dict[str, Any]) -> str:
    """The options that tell runs of one method apart; older records carry them only in ``options``."""
    if "variant" in record:
        return record["variant"]
    options = dict(record.get("options", {}).get("deft_options", {}))
    options.pop("seed", None)
    return ",".join(f"{k}={v}" for k, v in options.items())


def _latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (setting, method, variant, seed): the newest."""
    best: dict[tuple, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r.get("created", "")):
        best[(*_setting(record), record["method"], variant(record), record["seed"])] = record
    return list(best.values())


def _row(label: str, runs: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    """One table line: ``label`` then each column summarised over the seeds in ``runs``."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return (
            "| " + " | ".join([label, str(len(runs)), runs[-1]["status"]] + [""] * (len(columns) - 3)) + " |"
        )
    cells = [label, str(len(ok))]
    for key, _ in columns[2:]:
        cells.append(_cell(key, [_time(r) if key == "time_s" else r.get(key) for r in ok]))
    return "| " + " | ".join(cells) + " |"


def markdown_tables(records: Iterable[dict[str, Any]]) -> str:
    """Markdown: a heading and a table per setting, one row per method and variant (in ``ORDER``,
    unknown methods last) aggregated over seeds; failed seeds are left out of the figures."""
    groups: dict[tuple[str, ...], dict[tuple[int, str, str], list[dict[str, Any]]]] = {}
    for record in _latest(records):
        method = record["method"]
        rank = ORDER.index(method) if method in ORDER else len(ORDER)
        groups.setdefault(_setting(record), {}).setdefault((rank, method, variant(record)), []).append(record)
    parts = []
    for (dataset, n, noise, backbone), rows in sorted(groups.items()):
        runs = [r for group in rows.values() for r in group]
        columns = COLUMNS if any(r.get("peak_gpu_mb") is not None for r in runs) else COLUMNS[:-1]
        rate = float(np.mean([r["noise_rate"] for r in runs]))
        lines = [
            f"### {dataset}, n = {n}, noise {noise} (measured rate {rate:.3f}), backbone {backbone}",
            "",
            "| " + " | ".join(title for _, title in columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
        ]
        for key in sorted(rows):
            label = key[1] + (f" [{key[2]}]" if key[2] else "")
            lines.append(_row(label, sorted(rows[key], key=lambda r: r["seed"]), columns))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="JSON records written by benchmarks.run.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown to this file.")
    args = parser.parse_args(argv)
    text = markdown_tables(json.loads(path.read_text()) for path in args.records)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
