"""Read a labelled image set (a labels CSV or an ImageFolder) into a validated :class:`Manifest`.

Inputs (see docs/input-formats.md):

- ``DATA_DIR`` + ``LABELS_CSV``: one row per image, an image-path column (autodetected from
  ``path``/``image``/``filename``/``file`` or ``--image-col``) and a label column (``label``/``class`` or
  ``--label-col``); paths are relative to ``DATA_DIR``.
- ``DATA_DIR`` alone: an ImageFolder, ``DATA_DIR/<class>/<image>``.
- ``DATA_DIR`` a ``.parquet`` file, or a folder of them: images (encoded bytes or paths) and labels in
  columns, rows identified by their index (:mod:`deft_clean.image_tables`).
- ``--classes FILE`` (optional): ``id`` or ``id,name`` per line; fixes class order and readable names.
  Without it, class order is the sorted unique labels (numeric when every label is an integer).

All checks run before any model work and every problem is raised at once in one ``DataError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deft_clean.config import DataConfig
from deft_clean.distributed import World
from deft_clean.errors import DataError, Problem
from deft_clean.image_cache import DecodedImages, build_image_cache, cache_folder, fits_in_ram
from deft_clean.image_tables import find_image_table, read_image_table
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.tables import fail, label_warnings, read_classes, read_table
from deft_clean.validation import Row, find_problems

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated labelled image set, rows in input order.

    ``labels`` (N,) int64 index into ``class_ids``/``class_names``; ``readable`` (N,) bool, False only
    for rows skipped with ``on_bad_image='skip'`` (they keep their label and appear in the results with
    status 'unreadable'). ``fingerprint`` identifies the input for the results metadata. ``images``:
    the pixels validation decoded at ``load_manifest(image_size=...)`` (uint8 (N, 3, S, S)), or None.
    ``cache_folder``: where decoded images are kept between runs (``DataConfig.image_cache``), or None.
    """

    data_dir: Path
    paths: list[str]
    labels: np.ndarray
    class_ids: list[str]
    class_names: list[str]
    readable: np.ndarray
    fingerprint: dict
    max_image_pixels: int | None = DataConfig.max_image_pixels
    images: torch.Tensor | None = None
    cache_folder: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> Path:
        """Absolute path of row ``i``."""
        return self.data_dir / self.paths[i]

    def files(self) -> list[Path]:
        """Absolute paths of every row, in input order."""
        return [self.data_dir / path for path in self.paths]

    def decode(
        self,
        size: int,
        *,
        rows: np.ndarray | None = None,
        num_workers: int = 0,
        cache_dir: Path | None = None,
        reporter: Reporter = SilentReporter(),
    ) -> torch.Tensor:
        """The images of ``rows`` (default: all) as uint8 (N, 3, size, size) in row order, other and
        unreadable rows zero: the pixels validation kept when it decoded at this size (under torchrun,
        those of this process's block), else from the image cache (``build_image_cache``; ``cache_dir``
        overrides the manifest's ``cache_folder``)."""
        if self.images is not None and self.images.shape[-1] == size:
            return self.images
        wanted = self.readable.copy()
        if rows is not None:
            wanted &= np.isin(np.arange(len(self)), rows)
        return build_image_cache(
            self.files(), size, readable=wanted, max_image_pixels=self.max_image_pixels,
            cache_dir=cache_dir or self.cache_folder, num_workers=num_workers, reporter=reporter,
        )  # fmt: skip

    def prompt_names(self) -> list[str]:
        """Class names for text prompts: '_' becomes ' ' ('golden_retriever' -> 'golden retriever')."""
        return [name.replace("_", " ") for name in self.class_names]


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
        raise fail("empty_folder", "no images found in class folders", str(root), fix=fix)
    listing = hashlib.sha256()
    for row in rows:
        size = os.lstat(root / row.path).st_size
        listing.update(f"{row.path}\t{row.label}\t{size}\n".encode())
    return rows, listing.hexdigest()


