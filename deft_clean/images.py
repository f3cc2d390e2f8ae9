"""Robust image decoding and the decode-once uint8 cache.

Every image becomes ``decode_square``: resized so its shorter side is ``size`` (bicubic,
antialiased), centre-cropped to ``size x size``, stored as uint8 ``(N, 3, S, S)``. Validation does it
when it knows the size (``data.load_manifest(image_size=...)`` keeps those pixels); otherwise
:func:`build_image_cache` does, once per cache file.
Training then reads batches from this tensor and augments them on the device (``augment.py``), so
the GPU never waits for JPEG decoding. The cache lives in RAM when it is small (< 25% of the
machine's memory) and otherwise in a numpy memmap file, written under a temporary name and
renamed into place, so an interrupted run never leaves a half-written cache that looks complete.

Decoding copes with grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit PNG (scaled,
not clipped, to 8 bit) and EXIF orientation. PIL's decompression-bomb guard stays on: wrap a pass in
:func:`pixel_limit` to set the limit, which also turns PIL's warning into an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from deft_clean.config import DataConfig
from deft_clean.errors import DataError, Problem
from deft_clean.files import atomic_file
from deft_clean.progress import Reporter, SilentReporter

# Errors PIL's decoders raise for damaged files (truncated data, bad CRCs, unknown formats).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
_RAM_FRACTION = 0.25
_CHUNK = 64


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set PIL's decompression-bomb limit for a pass and make its warning an error.

    PIL only warns between 1x and 2x ``Image.MAX_IMAGE_PIXELS``; inside this context an image over
    ``max_pixels`` fails with a clear error naming the file. ``None`` disables the guard. Enter it
    once, in the calling thread, around a whole thread-pool pass (PIL's limit is a global).
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _decode(path: Path, draft: int | None = None) -> Image.Image:
    """Open and fully decode ``path`` (truncated data fails here); raise a one-problem DataError.

    ``draft``: for JPEG, let libjpeg decode at a reduced scale whose sides stay >= ``draft`` (fast,
    and it still reads every byte, so truncation is still detected).
    """
    try:
        image = Image.open(path)
        if draft is not None:
            image.draft("RGB", (draft, draft))
        image.load()
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        problem = Problem(
            "too_large",
            f"image too large for the decompression-bomb guard: {error}",
            path=str(path),
            fix="If the image is genuine, raise --max-image-pixels.",
        )
    except _DECODE_ERRORS as error:
        problem = Problem(
            "unreadable",
            f"cannot decode image ({type(error).__name__}: {error})",
            path=str(path),
            fix="Re-export or remove the file, or pass --on-bad-image skip.",
        )
    raise DataError([problem], source=str(path))


def verify_image(path: Path) -> None:
    """Decode ``path`` cheaply (JPEG at 1/8 scale) to prove it is readable; raise DataError if not."""
    _decode(path, draft=64).close()


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale to 8 bit by its range (PIL's convert would clip)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:  # I;16* are 0..65535; 'I' holds 16-bit PNGs too, unless every value already fits in 8 bit
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, transparency composited on white."""
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image)
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(path: Path, *, draft: int | None = None) -> Image.Image:
    """Decode ``path`` to an RGB image with its orientation fixed.

    Raises :class:`DataError` with one Problem (kind 'unreadable' or 'too_large') naming the file.
    ``draft``: optional minimum side for fast reduced-scale JPEG decoding.
    """
    image = _decode(Path(path), draft)
    rgb = to_rgb(image)
    if rgb is not image:
        image.close()
    return rgb


def decode_square(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 of the image file at ``path``: see :func:`square`."""
    return square(open_image(path, draft=size), size)


def square(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: shorter side resized to ``size`` (bicubic, antialiased), centre crop."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)  # resize of the centre square == resize then crop
    square = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
    return np.asarray(square, dtype=np.uint8)


def _ram_bytes() -> int:
    """Total physical memory in bytes (/proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_in_ram(shape: tuple[int, ...]) -> bool:
    """Whether a uint8 array of ``shape`` stays under the share of physical memory a cache may take."""
    return int(np.prod(shape)) < _RAM_FRACTION * _ram_bytes()


def _cache_key(files: Sequence[Path], readable: np.ndarray, size: int) -> str:
    """Hash of everything the cache content depends on: files (path, size, mtime), mask, size."""
    digest = hashlib.sha256(json.dumps([size, len(files)]).encode())
    for file, ok in zip(files, readable, strict=True):
        stat = file.stat() if ok else None
        digest.update(f"{file}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _fill(
    array: np.ndarray,
    files: Sequence[Path],
    readable: np.ndarray,
    size: int,
    num_workers: int,
    max_pixels: int | None,
    reporter: Reporter,
) -> None:
    """Decode every readable file into ``array`` (N, 3, S, S) with a thread pool (PIL drops the GIL)."""

    def work(rows: range) -> int:
        for i in rows:
            if readable[i]:
                array[i] = decode_square(files[i], size).transpose(2, 0, 1)
        return len(rows)

    workers = num_workers or os.cpu_count() or 1  # 0: one thread per core (PIL decodes without the GIL)
    chunks = [range(s, min(s + _CHUNK, len(files))) for s in range(0, len(files), _CHUNK)]
    with reporter.task("Decoding images", total=len(files)), pixel_limit(max_pixels):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done in as_completed([pool.submit(work, c) for c in chunks]):
                reporter.advance(done.result())


def build_image_cache(
    files: Sequence[Path],
    size: int,
    *,
    readable: np.ndarray | None = None,
    max_image_pixels: int | None = DataConfig.max_image_pixels,
    cache_dir: Path | None = None,
    num_workers: int = 0,
    in_memory: bool | None = None,
    reporter: Reporter = SilentReporter(),
) -> torch.Tensor:
    """Decode every image file once into a uint8 tensor of shape (N, 3, size, size), on the CPU.

    Rows follow ``files``; rows with ``readable[i] == False`` are zeros (default: all readable).
    ``in_memory=None`` chooses RAM when the tensor is under 25% of physical memory, else a memmap
    file in ``cache_dir`` (default: ``<tmp>/deft_clean_cache``) named by a hash of the inputs, reused
    when it exists.
    """
    if size < 1:
        raise ValueError(f"cache size must be a positive number of pixels, got {size}")
    files = [Path(f) for f in files]
    readable = np.ones(len(files), dtype=bool) if readable is None else np.asarray(readable, dtype=bool)
    shape = (len(files), 3, size, size)
    fill = (files, readable, size, num_workers, max_image_pixels, reporter)
    if in_memory if in_memory is not None else fits_in_ram(shape):
        array = np.zeros(shape, dtype=np.uint8)
        _fill(array, *fill)
        return torch.from_numpy(array)
    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "deft_clean_cache"
    final = folder / f"images-{_cache_key(files, readable, size)}-{size}px.u8"
    if final.is_file() and final.stat().st_size == int(np.prod(shape)):
        reporter.log(f"reusing decoded image cache {final}")
    else:
        with atomic_file(final) as partial:
            array = np.memmap(partial, dtype=np.uint8, mode="w+", shape=shape)
            _fill(array, *fill)
            array.flush()
    return torch.from_numpy(np.memmap(final, dtype=np.uint8, mode="c", shape=shape))
