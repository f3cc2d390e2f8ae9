"""Build the bundled example: 300 Fashion-MNIST test images with 20% planted wrong labels.

Reads the IDX files of the Debian package ``dataset-fashion-mnist`` (``apt-get install -y
dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist/) and writes, next to this
script, ``fashion-mnist/``: ``images/<index>.png`` (28x28 grey, ``index`` = position in the test
set), ``labels.csv`` (``path,label``: the labels a user would hand to deft-clean, some wrong),
``truth.csv`` (``path,label,is_noisy``: the true label and whether the given one was planted),
``classes.txt`` (``id,name`` per line, in Fashion-MNIST label order).

The output is deterministic: the first ``--per-class`` images of each class in file order, and
the wrong labels drawn with ``numpy.random.default_rng(--seed)``. Run it again and ``git diff``
shows nothing.

    python examples/make_fashion_mnist.py [--source DIR] [--per-class 30] [--noise 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# (id used in labels.csv, readable name used in prompts), in Fashion-MNIST label order 0..9.
CLASSES = [
    ("T-shirt_top", "T-shirt or top"),
    ("Trouser", "trouser"),
    ("Pullover", "pullover"),
    ("Dress", "dress"),
    ("Coat", "coat"),
    ("Sandal", "sandal"),
    ("Shirt", "shirt"),
    ("Sneaker", "sneaker"),
    ("Bag", "bag"),
    ("Ankle_boot", "ankle boot"),
]
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = Path(__file__).resolve().parent / "fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array: labels (N,) or images (N, 28, 28)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def pick_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, in file order, shape (K * per_class,)."""
    chosen = [np.flatnonzero(labels == k)[:per_class] for k in range(len(CLASSES))]
    return np.sort(np.concatenate(chosen))


def plant_noise(true: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Given labels with ``round(fraction * N)`` rows flipped to a uniformly drawn *other* class."""
    rng = np.random.default_rng(seed)
    given = true.copy()
    flipped = rng.choice(len(true), size=round(fraction * len(true)), replace=False)
    offsets = rng.integers(1, len(CLASSES), size=len(flipped))  # 1..K-1: never the true class
    given[flipped] = (true[flipped] + offsets) % len(CLASSES)
    return given


def write_example(source: Path, per_class: int, fraction: float, seed: int) -> None:
    images = read_idx(source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(source / "t10k-labels-idx1-ubyte.gz")
    indices = pick_indices(labels, per_class)
    true = labels[indices].astype(np.int64)
    given = plant_noise(true, fraction, seed)

    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR / "images", ignore_errors=True)
    (OUT_DIR / "images").mkdir(parents=True, exist_ok=True)
    paths = [f"images/{i:05d}.png" for i in indices]
    for path, i in zip(paths, indices, strict=True):
        Image.fromarray(images[i]).save(OUT_DIR / path, optimize=True)

    with open(OUT_DIR / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows((p, CLASSES[g][0]) for p, g in zip(paths, given, strict=True))
    with open(OUT_DIR / "truth.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "is_noisy"])
        writer.writerows(
            (p, CLASSES[t][0], str(t != g).lower()) for p, t, g in zip(paths, true, given, strict=True)
        )
    (OUT_DIR / "classes.txt").write_text("".join(f"{cid},{name}\n" for cid, name in CLASSES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="Folder with the *-ubyte.gz files."
    )
    parser.add_argument("--per-class", type=int, default=30, help="Images per class (first N in file order).")
    parser.add_argument(
        "--noise", type=float, default=0.2, help="Fraction of labels replaced by another class."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for choosing and flipping the noisy rows.")
    args = parser.parse_args()
    write_example(args.source, args.per_class, args.noise, args.seed)


if __name__ == "__main__":
    main()
