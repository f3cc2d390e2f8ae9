"""Markdown tables from benchmark JSON records: one table per (dataset, size, noise, backbone) setting.

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

ORDER = ("deft", "deft-mismatch", "cleanlab", "knn", "small-loss", "ce-gmm", "ce-mismatch", "zero-shot")
COLUMNS = (
    ("method", "method"),
    ("f1", "F1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("n_flagged", "flagged"),
    ("wall_s", "time s"),
    ("images_per_s", "img/s"),
    ("peak_gpu_mb", "peak GPU MB"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("f1", "precision", "recall", "auroc", "auprc"):
        return f"{value:.3f}"
    if key in ("wall_s", "images_per_s", "peak_gpu_mb"):
        return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    return str(value)


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


def _label(record: dict[str, Any]) -> str:
    return record["method"] + (f" [{variant(record)}]" if variant(record) else "")


def _latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (setting, method, variant, seed): the newest."""
    best: dict[tuple, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r.get("created", "")):
        best[(*_setting(record), record["method"], variant(record), record["seed"])] = record
    return list(best.values())


def markdown_tables(records: Iterable[dict[str, Any]]) -> str:
    """Markdown: a heading and a table per setting, methods in ``ORDER`` (unknown ones last)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in _latest(records):
        groups.setdefault(_setting(record), []).append(record)
    parts = []
    for (dataset, n, noise, backbone), rows in sorted(groups.items()):
        rows.sort(
            key=lambda r: (
                ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER),
                variant(r),
                r["seed"],
            )
        )
        rate = rows[0]["noise_rate"]
        lines = [
            f"### {dataset}, n = {n}, noise {noise} (measured rate {rate:.3f}), backbone {backbone}",
            "",
            "| " + " | ".join(title for _, title in COLUMNS) + " |",
            "|" + "|".join("---" for _ in COLUMNS) + "|",
        ]
        for r in rows:
            if r["status"] != "ok":
                cells = [_label(r), r["status"]] + [""] * (len(COLUMNS) - 2)
            else:
                cells = [_label(r)] + [_cell(key, r.get(key)) for key, _ in COLUMNS[1:]]
            lines.append("| " + " | ".join(cells) + " |")
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
