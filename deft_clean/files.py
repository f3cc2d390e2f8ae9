"""Writing to disk: the one atomic writer (files and folders) and the one saved-folder format.

Anything deft-clean writes appears whole or not at all: it is written under a temporary sibling
name and renamed into place, and the partial file or folder is removed when writing fails.

A saved folder (detector, classifier, exported backbone) is one JSON description plus weight
files. The description always carries ``format`` (what the folder is), ``format_version`` (bumped
when the layout changes) and ``deft_clean_version`` (what wrote it), so a reader can refuse a
folder it does not understand instead of loading garbage.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deft_clean.errors import ConfigError
from deft_clean.version import __version__


def _partial(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.partial"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed to ``path``.

    Parent folders are created. On any error the partial file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(target)
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success its files move into ``path``.

    A new (or empty) ``path`` is replaced by the folder in one rename; into an existing folder each
    entry moves by its own rename (other files there are kept, same-named ones replaced). On any
    error the partial folder is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            os.replace(partial, target)
        else:
            for entry in partial.iterdir():
                destination = target / entry.name
                if destination.is_dir() and not destination.is_symlink():
                    shutil.rmtree(destination)
                os.replace(entry, destination)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def write_description(folder: Path, name: str, kind: str, version: int, body: dict[str, Any]) -> None:
    """Write ``folder/name``: ``body`` headed by ``format``, ``format_version``, ``deft_clean_version``."""
    head = {"format": kind, "format_version": version, "deft_clean_version": __version__}
    text = json.dumps({**head, **body}, indent=2, sort_keys=False) + "\n"
    (folder / name).write_text(text, encoding="utf-8")


def read_description(folder: str | Path, name: str, kind: str, version: int, *, hint: str) -> dict[str, Any]:
    """Read ``folder/name`` written by :func:`write_description`; refuse a missing file, bad JSON, another
    ``format`` or a newer ``format_version`` (naming the file). Folders written before the format was
    shared (no ``format`` key, or ``version`` for ``format_version``) are read as version 1."""
    file = Path(folder) / name
    if not file.is_file():
        raise ConfigError(f"'{folder}' has no {name}.", hint=hint)
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{file} is not valid JSON: {error}.", hint=hint) from None
    found = meta.get("format_version", meta.get("version", 1))
    if meta.get("format", kind) != kind or found > version:
        raise ConfigError(
            f"'{file}' holds format {meta.get('format')!r} version {found}; this deft-clean reads "
            f"{kind!r} up to version {version}.",
            hint=hint,
        )
    return meta
