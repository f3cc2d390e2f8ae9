"""Materialise benchmark datasets in deft-clean's own input format and plant label noise.

A dataset becomes a folder under the cache dir (default ``benchmarks/cache/``, gitignored)::

    <cache>/<name>-<subset|all>[-s<seed>]/
        images/<index>.jpg|png    one file per image, <index> = position in the source
        classes.txt               'id,name' per line, in label order (pass as classes_file)
        truth.csv                 path,label: the true labels
        labels_<noise>_s<seed>.csv   path,label: the labels a user would hand to deft-clean

Images are written once per (dataset, subset, seed) and shared by every noise setting; each noise
setting only adds a labels CSV. Sources: ``cifar10`` (the train split of ``<data-root>/cifar10/*.parquet``),
``fashion-mnist`` (the Debian package's IDX files, or ``<data-root>/fashion-mnist/``) and
``synthetic`` (coloured noise images generated on the fly, for smoke runs without data).

Noise (``--noise``): ``sym:R``, ``asym:R``, ``instance:R``, ``file:PATH``; see the ``*_noise`` functions.
Rates are exact counts (``round(R * n)`` flips) drawn with ``numpy.random.default_rng(seed)``, so a
setting flips the same rows every time and the measured rate equals R up to rounding.
"""

from __future__ import annotations

import gzip
import io
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import train_test_split

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("cifar10", "fashion-mnist", "synthetic")
NOISE_KINDS = ("sym", "asym", "pairflip", "instance", "file")
# CIFAR-10 class-dependent flips (Patrini et al. 2017): truck→automobile, bird→airplane, deer→horse, cat↔dog.
ASYM_PAIRS = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}
# (id, readable name) in Fashion-MNIST label order: the bundled example's classes.txt is the one copy.
FASHION_CLASSES = tuple(
    tuple(line.split(",", 1))
    for line in (Path(__file__).parents[1] / "examples" / "fashion-mnist" / "classes.txt")
    .read_text()
    .splitlines()
)
SYNTHETIC_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 50, 190),
    "orange": (240, 140, 30),
    "cyan": (40, 210, 220),
    "pink": (240, 120, 190),
    "brown": (120, 75, 30),
    "grey": (128, 128, 128),
}


class DatasetUnavailable(RuntimeError):
    """A source's files are not on this machine; the message says what to install or pass."""


@dataclass(frozen=True)
class Source:
    """An image set before materialising: true labels and a way to get each image's file bytes."""

    name: str
    labels: np.ndarray  # (N,) int64, true labels
    class_ids: tuple[str, ...]  # label strings written to the CSVs
    class_names: tuple[str, ...]  # readable names for prompts
    suffix: str  # '.jpg' or '.png'
    encode: Callable[[int], bytes]  # image i of the source → file bytes


@dataclass(frozen=True)
class Dataset:
    """A materialised dataset: ``root/paths[i]`` is image i, ``labels[i]`` its true label."""

    name: str
    root: Path
    paths: tuple[str, ...]  # relative to root, e.g. 'images/00012.jpg'
    labels: np.ndarray  # (N,) int64
    class_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    source_index: np.ndarray  # (N,) int64, position of each image in its source

    @property
    def classes_file(self) -> Path:
        return self.root / "classes.txt"


@dataclass(frozen=True)
class NoisySet:
    """One noise setting on a dataset: the given labels and where they are written."""

    dataset: Dataset
    noise: str
    given: np.ndarray  # (N,) int64, labels a user would hand to the tool
    labels_csv: Path

    @property
    def truth(self) -> np.ndarray:
        """(N,) bool: the given label is wrong."""
        return self.given != self.dataset.labels


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX (MNIST format) file as uint8: labels (N,) or images (N, 28, 28)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _cifar10(data_root: Path) -> Source:
    import pyarrow.parquet as pq

    folder = data_root / "cifar10"
    if not (folder / "train.parquet").is_file():
        raise DatasetUnavailable(
            f"CIFAR-10 not found: {folder / 'train.parquet'} is missing. Pass --data-root."
        )
    table = pq.read_table(folder / "train.parquet", columns=["index", "label", "jpeg"])
    order = np.argsort(table.column("index").to_numpy())
    jpegs = table.column("jpeg").to_pylist()
    names = tuple((folder / "classes.txt").read_text().split())
    labels = table.column("label").to_numpy().astype(np.int64)[order]
    return Source("cifar10", labels, names, names, ".jpg", lambda i: jpegs[order[i]])


def _fashion_mnist(data_root: Path) -> Source:
    folder = next((d for d in (data_root / "fashion-mnist", FASHION_MNIST_DIR) if d.is_dir()), None)
    if folder is None:
        raise DatasetUnavailable(
            f"Fashion-MNIST not found in {data_root / 'fashion-mnist'} or {FASHION_MNIST_DIR}. "
            "Install it with: apt-get install -y dataset-fashion-mnist"
        )
    images = _read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = _read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    ids, names = zip(*FASHION_CLASSES, strict=True)
    return Source("fashion-mnist", labels, ids, names, ".png", lambda i: _png(images[i]))


