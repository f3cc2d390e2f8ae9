"""Read a labelled image set (a labels CSV or an ImageFolder) into a validated :class:`Manifest`.

Inputs (see docs/input-formats.md):

- ``DATA_DIR`` + ``LABELS_CSV``: one row per image, an image-path column (autodetected from
  ``path``/``image``/``filename``/``file`` or ``--image-col``) and a label column (``label``/``class`` or
  ``--label-col``); paths are relative to ``DATA_DIR``.
- ``DATA_DIR`` alone: an ImageFolder, ``DATA_DIR/<class>/<image>``.
- ``--classes FILE`` (optional): ``id`` or ``id,name`` per line; fixes class order and readable names.
  Without it, class order is the sorted unique labels (numeric when every label is an integer).

All checks run before any model work and every problem is raised at once in one ``DataError``.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deft_clean.config import DataConfig
from deft_clean.errors import ConfigError, DataError, Problem
from deft_clean.images import open_image
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.validation import Row, find_problems

__all__ = [
    "Manifest",
    "load_manifest",
    "load_labels",
    "open_image",
    "read_table",
    "read_classes",
    "class_order",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
PATH_COLUMNS = ("path", "image", "filename", "file")
LABEL_COLUMNS = ("label", "class")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated labelled image set, rows in input order.

    ``labels`` (N,) int64 index into ``class_ids``/``class_names``; ``readable`` (N,) bool, False only
    for rows skipped with ``on_bad_image='skip'`` (they keep their label and appear in the results with
    status 'unreadable'). ``fingerprint`` identifies the input for the results metadata.
    """

    data_dir: Path
    paths: list[str]
    labels: np.ndarray
    class_ids: list[str]
    class_names: list[str]
    readable: np.ndarray
    fingerprint: dict
    max_image_pixels: int | None = DataConfig.max_image_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> Path:
        """Absolute path of row ``i``."""
        return self.data_dir / self.paths[i]

    def prompt_names(self) -> list[str]:
        """Class names for text prompts: '_' becomes ' ' ('golden_retriever' -> 'golden retriever')."""
        return [name.replace("_", " ") for name in self.class_names]


def _fail(
    kind: str, message: str, source: str, *, row: int | None = None, fix: str | None = None
) -> DataError:
    return DataError([Problem(kind, message, path=source, row=row, fix=fix)], source=source)


