"""A linear probe's leave-one-out opinion of every row's class, in closed form.

Why: the prompts' class probabilities come from a model that trained on the row's own label, and the
neighbour votes come from an embedding that model shaped. A linear probe on the untuned features, fitted
without the row, is the out-of-sample opinion a careful user would compute by hand (and what cleanlab
is usually fed). ``detect`` mixes it into the class probabilities (``--probe-weight``); on 2,000
CIFAR-10 images the mix with it ranked better than prompts and votes alone under every noise setting
measured (docs/benchmarks.md, "Linear probe"). ``detect`` fits the probe twice: on every row, then on the rows
that first verdict kept (``fitted_on``), so the suspects' labels no longer pull the fit towards their
mistakes; the flagged rows are then predicted by a fit that never saw them, the kept ones still each by
the fit without it.

The probe is ridge regression of the one-hot given labels on the L2-normalised features, with an
unpenalised intercept. Features that are all non-negative (a convolutional tower's pooled activations, as
the ``offline`` trunk's) are square-rooted first (the Hellinger map, which keeps a few large activations
from deciding every distance): on 2,000 CIFAR-10 images the rank's AUROC rose in 51 of 60 noisy sets and
in all 12 held-out ones, by 0.001-0.005 on average; the signed square root of signed features (a
projection, as a CLIP embedding is) lowered the probe's AUROC, so those are used as they are
(docs/benchmarks.md, "The probe's features: square roots").

Ridge has an exact leave-one-out identity: with hat-matrix diagonal ``h_i``, the prediction for row i of
the fit without row i is ``y_i + (ŷ_i - y_i) / (1 - h_i)``. One eigendecomposition
(of the (F, F) scatter matrix of the centred rows, or of their (N, N) Gram matrix when there are fewer
rows than features: the same non-zero spectrum) therefore gives every row's leave-one-out prediction
under every penalty of the grid, with no folds and no clean labels. The penalty is the one with the
lowest leave-one-out squared error (over at most :data:`SELECTION_ROWS` evenly spaced fitted rows): one number
out of 13, the only part of the fit a row's own label touches (in the second fit, also which other
rows the first verdict flagged). Cost: three passes over the rows in
blocks (centre; scatter; predictions) and one over the selection rows, O(N·F² + N·F·K), and one
eigendecomposition, in float64 (the identity subtracts nearly equal numbers) on CUDA or else the CPU
(Apple's MPS lacks both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

PENALTY_GRID = tuple(10.0 ** (e / 2) for e in range(-6, 7))  # x the scatter's mean eigenvalue
MAX_FEATURES = 8192  # wider features are not probed (the (F, F) matrix and its eigendecomposition)
MIN_ROWS = 3  # a leave-one-out fit needs at least two other rows
SELECTION_ROWS = 8192  # rows whose leave-one-out error chooses the penalty (a fixed sample above)

Rows = Callable[[slice | torch.Tensor], torch.Tensor]  # rows (a block or indices) → (B, ...)


@dataclass(frozen=True)
class Probe:
    """Out-of-sample class probabilities ``probs`` (N, K) (the ridge predictions clipped at 0 and
    normalised; a fitted row's by the fit without it, any other row's by the fit), the ``penalty``
    chosen (relative to the mean eigenvalue), the rows' ``agreement`` (share whose prediction is
    their given label), and whether it fitted the features' ``square_roots`` (all were non-negative)."""

    probs: np.ndarray
    penalty: float
    agreement: float
    square_roots: bool


