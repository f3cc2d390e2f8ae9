"""gpu_augment: shapes, dtype, determinism, plain resize at eval, crop scale and flips at train."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from deft_clean.augment import gpu_augment

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randint(
        0, 256, (6, 3, 20, 20), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return TF.normalize(x, list(MEAN), list(STD))


@pytest.mark.parametrize("train", [True, False])
def test_shapes_and_dtype(batch: torch.Tensor, train: bool) -> None:
    out = gpu_augment(
        batch, mean=MEAN, std=STD, out_size=12, train=train, generator=torch.Generator().manual_seed(1)
    )
    assert out.shape == (6, 3, 12, 12) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_eval_is_a_plain_resize_and_normalise(batch: torch.Tensor) -> None:
    out = gpu_augment(batch, mean=MEAN, std=STD, out_size=12, train=False)
    expected = _normalise(TF.resize(batch.float() / 255, [12, 12], antialias=True))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    same = gpu_augment(batch, mean=MEAN, std=STD, out_size=20, train=False)
    torch.testing.assert_close(same, _normalise(batch.float() / 255))


def test_input_is_not_modified(batch: torch.Tensor) -> None:
    as_float = batch.float()
    gpu_augment(as_float, mean=MEAN, std=STD, out_size=20, train=False)
    assert torch.equal(as_float, batch.float())


def test_seeded_generator_is_deterministic(batch: torch.Tensor) -> None:
    def run(seed: int) -> torch.Tensor:
        return gpu_augment(
            batch, mean=MEAN, std=STD, out_size=16, train=True, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_full_scale_crop_is_identity_or_mirror(batch: torch.Tensor) -> None:
    images = batch.repeat(8, 1, 1, 1)  # 48 samples: both outcomes must occur
    out = gpu_augment(
        images,
        mean=MEAN,
        std=STD,
        out_size=20,
        train=True,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        generator=torch.Generator().manual_seed(0),
    )
    plain = _normalise(images.float() / 255)
    same = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-4
    mirrored = (out - plain.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert torch.all(same | mirrored)
    assert same.any() and mirrored.any()


def test_crop_covers_the_requested_area_fraction() -> None:
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8)  # value encodes the x coordinate
    images = ramp.view(1, 1, 1, 64).expand(32, 3, 64, 64).contiguous()
    out = gpu_augment(
        images,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        out_size=64,
        train=True,
        scale=(0.25, 0.25),
        ratio=(1.0, 1.0),
        generator=torch.Generator().manual_seed(0),
    )
    row = out[:, 0, 32]  # (B, 64)
    width = row.amax(dim=1) - row.amin(dim=1)  # fraction of the full ramp seen by each crop
    torch.testing.assert_close(
        width, torch.full_like(width, 0.5), atol=0.03, rtol=0
    )  # sqrt(0.25) of the side
    assert row.amin() >= 0 and row.amax() <= 1  # crops stay inside the image
