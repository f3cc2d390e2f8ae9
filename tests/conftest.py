"""Shared fixtures: tiny image sets generated on the fly in tmp_path (no files checked in)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ImageWriter = Callable[..., Path]


def write_image(
    path: Path, *, size: tuple[int, int] = (12, 8), mode: str = "RGB", seed: int = 0, **save
) -> Path:
    """Write a random ``mode`` image of ``size`` (width, height) to ``path``; format from the suffix."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


@pytest.fixture
def make_image() -> ImageWriter:
    """``make_image(path, size=(w, h), mode='RGB', seed=0, **save_kwargs) -> path``."""
    return write_image


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder with classes 'cat' (3 PNGs) and 'dog' (3 JPEGs), images 12x8."""
    root = tmp_path / "folder"
    for k in range(3):
        write_image(root / "cat" / f"c{k}.png", seed=k)
        write_image(root / "dog" / f"d{k}.jpg", seed=10 + k)
    return root


@pytest.fixture
def csv_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """(data_dir, labels.csv): 6 PNGs under data_dir/img, labels 10/2/2/10/2/10 (integers)."""
    root = tmp_path / "data"
    labels = ["10", "2", "2", "10", "2", "10"]
    lines = ["path,label"]
    for k, label in enumerate(labels):
        write_image(root / "img" / f"{k}.png", seed=k)
        lines.append(f"img/{k}.png,{label}")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, csv_path


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make rich render 300 columns wide so table cells (file names, messages) are not wrapped."""
    from deft_clean import _render

    monkeypatch.setattr(_render.console, "width", 300)


def stage_configs(stage: str, **options: object) -> dict[str, object]:
    """Flat test options -> the config objects ``detect``/``finetune``/``embed`` (``stage``) take, by keyword.

    Each key goes to the config of the stage that declares it (data, backbone, then the stage's own);
    a config is passed only when one of its fields was given, so the function's defaults apply otherwise.
    """
    import dataclasses

    from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig

    own = {"detect": {"detect": DetectConfig}, "finetune": {"finetune": FinetuneConfig}, "embed": {}}[stage]
    stages = {"data": DataConfig, "backbone": BackboneConfig, **own}
    built: dict[str, object] = {}
    for keyword, cls in stages.items():
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in options.items() if k in names}
        if values:
            built[keyword] = cls(**values)
    unknown = set(options) - {f.name for cls in stages.values() for f in dataclasses.fields(cls)}
    assert not unknown, f"not a config field: {unknown}"
    return built
