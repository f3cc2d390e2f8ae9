"""Every row-level data check, in one pass, before any model work.

:func:`find_problems` looks at all rows at once and returns every problem it finds (each naming the
CSV row and the file), so a user fixes a dataset in one round instead of one error per run. Image
problems (missing, empty, undecodable, too large) can instead be *skipped* with
``on_bad_image='skip'``: those rows stay in the manifest with ``readable=False``.
"""

from __future__ import annotations

import difflib
import os
import posixpath
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from deft_clean.distributed import World
from deft_clean.errors import DataError, Problem
from deft_clean.images import pixel_limit, verify_image
from deft_clean.progress import Reporter, SilentReporter

Decoder = Callable[[int, Path], None]  # (row index, file) -> None; raises DataError for a bad image


@dataclass(frozen=True)
class Row:
    """One labelled image as read from the input: 1-based CSV line (None for ImageFolder)."""

    line: int | None
    path: str
    label: str


@dataclass
class Findings:
    """Result of :func:`find_problems`: blocking problems, skipped bad images, readable mask (N,)."""

    problems: list[Problem]
    skipped: list[Problem] = field(default_factory=list)
    readable: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def _outside(root: Path, path: str, follow_links: bool = False) -> tuple[str, str] | None:
    """(why, fix) when ``path`` is not safely inside ``root`` (absolute, '..' or a symlink out), else None.

    ``follow_links``: a path inside ``root`` that is a symlink (or under one) to a readable file elsewhere
    is accepted (data sets kept as links into a store, e.g. DVC or git-annex); never by default."""
    relative = "Use a path relative to DATA_DIR."
    if not path:
        return "empty image path", "Fill in the path."
    if os.path.isabs(path) or Path(path).drive:
        return "absolute path refused; paths must be relative to DATA_DIR", relative
    resolved = (root / path).resolve()
    if resolved.is_relative_to(root):
        return None
    if ".." in Path(path).parts:
        return "path leaves DATA_DIR through '..'", relative
    if follow_links and resolved.is_file() and os.access(resolved, os.R_OK):
        return None
    fix = "Copy the file into DATA_DIR, or pass --follow-links to allow links to files outside it."
    return f"the path is inside DATA_DIR but is a symlink to '{resolved}', outside it", fix


def _near_names(file: Path, listings: dict[Path, list[str]]) -> str:
    """A 'did you mean' hint from the names in the file's folder (listed once per folder)."""
    folder = file.parent
    if folder not in listings:
        listings[folder] = sorted(os.listdir(folder)) if folder.is_dir() else []
    close = difflib.get_close_matches(file.name, listings[folder], n=1, cutoff=0.75)
    return f" Did you mean '{close[0]}'?" if close else ""


def _file_problem(root: Path, path: str, listings: dict[Path, list[str]]) -> Problem | None:
    """Missing / not a file / 0 bytes, checked with one stat."""
    file = root / path
    fix = f"Paths are relative to DATA_DIR ({root})."
    if not file.exists():
        if "\\" in path:
            posix = path.replace("\\", "/")
            found = " (that file exists)" if (root / posix).exists() else ""
            fix += f" Separate folders with '/', not a Windows '\\': '{posix}'{found}."
        return Problem(
            "missing_file", "image file not found", path=path, fix=fix + _near_names(file, listings)
        )
    if not file.is_file():
        return Problem("missing_file", "not a regular file (a folder?)", path=path, fix=fix)
    if file.stat().st_size == 0:
        return Problem("empty_file", "image file is empty (0 bytes)", path=path, fix="Re-copy or remove it.")
    return None


def _decode_problems(
    root: Path,
    rows: list[tuple[int, Row]],
    num_workers: int,
    max_pixels: int | None,
    decode: Decoder | None,
    reporter: Reporter,
) -> list[Problem]:
    """Fully decode every (index, row)'s file in a thread pool; a problem (naming row and file) per failure.

    ``decode(index, file)`` does the decoding (and may keep the pixels); default: :func:`verify_image`.
    """

    def check(item: tuple[int, Row]) -> Problem | None:
        index, row = item
        try:
            if decode is None:
                verify_image(root / row.path)
            else:
                decode(index, root / row.path)
        except DataError as error:
            return replace(error.problems[0], path=row.path, row=row.line)
        return None

    found: list[Problem] = []
    with reporter.task("Checking images", total=len(rows)), pixel_limit(max_pixels):
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            for problem in pool.map(check, rows):
                reporter.advance()
                if problem is not None:
                    found.append(problem)
    return found


