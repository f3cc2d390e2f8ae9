"""Writing to disk: the output check, the one atomic writer (files and folders) and the saved-folder format.

Every command checks its outputs with :func:`check_output` before any model work, so a run never
trains for an hour and then fails to save: the output must not be an input, must not exist (unless
``--overwrite``), its folder must be writable and have room. The check also takes a lock file beside
the output (``.NAME.lock``, holding the process id) so a second run writing the same output at the
same time is refused instead of silently losing one result; a lock left by a dead process is taken
over.

Anything deft-clean writes appears whole or not at all: it is written under a temporary sibling
name and renamed into place, and the partial file or folder is removed when writing fails (a failed
write is an :class:`OutputError` saying where space or permission ran out).

A saved folder (detector, classifier, exported backbone) is one JSON description plus weight
files. The description always carries ``format`` (what the folder is), ``format_version`` (bumped
when the layout changes) and ``deft_clean_version`` (what wrote it), so a reader can refuse a
folder it does not understand instead of loading garbage.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, Literal, TypeVar

from deft_clean.errors import ConfigError, OutputError
from deft_clean.version import __version__

F = TypeVar("F", bound=Callable[..., Any])
_HELD: set[Path] = set()  # lock files this process holds
_NEARLY_FULL = 1_000_000  # bytes: a writer failing with less free than this ran out of space
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for the file system",
}


def check_output(
    path: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    kind: Literal["file", "folder"] = "file",
    estimated_bytes: int = 0,
    option: str = "--out",
) -> Path:
    """Refuse an output that cannot or must not be written, before any work; lock it for this run.

    ``path`` must not be one of ``inputs`` (even with ``overwrite``), must not exist unless
    ``overwrite`` (a ``folder`` may exist empty), must be a ``kind`` (no folder where a file is wanted),
    and its nearest existing folder must be writable (probed by creating a file, so read-only mounts,
    /proc and permissions all count) with ``estimated_bytes`` free. Missing parent folders are created.
    Raises :class:`OutputError` naming ``option``, the path and the fix; returns the path.
    """
    target = Path(path).expanduser()
    refuse_input(target, inputs, option=option)
    _refuse_existing(target, kind, overwrite, option)
    folder = _writable_ancestor(target, option)
    free = shutil.disk_usage(folder).free
    if estimated_bytes > free:
        raise OutputError(
            f"{option} '{target}' needs about {_size(estimated_bytes)}; '{folder}' has {_size(free)} free.",
            hint="Free some space or write to another disk.",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{option} '{target}': cannot create its folder ({error.strerror}).") from None
    _lock(target, option)
    return target


def refuse_input(
    target: Path,
    inputs: Iterable[str | Path | None],
    *,
    option: str = "--out",
    what: str = "an input of this run",
    hint: str = "Choose another output path (--overwrite never replaces an input).",
) -> None:
    """Refuse ``target`` when it is one of ``inputs``: writing it would destroy it. The same file counts
    under any name: the same resolved path (symlinks), or the same inode on the same device (hard links;
    compared only when ``target`` exists with more than one link, so a new output costs no stat per input)."""
    resolved = target.resolve()
    try:
        stat = target.stat()
        inode = (stat.st_dev, stat.st_ino) if stat.st_nlink > 1 else None
    except OSError:
        inode = None
    for item in inputs:
        if item is not None and _same_file(Path(item).expanduser(), resolved, inode):
            raise OutputError(f"{option} '{target}' is {what}; writing it would destroy it.", hint=hint)


def _same_file(item: Path, resolved: Path, inode: tuple[int, int] | None) -> bool:
    """Whether ``item`` is the file at ``resolved`` (by path, or by ``inode`` (st_dev, st_ino) when given)."""
    if item.resolve() == resolved:
        return True
    if inode is None:
        return False
    try:
        stat = item.stat()
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == inode


def _refuse_existing(target: Path, kind: str, overwrite: bool, option: str) -> None:
    """Refuse a folder where a file is wanted (or the reverse), or anything there without overwrite."""
    if target.is_dir():
        if kind == "file":
            raise OutputError(
                f"{option} '{target}' is a folder; a file is expected.",
                hint=f"Name a file, e.g. {option} '{target / 'results.parquet'}'.",
            )
        if any(target.iterdir()) and not overwrite:
            raise OutputError(
                f"{option} '{target}' already exists and is not empty.",
                hint="Pass --overwrite to replace what this run writes into it, or choose a new folder.",
            )
    elif target.exists() or target.is_symlink():
        if kind == "folder":
            raise OutputError(f"{option} '{target}' is a file; a folder is expected.", hint="Name a folder.")
        if not overwrite:
            raise OutputError(
                f"{option} '{target}' already exists.",
                hint="Pass --overwrite to replace it, or choose another path.",
            )


def _writable_ancestor(target: Path, option: str) -> Path:
    """The nearest existing folder above ``target``, after proving a file can be created in it."""
    folder = target.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{option} '{target}': '{folder}' is a file, so no folder can be made under it.")
    probe = folder / f".deft-clean-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as error:
        raise OutputError(
            f"{option} '{target}' cannot be written: {error.strerror or error} in '{folder}'.",
            hint="Choose a folder you can write to.",
        ) from None
    return folder


def _lock_file(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(target: Path, option: str) -> None:
    """Create ``.NAME.lock`` beside ``target`` (re-entrant for this process; a dead owner's lock is taken)."""
    lock = _lock_file(target)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = lock.read_text(encoding="utf-8").strip() if lock.is_file() else ""
            owner = int(text) if text.isdigit() else -1
            if owner == os.getpid():
                _HELD.add(lock)
                return
            if owner > 0 and _alive(owner):
                raise OutputError(
                    f"{option} '{target}' is being written by another deft-clean run (process {owner}).",
                    hint=f"Wait for it or choose another output; if that run is gone, delete '{lock}'.",
                ) from None
            lock.unlink(missing_ok=True)  # left by a process that died
            continue
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(f"{os.getpid()}\n")
        _HELD.add(lock)
        return


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD):
        lock.unlink(missing_ok=True)
        _HELD.discard(lock)


