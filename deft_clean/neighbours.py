"""Neighbour votes: what the given labels of a row's nearest neighbours in the detector's image embedding
say its class is.

Why: the prompts' class probabilities come from a model that trained on the row's own label, so they
lean toward it, wrong or not. A row is never its own neighbour, so its neighbours' labels are an opinion
its own label did not shape. ``detect`` averages the two (``--neighbour-weight``); on 2,000 CIFAR-10
images this ranked better than the prompts alone under every noise setting measured (docs/benchmarks.md).

The number of neighbours k is chosen without clean labels, as the k whose leave-one-out majority vote
best predicts the given labels: when noise does not depend on the image, agreement with the noisy labels
grows with agreement with the true ones. Above ``REFERENCE_CAP`` rows, neighbours are searched among a
seeded sample of that many rows, so the cost stays linear in the rows.
"""

from __future__ import annotations

import numpy as np
import torch

K_GRID = (5, 10, 20, 40, 80)  # neighbour counts to choose from
REFERENCE_CAP = 100_000  # rows searched for neighbours at most (a seeded sample beyond)


def neighbour_votes(
    features: torch.Tensor, labels: np.ndarray, num_classes: int, *, seed: int, chunk: int = 2048
) -> tuple[np.ndarray, int]:
    """(N, num_classes) share of each row's k nearest neighbours (cosine, itself excluded) given each
    label, and the k chosen from :data:`K_GRID`. ``features`` (N, E) on any device; ``labels`` (N,) given.
    Fewer than two rows: all-zero votes and k = 0 (no neighbour to ask)."""
    n = len(labels)
    reference = _reference(n, seed)
    k_max = min(max(K_GRID), len(reference) - 1)
    if k_max < 1:
        return np.zeros((n, num_classes), np.float32), 0
    found = _nearest(features, reference, k_max, chunk)  # (N, k_max) rows, nearest first
    grid = [k for k in K_GRID if k <= k_max] or [k_max]
    return _best_votes(labels[found], labels, num_classes, grid)


def _reference(n: int, seed: int) -> np.ndarray:
    """The rows searched for neighbours: all of them, or a seeded sample of ``REFERENCE_CAP``."""
    if n <= REFERENCE_CAP:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, REFERENCE_CAP, replace=False))


def _nearest(features: torch.Tensor, reference: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """(N, k) indices (into the rows) of each row's ``k`` most cosine-similar ``reference`` rows, itself
    excluded, nearest first; the search runs on the features' device, ``chunk`` rows at a time."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    ref_rows = torch.from_numpy(reference).to(unit.device)
    ref = unit[ref_rows]
    out = []
    for start in range(0, len(unit), chunk):
        rows = torch.arange(start, min(start + chunk, len(unit)), device=unit.device)
        sims = unit[rows] @ ref.T  # (B, R)
        sims[rows[:, None] == ref_rows[None, :]] = -torch.inf  # a row is not its own neighbour
        out.append(ref_rows[sims.topk(k, dim=1).indices].cpu())
    return torch.cat(out).numpy()


def _best_votes(
    neighbour_labels: np.ndarray, labels: np.ndarray, num_classes: int, grid: list[int]
) -> tuple[np.ndarray, int]:
    """The (N, num_classes) label shares among each row's first k neighbours ``neighbour_labels`` (N, k
    max, nearest first) and that k: the k of ``grid`` whose leave-one-out majority vote agrees most with
    the given ``labels`` (ties: the smaller k). One pass adds the neighbours column by column, so every
    k of the grid is read off the same running counts."""
    rows = np.arange(len(labels))
    counts = np.zeros((len(labels), num_classes), np.float32)
    best_agreement, best = -1.0, (counts, 0)
    for column in range(max(grid)):
        counts[rows, neighbour_labels[:, column]] += 1.0  # one label per row: no index repeats
        k = column + 1
        if k in grid:
            agreement = float(np.mean(counts.argmax(axis=1) == labels))
            if agreement > best_agreement:
                best_agreement, best = agreement, (counts / np.float32(k), k)
    return best
