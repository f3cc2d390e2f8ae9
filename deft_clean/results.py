"""The Parquet results file: one schema (:data:`COLUMNS`), atomic writes, self-describing metadata.

Every later command reads what ``detect`` wrote, so the columns are declared once here, with their
dtype and meaning (docs/output-schema.md is generated from :func:`schema_markdown`). The file carries
its own provenance as JSON under the ``deft_clean`` key of the Arrow schema metadata: schema version,
package versions, every stage config, the class list and the input fingerprint.

Score direction: **low ``clean_score``, ``p_clean`` (and ``margin``) = likely mislabeled**; ``noise_rank``
1 is the row most likely to carry a wrong label.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deft_clean.config import to_dict
from deft_clean.data import Manifest
from deft_clean.errors import DeftCleanError
from deft_clean.files import atomic_file
from deft_clean.scoring import noise_rank, suggest_labels
from deft_clean.version import __version__

SCHEMA_VERSION = 1
METADATA_KEY = b"deft_clean"
SCORE_DIRECTION = (
    "Low clean_score (and low p_clean, margin) = likely mislabeled; noise_rank 1 = most likely wrong."
)

COLUMNS: dict[str, tuple[str, str]] = {
    "path": ("string", "Image path as given in the labels CSV (ImageFolder: relative to DATA_DIR)."),
    "given_label": ("category", "The label in the input: a class id (categories = all class ids, in order)."),
    "status": ("string", "'ok', or 'unreadable' for a row skipped with --on-bad-image skip (no scores)."),
    "is_noisy": (
        "boolean",
        "True when the given label is judged wrong: with the default --flag-rule margin, clean_score < 0 "
        "(as many rows as the prompts and neighbour votes find another class more probable for, chosen by "
        "the score blended with the class transitions); with --flag-rule dual, p_clean <= --threshold "
        "(with --strict, also when another class has a higher p_clean). NA for unreadable rows.",
    ),
    "clean_score": (
        "float32",
        "The margin m = P(given label) - max P(other class), P = the positive prompts' class probabilities "
        "averaged over the epochs after warm-up, mixed with the labels of the image's nearest images "
        "(--neighbour-weight) and a linear probe's leave-one-out class probabilities on the untuned "
        "tower's features (--probe-weight); blended as (1 - w) m + w (2 q - 1) with q = P(label right) "
        "under the class transitions estimated from the data, w = --transition-weight (0: m alone), then "
        "mapped in order onto [-1, 1] with 0 at the cut, so it is below 0 exactly for the flagged rows. "
        "NaN for unreadable rows.",
    ),
    "p_clean": (
        "float32",
        "Probability that the given label is correct (positive vs negative prompt of that class), "
        "averaged like clean_score. Low = likely mislabeled. NaN for unreadable rows.",
    ),
    "margin": (
        "float32",
        "cos(image, positive prompt) - cos(image, negative prompt) for the given label; "
        "below 0 = closer to the negative prompt (likely mislabeled).",
    ),
    "predicted_label": (
        "category",
        "The most probable class of the mix behind clean_score; for a flagged row, the most probable class "
        "other than its given label (predict: top class).",
    ),
    "predicted_prob": (
        "float32",
        "Softmax probability of predicted_label (over the positive prompts / classes).",
    ),
    "suggested_label": (
        "category",
        "For a flagged row, the class the positive prompts predict (= predicted_label; under --flag-rule "
        "dual it can equal the given label); for a clean row, the given label. NA for unreadable rows.",
    ),
    "noise_rank": (
        "Int64",
        "1 = most likely mislabeled: rows ordered by the score that decides the flag (clean_score, or "
        "p_clean under --flag-rule dual), ascending, so every flagged row ranks before every kept row. "
        "NA if unreadable.",
    ),
    "fold": (
        "Int64",
        "Which model scored the row: -1 = the one model trained on every row (--scoring insample); "
        "0..K-1 = the model of the other folds, which never saw this row's label (--scoring crossfit). "
        "NA if unreadable.",
    ),
    "probs": (
        "object",
        "predict only: the fine-tuned classifier's class probabilities, a list of K floats in class_ids "
        "order (np.stack(df.probs) gives (N, K)); NaN for unreadable rows.",
    ),
}
BASE_COLUMNS = ("path", "given_label", "status")
LABEL_COLUMNS = ("given_label", "predicted_label", "suggested_label")
_PACKAGES = ("torch", "open_clip_torch", "peft", "numpy", "pandas", "pyarrow", "pillow")


def schema_markdown() -> str:
    """The column table of docs/output-schema.md, generated from :data:`COLUMNS`."""
    lines = ["| column | dtype | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{dtype}` | {text} |" for name, (dtype, text) in COLUMNS.items()]
    return "\n".join(lines) + "\n"


def base_frame(manifest: Manifest) -> pd.DataFrame:
    """(N rows) path, given_label (class ids; NA for unlabelled rows), status ('ok'/'unreadable'), in input
    order."""
    frame = pd.DataFrame(
        {
            "path": list(manifest.paths),
            "given_label": [manifest.class_ids[k] if k >= 0 else None for k in manifest.labels],
            "status": np.where(manifest.readable, "ok", "unreadable"),
        }
    )
    return _conform(frame, manifest.class_ids)


@dataclass
class Scores:
    """Per readable row (N,): the scoring model's verdict on its given label."""

    p_clean: np.ndarray  # float32, P(given label is right)
    margin: np.ndarray  # float32, cos⁺ − cos⁻ of the given label
    is_noisy: np.ndarray  # bool
    predicted: np.ndarray  # int64, argmax s⁺
    predicted_prob: np.ndarray  # float32, softmax(s⁺) at the argmax
    clean_score: np.ndarray | None = None  # float32, the flag score (low = wrong, < 0 = flagged); None: NaN
    fold: np.ndarray | None = None  # int64, the model that scored the row (-1: in-sample); None: -1
    rank_key: np.ndarray | None = None  # the score that decides the flag, low = wrong; None: p_clean


