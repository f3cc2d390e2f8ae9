"""Batched augmentation on the device: random resized crop + horizontal flip + normalise.

Training batches come from the uint8 image cache (``images.py``) already on the device. One
``affine_grid``/``grid_sample`` call crops, rescales and flips the whole batch: no per-sample Python
loop and no host synchronisation (random numbers are drawn with torch, on the generator's device).

Default crop strength follows the DeFT authors' loaders (HotanLee/DeFT ``dataloader/``): CIFAR uses
``RandomCrop(32, padding=4)`` and CUB ``Resize(256) + RandomCrop(224)``, i.e. crops keeping roughly
75-100% of the image area plus a horizontal flip; much milder than ImageNet's ``scale=(0.08, 1)``,
which would often cut away the object whose label is being judged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_SCALE = (0.75, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


def _crop_flip_theta(
    batch: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """(B, 2, 3) affine matrices mapping output coords to a random crop (optionally mirrored)."""
    draw_on = generator.device if generator is not None else device
    u = torch.rand(batch, 5, generator=generator, device=draw_on).to(device, non_blocking=True)  # (B, 5)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the side, (B,)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (1 - width) * (2 * u[:, 2] - 1)  # normalised coords in [-1, 1]
    centre_y = (1 - height) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return theta


def gpu_augment(
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    out_size: int,
    train: bool,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> torch.Tensor:
    """uint8 (B, 3, S, S) on the device -> normalised float32 (B, 3, out_size, out_size).

    ``train=True``: random resized crop (area fraction in ``scale``, aspect in ``ratio``) and a
    horizontal flip with probability 0.5, bilinear, batched in one grid_sample. ``train=False``:
    a plain (antialiased bilinear) resize to ``out_size``. ``generator`` makes the draws reproducible.
    """
    x = images.to(torch.float32) / 255.0  # (B, 3, S, S), a new tensor: the input is never modified
    if train:
        theta = _crop_flip_theta(x.shape[0], scale, ratio, generator, x.device)
        grid = F.affine_grid(theta, [x.shape[0], 3, out_size, out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    elif x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    for c in range(3):  # Python scalars: a (3,) tensor built from host lists would copy and sync
        x[:, c].sub_(float(mean[c])).div_(float(std[c]))
    return x
