"""The fine-tuning loop of ``finetune``, top to bottom: SGD with a cosine schedule over the staged images
(or their frozen features, ``--tune linear``), TeS or CE, one host sync per epoch, a checkpoint per epoch;
and, under torchrun, where each step's batch comes from (:class:`_Batches`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deft_clean.checkpoint import Checkpoint
from deft_clean.config import FinetuneConfig
from deft_clean.distributed import World
from deft_clean.errors import ConfigError
from deft_clean.progress import Reporter
from deft_clean.runtime import StagedImages, autocast, cosine_lr, feature_pass
from deft_clean.tes import tes_loss

if TYPE_CHECKING:
    from deft_clean.tes import ClassifierHead


def check_process_shares(
    config: FinetuneConfig, world: World, owners: np.ndarray, reporter: Reporter
) -> None:
    """Under torchrun a tuned tower trains on ``--batch-size / N`` images of each process per step, so the
    batch must split evenly and each process must hold one share of the training rows (``owners`` (N,):
    the process holding each); one that holds fewer (its block of the CSV lost rows as unreadable or
    flagged) would leave every epoch without a step and the tower untrained. When the poorest process
    lets an epoch reach less than 3/4 of the rows one process would train on, the log says so."""
    if not world.active or config.tune == "linear":
        return
    if config.batch_size % world.size:
        raise ConfigError(
            f"--batch-size {config.batch_size} is the global batch; with {world.size} processes and "
            f"--tune {config.tune} it must be a multiple of {world.size} (each process takes an equal "
            "share).",
            hint=f"Use --batch-size {config.batch_size // world.size * world.size or world.size}.",
        )
    held, share, steps = _shares(config.batch_size, owners, world.size)
    poorest = int(held.argmin())
    where = (
        f"process {poorest} holds {held[poorest]} training rows (its block of the CSV, less unreadable and "
        f"dropped rows; the processes hold {', '.join(map(str, held))})"
    )
    if steps == 0:
        raise ConfigError(
            f"With {world.size} processes and --tune {config.tune} each process trains on {share} of its own "
            f"images per step, but {where}.",
            hint="Run with fewer processes, a smaller --batch-size, or --tune linear.",
        )
    covered, size = steps * share * world.size, min(config.batch_size, len(owners))
    if covered < 0.75 * (len(owners) // size * size):  # one process drops only the ragged last batch
        reporter.log(
            f"Each epoch trains on {covered:,} of the {len(owners):,} training rows: with --tune "
            f"{config.tune} each process takes {share} of its own images per step, and {where}. Fewer "
            "processes would train on more of them.",
            level="warning",
        )


def _shares(batch_size: int, owners: np.ndarray, processes: int) -> tuple[np.ndarray, int, int]:
    """(rows each process holds, images each takes per step, steps per epoch) of a tuned tower: every
    step takes the same share from every process, so the process holding fewest rows sets the epoch."""
    held = np.bincount(owners, minlength=processes)
    share = max(min(batch_size, len(owners)) // processes, 1)
    return held, share, int(held.min()) // share


def train_classifier(
    tower: nn.Module,
    head: ClassifierHead,
    images: StagedImages,
    labels: torch.Tensor,
    cfg: FinetuneConfig,
    reporter: Reporter,
    checkpoint: Checkpoint | None = None,
    shared: tuple[World, np.ndarray | None] = (World(), None),
) -> None:
    """SGD over the staged ``images`` (N samples) with ``labels`` (N,); TeS or CE per ``cfg.method``.

    The loss is read back once per epoch (no host sync per step). ``checkpoint``: saved after every
    epoch; the epochs it holds are skipped when resuming. ``shared``: under torchrun, the world and
    the process holding each sample's image (``images`` are this process's); see :class:`_Batches`.
    """
    device = next(head.parameters()).device
    world = shared[0]
    batches = _Batches(tower, images, labels.to(device), cfg, reporter, shared)
    params = [p for p in [*tower.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total_steps = batches.steps * cfg.epochs
    order_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    tower.train(cfg.tune != "linear")
    head.train()
    net, generators = nn.ModuleDict({"tower": tower, "head": head}), [order_gen, batches.generator]
    start, _ = checkpoint.restore(net, optimizer, generators) if checkpoint else (0, [])
    step = start * batches.steps
    for epoch in range(start, cfg.epochs):
        order = batches.order(epoch, order_gen)
        running = torch.zeros((), device=device)
        with reporter.task(
            f"Fine-tuning ({cfg.method}) epoch {epoch + 1}/{cfg.epochs}", total=batches.steps * batches.size
        ):
            for i in range(batches.steps):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(cfg.lr, step / max(total_steps, 1))
                with autocast(device):
                    features, y = batches.batch(order, i)  # (B, E), (B,)
                    vision_logits, text_logits = head(features)  # (B, K), (B, K) or None
                if text_logits is None:
                    loss = F.cross_entropy(vision_logits.float(), y)
                else:
                    loss = tes_loss(
                        vision_logits, text_logits, y, lambda_t=cfg.lambda_t, lambda_v=cfg.lambda_v
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                world.average_gradients(params)
                optimizer.step()
                running += loss.detach()
                step += 1
                reporter.advance(len(y))
            reporter.advance(0, loss=float(running / max(batches.steps, 1)))  # one sync per epoch
        if checkpoint is not None and world.is_main:
            checkpoint.save(epoch + 1, [], net, optimizer, generators)
    tower.eval()
    head.eval()


class _Batches:
    """Where each training step's features (B, E) and labels (B,) come from.

    ``--tune linear``: the frozen features of every sample, computed once by the one feature pass
    (under torchrun each process computes its share and all are gathered), then batches of one
    permutation of the N samples: the same steps in every process and in one process. A tuned tower
    crops/flips/normalises the batch on the device and runs the tower; under torchrun each process
    draws ``batch / N`` of its own samples (a permutation of its own per epoch, seeded by epoch and
    rank) and the features and labels are gathered, so the loss is the whole batch's everywhere.
    """

    def __init__(
        self,
        tower: nn.Module,
        images: StagedImages,
        labels: torch.Tensor,
        cfg: FinetuneConfig,
        reporter: Reporter,
        shared: tuple[World, np.ndarray | None],
    ) -> None:
        world, owners = shared
        owners = np.zeros(len(labels), dtype=np.int64) if owners is None else owners
        self.world, self.tower, self.images, self.labels, self.seed = world, tower, images, labels, cfg.seed
        self.generator = torch.Generator(device=images.device).manual_seed(cfg.seed + 1)  # augmentations
        self.size = min(cfg.batch_size, len(labels))
        self.features: torch.Tensor | None = None
        if cfg.tune == "linear":
            tower.eval()
            local = feature_pass(tower, images, batch_size=256, reporter=reporter)  # (N_own, E) float32
            self.features = world.gather_rows(local, owners)  # (N, E)
            self.steps = len(labels) // self.size  # drop the ragged last batch (BatchNorm needs B > 1)
            return
        if images.channels_last:
            tower.to(memory_format=torch.channels_last)
        _, self.share, self.steps = _shares(cfg.batch_size, owners, world.size)
        self.own_labels = labels[torch.from_numpy(np.flatnonzero(owners == world.rank)).to(labels.device)]
        self.who = np.repeat(np.arange(world.size), self.share)

    def order(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """This epoch's permutation of the samples the batches are drawn from."""
        if self.features is not None or not self.world.active:
            return torch.randperm(len(self.labels), generator=generator, device=self.labels.device)
        self.generator.manual_seed(self.seed + 2 + self.world.rank + self.world.size * epoch)
        return torch.randperm(len(self.own_labels), generator=self.generator, device=self.labels.device)

    def batch(self, order: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, E), labels (B,)) of step ``i`` of the epoch ordered by ``order``."""
        if self.features is not None:
            idx = order[i * self.size : (i + 1) * self.size]
            return self.features[idx], self.labels[idx]
        idx = order[i * self.share : (i + 1) * self.share]
        features = self.tower(self.images.images_at(idx, train=True, generator=self.generator))
        return self.world.gather_rows(features, self.who), self.world.gather_rows(
            self.own_labels[idx], self.who
        )