def class_order(labels: list[str]) -> list[str]:
    """Sorted unique labels; numeric order when every label is an integer ('2' before '10')."""
    unique = {label for label in labels if label}
    if unique and all(_INTEGER.fullmatch(label) for label in unique):
        return sorted(unique, key=lambda label: (int(label), label))
    return sorted(unique)


def _read_inputs(
    data_dir: str | Path, labels_csv: Path | None, config: DataConfig, reporter: Reporter
) -> tuple[Path, list[Row], dict, tuple[list[str], list[str]] | None]:
    """(images folder, rows, input fingerprint, (ids, names) from --classes, else those a table declares,
    else None); every file-level
    problem at once. A Parquet table's images folder is the cache its images were unpacked to."""
    problems: list[Problem] = []
    table = find_image_table(data_dir) if labels_csv is None else None
    root = _root(data_dir) if table is None else Path(data_dir)
    rows, fingerprint, classes = [], {}, None
    try:
        if table is not None:
            found = read_image_table(table, config, reporter=reporter)
            root, rows, fingerprint, classes = found.images, found.rows, found.fingerprint, found.classes
        elif labels_csv is None:
            rows, digest = read_image_folder(root)
            fingerprint = {"source": "imagefolder", "listing_sha256": digest}
        else:
            rows, digest = read_table(
                labels_csv, image_col=config.image_col, label_col=config.label_col, delimiter=config.separator
            )
            fingerprint = {"source": "csv", "csv": str(labels_csv), "csv_sha256": digest}
    except DataError as error:
        problems += error.problems
    try:
        classes = read_classes(Path(config.classes_file)) if config.classes_file else classes
    except DataError as error:
        problems += error.problems
    if problems:
        raise DataError(problems, source=str(labels_csv or data_dir))
    return root, rows, fingerprint, classes


