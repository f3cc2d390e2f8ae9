"""Robust image decoding: any file PIL reads, as the RGB square every model sees.

Every image becomes ``decode_square``: resized so its shorter side is ``size`` (bicubic,
antialiased), centre-cropped to ``size x size``, uint8. The decode-once cache of a whole image set
(``(N, 3, S, S)``, kept on disk between runs) is :mod:`deft_clean.image_cache`; bump
:data:`DECODE_VERSION` whenever a change here changes the pixels, so caches of older pixels are not reused.

Decoding copes with grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit PNG (scaled,
not clipped, to 8 bit) and EXIF orientation. PIL's decompression-bomb guard stays on: wrap a pass in
:func:`pixel_limit` to set the limit, which also turns PIL's warning into an error.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from deft_clean.errors import DataError, Problem

# Errors PIL's decoders raise for damaged files (truncated data, bad CRCs, unknown formats).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
DECODE_VERSION = 1  # part of every decoded-image cache key: bump when decode_square's pixels change


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
