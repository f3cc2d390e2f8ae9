"""Several processes, one run: what ``torchrun`` gives a deft-clean command (see docs/usage.md).

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without
them (or with ``WORLD_SIZE`` 1) a run is one process and nothing here talks to ``torch.distributed``.
With them, :func:`joined` opens the process group (gloo on the CPU; gloo for Python objects and NCCL
for CUDA tensors on GPUs) and each stage hooks in where it owns a step:

- rows are dealt in contiguous blocks (:meth:`World.block`): each process validates and decodes only
  its block, and the problems found are exchanged so every process raises the same ``DataError``;
- a step's work (a training batch, a scoring pass) is split between the processes (``who`` says which
  process computes which row) and the rows are gathered back in order on every process
  (:meth:`World.gather_rows`), so the loss of the whole global batch is computed identically
  everywhere; gradients are then averaged (:meth:`World.average_gradients`);
- steps that only the main process does (checking and writing the outputs) run through
  :meth:`World.on_main`, which hands its result, or its ``DeftCleanError``, to every process, so a
  refused output stops every process with the same message.

A process that dies (killed, out of memory) breaks the next collective operation of the others, and
torchrun stops them; the outputs are written atomically by the main process at the very end, so
nothing partial is left.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from deft_clean.errors import ConfigError, DeftCleanError, ProcessLostError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(
            f"The environment variable {name}={value!r} is not an integer.",
            hint="Start several processes with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK.",
        ) from None


def is_main() -> bool:
    """Whether this process prints (rank 0, or not started by torchrun); read from the environment."""
    return _env_int("RANK", 0) == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 for a single process)."""
    return _env_int("LOCAL_RANK", 0)


@dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes of a run (``rank`` 0 is the main one)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: the collective operations below communicate."""
        return self.size > 1

    def owners(self, n: int) -> np.ndarray:
        """(n,) the process owning each of ``n`` rows: contiguous blocks, sizes differing by at most one."""
        return (np.arange(n) * self.size) // max(n, 1)

    def block(self, n: int) -> tuple[int, int]:
        """[start, stop) of the rows this process owns among ``n`` (see :meth:`owners`)."""
        bounds = [-(-k * n // self.size) for k in range(self.size + 1)]  # ceil(k n / size)
        return bounds[self.rank], bounds[self.rank + 1]

    def gather_objects(self, value: T) -> list[T]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def gather_rows(self, local: torch.Tensor, who: np.ndarray) -> torch.Tensor:
        """(len(who), ...) rows in order on every process, row ``j`` computed by process ``who[j]``.

        ``local`` holds this process's rows (those with ``who == rank``, in order). Its rows keep their
        gradient, scaled by ``size`` (the value is unchanged), and the other processes' rows are
        constants: a loss computed from the result on every process and then :meth:`average_gradients`
        gives each parameter the gradient of the whole batch, counting each row once.
        """
        if not self.active:
            return local
        counts = np.bincount(who, minlength=self.size)
        width = int(counts.max())
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: len(local)] = local.detach()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        parts[self.rank] = (
            local + (self.size - 1) * (local - local.detach()) if local.requires_grad else local
        )
        stacked = torch.cat([part[: counts[r]] for r, part in enumerate(parts)])
        order = np.argsort(who, kind="stable")  # positions in the order the processes' rows arrive
        inverse = torch.from_numpy(np.argsort(order)).to(stacked.device)
        return stacked[inverse]

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the processes, in one flat all-reduce. A parameter
        no process computed a gradient for keeps none (as in one process, the optimizer skips it)."""
        if not self.active or not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        has = has.to(flat.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        dist.all_reduce(flat)
        flat /= self.size
        start = 0
        for p, present in zip(params, has.tolist(), strict=True):
            grad = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
            p.grad = grad.clone() if present else None

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every process the main process's values of ``tensors`` (parameters, BatchNorm
        statistics), in place: the same start, or the same model to save."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def on_main(self, step: Callable[[], T]) -> T:
        """Run ``step`` on the main process only and return its result on every process; a
        ``DeftCleanError`` it raises is raised on every process (each stops with the same message)."""
        if not self.active:
            return step()
        box: list[Any] = [(None, None)]
        if self.is_main:
            box[0] = _attempt(step)
        dist.broadcast_object_list(box, src=0)
        value, error = box[0]
        if error is not None:
            raise _unpack(error)
        return value

    def together(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every process; when it raises a ``DeftCleanError`` on any of them, every
        process raises the first one (by rank), so none waits forever for the others."""
        if not self.active:
            return step()
        value, error = _attempt(step)
        for found in self.gather_objects(error):
            if found is not None:
                raise _unpack(found)
        return value


Packed = tuple[type, tuple[Any, ...], dict[str, Any]]


def _attempt(step: Callable[[], T]) -> tuple[T | None, Packed | None]:
    """(result, None), or (None, the DeftCleanError ``step`` raised, packed to travel)."""
    try:
        return step(), None
    except DeftCleanError as error:
        return None, (type(error), error.args, dict(vars(error)))


def _unpack(packed: Packed) -> DeftCleanError:
    """The error :func:`_attempt` packed, rebuilt without calling its ``__init__`` (whose signature
    differs between subclasses)."""
    cls, args, fields = packed
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    vars(error).update(fields)
    return error


def world_from_env() -> World:
    """The world torchrun describes in ``RANK``/``WORLD_SIZE`` (one process when they are unset)."""
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(
            f"RANK={rank} and WORLD_SIZE={size} do not describe a process of a run.",
            hint="Start several processes with torchrun, which sets both.",
        )
    return World(rank=rank, size=size)


@contextlib.contextmanager
def joined() -> Iterator[World]:
    """This process's :class:`World`, with the process group open while the block runs (opened here
    unless the caller already did, and then closed here). One process: no ``torch.distributed`` at all.

    gloo carries the CPU tensors and Python objects; on a machine with CUDA, NCCL carries the CUDA
    tensors (it connects only when first used)."""
    world = world_from_env()
    if not world.active or dist.is_initialized():
        yield world
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def runs_distributed(func: F) -> F:
    """Run ``func`` inside :func:`joined`, so the stages it calls can take :func:`world_from_env`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with joined() as world:
            try:
                return func(*args, **kwargs)
            except dist.DistError as error:  # a peer died: its own output says why
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ProcessLostError(
                    f"Process {world.rank} of {world.size}: another process of this run stopped ({first}). "
                    "Nothing was written.",
                    hint="See the first failure torchrun reports; with --resume a detect run continues "
                    "from its last epoch.",
                ) from None

    return wrapper  # type: ignore[return-value]
