"""Where and how the tensors run: device, precision, seeding, the lr schedule, images on the device, and
the one un-augmented feature pass.

Every stage (detect, embed, finetune, predict) goes through these, so a rule is written once: which
device ``auto`` means, when bf16 autocast applies, when cuDNN autotuning pays, how the uint8 image
cache is staged for the device (:class:`StagedImages`, one policy), and how frozen features of every
image are computed (:func:`feature_pass`: resized and normalised by ``augment.gpu_augment(train=False)``).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from deft_clean.augment import gpu_augment
from deft_clean.distributed import local_rank, world_from_env
from deft_clean.errors import ConfigError
from deft_clean.progress import Reporter, SilentReporter

GPU_CACHE_FRACTION = 0.5  # the image cache moves to the GPU when it takes at most this share of free memory


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; otherwise the named device, checked to exist.
    Under torchrun, ``cuda`` without an index is this process's GPU (``LOCAL_RANK``)."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and world_from_env().active:
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(
                f"This is process {local_rank()} of those torchrun started on this machine, which has "
                f"{torch.cuda.device_count()} CUDA device(s).",
                hint=f"Start one process per GPU: --nproc-per-node {torch.cuda.device_count()}.",
            )
        return torch.device("cuda", local_rank())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"Unknown device '{name}'.", hint="Use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device '{name}' requested but CUDA is not available.", hint="Use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"Device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible.",
            hint="Use --device cuda:0 or --device auto.",
        )
    return device


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled (fp32) context elsewhere. The one mixed-precision rule."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def is_conv(module: torch.nn.Module) -> bool:
    """Whether ``module`` has real convolutions (kernel != stride; a ViT's patch embedding does not count)."""
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride for m in module.modules())


@contextlib.contextmanager
def cuda_autotune(device: torch.device, tower: torch.nn.Module) -> Iterator[None]:
    """Let cuDNN time its kernels once per input shape and keep the fastest (restored after).

    Only on CUDA and only for convolutional ``tower``s (:func:`is_conv`): training and scoring see a
    handful of fixed batch shapes over thousands of steps, so the one-off timing pays for conv towers
    and costs ViTs (measured in docs/benchmarks.md).
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or (device.type == "cuda" and is_conv(tower))
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a run's draws outside explicit generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under torch seed ``seed`` and restore the global generator after (CPU only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cosine_lr(base: float, progress: float) -> float:
    """Cosine decay from ``base`` at ``progress`` 0 towards 0 at ``progress`` 1 (clamped to [0, 1])."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class StagedImages:
    """The decoded images of some rows of a uint8 cache, staged for the device: the one staging policy.

    ``cache`` (N_all, 3, S, S) uint8 on the CPU (RAM or memmap), never copied whole on the host;
    ``rows`` (N,) the indices of the rows in use (sample ``i`` is cache row ``rows[i]``). The cache
    moves to the GPU when it takes at most :data:`GPU_CACHE_FRACTION` of the free memory; otherwise
    each batch is gathered on the host, pinned and copied asynchronously. ``channels_last``: batches
    come out NHWC on CUDA (convolutional towers run faster so).
    """

    def __init__(
        self,
        cache: torch.Tensor,
        rows: np.ndarray,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        size: int,
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        self.cache, self.rows, self.mean, self.std, self.size = cache, rows, mean, std, size
        self.device = device
        self.on_device = device.type == "cuda" and cache.numel() <= GPU_CACHE_FRACTION * _free_gpu_bytes()
        self.images = cache.to(device) if self.on_device else cache
        self.cache_rows = torch.from_numpy(np.asarray(rows)).to(device if self.on_device else "cpu")
        self.channels_last = channels_last and device.type == "cuda"

    def __len__(self) -> int:
        return len(self.rows)

    def images_at(
        self, index: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised float images (B, 3, size, size) for samples ``index`` (B,); augmented when ``train``."""
        if self.on_device:
            batch = self.images[self.cache_rows[index.to(self.device, non_blocking=True)]]
        else:
            batch = self.images[self.cache_rows[index.cpu()]]
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = gpu_augment(
            batch, mean=self.mean, std=self.std, out_size=self.size, train=train, generator=generator
        )
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _free_gpu_bytes() -> int:
    free, _total = torch.cuda.mem_get_info()
    return free


@torch.no_grad()
def feature_pass(
    tower: Callable[[torch.Tensor], torch.Tensor],
    images: StagedImages,
    *,
    batch_size: int,
    reporter: Reporter = SilentReporter(),
    description: str = "Image features",
) -> torch.Tensor:
    """(N, F) float32 features on the device of every staged image, un-augmented, in order: the one
    frozen-feature pass (detect's trunk cache, embed, finetune's linear head, predict)."""
    parts = []
    with reporter.task(description, total=len(images)):
        for start in range(0, len(images), batch_size):
            index = torch.arange(start, min(start + batch_size, len(images)))
            with autocast(images.device):
                parts.append(tower(images.images_at(index, train=False)).float())
            reporter.advance(len(index))
    if not parts:  # (0, F): gather_rows needs every process's width; not every tower runs an empty batch
        blank = torch.zeros(1, 3, images.size, images.size, device=images.device)
        with autocast(images.device):
            return tower(blank).float()[:0]
    return torch.cat(parts)