def _decode_text(path: Path, what: str) -> tuple[str, str]:
    """(text, sha256) of a UTF-8 file; a DataError naming the line of the first bad byte otherwise."""
    if not path.is_file():
        raise _fail("missing_file", f"{what} not found", str(path), fix="Check the path.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        message = f"{what} is not UTF-8: byte 0x{raw[error.start]:02x} on line {line} cannot be decoded"
        fix = f"Re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 '{path}' > fixed.csv"
        raise _fail("not_utf8", message, str(path), row=line, fix=fix) from None


def _records(text: str) -> list[tuple[int, list[str]]]:
    """Non-blank CSV records with their 1-based starting line; delimiter sniffed from ',;<tab>|'."""
    head = text.split("\n", 1)[0]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(head, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    records, start = [], 1
    for fields in reader:
        if any(f.strip() for f in fields):
            records.append((start, [f.strip() for f in fields]))
        start = reader.line_num + 1
    return records


def _column(
    header: list[str], given: str | None, candidates: tuple[str, ...], option: str, what: str, source: str
) -> int | Problem:
    """Index of the wanted column, or a 'missing_column' Problem suggesting the nearest names."""
    lowered = [h.lower() for h in header]
    wanted = [given.lower()] if given is not None else list(candidates)
    for name in wanted:
        if name in lowered:
            return lowered.index(name)
    near = {m for name in wanted for m in difflib.get_close_matches(name, lowered, n=3, cutoff=0.5)}
    near |= {h for h in lowered if any(name in h for name in wanted)}
    guesses = [header[i] for i, h in enumerate(lowered) if h in near]
    looked = f"'{given}'" if given is not None else "/".join(candidates)
    fix = f"Did you mean {' or '.join(repr(g) for g in guesses)}? " if guesses else ""
    return Problem(
        "missing_column",
        f"no {what} column ({looked}); the header has: {', '.join(header)}",
        path=source,
        row=1,
        fix=f"{fix}Name it with {option} COLUMN.",
    )


def read_table(
    csv_path: Path, *, image_col: str | None = None, label_col: str | None = None
) -> tuple[list[Row], str]:
    """Rows of a labels CSV and the file's sha256: ``(list[Row], str)``; DataError for a bad file.

    Rows with too few fields get empty values (reported later as empty path/label).
    """
    source = str(csv_path)
    text, digest = _decode_text(Path(csv_path), "labels CSV")
    records = _records(text)
    if len(records) < 2:
        message = "labels CSV is empty" if not records else "labels CSV has a header but no rows"
        raise _fail("empty_csv", message, source, fix="Add one row per image: path,label.")
    header = records[0][1]
    columns = [
        _column(header, image_col, PATH_COLUMNS, "--image-col", "image path", source),
        _column(header, label_col, LABEL_COLUMNS, "--label-col", "label", source),
    ]
    problems = [c for c in columns if isinstance(c, Problem)]
    if problems:
        raise DataError(problems, source=source)
    img, lab = columns
    if img == lab:
        raise _fail(
            "missing_column",
            f"image and label column are both '{header[img]}'",
            source,
            row=1,
            fix="Pass different --image-col and --label-col.",
        )

    def get(fields: list[str], i: int) -> str:
        return fields[i] if i < len(fields) else ""

    return [Row(line, get(fields, img), get(fields, lab)) for line, fields in records[1:]], digest


def read_image_folder(root: Path) -> tuple[list[Row], str]:
    """Rows of an ImageFolder ``root/<class>/<image>`` (nested folders included) and a listing hash."""
    rows: list[Row] = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for folder, subdirs, files in os.walk(class_dir):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    rows.append(Row(None, Path(folder, name).relative_to(root).as_posix(), class_dir.name))
    if not rows:
        fix = "Arrange images as DATA_DIR/<class>/<image>, or pass a labels CSV."
        raise _fail("empty_folder", "no images found in class folders", str(root), fix=fix)
    listing = hashlib.sha256()
    for row in rows:
        size = os.lstat(root / row.path).st_size
        listing.update(f"{row.path}\t{row.label}\t{size}\n".encode())
    return rows, listing.hexdigest()


def read_classes(path: Path) -> tuple[list[str], list[str]]:
    """``(class_ids, class_names)`` from a classes file: ``id`` or ``id,name`` a line; blank lines skipped."""
    text, _ = _decode_text(Path(path), "classes file")
    ids: list[str] = []
    names: list[str] = []
    problems = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cid, _, name = (part.strip() for part in line.partition(","))
        if cid in ids:
            fix = "Each class id must appear once."
            problems.append(
                Problem("duplicate_class", f"class id '{cid}' repeated", path=str(path), row=line_no, fix=fix)
            )
            continue
        ids.append(cid)
        names.append(name or cid)
    if not ids:
        problems.append(
            Problem("empty_classes", "classes file is empty", path=str(path), fix="List one class a line.")
        )
    if problems:
        raise DataError(problems, source=str(path))
    return ids, names


def class_order(labels: list[str]) -> list[str]:
    """Sorted unique labels; numeric order when every label is an integer ('2' before '10')."""
    unique = {label for label in labels if label}
    if unique and all(_INTEGER.fullmatch(label) for label in unique):
        return sorted(unique, key=lambda label: (int(label), label))
    return sorted(unique)


def _check_options(config: DataConfig) -> None:
    if config.on_bad_image not in ("error", "skip"):
        raise ConfigError(f"--on-bad-image must be 'error' or 'skip', got '{config.on_bad_image}'.")
    if config.min_per_class < 0:
        raise ConfigError(f"--min-per-class must be >= 0, got {config.min_per_class}.")
    if config.max_image_pixels is not None and config.max_image_pixels < 1:
        raise ConfigError(f"--max-image-pixels must be positive, got {config.max_image_pixels}.")


def _read_inputs(
    root: Path, labels_csv: Path | None, config: DataConfig
) -> tuple[list[Row], dict, tuple[list[str], list[str]] | None]:
    """Rows, input fingerprint and (ids, names) from --classes (or None); all file-level problems at once."""
    problems: list[Problem] = []
    rows, fingerprint, classes = [], {}, None
    try:
        if labels_csv is None:
            rows, digest = read_image_folder(root)
            fingerprint = {"source": "imagefolder", "listing_sha256": digest}
        else:
            rows, digest = read_table(labels_csv, image_col=config.image_col, label_col=config.label_col)
            fingerprint = {"source": "csv", "csv": str(labels_csv), "csv_sha256": digest}
    except DataError as error:
        problems += error.problems
    try:
        classes = read_classes(Path(config.classes_file)) if config.classes_file else None
    except DataError as error:
        problems += error.problems
    if problems:
        raise DataError(problems, source=str(labels_csv or root))
    return rows, fingerprint, classes


def load_manifest(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    config: DataConfig = DataConfig(),
    reporter: Reporter = SilentReporter(),
) -> Manifest:
    """Read, validate (decoding every image once) and return the labelled image set.

    Raises ``DataError`` listing every problem (each naming the CSV row and file), ``ConfigError`` for
    invalid options. Rows skipped with ``on_bad_image='skip'`` are kept with ``readable=False``.
    """
    _check_options(config)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise _fail(
            "missing_dir",
            "data directory not found",
            str(data_dir),
            fix="Pass the folder holding the images.",
        )
    root = root.resolve()
    csv_path = Path(labels_csv).expanduser() if labels_csv is not None else None
    rows, fingerprint, classes = _read_inputs(root, csv_path, config)
    class_ids, class_names = classes or (class_order([r.label for r in rows]), None)
    findings = find_problems(
        rows,
        root,
        class_ids,
        min_per_class=config.min_per_class,
        on_bad_image=config.on_bad_image,
        max_pixels=config.max_image_pixels,
        reporter=reporter,
    )
    if findings.problems:
        raise DataError(findings.problems, source=str(csv_path or data_dir))
    for problem in findings.skipped:
        reporter.log(f"skipped (status=unreadable): {problem}", level="warning")
    index = {cid: k for k, cid in enumerate(class_ids)}
    fingerprint.update(n_rows=len(rows), n_files=int(findings.readable.sum()))
    return Manifest(
        data_dir=root,
        paths=[r.path for r in rows],
        labels=np.array([index[r.label] for r in rows], dtype=np.int64),
        class_ids=list(class_ids),
        class_names=list(class_names or class_ids),
        readable=findings.readable,
        fingerprint=fingerprint,
        max_image_pixels=config.max_image_pixels,
    )


def load_labels(
    labels_csv: str | Path,
    manifest: Manifest,
    *,
    image_col: str | None = None,
    label_col: str | None = None,
    allow_missing: bool = False,
) -> np.ndarray:
    """Labels from a second CSV (e.g. ``detect --truth``) keyed by path, mapped onto the manifest's classes.

    Returns (N,) int64 aligned with ``manifest.paths``; labels may be class ids or class names. Every
    label must be known; every manifest row must have a row here unless ``allow_missing`` (then -1).
    Extra CSV rows are ignored. Raises DataError listing every problem.
    """
    rows, _ = read_table(Path(labels_csv), image_col=image_col, label_col=label_col)
    index = {name: k for k, name in enumerate(manifest.class_names)}
    index.update({cid: k for k, cid in enumerate(manifest.class_ids)})
    by_path = {os.path.normpath(r.path): r for r in rows}
    out = np.full(len(manifest), -1, dtype=np.int64)
    problems = []
    for i, path in enumerate(manifest.paths):
        row = by_path.get(os.path.normpath(path))
        if row is None and not allow_missing:
            problems.append(
                Problem(
                    "missing_row",
                    "image has no row in this CSV",
                    path=path,
                    fix="Every image of the data set needs a label here.",
                )
            )
        elif row is not None and row.label not in index:
            problems.append(
                Problem(
                    "unknown_label",
                    f"label '{row.label}' is not a known class",
                    path=path,
                    row=row.line,
                    fix=f"Known classes: {', '.join(manifest.class_ids[:20])}.",
                )
            )
        elif row is not None:
            out[i] = index[row.label]
    if problems:
        raise DataError(problems, source=str(labels_csv))
    return out
