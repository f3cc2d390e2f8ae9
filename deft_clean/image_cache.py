"""The decode-once uint8 cache of an image set, kept on disk: a second run on unchanged images decodes none.

Every run needs each image as ``images.decode_square`` makes it, stacked as uint8 ``(N, 3, S, S)``;
training reads batches from it and augments them on the device, so the GPU never waits for JPEG
decoding. Validation decodes each image once and keeps the pixels (:class:`DecodedImages`, used by
``data.load_manifest(image_size=...)``); :func:`build_image_cache` decodes when validation did not
(another size, or more pixels than fit in RAM, then into a memmap file).

Both keep what they decoded in one file under the cache folder (``DataConfig.image_cache``: by default
``$DEFT_CLEAN_CACHE/decoded``, i.e. ``~/.cache/deft-clean/decoded``), named by a key over everything
the pixels depend on: every file's path, size, mtime and inode, the size ``S``, the decompression-bomb
limit and :data:`images.DECODE_VERSION`. A later run whose key matches reads the file instead of
decoding; a changed, replaced, added or removed image changes the key. The file is written
atomically (``files.atomic_file``) and carries its key, shape, readable rows and a CRC-32 of the
pixels, checked on every read: a damaged or truncated file is ignored with a notice and rebuilt,
never trusted. Writing one that fails (no space) is a notice, not an error: the run goes on. A new
file replaces the older files of the same image list and size; the folder is safe to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from deft_clean.config import DataConfig
from deft_clean.errors import OutputError
from deft_clean.files import atomic_file
from deft_clean.images import DECODE_VERSION, decode_square, pixel_limit
from deft_clean.progress import Reporter, SilentReporter

_MAGIC = b"deft-clean decoded images\n"
_ALIGN = 4096  # the pixels start at the first multiple of this after the header
_RAM_FRACTION = 0.25
_CHUNK = 64
_CRC_BLOCK = 1 << 26


def cache_root() -> Path:
    """Where deft-clean keeps what it can rebuild: ``$DEFT_CLEAN_CACHE``, default ``~/.cache/deft-clean``."""
    return Path(os.environ.get("DEFT_CLEAN_CACHE", Path.home() / ".cache" / "deft-clean")).expanduser()


def cache_folder(setting: str) -> Path | None:
    """The folder of ``DataConfig.image_cache``: 'auto' is ``cache_root()/decoded``, 'off' None."""
    if setting == "off":
        return None
    return cache_root() / "decoded" if setting == "auto" else Path(setting).expanduser()


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


def _crc(array: np.ndarray) -> int:
    """CRC-32 of the array's bytes, a block at a time (a memmap is not read into RAM at once)."""
    flat, crc = array.reshape(-1), 0
    for start in range(0, flat.size, _CRC_BLOCK):
        crc = zlib.crc32(flat[start : start + _CRC_BLOCK], crc)
    return crc


def _header(meta: dict) -> bytes:
    """The file's head: magic line, the JSON's length as 16 digits and a newline, the JSON."""
    text = json.dumps(meta).encode()
    return _MAGIC + f"{len(text):016d}\n".encode() + text


def _read_header(path: Path) -> tuple[dict, int]:
    """(the JSON of a cache file's head, where its pixels start); ValueError when it is not one."""
    with open(path, "rb") as file:
        if file.read(len(_MAGIC)) != _MAGIC:
            raise ValueError("not a deft-clean cache file")
        length = int(file.read(17))
        text = file.read(length)
    if len(text) != length:
        raise ValueError("truncated")
    head = len(_MAGIC) + 17 + length
    return json.loads(text), head // _ALIGN * _ALIGN + _ALIGN