def _synthetic(n: int = 300, seed: int = 0) -> Source:
    """``n`` 32×32 images in 10 classes: a class colour plus per-image Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(SYNTHETIC_COLOURS)
    colours = np.array(list(SYNTHETIC_COLOURS.values()), dtype=np.float32)
    pixels = colours[labels][:, None, None, :] + rng.normal(0, 40, size=(n, 32, 32, 3))
    images = np.clip(pixels, 0, 255).astype(np.uint8)  # (n, 32, 32, 3)
    names = tuple(SYNTHETIC_COLOURS)
    return Source("synthetic", labels, names, names, ".png", lambda i: _png(images[i]))


def _many_classes(classes: int, n: int | None = None, seed: int = 0) -> Source:
    """``n`` (default 20 per class) 32×32 images in ``classes`` classes (2..100) a tiny model can learn,
    for the many-class benchmarks (``--classes K``): class k's top half has palette colour ``k // 10``,
    its bottom half colour ``k % 10``, plus pixel noise."""
    palette = np.array(list(SYNTHETIC_COLOURS.values()), dtype=np.float32)  # (10, 3)
    if not 2 <= classes <= len(palette) ** 2:
        raise ValueError(f"--classes {classes}: the synthetic many-class set has 2..{len(palette) ** 2}.")
    rng = np.random.default_rng(seed)
    labels = np.arange(n or 20 * classes, dtype=np.int64) % classes
    pixels = np.empty((len(labels), 32, 32, 3), dtype=np.float32)
    pixels[:, :16] = palette[labels // len(palette)][:, None, None, :]
    pixels[:, 16:] = palette[labels % len(palette)][:, None, None, :]
    pixels += rng.normal(0, 6, (len(labels), 1, 1, 3)) + rng.normal(0, 6, pixels.shape)
    images = np.clip(pixels, 0, 255).astype(np.uint8)
    ids = tuple(f"c{k:03d}" for k in range(classes))
    names = tuple(f"class {k:03d}" for k in range(classes))
    return Source(f"synthetic-k{classes}", labels, ids, names, ".png", lambda i: _png(images[i]))


def load_source(name: str, data_root: Path, *, size: int | None = None, classes: int | None = None) -> Source:
    """The named source (one of ``DATASETS``); raises DatasetUnavailable when its files are missing.

    ``size`` and ``classes`` only matter for ``synthetic``: how many images to generate (default 300,
    or 20 per class) and, when given, the many-class set of that many classes instead of 10 colours.
    """
    if name == "cifar10":
        return _cifar10(Path(data_root))
    if name == "fashion-mnist":
        return _fashion_mnist(Path(data_root))
    if name == "synthetic":
        return _many_classes(classes, size) if classes else _synthetic(size or 300)
    raise ValueError(f"Unknown dataset '{name}'. Choose one of: {', '.join(DATASETS)}.")


def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified random subset of size ``n`` (all indices when None or ≥ N)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    return np.sort(chosen)


def materialise(
    name: str,
    *,
    data_root: Path,
    cache_dir: Path,
    subset: int | None = None,
    seed: int = 0,
    classes: int | None = None,
) -> Dataset:
    """Write (once) the images, classes.txt and truth.csv of a dataset; reuse them when present.
    ``classes``: the synthetic many-class set (``synthetic`` only)."""
    source_name = f"{name}-k{classes}" if classes else name
    root = Path(cache_dir) / (f"{source_name}-{subset}-s{seed}" if subset else f"{source_name}-all")
    if (root / "truth.csv").is_file():
        return _read_dataset(source_name, root)
    source = load_source(name, data_root, size=subset, classes=classes)
    index = stratified_subset(source.labels, subset, seed)
    width = len(str(len(source.labels) - 1))
    paths = [f"images/{i:0{width}d}{source.suffix}" for i in index]
    partial = root / "images.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for i, path in zip(index, paths, strict=True):
        (partial / Path(path).name).write_bytes(source.encode(int(i)))
    shutil.rmtree(root / "images", ignore_errors=True)
    partial.rename(root / "images")
    lines = [f"{cid},{cname}" for cid, cname in zip(source.class_ids, source.class_names, strict=True)]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    truth = pd.DataFrame(
        {"path": paths, "label": np.array(source.class_ids)[source.labels[index]], "index": index}
    )
    truth.to_csv(root / "truth.csv", index=False)  # written last: its presence marks a complete folder
    return _read_dataset(source_name, root)


def _read_dataset(name: str, root: Path) -> Dataset:
    pairs = [line.split(",", 1) for line in (root / "classes.txt").read_text().splitlines() if line]
    class_ids, class_names = (tuple(column) for column in zip(*pairs, strict=True))
    truth = pd.read_csv(root / "truth.csv", dtype={"label": str})
    labels = truth["label"].map({cid: k for k, cid in enumerate(class_ids)}).to_numpy(np.int64)
    return Dataset(
        name, root, tuple(truth["path"]), labels, class_ids, class_names, truth["index"].to_numpy(np.int64)
    )


def parse_noise(spec: str) -> tuple[str, str]:
    """``'sym:0.4'`` → ``('sym', '0.4')``; checks the kind and that a rate lies in [0, 1]."""
    kind, _, value = spec.partition(":")
    if kind not in NOISE_KINDS or not value:
        raise ValueError(f"Noise '{spec}' is not KIND:VALUE with KIND one of {', '.join(NOISE_KINDS)}.")
    if kind != "file" and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"Noise rate in '{spec}' must lie in [0, 1].")
    return kind, value


def _flip_count(n: int, rate: float) -> int:
    return int(round(rate * n))


def symmetric_noise(labels: np.ndarray, rate: float, n_classes: int, seed: int) -> np.ndarray:
    """Given labels: ``round(rate * N)`` random rows moved to a uniformly drawn *other* class. (N,) int64."""
    rng = np.random.default_rng(seed)
    given = labels.copy()
    rows = rng.choice(len(labels), size=_flip_count(len(labels), rate), replace=False)
    given[rows] = (labels[rows] + rng.integers(1, n_classes, size=len(rows))) % n_classes
    return given


def asymmetric_noise(labels: np.ndarray, rate: float, class_ids: tuple[str, ...], seed: int) -> np.ndarray:
    """Given labels: per source class of ``ASYM_PAIRS``, ``round(rate * n_class)`` rows go to its pair."""
    missing = sorted((set(ASYM_PAIRS) | set(ASYM_PAIRS.values())) - set(class_ids))
    if missing:
        raise ValueError(
            f"asym noise uses the CIFAR-10 class pairs; this dataset lacks {', '.join(missing)}."
        )
    rng = np.random.default_rng(seed)
    given = labels.copy()
    for source, target in ASYM_PAIRS.items():
        members = np.flatnonzero(labels == class_ids.index(source))
        rows = rng.choice(members, size=_flip_count(len(members), rate), replace=False)
        given[rows] = class_ids.index(target)
    return given


def pairflip_noise(labels: np.ndarray, rate: float, n_classes: int, seed: int) -> np.ndarray:
    """Given labels: in every class ``c``, ``round(rate * n_c)`` random rows go to class ``c + 1`` (mod K),
    the "pair flip" of the co-teaching papers: every class sends and receives, one way round a ring."""
    rng = np.random.default_rng(seed)
    given = labels.copy()
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        rows = rng.choice(members, size=_flip_count(len(members), rate), replace=False)
        given[rows] = (c + 1) % n_classes
    return given


def instance_noise(labels: np.ndarray, probs: np.ndarray, rate: float) -> np.ndarray:
    """Given labels: the ``round(rate * N)`` rows whose most likely *other* class is most probable flip to it.

    ``probs`` (N, K) are out-of-sample class probabilities from a probe trained on the true labels (the
    harness fits its tuned 5-fold probe on a second backbone's features, see ``benchmarks.noise``), so the
    flips go to the class a pretrained model finds most similar for that very image: hard,
    feature-dependent noise.
    """
    others = probs.astype(np.float64).copy()
    others[np.arange(len(labels)), labels] = -np.inf
    second = others.argmax(axis=1)
    rows = np.argsort(-others.max(axis=1), kind="stable")[: _flip_count(len(labels), rate)]
    given = labels.copy()
    given[rows] = second[rows]
    return given


def file_noise(dataset: Dataset, path: Path) -> np.ndarray:
    """Given labels read from a file covering the whole source, picked at ``dataset.source_index``.

    ``.npy``: (N_source,) integer labels in source order (e.g. CIFAR-10N's ``worse_label``). ``.csv``:
    columns ``index,label`` with ``index`` the source position and ``label`` a class id or integer.
    """
    path = Path(path)
    if path.suffix == ".npy":
        full = np.load(path).astype(np.int64)
        return full[dataset.source_index]
    table = pd.read_csv(path, dtype={"label": str}).set_index("index")["label"]
    lookup = {cid: k for k, cid in enumerate(dataset.class_ids)} | {
        str(k): k for k in range(len(dataset.class_ids))
    }
    values = table.reindex(dataset.source_index)
    unknown = sorted(set(values[values.map(lookup).isna()].astype(str)))
    if unknown:
        raise ValueError(
            f"{path}: labels {unknown[:5]} are neither class ids nor integers, or rows are missing."
        )
    return values.map(lookup).to_numpy(np.int64)


def write_noisy_labels(dataset: Dataset, given: np.ndarray, noise: str, seed: int) -> NoisySet:
    """Write ``labels_<noise>_s<seed>.csv`` (path,label) next to the images and return the setting."""
    kind, value = parse_noise(noise)
    slug = f"{kind}-{Path(value).stem if kind == 'file' else value}"
    csv = dataset.root / f"labels_{slug}_s{seed}.csv"
    pd.DataFrame({"path": dataset.paths, "label": np.array(dataset.class_ids)[given]}).to_csv(
        csv, index=False
    )
    return NoisySet(dataset, noise, given, csv)
