"""The DeFT training loop, top to bottom: one :func:`train_detector` call trains the prompts and the
image-tower tuning on the given (noisy) labels of some rows.

Data path: the uint8 image cache is staged for the device by :class:`deft_clean.runtime.StagedImages`,
batches are drawn by index with seeded generators and augmented on the device; the loop never waits
on the device except once per epoch, to read the epoch's loss and timing. Warm-up epochs train CE on
every sample; later epochs CE on the samples the current model calls clean (in the same batch) and
pseudo-labels for the rest in the negative-prompt loss (:func:`deft_clean.scoring.deft_loss`).
The un-augmented passes of the trained detector over some rows (:func:`score_into`, :func:`embed_rows`)
are here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from deft_clean.checkpoint import Checkpoint
from deft_clean.config import DetectConfig
from deft_clean.crossfit import EpochAverage, score_pass
from deft_clean.deft_model import DeftModel
from deft_clean.distributed import World
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.runtime import StagedImages, autocast, cosine_lr, feature_pass
from deft_clean.scoring import clean_probability, complementary_labels, deft_loss, select_clean
from deft_clean.text_sampling import step_classes, to_local


class LabelledImages:
    """The staged images of the readable rows and their given labels ``labels_np`` (N,), on the device too.

    ``owners`` (N,): the process holding each sample's image (under torchrun, see :class:`Block`;
    all 0 in one process)."""

    def __init__(
        self, images: StagedImages | Block | _Subset, labels_np: np.ndarray, owners: np.ndarray | None = None
    ) -> None:
        self.images, self.labels_np, self.device = images, labels_np, images.device
        self.labels = torch.from_numpy(labels_np).to(images.device)
        self.index = getattr(images, "index", np.arange(len(labels_np)))  # samples of the full set held here
        self.owners = np.zeros(len(labels_np), dtype=np.int64) if owners is None else owners

    def __len__(self) -> int:
        return len(self.labels_np)

    def subset(self, index: np.ndarray) -> LabelledImages:
        """The samples ``index`` (M,) of this set (a view: nothing is copied or moved)."""
        index = np.asarray(index)
        return LabelledImages(_Subset(self.images, index), self.labels_np[index], self.owners[index])


class Block:
    """Under torchrun: the ``n`` samples of a run, of which this process staged ``images``, samples
    ``start`` to ``start + len(images)``; only those may be asked for (the others live elsewhere)."""

    def __init__(self, images: StagedImages, start: int, n: int) -> None:
        self.images, self.start, self.n, self.device = images, start, n, images.device

    def __len__(self) -> int:
        return self.n

    def images_at(
        self, index: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.images.images_at(index.cpu() - self.start, train=train, generator=generator)


class _Subset:
    """Some samples of a :class:`StagedImages`: sample ``i`` here is sample ``index[i]`` there."""

    def __init__(self, images: StagedImages | Block | _Subset, index: np.ndarray) -> None:
        self.images, self.device = images, images.device
        self.index = getattr(images, "index", np.arange(len(images)))[index]
        self._local = torch.from_numpy(index)

    def __len__(self) -> int:
        return len(self._local)

    def images_at(
        self, index: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.images.images_at(self._local[index.cpu()], train=train, generator=generator)


def trunk_cache(net: DeftModel, images: StagedImages, batch_size: int) -> torch.Tensor:
    """(N, F) frozen-trunk features of the un-augmented images, computed once (``net.caches_features``)."""
    return feature_pass(net.trunk_features, images, batch_size=batch_size)


def workers(
    world: World, data: LabelledImages, index: torch.Tensor, trunk: torch.Tensor | None
) -> np.ndarray:
    """(B,) the process that computes each of samples ``index`` (B,): with a trunk cache (every process
    holds all of it) the batch is dealt evenly; otherwise each sample goes to the process holding
    its image."""
    if trunk is not None:
        return world.owners(len(index))
    return data.owners[index.cpu().numpy()]


def world_features(
    net: DeftModel,
    data: LabelledImages,
    index: torch.Tensor,
    trunk: torch.Tensor | None,
    *,
    world: World,
    train: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """:func:`batch_features` of samples ``index`` (B,), each computed by one process (:func:`workers`)
    and gathered in order on every process (:meth:`World.gather_rows`); in one process, the same."""
    if not world.active:
        return batch_features(net, data, index, trunk, train=train, generator=generator)
    who = workers(world, data, index, trunk)
    mine = index[torch.from_numpy(np.flatnonzero(who == world.rank))]
    if len(mine) == 0:  # none of this batch is here (and a tower cannot run on an empty batch)
        return world.gather_rows(torch.zeros(0, net.embed_dim, device=data.device), who)
    return world.gather_rows(batch_features(net, data, mine, trunk, train=train, generator=generator), who)


def batch_features(
    net: DeftModel,
    data: LabelledImages,
    index: torch.Tensor,
    trunk: torch.Tensor | None,
    *,
    train: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, E) normalised image features for ``index``: from the trunk cache, or images through the tower."""
    if trunk is not None:
        return net.image_features(trunk=trunk[index.to(trunk.device, non_blocking=True)])
    return net.image_features(data.images.images_at(index, train=train, generator=generator))


