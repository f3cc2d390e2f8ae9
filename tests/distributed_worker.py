"""A process of the spawned two-process tests in test_distributed.py; it imports only torch and
deft_clean.distributed, so starting it takes a second, not the whole package."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from deft_clean.distributed import World
from deft_clean.errors import DataError, OutputError


def _loss(features: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A batch-level loss like DeFT's: CE averaged over the rows a batch-wide rule selects."""
    logits = features @ text.t()
    each = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    selected = (logits.detach().softmax(1)[torch.arange(len(labels)), labels] > 0.2).float()
    return (each * selected).sum() / selected.sum().clamp(min=1) + logits.logsumexp(1).mean()


def _same_step(world: World, who: list[int]) -> None:
    """Features computed by process ``who[i]`` for row i, gathered, then gradients averaged: the same
    gradients as one process computing the whole batch (tower and text side alike)."""
    torch.manual_seed(0)
    tower, text = torch.nn.Linear(5, 4), torch.nn.Parameter(torch.randn(3, 4))
    params = [*tower.parameters(), text]
    images, labels = torch.randn(len(who), 5), torch.tensor([0, 1, 2, 1, 0, 2, 2][: len(who)])
    _loss(tower(images), text, labels).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    owner = np.array(who)
    mine = torch.from_numpy(np.flatnonzero(owner == world.rank))
    _loss(world.gather_rows(tower(images[mine]), owner), text, labels).backward()
    world.average_gradients(params)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.grad, want, atol=1e-6, rtol=1e-5)


def step_of_one_process(rank: int, store: str, batches: list[list[int]]) -> None:
    """Process ``rank`` of 2: :func:`_same_step` for each batch's owners; then an error raised on one
    process (or on the main one only) is raised on both."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = World(rank, 2)
    for who in batches:
        _same_step(world, who)

    def fails_on_one() -> None:
        if rank == 1:
            raise DataError([], source=f"process {rank}")

    with pytest.raises(DataError, match="process 1"):
        world.together(fails_on_one)
    with pytest.raises(OutputError, match="refused"):
        world.on_main(lambda: (_ for _ in ()).throw(OutputError("refused by rank 0")))
    dist.destroy_process_group()
