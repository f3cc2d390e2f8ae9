"""Shared fixtures: tiny image sets generated on the fly in tmp_path (no files checked in)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deft_clean.progress import SilentReporter

ImageWriter = Callable[..., Path]


class LogLines(SilentReporter):
    """A reporter that keeps the log lines of a run (``lines``), and nothing else."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str, level: str = "info") -> None:
        self.lines.append(message)


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


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test keeps decoded images and unpacked tables in a temporary cache, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEFT_CLEAN_CACHE", str(tmp_path_factory.mktemp("deft-clean-cache")))
        yield


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


class FlagsCase:
    """A results file written without a model (see the ``flags_case`` fixture) and what it plants."""

    def __init__(self, root: Path, labels_csv: Path, flags: Path, truth_csv: Path, frame) -> None:
        self.root, self.labels_csv, self.flags, self.truth_csv, self.frame = (
            root, labels_csv, flags, truth_csv, frame
        )  # fmt: skip


@pytest.fixture
def flags_case(tmp_path: Path) -> FlagsCase:
    """30 images in classes cat/dog/owl (names Cat/Dog/Owl), a labels CSV with an extra ``split`` column,
    and a results file in which rows 0-7 are flagged (p_clean 0.05..0.40, suggested = the next class),
    rows 0-3 with predicted_prob 0.95, rows 4-7 with 0.5. ``truth.csv``: rows 0-5 truly wrong (truth =
    suggestion), 6-7 false alarms, row 20 wrong but not flagged (missed)."""
    from deft_clean.config import DataConfig
    from deft_clean.data import load_manifest
    from deft_clean.results import Scores, result_frame, run_metadata, write_results
    from deft_clean.scoring import noise_rank

    root = tmp_path / "data"
    ids = ["cat", "dog", "owl"]
    (tmp_path / "classes.txt").write_text("cat,Cat\ndog,Dog\nowl,Owl\n")
    n = 30
    labels = np.arange(n) % 3
    lines = ["split,path,label"] + [f"train,img/{i:02d}.png,{ids[labels[i]]}" for i in range(n)]
    for i in range(n):
        write_image(root / "img" / f"{i:02d}.png", size=(16, 16), seed=i)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("\n".join(lines) + "\n")
    manifest = load_manifest(root, labels_csv, config=DataConfig(classes_file=str(tmp_path / "classes.txt")))
    flagged = np.arange(n) < 8
    p_clean = np.where(flagged, 0.05 * (np.arange(n) + 1), 0.6 + 0.01 * np.arange(n)).astype(np.float32)
    predicted = np.where(flagged, (labels + 1) % 3, labels)
    prob = np.where(np.arange(n) < 4, 0.95, np.where(flagged, 0.5, 0.9)).astype(np.float32)
    margin = (p_clean - 0.5).astype(np.float32)
    scores = Scores(p_clean, margin, flagged, predicted, prob)
    frame = result_frame(manifest, np.arange(n), scores)
    assert frame["noise_rank"].tolist() == noise_rank(p_clean, margin).tolist()
    meta = run_metadata(manifest=manifest, configs={"data": DataConfig(classes_file="classes.txt")})
    flags = write_results(frame, tmp_path / "flags.parquet", metadata=meta)
    truth = labels.copy()
    truth[:6] = predicted[:6]
    truth[20] = (labels[20] + 2) % 3
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text("path,label\n" + "".join(f"img/{i:02d}.png,{ids[truth[i]]}\n" for i in range(n)))
    return FlagsCase(root, labels_csv, flags, truth_csv, frame)