def loo_probe(
    features: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    *,
    fitted_on: np.ndarray | None = None,
    chunk: int = 1 << 22,
) -> Probe | None:
    """The leave-one-out ridge probe of ``features`` (N, F) on any device against the given ``labels``
    (N,); None when it cannot be fitted (fewer than :data:`MIN_ROWS` rows to fit or 2 classes, features
    wider than :data:`MAX_FEATURES`, non-finite features, or a failed eigendecomposition).
    ``fitted_on`` (N,) bool: the rows the ridge fits (default: all). Each of them is predicted by the fit
    without it; every other row by the fit as it is, which never saw that row either. ``chunk``:
    elements of a row block's temporaries (the features are read block by block; with fewer fitted rows
    than features the centred fitted rows and their Gram matrix are held whole)."""
    n, width = features.shape if features.ndim == 2 else (0, 0)
    if fitted_on is not None and (fitted_on.shape != (n,) or fitted_on.dtype != bool):
        raise ValueError(f"fitted_on must be a ({n},) bool mask, not {fitted_on.dtype} {fitted_on.shape}")
    fitted = np.ones(n, bool) if fitted_on is None else fitted_on
    if fitted.sum() < MIN_ROWS or num_classes < 2 or not 0 < width <= MAX_FEATURES:
        return None
    if not bool(torch.isfinite(features).all()):
        return None
    device = features.device if features.device.type == "cuda" else torch.device("cpu")
    y = torch.as_tensor(labels, dtype=torch.int64, device=device)
    member = torch.as_tensor(fitted, device=device)
    step = max(1, chunk // max(width, num_classes))
    blocks = [slice(start, start + step) for start in range(0, n, step)]

    hellinger = bool(features.amin() >= 0)  # pooled activations: compared by their square roots

    def unit(rows: slice | torch.Tensor) -> torch.Tensor:  # (B, F) L2-normalised rows in float64
        x = features[rows].to(device=device, dtype=torch.float64)
        x = x.sqrt() if hellinger else x
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    size = int(fitted.sum())
    centre = sum(unit(part)[member[part]].sum(dim=0) for part in blocks) / size
    try:
        eigvals, project, by_class = _spectrum(unit, centre, blocks, y, member, num_classes)
    except torch.linalg.LinAlgError:
        return None
    fit = _RidgeFit(eigvals, by_class, torch.bincount(y[member], minlength=num_classes).double() / size, size)
    scale = max(float(eigvals.sum()) / width, 1e-12)  # the (F, F) scatter's mean eigenvalue, either way
    best = _best_penalty(fit, [p * scale for p in PENALTY_GRID], project, y, np.flatnonzero(fitted), step)
    probs = torch.empty(n, num_classes, device=device)
    for part in blocks:
        onehot = _onehot(y[part], num_classes)
        residual = fit.residual(project(part), onehot, PENALTY_GRID[best] * scale, member[part])
        probs[part] = _normalised((onehot + residual).clamp_min(0)).float()
    agreement = float((probs.argmax(dim=1) == y).float().mean())
    return Probe(probs.cpu().numpy(), PENALTY_GRID[best], agreement, hellinger)


def _spectrum(
    unit: Rows,
    centre: torch.Tensor,
    blocks: list[slice],
    labels: torch.Tensor,
    member: torch.Tensor,
    num_classes: int,
) -> tuple[torch.Tensor, Rows, torch.Tensor]:
    """The spectrum of the fitted rows (``member`` (N,) bool) of ``unit``, centred: eigenvalues (R,)
    (clipped at 0), a function giving any rows in the eigenbasis (B, R), and Zᵀ Y (R, K) of the fitted
    rows Z. Fewer fitted rows than features: from their (N', N') Gram matrix (cheaper to decompose; the
    basis is Xᵀ V / sqrt(eigenvalue), null directions dropped, as they carry no fit); else from the
    (F, F) scatter and Xᵀ Y of the centred fitted rows X, summed block by block and turned into the
    eigenbasis."""
    width = centre.shape[0]
    fitted_labels = labels[member]
    if len(fitted_labels) <= width:
        centred = torch.cat([unit(part)[member[part]] - centre for part in blocks])
        eigvals, vectors = torch.linalg.eigh(centred @ centred.T)
        kept = eigvals > eigvals.max().clamp_min(0) * 1e-12
        basis = centred.T @ (vectors[:, kept] / eigvals[kept].sqrt())
        z = vectors[:, kept] * eigvals[kept].sqrt()  # = centred @ basis
        return (
            eigvals[kept],
            lambda rows: (unit(rows) - centre) @ basis,
            z.T @ _onehot(fitted_labels, num_classes),
        )
    scatter = torch.zeros(width, width, dtype=torch.float64, device=centre.device)
    by_label = torch.zeros(width, num_classes, dtype=torch.float64, device=centre.device)
    for part in blocks:
        centred = unit(part)[member[part]] - centre
        scatter += centred.T @ centred
        by_label += centred.T @ _onehot(labels[part][member[part]], num_classes)
    eigvals, basis = torch.linalg.eigh(scatter)
    return eigvals.clamp_min(0), lambda rows: (unit(rows) - centre) @ basis, basis.T @ by_label


def _best_penalty(
    fit: _RidgeFit, penalties: list[float], project: Rows, labels: torch.Tensor, fitted: np.ndarray, step: int
) -> int:
    """Index of the penalty with the lowest leave-one-out squared error over at most
    :data:`SELECTION_ROWS` evenly spaced ``fitted`` rows (indices; all of them below that), in blocks of
    ``step`` rows."""
    spaced = np.unique(np.linspace(0, len(fitted) - 1, min(len(fitted), SELECTION_ROWS)).round())
    chosen = torch.from_numpy(fitted[spaced.astype(np.int64)]).to(labels.device)
    errors = np.zeros(len(penalties))
    for start in range(0, len(chosen), step):
        rows = chosen[start : start + step]
        z, onehot = project(rows), _onehot(labels[rows], fit.by_class.shape[1])
        held_in = torch.ones(len(rows), dtype=torch.bool, device=labels.device)
        for i, penalty in enumerate(penalties):
            errors[i] += float((fit.residual(z, onehot, penalty, held_in) ** 2).sum())
    return int(np.argmin(errors))


@dataclass(frozen=True)
class _RidgeFit:
    """Ridge of one-hot labels on the centred fitted rows, in the eigenbasis of their spectrum:
    ``eigvals`` (R,), ``by_class`` (R, K) = Zᵀ Y (Z: the fitted rows in that basis), ``prior`` (K,) their
    label shares (the intercept), ``rows`` how many they are."""

    eigvals: torch.Tensor
    by_class: torch.Tensor
    prior: torch.Tensor
    rows: int

    def residual(
        self, z: torch.Tensor, onehot: torch.Tensor, penalty: float, held_in: torch.Tensor
    ) -> torch.Tensor:
        """(B, K) out-of-sample prediction minus label of the rows ``z`` (B, R), ``onehot`` (B, K). A row
        the ridge fits (``held_in`` (B,) True) gets the leave-one-out identity: its in-sample residual
        divided by ``1 - h_i`` (``h_i``: its leverage, intercept included); any other row the fit's own
        prediction."""
        inverse = 1.0 / (self.eigvals + penalty)
        fitted = (z * inverse) @ self.by_class + self.prior
        leverage = (z * z) @ inverse + 1.0 / self.rows
        shrink = torch.where(held_in, (1.0 - leverage).clamp_min(1e-9), torch.ones_like(leverage))
        return (fitted - onehot) / shrink[:, None]


def _onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)


def _normalised(probs: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum; a row with nothing above 0 becomes uniform."""
    total = probs.sum(dim=1, keepdim=True)
    uniform = torch.full_like(probs, 1.0 / probs.shape[1])
    return torch.where(total > 0, probs / total.clamp_min(1e-12), uniform)