def result_frame(manifest: Manifest, rows: np.ndarray, scores: Scores) -> pd.DataFrame:
    """The results table: base columns for every row, scores on readable rows ``rows`` (NA elsewhere)."""
    frame = base_frame(manifest)
    n, ids = len(manifest), np.asarray(manifest.class_ids, dtype=object)
    given = manifest.labels[rows]
    suggested = suggest_labels(given, scores.predicted, scores.is_noisy)
    count = len(scores.p_clean)
    clean = scores.clean_score if scores.clean_score is not None else np.full(count, np.nan, np.float32)
    fold = scores.fold if scores.fold is not None else np.full(count, -1, np.int64)
    key = scores.rank_key if scores.rank_key is not None else scores.p_clean
    columns = {
        "is_noisy": (pd.array([pd.NA] * n, dtype="boolean"), scores.is_noisy),
        "clean_score": (np.full(n, np.nan, np.float32), clean),
        "p_clean": (np.full(n, np.nan, np.float32), scores.p_clean),
        "margin": (np.full(n, np.nan, np.float32), scores.margin),
        "predicted_label": (np.full(n, None, object), ids[scores.predicted]),
        "predicted_prob": (np.full(n, np.nan, np.float32), scores.predicted_prob),
        "suggested_label": (np.full(n, None, object), ids[suggested]),
        "noise_rank": (pd.array([pd.NA] * n, dtype="Int64"), noise_rank(key, scores.margin)),
        "fold": (pd.array([pd.NA] * n, dtype="Int64"), fold),
    }
    for name, (column, values) in columns.items():
        column[rows] = values
        frame[name] = column
    return frame


def confident_suggestions(flags: pd.DataFrame, threshold: float) -> np.ndarray:
    """(N,) bool: flagged rows whose ``suggested_label`` is the detector's prediction, differs from the given
    label, and has ``predicted_prob >= threshold`` (so that probability is the suggestion's own).

    The one rule for applying suggestions: ``export --accept-above`` and ``finetune --relabel``.
    """
    suggested = flags["suggested_label"].astype(object)
    agree = (suggested == flags["predicted_label"].astype(object)) & (
        suggested != flags["given_label"].astype(object)
    )
    flagged = flags["is_noisy"].fillna(False).to_numpy(bool) & suggested.notna().to_numpy()
    sure = flags["predicted_prob"].to_numpy(np.float64, na_value=0.0) >= threshold
    return flagged & agree.to_numpy(bool) & sure


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when absent) and of Python: how a run was made."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_metadata(*, manifest: Manifest, configs: dict[str, Any], extra: dict | None = None) -> dict:
    """Everything needed to know how a results file was made (stored in the file, see write_results)."""
    meta = {
        "schema_version": SCHEMA_VERSION,
        "deft_clean_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "configs": {k: to_dict(v) if dataclasses.is_dataclass(v) else dict(v) for k, v in configs.items()},
        "class_ids": list(manifest.class_ids),
        "class_names": list(manifest.class_names),
        "input": {"data_dir": str(manifest.data_dir), **manifest.fingerprint},
        "score_direction": SCORE_DIRECTION,
    }
    meta.update(extra or {})
    return meta