def _key(path: str) -> str:
    """Normalised form of a path, so 'a/./b.jpg' and 'a/b.jpg' count as the same image."""
    return posixpath.normpath(path.replace("\\", "/"))


def _row_problems(
    rows: list[Row], root: Path, class_ids: list[str], follow_links: bool = False
) -> tuple[list[Problem], dict[str, int]]:
    """Label, path-safety and duplicate checks; returns problems and {normalised path: first row index}."""
    known = set(class_ids)
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        where = {"path": row.path or None, "row": row.line}
        if not row.label:
            problems.append(Problem("empty_label", "label is empty", **where, fix="Fill in the label."))
        elif row.label not in known:
            close = difflib.get_close_matches(row.label, class_ids, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            fix = f"Add it to the --classes file or fix the label.{hint}"
            problems.append(
                Problem("unknown_label", f"label '{row.label}' is not in --classes", **where, fix=fix)
            )
        outside = _outside(root, row.path, follow_links)
        if outside is not None:
            problems.append(Problem("unsafe_path", outside[0], **where, fix=outside[1]))
            continue
        key = _key(row.path)
        if key in first:
            seen = rows[first[key]]
            other = f"row {seen.line}" if seen.line is not None else f"'{seen.path}'"
            what = "" if seen.label == row.label else f" with a different label ('{seen.label}')"
            fix = "Keep one row per image."
            problems.append(Problem("duplicate", f"same image as {other}{what}", **where, fix=fix))
        else:
            first[key] = i
    return problems, first


def _class_problems(
    rows: list[Row], readable: np.ndarray, class_ids: list[str], minimum: int
) -> list[Problem]:
    """Classes with fewer than ``minimum`` readable images (0 included, for classes from --classes)."""
    counts = Counter(row.label for row, ok in zip(rows, readable, strict=True) if ok)
    example = {row.label: row for row in reversed(rows)}
    problems = []
    for cls in class_ids:
        if counts[cls] < minimum:
            row = example.get(cls)
            problems.append(
                Problem(
                    "small_class",
                    f"class '{cls}' has {counts[cls]} readable image(s); at least {minimum} needed",
                    path=row.path if row else None,
                    row=row.line if row else None,
                    fix="Add images, remove the class, or lower --min-per-class.",
                )
            )
    return problems


def find_problems(
    rows: list[Row],
    root: Path,
    class_ids: list[str],
    *,
    min_per_class: int = 2,
    on_bad_image: str = "error",
    max_pixels: int | None = None,
    num_workers: int | None = None,
    decode: Decoder | None = None,
    follow_links: bool = False,
    reporter: Reporter = SilentReporter(),
    world: World = World(),
) -> Findings:
    """Check every row at once; return all problems (row-ordered) and the readable mask.

    ``root`` must be resolved. Checks: empty/unknown labels, paths outside ``root`` (absolute, '..',
    symlinks out), duplicate rows, missing / 0-byte / undecodable / too-large images (decoded in a
    thread pool), and classes under ``min_per_class``. With ``on_bad_image='skip'`` image problems
    go to ``Findings.skipped`` and their rows get ``readable=False`` instead of blocking. ``decode``:
    how each image is decoded, called once per distinct file with its row index (``data`` passes one
    that keeps the pixels, so the image cache needs no second decode); default: a cheap full decode.
    ``follow_links``: accept symlinks out of ``root`` to readable files (``--follow-links``).
    ``world``: under torchrun each process opens only the files of its block of rows
    (:meth:`World.block`) and the image problems are exchanged, so every process returns the same.
    """
    problems, first = _row_problems(rows, root, class_ids, follow_links)
    listings: dict[Path, list[str]] = {}
    bad: list[Problem] = []
    to_decode: list[tuple[int, Row]] = []
    start, stop = world.block(len(rows))
    for i in (i for i in first.values() if start <= i < stop):
        problem = _file_problem(root, rows[i].path, listings)
        if problem is None:
            to_decode.append((i, rows[i]))
        else:
            bad.append(replace(problem, row=rows[i].line))
    workers = num_workers or min(8, os.cpu_count() or 1)
    bad += _decode_problems(root, to_decode, workers, max_pixels, decode, reporter)
    bad = [problem for found in world.gather_objects(bad) for problem in found]
    skip = on_bad_image == "skip"
    bad_keys = {_key(p.path or "") for p in bad} if skip else set()
    readable = np.array([_key(row.path) not in bad_keys for row in rows], dtype=bool)
    if not skip:
        problems += bad
    problems += _class_problems(rows, readable, class_ids, min_per_class)
    problems.sort(key=lambda p: (p.row is None, p.row or 0, p.path or ""))
    return Findings(problems, bad if skip else [], readable)
