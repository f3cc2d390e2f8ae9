"""Labelled images held in Parquet tables: a ``.parquet`` file, or a folder of them, as ``DATA_DIR``.

The layout Hugging Face ``datasets`` exports (an ``image`` struct of ``bytes``/``path`` and a ``label``)
and the one of ``../shared/data/cifar10/*.parquet`` (a binary ``jpeg`` column and a ``label``): an image
column holding encoded bytes (or paths relative to the table's folder) and a label column. A folder's
tables are read in name order as one table; a row is identified by its index in it.

The images are written once, as files named by that index, to a cache folder keyed by the tables'
SHA-256 (``$DEFT_CLEAN_CACHE``, default ``~/.cache/deft-clean``): from there on they are an ordinary
labelled set (the rows' ``path`` is the index, ``DATA_DIR`` the cache folder), so validation, the
results file and every command work exactly as for a labels CSV.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from deft_clean.config import DataConfig
from deft_clean.files import atomic_folder
from deft_clean.image_cache import cache_root
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.tables import LABEL_COLUMNS, fail
from deft_clean.validation import Row

IMAGE_COLUMNS = ("image", "img", "jpeg", "png", "bytes", "path", "file", "filename")
_COMPLETE = ".complete"  # written last into a cache folder: its images are all there


@dataclass(frozen=True)
class ImageTable:
    """One or more Parquet files read as a single table of labelled images."""

    files: tuple[Path, ...]

    @property
    def source(self) -> str:
        return str(self.files[0] if len(self.files) == 1 else self.files[0].parent)


def find_image_table(data_dir: str | Path) -> ImageTable | None:
    """The Parquet input named by ``data_dir`` (a ``.parquet`` file or a folder holding some), else None."""
    path = Path(data_dir).expanduser()
    if path.is_file() and path.suffix.lower() == ".parquet":
        return ImageTable((path.resolve(),))
    if path.is_dir():
        files = sorted(f.resolve() for f in path.glob("*.parquet") if not f.name.startswith("."))
        return ImageTable(tuple(files)) if files else None
    return None


@dataclass(frozen=True)
class TableInput:
    """What :func:`read_image_table` found: where the images are, the rows, the input's fingerprint, and
    the classes the table declares (a Hugging Face ``ClassLabel``: ids '0', '1', ... and their names)."""

    images: Path
    rows: list[Row]
    fingerprint: dict
    classes: tuple[list[str], list[str]] | None


def read_image_table(
    table: ImageTable, config: DataConfig, *, reporter: Reporter = SilentReporter()
) -> TableInput:
    """The rows of ``table``, its images written once to the cache, and the classes it declares.

    Raises DataError naming the file and the columns it has when the image or label column is missing.
    """
    schema = pq.read_schema(table.files[0])
    image_col = _column(schema, config.image_col, IMAGE_COLUMNS, "--image-col", "image", table)
    label_col = _column(schema, config.label_col, LABEL_COLUMNS, "--label-col", "label", table)
    digest = hashlib.sha256()
    for file in table.files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    sha = digest.hexdigest()
    folder = cache_root() / "tables" / f"{sha[:24]}-{image_col}"
    labels = _labels(table, label_col)
    if not (folder / _COMPLETE).is_file():
        _write_images(table, image_col, folder, reporter)
    rows = [Row(None, str(i), label) for i, label in enumerate(labels)]
    fingerprint = {
        "source": "parquet",
        "tables": [str(f) for f in table.files],
        "table_sha256": sha,
        "image_col": image_col,
        "label_col": label_col,
    }
    return TableInput(folder, rows, fingerprint, _declared_classes(schema, label_col))


def _declared_classes(schema: pa.Schema, column: str) -> tuple[list[str], list[str]] | None:
    """(ids, names) of a Hugging Face ClassLabel column, from the ``huggingface`` schema metadata: the
    names the prompts need (integer labels alone would make prompts like 'a photo of a 3')."""
    blob = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(blob)["info"]["features"][column] if blob else {}
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    if feature.get("_type") != "ClassLabel" or not isinstance(names, list):
        return None
    return [str(k) for k in range(len(names))], [str(n) for n in names]


def _column(
    schema: pa.Schema, given: str | None, names: tuple[str, ...], option: str, what: str, table: ImageTable
) -> str:
    """The wanted column's name (case-insensitive), or a DataError listing the table's columns."""
    present = {name.lower(): name for name in schema.names}
    for name in [given] if given else names:
        if name.lower() in present:
            return present[name.lower()]
    looked = f"'{given}'" if given else "/".join(names)
    message = f"no {what} column ({looked}); the table has: {', '.join(schema.names)}"
    raise fail("missing_column", message, table.source, fix=f"Name it with {option} COLUMN.")


def _labels(table: ImageTable, column: str) -> list[str]:
    """Every row's label as text (integer class indices become '0', '1', ...; missing ones '')."""
    values: list[str] = []
    for file in table.files:
        for value in pq.read_table(file, columns=[column]).column(column).to_pylist():
            values.append("" if value is None else str(value))
    return values


def _write_images(table: ImageTable, column: str, folder: Path, reporter: Reporter) -> None:
    """Write row i's image to ``folder/i`` (encoded bytes as stored; a path's file copied), atomically."""
    index = 0
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in table.files)
    with atomic_folder(folder) as partial, reporter.task("Unpacking images", total):
        for file in table.files:
            for batch in pq.ParquetFile(file).iter_batches(columns=[column], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    # a cell without an image becomes an empty file: validation reports it like any other
                    (partial / str(index)).write_bytes(_image_bytes(value, file.parent) or b"")
                    index += 1
                reporter.advance(batch.num_rows)
        (partial / _COMPLETE).write_text(f"{index} rows\n")


def _image_bytes(value: object, base: Path) -> bytes | None:
    """Encoded image bytes from a cell: bytes, a path (relative to the table's folder) or HF's struct."""
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        file = base / value
        return file.read_bytes() if file.is_file() else None
    return None
