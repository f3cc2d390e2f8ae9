"""Frozen image features: shapes, normalisation, input order, the pooled-trunk choice."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from open_clip.timm_model import TimmModel
from PIL import Image
from torch import nn

from deft_clean.config import BackboneConfig
from deft_clean.data import load_manifest
from deft_clean.embed import embed_images, image_tower

SIZE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class TinyCLIP(nn.Module):
    """Just enough of open_clip's CLIP for the image side: ``visual`` and ``encode_image``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.visual(images)


def _timm_backbone() -> SimpleNamespace:
    torch.manual_seed(0)
    visual = TimmModel("test_efficientnet", embed_dim=8, image_size=SIZE, pool="avg", proj="linear")
    return SimpleNamespace(model=TinyCLIP(visual).eval(), image_size=SIZE, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 40×40 images in two classes, each a different colour, plus labels.csv."""
    root = tmp_path_factory.mktemp("embed")
    (root / "images").mkdir()
    lines = ["path,label"]
    for i in range(6):
        colour = (40 * i, 255 - 40 * i, (90 * i) % 256)
        Image.new("RGB", (40, 40), colour).save(root / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,{'ab'[i % 2]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_image_tower_prefers_the_pooled_trunk_of_a_projecting_timm_head() -> None:
    backbone = _timm_backbone()
    x = torch.rand(2, 3, SIZE, SIZE)
    assert image_tower(backbone.model, pooled=True) is backbone.model.visual.trunk
    assert image_tower(backbone.model, pooled=True)(x).shape == (2, backbone.model.visual.trunk.num_features)
    assert image_tower(backbone.model, pooled=False)(x).shape == (2, 8)


def test_image_tower_falls_back_to_encode_image_without_a_trunk() -> None:
    vit_like = TinyCLIP(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 4)))
    assert image_tower(vit_like, pooled=True).__func__ is TinyCLIP.encode_image  # type: ignore[attr-defined]


@pytest.mark.parametrize("pooled, dim", [(True, 256), (False, 8)])
def test_embed_images_unit_rows_in_input_order(image_dir: Path, pooled: bool, dim: int) -> None:
    backbone = _timm_backbone()
    manifest = load_manifest(image_dir, image_dir / "labels.csv")
    features = embed_images(manifest, backbone, batch_size=4, pooled=pooled)
    assert features.shape == (6, dim) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    # row i is image i: embedding a single decoded image gives the same row
    from deft_clean.augment import gpu_augment
    from deft_clean.images import decode_square

    pixels = torch.from_numpy(decode_square(image_dir / "images" / "3.png", SIZE).copy()).permute(2, 0, 1)[
        None
    ]
    with torch.no_grad():
        single = image_tower(backbone.model, pooled=pooled)(
            gpu_augment(pixels, mean=MEAN, std=STD, out_size=SIZE, train=False)
        )
    np.testing.assert_allclose(
        features[3], torch.nn.functional.normalize(single, dim=-1)[0].numpy(), atol=1e-5
    )
    assert not np.allclose(features[2], features[3])


def test_embed_images_reads_a_data_dir_and_restores_training_mode(image_dir: Path) -> None:
    backbone = _timm_backbone()
    backbone.model.train()
    features = embed_images(image_dir, backbone, labels_csv=image_dir / "labels.csv", batch_size=5)
    assert features.shape == (6, 8)  # default: encode_image, the projected embedding
    assert backbone.model.training  # left as the caller had it
    again = embed_images(image_dir, backbone, labels_csv=image_dir / "labels.csv", batch_size=2)
    np.testing.assert_allclose(
        features, again, atol=1e-5
    )  # eval mode: batch size does not matter (BatchNorm)


def test_embed_api_builds_the_backbone_and_saves_npy(image_dir: Path, tmp_path: Path) -> None:
    from deft_clean.embed import embed

    out = tmp_path / "sub" / "features.npy"
    tiny = BackboneConfig(model="test-tiny", device="cpu")
    features = embed(image_dir, image_dir / "labels.csv", out=out, backbone=tiny, batch_size=4)
    assert features.shape[0] == 6 and features.dtype == np.float32
    np.testing.assert_array_equal(np.load(out), features)
    assert [p.name for p in out.parent.iterdir()] == ["features.npy"]  # no partial file left behind
    with pytest.raises(TypeError, match="modle"):  # the typed API refuses a misspelt option by name
        embed(image_dir, image_dir / "labels.csv", modle="test-tiny")  # type: ignore[call-arg]


def test_cli_embed_writes_npy(image_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deft_clean.cli import app

    out = tmp_path / "f.npy"
    args = ["embed", str(image_dir), str(image_dir / "labels.csv"), "--out", str(out), "--model", "test-tiny"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape[0] == 6 and f"wrote 6 x {np.load(out).shape[1]} features" in result.output
    missing = CliRunner().invoke(
        app, ["embed", str(tmp_path / "nope"), "--out", str(tmp_path / "g.npy"), "--model", "test-tiny"]
    )
    assert missing.exit_code == 2 and "nope" in missing.output
