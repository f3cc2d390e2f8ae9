"""Fix the labels: a corrected labels CSV, a Label Studio review project, and the reviewer's decisions back.

- :func:`export_csv` applies a suggestion where the detector is confident (``predicted_prob`` at least
  ``accept_above``) and leaves everything else as it was: the output keeps the user's own columns and row
  order, and a ``review.csv`` lists the flagged rows it did not change, most likely wrong first.
- :func:`export_label_studio` writes an import file of image-classification tasks for the flagged rows,
  our suggestion pre-filled as a prediction scored by ``p_clean`` (Label Studio shows the lowest score
  first, so the likeliest mistakes come first), and the matching labeling config.
- :func:`import_review` applies a reviewer's Label Studio export (JSON or JSON-MIN) to a labels CSV.

Choices are class ids, the values of the user's label column, so a decision maps back without a lookup
table; the readable class name is the choice's hint. Rows never flagged are never touched.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

from deft_clean.config import ExportConfig
from deft_clean.errors import DataError, DeftCleanError, Problem
from deft_clean.files import atomic_file, atomic_folder, check_output, releases_outputs
from deft_clean.results import confident_suggestions, read_results, recorded_inputs
from deft_clean.tables import LABEL_COLUMNS, PATH_COLUMNS
from deft_clean.version import __version__

CORRECTED_CSV, REVIEW_CSV = "corrected.csv", "review.csv"
TASKS_JSON, LABEL_CONFIG_XML = "label-studio-tasks.json", "label-studio-config.xml"
FROM_NAME, TO_NAME = "label", "image"  # the Choices and Image tag names of the labeling config


@dataclass(frozen=True)
class ExportSummary:
    """What an export or import wrote and how many rows it changed."""

    files: tuple[Path, ...]
    n_rows: int
    n_flagged: int
    n_changed: int
    n_for_review: int


def export_labels(
    results: str | Path | pd.DataFrame,
    out_dir: str | Path | None = None,
    *,
    labels_csv: str | Path | None = None,
    config: ExportConfig = ExportConfig(),
    overwrite: bool = False,
) -> ExportSummary:
    """Export a results file as ``config.to`` says (:func:`export_csv` or :func:`export_label_studio`).

    ``out_dir`` defaults to the folder holding the results file. Each file it would write is checked
    first (:func:`check_output`): an existing one is refused unless ``overwrite``, an input of the run
    (the results, the labels CSV, an image) always.
    """
    if out_dir is None:
        if isinstance(results, pd.DataFrame):
            raise DeftCleanError("export_labels needs 'out_dir' for a DataFrame.", hint="Pass out_dir=.")
        out_dir = Path(results).parent
    if config.to == "csv":
        return export_csv(results, out_dir, labels_csv=labels_csv, config=config, overwrite=overwrite)
    return export_label_studio(results, out_dir, config=config, overwrite=overwrite)


def _check_files(
    out_dir: str | Path,
    names: tuple[str, ...],
    results: object,
    frame: pd.DataFrame,
    *,
    labels_csv: object,
    overwrite: bool,
) -> None:
    """Refuse, before any work, an export file that exists (without ``overwrite``) or is an input."""
    given = [results if isinstance(results, (str, Path)) else None, labels_csv]
    for name in names:
        check_output(Path(out_dir) / name, inputs=given + recorded_inputs(frame, name), overwrite=overwrite)


@releases_outputs
def export_csv(
    results: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    labels_csv: str | Path | None = None,
    config: ExportConfig = ExportConfig(),
    overwrite: bool = False,
) -> ExportSummary:
    """Write ``corrected.csv`` (the labels CSV with confident suggestions applied) and ``review.csv``.

    ``labels_csv`` defaults to the CSV detect read (from the metadata); an ImageFolder or Parquet run
    gets a ``path,label`` CSV of its rows (a table's paths are its row indices). ``corrected.csv`` is an
    ordinary labels CSV: pass it to ``finetune``. Outputs are checked first, as in :func:`export_labels`.
    """
    frame = _frame(results)
    names = (CORRECTED_CSV, REVIEW_CSV)
    _check_files(out_dir, names, results, frame, labels_csv=labels_csv, overwrite=overwrite)
    table, path_col, label_col = _user_table(frame, labels_csv)
    rows = _rows_of(frame, table[path_col])
    take = confident_suggestions(frame, config.accept_above)
    table.loc[rows[take], label_col] = frame["suggested_label"].astype(object)[take].to_numpy()
    flagged = frame["is_noisy"].fillna(False).to_numpy(bool)
    review = frame.loc[flagged & ~take, _REVIEW_COLUMNS].sort_values("noise_rank")
    with atomic_folder(out_dir) as folder:  # both files appear together, or neither
        _write_csv(table, folder / CORRECTED_CSV)
        _write_csv(review, folder / REVIEW_CSV)
    files = (Path(out_dir) / CORRECTED_CSV, Path(out_dir) / REVIEW_CSV)
    return ExportSummary(files, len(frame), int(flagged.sum()), int(take.sum()), len(review))


_REVIEW_COLUMNS = ["path", "given_label", "suggested_label", "p_clean", "predicted_prob", "noise_rank"]


@releases_outputs
def export_label_studio(
    results: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    config: ExportConfig = ExportConfig(),
    overwrite: bool = False,
) -> ExportSummary:
    """Write Label Studio tasks for the flagged rows (most likely wrong first) and the labeling config.

    Each task: ``data`` holds ``image`` (``image_url_prefix`` + path), ``path``, ``given_label`` and
    ``noise_rank``; ``predictions`` holds one prediction, our suggested label, scored by ``p_clean``.
    Outputs are checked first, as in :func:`export_labels`.
    """
    frame = _frame(results)
    names = (TASKS_JSON, LABEL_CONFIG_XML)
    _check_files(out_dir, names, results, frame, labels_csv=None, overwrite=overwrite)
    ids = list(frame["given_label"].cat.categories)
    names = list(frame.attrs.get("class_names") or ids)
    flagged = frame[frame["is_noisy"].fillna(False).to_numpy(bool)].sort_values("noise_rank")
    tasks = []
    for row in flagged.itertuples():
        path = str(row.path)
        result = {
            "id": f"deft-{row.Index}",
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": [str(row.suggested_label)]},
        }
        tasks.append(
            {
                "data": {
                    TO_NAME: config.image_url_prefix + quote(path),
                    "path": path,
                    "given_label": str(row.given_label),
                    "noise_rank": int(row.noise_rank),
                },
                "predictions": [
                    {
                        "model_version": f"deft-clean {__version__}",
                        "score": float(row.p_clean),
                        "result": [result],
                    }
                ],
            }
        )
    with atomic_folder(out_dir) as folder:
        (folder / TASKS_JSON).write_text(json.dumps(tasks, indent=1, ensure_ascii=False), encoding="utf-8")
        (folder / LABEL_CONFIG_XML).write_text(labeling_config(ids, names), encoding="utf-8")
    tasks_path, config_path = Path(out_dir) / TASKS_JSON, Path(out_dir) / LABEL_CONFIG_XML
    return ExportSummary((tasks_path, config_path), len(frame), len(flagged), 0, len(tasks))


def labeling_config(class_ids: list[str], class_names: list[str]) -> str:
    """The Label Studio labeling config the tasks are made for: one image, one single choice per class."""
    choices = "\n".join(
        f"    <Choice value={quoteattr(cid)}" + (f" hint={quoteattr(name)}" if name != cid else "") + "/>"
        for cid, name in zip(class_ids, class_names, strict=True)
    )
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


@releases_outputs
def import_review(
    export_json: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    *,
    image_col: str | None = None,
    label_col: str | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Apply a reviewer's Label Studio export to ``labels_csv`` and write the result to ``out``.

    Tasks are matched to CSV rows by ``data.path``; the latest annotation that was not cancelled wins;
    tasks without one leave their row as it was, and so do all rows that were never sent for review.
    Raises DataError naming every task whose path or chosen label is not in the CSV's. ``out`` is
    checked first (:func:`check_output`): an existing file is refused unless ``overwrite``, either
    input always (write the corrected CSV beside the original, not over it).
    """
    check_output(out, inputs=[export_json, labels_csv], overwrite=overwrite)
    decisions = _decisions(_load_json(Path(export_json)))
    table, path_col, label_col = _read_labels(Path(labels_csv), image_col, label_col)
    index = {os.path.normpath(p.strip()): i for i, p in enumerate(table[path_col])}
    known = set(table[label_col].str.strip())
    problems = []
    changed = 0
    for number, (path, label) in enumerate(decisions, start=1):
        row = index.get(os.path.normpath(path))
        if row is None or label not in known:
            what = f"path '{path}' is not in {labels_csv}" if row is None else f"label '{label}' is unknown"
            fix = "Import the export of tasks made from this labels CSV." if row is None else None
            problems.append(Problem("review_mismatch", what, path=str(export_json), row=number, fix=fix))
            continue
        changed += int(table.at[row, label_col].strip() != label)
        table.at[row, label_col] = label
    if problems:
        raise DataError(problems, source=str(export_json))
    with atomic_file(out) as partial:
        _write_csv(table, partial)
    written = Path(out)
    return ExportSummary((written,), len(table), len(decisions), changed, 0)


def _decisions(tasks: Any) -> list[tuple[str, str]]:
    """(path, chosen label) per reviewed task, from Label Studio's JSON or JSON-MIN export."""
    if not isinstance(tasks, list):
        raise DeftCleanError(
            "The review file is not a Label Studio export (expected a JSON list of tasks).",
            hint="In Label Studio: Export → JSON (or JSON-MIN).",
        )
    out = []
    for task in tasks:
        if "annotations" in task:  # JSON: the task with its annotations
            done = [a for a in task["annotations"] if not a.get("was_cancelled") and a.get("result")]
            done.sort(key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
            choice = next(
                (
                    r["value"]["choices"][0]
                    for r in (done[-1]["result"] if done else [])
                    if r.get("type") == "choices"
                ),
                None,
            )
            path = task.get("data", {}).get("path")
        else:  # JSON-MIN: the data fields plus one key per control tag
            value = task.get(FROM_NAME)
            choice = value.get("choices", [None])[0] if isinstance(value, dict) else value
            path = task.get("path")
        if choice is not None and path is not None:
            out.append((str(path), str(choice)))
    return out


def _load_json(path: Path) -> Any:
    """The parsed JSON file; DeftCleanError naming the file and the position when it is not JSON."""
    if not path.is_file():
        raise DeftCleanError(f"Review file not found: '{path}'.", hint="Pass Label Studio's JSON export.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeftCleanError(
            f"'{path}' is not JSON ({error}).", hint="In Label Studio: Export → JSON (or JSON-MIN)."
        ) from None


def _frame(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    return results if isinstance(results, pd.DataFrame) else read_results(results)


def _user_table(frame: pd.DataFrame, labels_csv: str | Path | None) -> tuple[pd.DataFrame, str, str]:
    """The labels CSV detect read (all its columns, as text) and its path/label columns.

    An ImageFolder or Parquet run has no CSV: its table is built from the results (``path,label``).
    """
    source = frame.attrs.get("input", {})
    data = frame.attrs.get("configs", {}).get("data", {})
    if labels_csv is None and source.get("source") != "csv":
        return (
            pd.DataFrame({"path": frame["path"], "label": frame["given_label"].astype(str)}),
            "path",
            "label",
        )
    path = Path(labels_csv if labels_csv is not None else source["csv"])
    table, path_col, label_col = _read_labels(path, data.get("image_col"), data.get("label_col"))
    digest = source.get("csv_sha256")
    if labels_csv is None and digest and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise DeftCleanError(
            f"The labels CSV '{path}' changed since detect read it (its sha256 differs from the results').",
            hint="Run detect again, or pass --labels with the CSV as it was.",
        )
    return table, path_col, label_col


def _read_labels(path: Path, image_col: str | None, label_col: str | None) -> tuple[pd.DataFrame, str, str]:
    """A labels CSV as text columns (delimiter sniffed like data.read_table) and its path/label columns."""
    if not path.is_file():
        raise DeftCleanError(
            f"Labels CSV not found: '{path}'.",
            hint="Pass --labels with the CSV given to detect (relative paths are read from here).",
        )
    table = pd.read_csv(
        path, sep=None, engine="python", dtype=str, keep_default_na=False, encoding="utf-8-sig"
    )
    lowered = {c.lower(): c for c in table.columns}

    def pick(given: str | None, candidates: tuple[str, ...], option: str) -> str:
        for name in [given] if given else candidates:
            if name.lower() in lowered:
                return lowered[name.lower()]
        raise DeftCleanError(
            f"'{path}' has no column {given or '/'.join(candidates)}; it has: {', '.join(table.columns)}.",
            hint=f"Name it with {option} COLUMN.",
        )

    return table, pick(image_col, PATH_COLUMNS, "--image-col"), pick(label_col, LABEL_COLUMNS, "--label-col")


def _rows_of(frame: pd.DataFrame, csv_paths: pd.Series) -> np.ndarray:
    """(N,) the CSV row of each results row, matched by normalised path; every result row must match."""
    index = {os.path.normpath(str(p).strip()): i for i, p in enumerate(csv_paths)}
    rows = np.array([index.get(os.path.normpath(str(p)), -1) for p in frame["path"]], dtype=np.int64)
    if (rows < 0).any():
        raise DeftCleanError(
            f"{int((rows < 0).sum())} result rows have no row in the labels CSV, "
            f"e.g. '{frame['path'].iloc[int(np.argmax(rows < 0))]}'.",
            hint="Pass --labels with the CSV given to detect.",
        )
    return rows


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """A plain comma-separated CSV with a header and no index (the format labels CSVs use)."""
    table.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