class CacheFile:
    """One image list's decoded pixels at one size, on disk: ``<folder>/<list>-<S>px-<key>.u8``.

    ``key`` hashes every file's path, size, mtime and inode with ``size``, ``max_pixels`` and the
    decoder's version (see the module docstring); ``<list>`` hashes the paths alone, so an older file of
    the same list and size (other key) is replaced when this one is written.
    """

    def __init__(self, folder: Path, files: Sequence[Path], size: int, max_pixels: int | None) -> None:
        self.shape = (len(files), 3, size, size)
        listing = hashlib.sha256()
        key = hashlib.sha256(json.dumps([DECODE_VERSION, size, max_pixels, len(files)]).encode())
        for file in files:
            try:
                stat = os.stat(file)
                state = f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
            except OSError:
                state = "missing"
            listing.update(f"{file}\n".encode())
            key.update(f"{file}|{state}\n".encode())
        self.key, self.stem = key.hexdigest()[:24], f"{listing.hexdigest()[:12]}-{size}px"
        self.path = Path(folder) / f"{self.stem}-{self.key}.u8"

    def load(self, *, in_memory: bool, reporter: Reporter) -> tuple[np.ndarray, np.ndarray] | None:
        """(pixels (N, 3, S, S), readable rows (N,)) when the file exists and proves whole, else None
        (a damaged one is reported: it will be rebuilt). ``in_memory``: read into RAM, else a memmap."""
        if not self.path.is_file():
            return None
        try:
            meta, offset = _read_header(self.path)
            if meta["key"] != self.key or tuple(meta["shape"]) != self.shape:
                raise ValueError("its header names other images")
            if self.path.stat().st_size != offset + int(np.prod(self.shape)):
                raise ValueError("truncated")
            if in_memory:
                pixels = np.fromfile(self.path, dtype=np.uint8, offset=offset).reshape(self.shape)
            else:
                pixels = np.memmap(self.path, dtype=np.uint8, mode="c", offset=offset, shape=self.shape)
            if _crc(pixels) != int(meta["crc32"], 16):
                raise ValueError("its pixels do not match their checksum")
            bits = np.unpackbits(np.frombuffer(bytes.fromhex(meta["readable"]), dtype=np.uint8))
            return pixels, bits[: self.shape[0]].astype(bool)
        except (OSError, ValueError, KeyError, TypeError) as error:
            reporter.log(f"ignored the damaged decoded-image cache {self.path} ({error}); decoding again")
            return None

    def store(self, readable: np.ndarray, fill: Callable[[np.ndarray], None], reporter: Reporter) -> bool:
        """Write the file: ``fill(pixels)`` fills the (N, 3, S, S) memmap; then the header, atomically.

        Returns False (with a notice; nothing left behind) when the folder cannot take it: a cache
        is never worth failing a run for. Errors raised by ``fill`` itself propagate."""
        bits = np.packbits(np.asarray(readable, dtype=bool)).tobytes().hex()
        meta = {"key": self.key, "shape": self.shape, "readable": bits, "crc32": "0" * 8}
        offset = len(_header(meta)) // _ALIGN * _ALIGN + _ALIGN
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            nbytes, free = offset + int(np.prod(self.shape)), shutil.disk_usage(self.path.parent).free
            if nbytes > free // 2:
                raise OSError(f"it needs {nbytes:,} bytes and only {free:,} are free")
            with atomic_file(self.path) as partial:
                pixels = np.memmap(partial, dtype=np.uint8, mode="w+", offset=offset, shape=self.shape)
                fill(pixels)
                pixels.flush()
                meta["crc32"] = f"{_crc(pixels):08x}"  # same width as the placeholder: same offset
                del pixels
                with open(partial, "r+b") as file:
                    file.write(_header(meta))
        except (OSError, OutputError) as error:
            reporter.log(f"not keeping the decoded images at {self.path}: {error}", level="warning")
            return False
        reporter.log(f"decoded {int(np.sum(readable))} images, cached at {self.path}")
        for older in self.path.parent.glob(f"{self.stem}-*.u8"):
            if older != self.path:
                older.unlink(missing_ok=True)
        return True