def train_detector(
    net: DeftModel,
    data: LabelledImages,
    config: DetectConfig,
    *,
    trunk: torch.Tensor | None = None,
    reporter: Reporter = SilentReporter(),
    checkpoint: Checkpoint | None = None,
    after_epoch: Callable[[int], None] | None = None,
    world: World = World(),
) -> list[dict[str, float]]:
    """Train prompts and tuning on the given labels; returns per-epoch dicts (loss, ce, neg, selected, img_s).
    Warm-up epochs: CE on every sample; later, CE on the samples the model calls clean (same batch) and
    the rest's pseudo-labels in the negative-prompt loss (:func:`deft_loss`).
    ``trunk``: :func:`trunk_cache` features of a frozen tower (computed if not given). ``after_epoch(epoch)``
    (0-based) runs after each epoch with the model in eval mode.
    ``checkpoint``: saved after every epoch (after ``after_epoch``); its epochs are skipped on resume.
    ``world``: under torchrun each process draws the same global batches, computes its share's image
    features (:func:`world_features`) and the whole batch's loss; gradients are averaged.
    """
    device, n = data.device, len(data)
    cpu_gen = torch.Generator().manual_seed(config.seed)
    dev_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    optimizer = torch.optim.SGD(
        net.param_groups(config), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if trunk is None and net.caches_features:
        trunk = trunk_cache(net, data.images, 2 * config.batch_size)
    steps = math.ceil(n / config.batch_size)
    generators = [cpu_gen, dev_gen]
    start, history = checkpoint.restore(net, optimizer, generators) if checkpoint else (0, [])
    augment = torch.Generator(device=device) if world.active else dev_gen
    net.train()
    for epoch in range(start, config.epochs):
        if world.active:  # seeded per epoch and process, so a resumed run draws the same
            augment.manual_seed(config.seed + 2 + world.rank + world.size * epoch)
        order = torch.randperm(n, generator=cpu_gen)
        totals = torch.zeros(4, device=device)  # sums of loss, ce, neg over samples; selected count
        started = time.perf_counter()
        with reporter.task(f"DeFT epoch {epoch + 1}/{config.epochs}", total=n):
            for step in range(steps):
                _set_lr(optimizer, config, epoch, step, steps)
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                totals += _train_step(
                    net, data, index, trunk, optimizer, config, warm=epoch < config.warmup_epochs,
                    generator=dev_gen, augment=augment, world=world,
                )  # fmt: skip
                if step < steps - 1:
                    reporter.advance(len(index))
            record = _epoch_record(epoch, totals, n, time.perf_counter() - started)
            reporter.advance(len(index), loss=record["loss"], img_s=record["img_s"])
        history.append(record)
        if after_epoch is not None:
            net.eval()
            after_epoch(epoch)
            net.train()
        if checkpoint is not None and world.is_main:
            checkpoint.save(epoch + 1, history, net, optimizer, generators)
    net.eval()
    return history


def _set_lr(
    optimizer: torch.optim.Optimizer, config: DetectConfig, epoch: int, step: int, steps: int
) -> None:
    """Cosine decay of every group's ``peak_lr``, per epoch or per step (``--lr-schedule``)."""
    progress = epoch / config.epochs
    if config.lr_schedule == "step":
        progress = (epoch * steps + step) / (config.epochs * steps)
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(group["peak_lr"], progress)


def _epoch_record(epoch: int, totals: torch.Tensor, n: int, seconds: float) -> dict[str, float]:
    """The history entry of ``epoch`` (0-based) from the (4,) sums of :func:`_train_step` over ``n`` rows."""
    loss_sum, ce_sum, neg_sum, chosen = totals.tolist()  # the one device sync of the epoch
    return {
        "epoch": epoch + 1,
        "loss": loss_sum / n,
        "ce": ce_sum / n,
        "neg": neg_sum / n,
        "selected_fraction": chosen / n,
        "seconds": seconds,
        "img_s": n / seconds if seconds > 0 else float("nan"),
    }


def _train_step(
    net: DeftModel,
    data: LabelledImages,
    index: torch.Tensor,
    trunk: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    config: DetectConfig,
    *,
    warm: bool,
    generator: torch.Generator,
    augment: torch.Generator | None = None,
    world: World = World(),
) -> torch.Tensor:
    """One SGD step on samples ``index`` (B,); returns (4,) on the device: B·loss, B·ce, B·neg, #selected.
    ``generator`` draws the labels' random choices, ``augment`` (default: the same) the augmentations."""
    augment = generator if augment is None else augment
    labels = data.labels[index.to(data.device, non_blocking=True)]
    with autocast(data.device):
        features = world_features(net, data, index, trunk, world=world, train=True, generator=augment)
    complementary = complementary_labels(labels, net.prompts.n_cls, generator)
    # Many classes: encode only those the loss needs plus a sample (labels become columns of s±).
    classes = step_classes(labels, complementary, net.prompts.n_cls, config.text_classes, generator)
    if classes is not None:
        labels, complementary = to_local(classes, net.prompts.n_cls, labels, complementary)
    with autocast(data.device):
        s_pos, s_neg = net.similarities(features, net.prompts(classes))
    s_pos, s_neg = s_pos.float(), s_neg.float()  # (B, C) each; C = K without sampling
    selected = None
    if not warm:
        p_clean = clean_probability(s_pos.detach(), s_neg.detach())
        selected = select_clean(p_clean, labels, threshold=config.threshold, strict=config.strict)
    loss, ce, neg = deft_loss(s_pos, s_neg, labels, complementary, selected, balance=config.balances)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    world.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()
    count = torch.full((), float(len(index)), device=data.device)
    chosen = selected.sum().float() if selected is not None else count
    return torch.stack([loss.detach() * count, ce.detach() * count, neg.detach() * count, chosen])


def score_into(
    net: DeftModel,
    data: LabelledImages,
    trunk: torch.Tensor | None,
    average: EpochAverage,
    batch: int,
    world: World = World(),
) -> None:
    """Add one un-augmented pass of ``net`` over ``data`` to ``average`` (shared among the processes)."""
    with autocast(data.device):
        text = net.prompts.encode_all()  # (K, E) each, once: the prompts do not change while scoring

    def similarities(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = batch_features(net, data, index, trunk, train=False, generator=None)
        return net.similarities(features, text)

    who = workers(world, data, torch.arange(len(data)), trunk)
    score_pass(similarities, len(data), data.labels, average, net.scale, batch, world=world, who=who)


@torch.no_grad()
def embed_rows(
    net: DeftModel, data: LabelledImages, trunk: torch.Tensor | None, batch: int, world: World = World()
) -> torch.Tensor:
    """(N, E) un-augmented image embeddings of ``data`` by ``net`` (for :func:`fold_votes`); under
    torchrun each process embeds the rows whose images it holds and every process gets them all."""
    if trunk is not None:
        with autocast(data.device):
            return net.image_features(trunk=trunk).float()
    if not world.active:
        return feature_pass(net.image_features, data.images, batch_size=batch)  # type: ignore[arg-type]
    own = np.flatnonzero(data.owners == world.rank)
    parts = [torch.zeros(0, net.embed_dim, device=data.device)]
    for start in range(0, len(own), batch):
        index = torch.from_numpy(own[start : start + batch])
        with autocast(data.device):
            parts.append(net.image_features(data.images.images_at(index, train=False)).float())
    return world.gather_rows(torch.cat(parts), data.owners)
