"""A linear probe's leave-one-out opinion of every row's class, in closed form.

Why: the prompts' class probabilities come from a model that trained on the row's own label, and the
neighbour votes come from an embedding that model shaped. A linear probe on the frozen features, fitted
without the row, is the out-of-sample opinion a careful user would compute by hand (and what cleanlab
is usually fed). ``detect`` mixes it into the class probabilities (``--probe-weight``); on 2,000
CIFAR-10 images the three-way mix ranked better than prompts and votes under every noise setting
measured (docs/benchmarks.md, "Linear probe").

The probe is ridge regression of the one-hot given labels on the L2-normalised features, with an
unpenalised intercept. Ridge has an exact leave-one-out identity: with hat-matrix diagonal ``h_i``, the
prediction for row i of the fit without row i is ``y_i + (ŷ_i - y_i) / (1 - h_i)``. One eigendecomposition
of the (F, F) covariance therefore gives every row's leave-one-out prediction under every penalty of the
grid, with no folds and no clean labels. The penalty is the one with the lowest leave-one-out squared
error (over at most :data:`SELECTION_ROWS` evenly spaced rows): one number out of 13, the only part of
the fit a row's own label touches. Cost: two passes over the rows, O(N·F²), an F³ solve and
O(N·F·K) for the predictions, in row blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

PENALTY_GRID = tuple(10.0 ** (e / 2) for e in range(-6, 7))  # x the mean eigenvalue of the covariance
MAX_FEATURES = 8192  # wider features are not probed (the F³ solve and the (F, F) matrix grow too large)
MIN_ROWS = 3  # a leave-one-out fit needs at least two other rows
SELECTION_ROWS = 8192  # rows whose leave-one-out error chooses the penalty (a fixed sample above)


@dataclass(frozen=True)
class Probe:
    """Leave-one-out class probabilities ``probs`` (N, K) (the ridge predictions clipped at 0 and
    normalised), the ``penalty`` chosen (relative to the mean eigenvalue) and the rows' ``agreement``
    (share whose leave-one-out prediction is their given label)."""

    probs: np.ndarray
    penalty: float
    agreement: float


def loo_probe(
    features: torch.Tensor, labels: np.ndarray, num_classes: int, *, chunk: int = 1 << 22
) -> Probe | None:
    """The leave-one-out ridge probe of ``features`` (N, F) on any device against the given ``labels``
    (N,); None when it cannot be fitted (fewer than :data:`MIN_ROWS` rows or 2 classes, features wider
    than :data:`MAX_FEATURES`, or non-finite features). ``chunk``: elements of a row block's temporaries
    (the features are read block by block in float64, never copied whole)."""
    n, width = features.shape if features.ndim == 2 else (0, 0)
    if n < MIN_ROWS or num_classes < 2 or not 0 < width <= MAX_FEATURES:
        return None
    if not bool(torch.isfinite(features).all()):
        return None
    dtype, y = _precise(features.device), torch.as_tensor(labels, device=features.device)
    step = max(1, chunk // max(width, num_classes))
    blocks = [slice(start, start + step) for start in range(0, n, step)]

    def unit(rows: slice | torch.Tensor) -> torch.Tensor:  # (B, F) L2-normalised rows, in float64
        x = features[rows].to(dtype)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    centre = sum(unit(part).sum(dim=0) for part in blocks) / n
    eigvals, project, by_class = _spectrum(unit, centre, y, blocks, num_classes)
    prior = torch.bincount(y, minlength=num_classes).to(dtype) / n
    fit = _RidgeFit(eigvals, by_class, prior, n)
    scale = float(eigvals.sum()) / width  # the mean eigenvalue of the (F, F) scatter, either way
    penalties = [p * max(scale, 1e-12) for p in PENALTY_GRID]
    sample = _sample(n, y.device)
    best = _best_penalty(fit, penalties, project(sample), y[sample])
    probs = torch.empty(n, num_classes, device=features.device)
    for part in blocks:
        onehot = _onehot(y[part], num_classes, dtype)
        residual = fit.loo_residual(project(part), onehot, penalties[best])
        probs[part] = _normalised((onehot + residual).clamp_min(0)).float()
    agreement = float((probs.argmax(dim=1) == y).float().mean())
    return Probe(probs.cpu().numpy(), PENALTY_GRID[best], agreement)


Rows = Callable[[slice | torch.Tensor], torch.Tensor]


def _spectrum(
    unit: Rows, centre: torch.Tensor, labels: torch.Tensor, blocks: list[slice], num_classes: int
) -> tuple[torch.Tensor, Rows, torch.Tensor]:
    """The centred rows' spectrum: eigenvalues (R,) (clipped at 0), a function giving rows Z (B, R) in
    the eigenbasis, and Zᵀ Y (R, K). Fewer rows than features: from the (N, N) Gram matrix (the same
    non-zero eigenvalues, Z = eigenvectors · sqrt(eigenvalues), cheaper to decompose); else from the
    (F, F) scatter, accumulated block by block."""
    n, width = len(labels), centre.shape[0]
    if n <= width:
        centred = torch.cat([unit(part) - centre for part in blocks])
        eigvals, vectors = torch.linalg.eigh(centred @ centred.T)
        z = vectors * eigvals.clamp_min(0).sqrt()
        by_class = torch.zeros(n, num_classes, dtype=z.dtype, device=z.device).index_add_(1, labels, z.T)
        return eigvals.clamp_min(0), lambda rows: z[rows], by_class
    scatter = torch.zeros(width, width, dtype=centre.dtype, device=centre.device)
    by_label = torch.zeros(width, num_classes, dtype=centre.dtype, device=centre.device)  # Xᵀ Y, centred
    for part in blocks:
        centred = unit(part) - centre
        scatter += centred.T @ centred
        by_label.index_add_(1, labels[part], centred.T)
    eigvals, basis = torch.linalg.eigh(scatter)
    return eigvals.clamp_min(0), lambda rows: (unit(rows) - centre) @ basis, basis.T @ by_label


def _sample(n: int, device: torch.device) -> torch.Tensor:
    """At most :data:`SELECTION_ROWS` evenly spaced rows (all of them below that), whose leave-one-out
    errors choose the penalty: the mean error of a fixed sample, at a fixed cost per penalty."""
    return torch.from_numpy(
        np.unique(np.linspace(0, n - 1, min(n, SELECTION_ROWS)).round().astype(np.int64))
    ).to(device)


def _best_penalty(fit: _RidgeFit, penalties: list[float], z: torch.Tensor, labels: torch.Tensor) -> int:
    """Index of the penalty whose leave-one-out squared error over rows ``z`` (S, F) is lowest."""
    onehot = _onehot(labels, fit.by_class.shape[1], z.dtype)
    errors = [float((fit.loo_residual(z, onehot, penalty) ** 2).sum()) for penalty in penalties]
    return int(np.argmin(errors))


@dataclass(frozen=True)
class _RidgeFit:
    """Ridge of one-hot labels on centred features, in the covariance's eigenbasis: ``eigvals`` (F,),
    ``by_class`` (F, K) = Zᵀ Y (Z: the centred rows in that basis), ``prior`` (K,) the label shares
    (the intercept), ``rows`` N."""

    eigvals: torch.Tensor
    by_class: torch.Tensor
    prior: torch.Tensor
    rows: int

    def loo_residual(self, z: torch.Tensor, onehot: torch.Tensor, penalty: float) -> torch.Tensor:
        """(B, K) leave-one-out prediction minus label of the rows ``z`` (B, F) (projected features),
        ``onehot`` (B, K): the in-sample residual divided by ``1 - h_i``."""
        inverse = 1.0 / (self.eigvals + penalty)
        fitted = (z * inverse) @ self.by_class + self.prior
        leverage = (z * z) @ inverse + 1.0 / self.rows
        return (fitted - onehot) / (1.0 - leverage).clamp_min(1e-9)[:, None]


def _onehot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).to(dtype)


def _normalised(probs: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum; a row with nothing above 0 becomes uniform."""
    total = probs.sum(dim=1, keepdim=True)
    uniform = torch.full_like(probs, 1.0 / probs.shape[1])
    return torch.where(total > 0, probs / total.clamp_min(1e-12), uniform)


def _precise(device: torch.device) -> torch.dtype:
    """float64 where the device has it (the solve subtracts nearly equal numbers), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64