def releases_outputs(func: F) -> F:
    """Release the output locks ``func`` took (:func:`check_output`) when it returns or fails."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = set(_HELD)
        try:
            return func(*args, **kwargs)
        finally:
            for lock in _HELD - before:
                lock.unlink(missing_ok=True)
                _HELD.discard(lock)

    return wrapper  # type: ignore[return-value]


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def _write_errors(target: Path) -> Iterator[None]:
    """A failed write (no space, no permission) as an OutputError naming the folder and what ran out."""
    try:
        yield
    except Exception as error:  # writers (pyarrow, safetensors, torch) wrap a full disk in their own types
        folder = target.absolute().parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        reason = _WRITE_ERRORS.get(getattr(error, "errno", None) or -1)
        if reason is None and free < _NEARLY_FULL:
            reason = "no space left"
        if reason is None or isinstance(error, OutputError):
            raise
        raise OutputError(
            f"Writing '{target}' failed: {reason} in '{folder}' ({_size(free)} free). Nothing was written; "
            "the partial output was removed.",
            hint="Free some space or choose a folder you can write to, then run again.",
        ) from None


def _umask_mode(path: Path) -> None:
    """Give the written file(s) the mode new files get under the umask: some writers (safetensors) create
    0600 files, which other users and services sharing a model folder could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for file in [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]:
        file.chmod(0o666 & ~mask)


def _partial(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.partial"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed to ``path``.

    Parent folders are created. On any error the partial file is removed and ``path`` is untouched.
    """
    target = Path(path)
    partial = _partial(target)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield partial
            _umask_mode(partial)
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
    partial = _partial(target)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            yield partial
            _umask_mode(partial)
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