def recorded_inputs(frame: pd.DataFrame, name: str, root: str | Path | None = None) -> list[Path]:
    """The inputs of the run that wrote ``frame`` which an output file called ``name`` could be: the
    labels CSV detect read and its images of that name (under ``root``, default the recorded data_dir).
    What ``report`` and ``export`` must never write over."""
    source = frame.attrs.get("input", {})
    folder = Path(root if root is not None else source.get("data_dir", "."))
    paths = frame["path"].astype(str)
    named = paths[(paths == name) | paths.str.endswith("/" + name)]
    return ([Path(source["csv"])] if source.get("csv") else []) + [folder / path for path in named]


def _conform(frame: pd.DataFrame, class_ids: list[str]) -> pd.DataFrame:
    """Columns in COLUMNS order with their declared dtypes; labels as Categoricals over ``class_ids``."""
    unknown = [c for c in frame.columns if c not in COLUMNS]
    missing = [c for c in BASE_COLUMNS if c not in frame.columns]
    if unknown or missing:
        raise DeftCleanError(
            f"Results columns do not match the schema: unknown {unknown}, missing {missing}.",
            hint="Declare every column once in deft_clean.results.COLUMNS.",
        )
    out = {}
    for name in (c for c in COLUMNS if c in frame.columns):
        dtype, column = COLUMNS[name][0], frame[name]
        if name in LABEL_COLUMNS:
            values = column.astype("string")
            stray = values.notna() & ~values.isin(class_ids)
            if stray.any():
                raise DeftCleanError(
                    f"Column '{name}' holds labels that are not class ids, e.g. '{values[stray].iloc[0]}'.",
                    hint=f"Use values from class_ids: {', '.join(class_ids[:10])}.",
                )
            out[name] = pd.Categorical(values, categories=list(class_ids))
        else:
            out[name] = column.astype(dtype)
    return pd.DataFrame(out, index=pd.RangeIndex(len(frame)))


def write_results(df: pd.DataFrame, path: str | Path, *, metadata: dict) -> Path:
    """Validate ``df`` against COLUMNS and write it atomically (temp file + rename) with ``metadata``.

    ``metadata`` (from :func:`run_metadata`) must hold ``class_ids``; it is stored as JSON under the
    ``deft_clean`` key of the Arrow schema metadata. An interrupted write leaves no partial file.
    """
    path = Path(path)
    if "class_ids" not in metadata:
        raise DeftCleanError(
            "Results metadata has no 'class_ids'.", hint="Build it with results.run_metadata()."
        )
    frame = _conform(df, metadata["class_ids"])
    try:
        blob = json.dumps(metadata, default=_json_default).encode()
    except TypeError as error:
        raise DeftCleanError(f"Results metadata is not JSON-serialisable: {error}.") from None
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: blob})
    with atomic_file(path) as partial:
        pq.write_table(table, partial)
    return path


def _json_default(value: Any) -> Any:
    """JSON for the few non-JSON values configs and fingerprints hold (paths, numpy scalars/arrays)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} value {value!r}")


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a results file: label columns as Categoricals over the class ids, metadata in ``df.attrs``.

    Raises DeftCleanError when the file is missing, not Parquet, not written by deft-clean, or written by
    a newer schema version.
    """
    path = Path(path)
    hint = "Pass a results file written by 'deft-clean detect'."
    if not path.is_file():
        raise DeftCleanError(f"Results file not found: '{path}'.", hint=hint)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DeftCleanError(f"'{path}' is not a readable Parquet file ({error}).", hint=hint) from None
    blob = (table.schema.metadata or {}).get(METADATA_KEY)
    if blob is None:
        raise DeftCleanError(f"'{path}' is a Parquet file but not a deft-clean results file.", hint=hint)
    meta = json.loads(blob)
    if meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise DeftCleanError(
            f"'{path}' uses results schema {meta.get('schema_version')}; "
            f"this version reads up to {SCHEMA_VERSION}.",
            hint="Upgrade deft-clean: pip install -U deft-clean",
        )
    frame = _conform(table.to_pandas(), meta["class_ids"])
    frame.attrs.update(meta)
    return frame