def _root(data_dir: str | Path) -> Path:
    """The resolved data folder; a DataError when it does not exist."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        fix = "Pass the folder holding the images."
        raise fail("missing_dir", "data directory not found", str(data_dir), fix=fix)
    return root.resolve()


def _readable(
    rows: list[Row],
    root: Path,
    class_ids: list[str],
    config: DataConfig,
    reporter: Reporter,
    source: str,
    pixels: DecodedImages | None = None,
    num_workers: int = 0,
    world: World = World(),
) -> np.ndarray:
    """Validate every row (``validation.find_problems``); the readable mask, or one DataError with all."""
    findings = find_problems(
        rows,
        root,
        class_ids,
        min_per_class=config.min_per_class,
        on_bad_image=config.on_bad_image,
        max_pixels=config.max_image_pixels,
        decode=None if pixels is None else pixels.decode,
        num_workers=num_workers or None,
        follow_links=config.follow_links,
        reporter=reporter,
        world=world,
    )
    if findings.problems:
        raise DataError(findings.problems, source=source)
    for problem in findings.skipped:
        reporter.log(f"skipped (status=unreadable): {problem}", level="warning")
    return findings.readable


def load_manifest(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    config: DataConfig = DataConfig(),
    image_size: int | None = None,
    num_workers: int = 0,
    reporter: Reporter = SilentReporter(),
    world: World = World(),
) -> Manifest:
    """Read, validate (every image is opened and fully decoded) and return the labelled image set.

    ``image_size``: the size the images are wanted at (the backbone's input); validation then decodes
    each image at that size and keeps the pixels (``Manifest.images``, when they fit in RAM), so each
    image is decoded once per run. Without it, validation decodes cheaply (JPEGs at reduced scale).
    ``num_workers``: decoding threads (0: automatic). ``world``: under torchrun each process decodes
    (and keeps) only the images of its block of rows; every process gets the same manifest.
    Raises ``DataError`` listing every problem (each naming the CSV row and file). Rows skipped with
    ``on_bad_image='skip'`` are kept with ``readable=False``.
    """
    csv_path = Path(labels_csv).expanduser() if labels_csv is not None else None
    root, rows, fingerprint, classes = world.together(
        lambda: _read_inputs(data_dir, csv_path, config, reporter)
    )  # a file missing on one machine stops every process
    for warning in label_warnings(rows, str(csv_path or data_dir)):
        reporter.log(warning, level="warning")
    class_ids, class_names = classes or (class_order([r.label for r in rows]), None)
    pixels = _pixels([root / r.path for r in rows], image_size, config, reporter, world)
    source = str(csv_path or data_dir)
    readable = _readable(rows, root, class_ids, config, reporter, source, pixels, num_workers, world)
    index = {cid: k for k, cid in enumerate(class_ids)}
    fingerprint.update(n_rows=len(rows), n_files=int(readable.sum()))
    return Manifest(
        data_dir=root,
        paths=[r.path for r in rows],
        labels=np.array([index[r.label] for r in rows], dtype=np.int64),
        class_ids=list(class_ids),
        class_names=list(class_names or class_ids),
        readable=readable,
        fingerprint=fingerprint,
        max_image_pixels=config.max_image_pixels,
        images=None if pixels is None else pixels.finish(readable),
        cache_folder=_cache_folder(config, world),
    )


def _pixels(
    files: list[Path], size: int | None, config: DataConfig, reporter: Reporter, world: World = World()
) -> DecodedImages | None:
    """What validation decodes into, keeping the pixels (from the image cache when its key matches), or
    None when no size is given, or when the pixels would not fit in RAM and the cache does not hold them
    (validation then decodes cheaply and ``Manifest.decode`` decodes into the cache's memmap). Under
    torchrun a process decodes only its block (the other rows stay zero, and take no memory: zeros are
    lazy), so the decoded images are not kept between runs: a pass of one block is not a whole pass."""
    if size is None:
        return None
    start, stop = world.block(len(files))
    folder, ram = _cache_folder(config, world), fits_in_ram((stop - start, 3, size, size))
    pixels = DecodedImages(
        files, size, folder=folder, max_pixels=config.max_image_pixels, reporter=reporter, in_memory=ram
    )
    return None if pixels.pixels is None else pixels


def _cache_folder(config: DataConfig, world: World) -> Path | None:
    """Where decoded images are kept between runs; none under torchrun (see :func:`_pixels`)."""
    return None if world.active else cache_folder(config.image_cache)


def has_loose_images(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds image files itself (a plain folder), not only in class folders."""
    root = Path(data_dir).expanduser()
    return root.is_dir() and any(
        f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
        for f in root.iterdir()
    )


def load_unlabelled(
    data_dir: str | Path,
    *,
    config: DataConfig = DataConfig(),
    image_size: int | None = None,
    reporter: Reporter = SilentReporter(),
    world: World = World(),
) -> Manifest:
    """Every image under a plain folder (sorted paths, subfolders included), validated like a labelled
    set (``image_size`` and ``world`` as in :func:`load_manifest`), as a Manifest without classes:
    ``labels`` are all -1, ``class_ids`` empty."""
    root = _root(data_dir)
    paths = sorted(
        f.relative_to(root).as_posix()
        for f in root.rglob("*")
        if f.is_file()
        and f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(p.startswith(".") for p in f.relative_to(root).parts)
    )
    if not paths:
        raise fail("empty_folder", "no images found", str(root), fix="Pass a folder holding image files.")
    rows = [Row(None, path, "?") for path in paths]  # one placeholder class: no label checks apply
    pixels = _pixels([root / path for path in paths], image_size, config, reporter, world)
    unsized = dataclasses.replace(config, min_per_class=0)
    readable = _readable(rows, root, ["?"], unsized, reporter, str(root), pixels, world=world)
    listing = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    return Manifest(
        data_dir=root,
        paths=paths,
        labels=np.full(len(paths), -1, dtype=np.int64),
        class_ids=[],
        class_names=[],
        readable=readable,
        fingerprint={"source": "folder", "listing_sha256": listing, "n_rows": len(paths)},
        max_image_pixels=config.max_image_pixels,
        images=None if pixels is None else pixels.finish(readable),
        cache_folder=_cache_folder(config, world),
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