class DecodedImages:
    """The pixels one validation pass decodes into (N, 3, S, S) in RAM, or finds in the cache.

    ``decode(index, file)`` is validation's decoder (``validation.Decoder``): on a cache hit it
    decodes only the rows the cache holds as unreadable (so their problem is reported again), else every
    row. :meth:`finish` stores a fresh pass in the cache and returns the pixels. ``folder`` None: no cache.
    ``in_memory`` False (more pixels than RAM should hold): a hit maps the cache file; without one,
    ``pixels`` is None and validation decodes cheaply, leaving the full decode to :func:`build_image_cache`.
    """

    def __init__(
        self,
        files: Sequence[Path],
        size: int,
        *,
        folder: Path | None,
        max_pixels: int | None,
        reporter: Reporter,
        in_memory: bool = True,
    ) -> None:
        self.size, self.reporter = size, reporter
        self.cache = None if folder is None else CacheFile(folder, files, size, max_pixels)
        found = None if self.cache is None else self.cache.load(in_memory=in_memory, reporter=reporter)
        fresh = np.zeros((len(files), 3, size, size), dtype=np.uint8) if in_memory else None
        self.pixels, self.cached = found or (fresh, None)

    def decode(self, index: int, file: Path) -> None:
        if self.cached is None or not self.cached[index]:
            self.pixels[index] = decode_square(file, self.size).transpose(2, 0, 1)  # type: ignore[index]

    def finish(self, readable: np.ndarray) -> torch.Tensor:
        """The pixels as a tensor, after storing a freshly decoded pass in the cache (with a notice)."""
        if self.cache is not None and self.cached is not None:
            self.reporter.log(f"reused decoded images from {self.cache.path}")
        elif self.cache is not None:
            self.cache.store(readable, self._copy, self.reporter)
        return torch.from_numpy(self.pixels)  # type: ignore[arg-type]

    def _copy(self, out: np.ndarray) -> None:
        np.copyto(out, self.pixels)


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
    """Every image file decoded once into a uint8 tensor of shape (N, 3, size, size), on the CPU.

    Rows follow ``files``; rows with ``readable[i] == False`` are zeros (default: all readable).
    ``cache_dir``: the cache folder (a file there whose key matches is read instead of decoding, and a
    fresh decode is stored there); None keeps nothing. ``in_memory=None`` chooses RAM when the tensor
    is under 25% of physical memory, else a memmap (of the cache file, or of a temporary file).
    """
    if size < 1:
        raise ValueError(f"cache size must be a positive number of pixels, got {size}")
    files = [Path(f) for f in files]
    readable = np.ones(len(files), dtype=bool) if readable is None else np.asarray(readable, dtype=bool)
    shape = (len(files), 3, size, size)
    ram = in_memory if in_memory is not None else fits_in_ram(shape)
    cache = None if cache_dir is None else CacheFile(Path(cache_dir), files, size, max_image_pixels)
    found = None if cache is None else cache.load(in_memory=ram, reporter=reporter)
    if found is not None and np.array_equal(found[1], readable):
        reporter.log(f"reused decoded images from {cache.path}")  # type: ignore[union-attr]
        return torch.from_numpy(found[0])

    def fill(array: np.ndarray) -> None:
        _fill(array, files, readable, size, num_workers, max_image_pixels, reporter)

    if cache is not None and not ram and cache.store(readable, fill, reporter):  # decoded into the file
        found = cache.load(in_memory=False, reporter=reporter)
        if found is not None:
            return torch.from_numpy(found[0])
    if ram:
        array = np.zeros(shape, dtype=np.uint8)
    else:  # a memmap of a file that disappears with it
        array = np.memmap(tempfile.TemporaryFile(), dtype=np.uint8, mode="w+", shape=shape)
    fill(array)
    if cache is not None and ram:
        cache.store(readable, lambda out: np.copyto(out, array), reporter)
    return torch.from_numpy(array)
