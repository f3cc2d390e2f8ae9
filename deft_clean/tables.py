"""Reading the text files of an input: the labels CSV (standard RFC 4180 quoting, the delimiter read from
the header unless given, columns autodetected) and the classes file; every problem is a ``DataError``
naming the file and line (see docs/input-formats.md).

Values are never altered: a label is kept exactly as quoted in the file (the field
``"green ""lime"" tea"`` is ``green "lime" tea``, spaces included); :func:`label_warnings` says when
a label has surrounding spaces or differs from another only by case, since that is usually a typo and
yields two classes. Only the whitespace around an image path is ignored (file names with surrounding
spaces are not supported).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
from pathlib import Path

from deft_clean.errors import DataError, Problem
from deft_clean.validation import Row

DELIMITERS = (",", ";", "\t", "|")
PATH_COLUMNS = ("path", "image", "filename", "file")
LABEL_COLUMNS = ("label", "class")


def fail(
    kind: str, message: str, source: str, *, row: int | None = None, fix: str | None = None
) -> DataError:
    return DataError([Problem(kind, message, path=source, row=row, fix=fix)], source=source)


def _decode_text(path: Path, what: str) -> tuple[str, str]:
    """(text, sha256) of a UTF-8 file; a DataError naming the line of the first bad byte otherwise."""
    if path.is_dir():
        fix = f"Pass the {what} file itself (the images folder is DATA_DIR, the first argument)."
        raise fail("not_a_file", f"{what} is a folder", str(path), fix=fix)
    if not path.is_file():
        raise fail("missing_file", f"{what} not found", str(path), fix="Check the path.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        message = f"{what} is not UTF-8: byte 0x{raw[error.start]:02x} on line {line} cannot be decoded"
        fix = f"Re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 '{path}' > fixed.csv"
        raise fail("not_utf8", message, str(path), row=line, fix=fix) from None


def _delimiter(header: str) -> str:
    """The separator of a header line: whichever of ``, ; <tab> |`` occurs most outside quotes, else ``,``."""
    unquoted = "".join(part for k, part in enumerate(header.split('"')) if k % 2 == 0)
    counts = {sep: unquoted.count(sep) for sep in DELIMITERS}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def _records(text: str, delimiter: str | None = None) -> list[tuple[int, list[str]]]:
    """Non-blank CSV records with their 1-based starting line, read with standard (RFC 4180) quoting;
    ``delimiter`` None: read from the header line (:func:`_delimiter`)."""
    separator = delimiter or _delimiter(text.split("\n", 1)[0])
    reader = csv.reader(io.StringIO(text), delimiter=separator, doublequote=True, quotechar='"', strict=False)
    records, start = [], 1
    for fields in reader:
        if any(f.strip() for f in fields):
            records.append((start, fields))
        start = reader.line_num + 1
    return records


def label_warnings(rows: list[Row], source: str) -> list[str]:
    """Warnings (not errors: labels are kept as written) for labels with leading/trailing spaces and for
    labels that differ only by case, each naming the first CSV row."""
    warnings, first = [], {}
    for row in rows:
        first.setdefault(row.label, row)
    for label, row in first.items():
        if label != label.strip():
            warnings.append(
                f"{source} row {row.line}: label {label!r} has leading/trailing spaces; it is kept as "
                f"written (a class apart from {label.strip()!r})."
            )
    by_case: dict[str, list[str]] = {}
    for label in first:
        by_case.setdefault(label.strip().casefold(), []).append(label)
    for labels in by_case.values():
        if len(labels) > 1:
            where = ", ".join(f"{label!r} (row {first[label].line})" for label in labels)
            warnings.append(
                f"{source}: labels {where} differ only by case or spaces; they are separate classes."
            )
    return warnings


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
    csv_path: Path,
    *,
    image_col: str | None = None,
    label_col: str | None = None,
    delimiter: str | None = None,
) -> tuple[list[Row], str]:
    """Rows of a labels CSV and the file's sha256: ``(list[Row], str)``; DataError for a bad file.

    Rows with too few fields get empty values (reported later as empty path/label). Labels are kept
    exactly; paths lose surrounding whitespace.
    """
    source = str(csv_path)
    text, digest = _decode_text(Path(csv_path), "labels CSV")
    records = _records(text, delimiter)
    if len(records) < 2:
        message = "labels CSV is empty" if not records else "labels CSV has a header but no rows"
        raise fail("empty_csv", message, source, fix="Add one row per image: path,label.")
    header = [name.strip() for name in records[0][1]]
    columns = [
        _column(header, image_col, PATH_COLUMNS, "--image-col", "image path", source),
        _column(header, label_col, LABEL_COLUMNS, "--label-col", "label", source),
    ]
    problems = [c for c in columns if isinstance(c, Problem)]
    if problems:
        raise DataError(problems, source=source)
    img, lab = columns
    if img == lab:
        raise fail(
            "missing_column",
            f"image and label column are both '{header[img]}'",
            source,
            row=1,
            fix="Pass different --image-col and --label-col.",
        )

    def get(fields: list[str], i: int) -> str:
        return fields[i] if i < len(fields) else ""

    return [Row(line, get(fields, img).strip(), get(fields, lab)) for line, fields in records[1:]], digest


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
