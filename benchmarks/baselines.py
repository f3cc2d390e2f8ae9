"""Baseline noisy-label detectors on frozen image features (and one on fine-tuning losses).

Every detector returns a :class:`Detection`: boolean flags "this label is wrong" and a noise score
where HIGHER means more likely wrong, both shape (N,). Features are (N, D) float32 from
``deft_clean.embed.embed_images`` (L2-normalised); labels are the given (noisy) labels, (N,) int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class Detection:
    """A detector's verdict: ``flags`` (N,) bool and ``scores`` (N,) float, higher = more likely wrong."""

    flags: np.ndarray
    scores: np.ndarray


# The C grid of the probe's inner cross-validation, from heavy regularisation to C = 10 (the old fixed
# C = 1 lies inside). sklearn's loss sums over rows, so one C regularises the less the more rows there
# are: 2,000 rows chose 1e-3 to 1e-2, 40,000 the old grid's lowest value, 1e-4; it now reaches 1e-6.
C_GRID = tuple(float(c) for c in np.logspace(-6, 1, 8))
K_GRID = (5, 10, 20, 40, 80)  # neighbour counts the kNN baseline chooses from


@dataclass(frozen=True)
class OutOfSample:
    """Cross-validated class probabilities ``probs`` (N, K), each row predicted by a probe that never saw
    it, and the C each outer fold's probe chose by its inner cross-validation."""

    probs: np.ndarray
    chosen_c: tuple[float, ...]


def tuned_probe(seed: int, *, inner_folds: int = 3) -> Pipeline:
    """The linear probe shared by the baselines, as a careful user builds it: standardised features →
    multinomial logistic regression whose C (from ``C_GRID``) maximises the inner-CV log-likelihood.
    A fixed C = 1 overfits 2,000 rows of 1,280-d features and understates every probe-based baseline."""
    inner = StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed)
    search = LogisticRegressionCV(
        Cs=list(C_GRID), cv=inner, scoring="neg_log_loss", max_iter=1000, random_state=seed
    )
    return make_pipeline(StandardScaler(), search)


def _full_probs(probs: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Widen (N, len(classes)) probabilities to (N, n_classes); absent classes get 0."""
    full = np.zeros((len(probs), n_classes), dtype=np.float64)
    full[:, classes] = probs
    return full


def cross_val_probs(
    features: np.ndarray, labels: np.ndarray, *, n_classes: int, folds: int = 5, seed: int = 0
) -> OutOfSample:
    """Out-of-sample class probabilities from ``folds``-fold cross-validation of :func:`tuned_probe`
    (whose C is chosen inside each training fold, so the held-out fold never influences it)."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = np.zeros((len(labels), n_classes), dtype=np.float64)
    chosen = []
    for train, held_out in splitter.split(features, labels):
        probe = tuned_probe(seed).fit(features[train], labels[train])
        probs[held_out] = _full_probs(probe.predict_proba(features[held_out]), probe.classes_, n_classes)
        chosen.append(float(np.ravel(probe[-1].C_)[0]))  # one C shared by all classes
    return OutOfSample(probs, tuple(chosen))


def cleanlab_baseline(probs: np.ndarray, labels: np.ndarray) -> Detection:
    """Confident learning (the real ``cleanlab`` package, default options) on out-of-sample ``probs``
    (N, K): flags from ``find_label_issues``, scores ``1 - get_label_quality_scores`` (self-confidence)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flags = find_label_issues(labels, probs)
    quality = get_label_quality_scores(labels, probs)
    return Detection(np.asarray(flags, dtype=bool), 1.0 - np.asarray(quality, dtype=np.float64))


def _neighbours(features: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """(N, k) indices of each row's ``k`` nearest neighbours by cosine, nearest first, itself excluded."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float32)
    order = np.empty((len(unit), k), dtype=np.int64)
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.T  # (B, N)
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # a sample is not its own neighbour
        top = np.argpartition(-sims, k, axis=1)[:, :k]  # (B, k), unordered
        nearest_first = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        order[start : start + chunk] = np.take_along_axis(top, nearest_first, axis=1)
    return order


def _votes(neighbour_labels: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """(N, n_classes) label counts among each row's ``k`` nearest neighbours."""
    return (neighbour_labels[:, :k, None] == np.arange(n_classes)).sum(axis=1)


def choose_k(neighbour_labels: np.ndarray, labels: np.ndarray, grid: tuple[int, ...] = K_GRID) -> int:
    """The k of ``grid`` whose leave-one-out kNN majority vote best predicts the GIVEN labels.

    ``neighbour_labels`` (N, max(grid)) are the labels of each row's neighbours, nearest first. Under
    noise that does not depend on the features, agreement with the noisy labels is an increasing affine
    function of agreement with the true ones, so this choice needs no clean labels (ties → smaller k)."""
    n_classes = int(max(labels.max(), neighbour_labels.max())) + 1
    accuracy = [np.mean(_votes(neighbour_labels, k, n_classes).argmax(axis=1) == labels) for k in grid]
    return grid[int(np.argmax(accuracy))]


def knn_baseline(features: np.ndarray, labels: np.ndarray, *, k: int | None = None) -> tuple[Detection, int]:
    """kNN vote: flag a sample when its given label is not (tied for) the most common label among its
    ``k`` nearest neighbours (cosine, itself excluded); score = 1 - the share of neighbours that agree.
    ``k=None`` chooses k by :func:`choose_k` (the vote's own accuracy); the k used is returned beside the
    detection. (A fixed "fewer than half agree" rule flags most rows at high noise rates or large k.)"""
    grid = K_GRID if k is None else (k,)
    neighbour_labels = labels[_neighbours(features, min(max(grid), len(labels) - 1))]  # (N, max k)
    k = choose_k(neighbour_labels, labels, grid) if k is None else k
    votes = _votes(neighbour_labels, k, int(max(labels.max(), neighbour_labels.max())) + 1)  # (N, C)
    given_votes = votes[np.arange(len(labels)), labels]
    return Detection(given_votes < votes.max(axis=1), 1.0 - given_votes / k), k


def small_loss_baseline(probs: np.ndarray, labels: np.ndarray, *, rate: float) -> Detection:
    """Oracle-rate small-loss on out-of-sample ``probs`` (N, K) (:func:`cross_val_probs`): score each
    sample by the cross-entropy of its given label and flag the ``round(rate * N)`` highest losses
    (``rate`` = the TRUE noise rate, which a real user does not know: an upper bound for loss ranking)."""
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    flags = np.zeros(len(labels), dtype=bool)
    flags[np.argsort(-loss, kind="stable")[: int(round(rate * len(labels)))]] = True
    return Detection(flags, loss)


def gmm_baseline(losses: np.ndarray, *, seed: int = 0) -> Detection:
    """DivideMix-style split: a two-component GMM on min-max-normalised per-sample losses (N,); the
    component with the smaller mean is clean, a sample is flagged when its clean posterior ≤ 0.5.
    Score = 1 - clean posterior."""
    span = max(float(losses.max() - losses.min()), 1e-12)
    scaled = ((losses - losses.min()) / span).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
    gmm.fit(scaled)
    p_clean = gmm.predict_proba(scaled)[:, int(np.argmin(gmm.means_[:, 0]))]
    return Detection(p_clean <= 0.5, 1.0 - p_clean)


def mismatch_baseline(probs: np.ndarray, labels: np.ndarray) -> Detection:
    """Flag when the predicted class (argmax of ``probs`` (N, K)) differs from the given label;
    score = 1 - probability of the given label."""
    return Detection(probs.argmax(axis=1) != labels, 1.0 - probs[np.arange(len(labels)), labels])


def zero_shot_probs(
    image_features: np.ndarray, text_features: np.ndarray, *, scale: float = 100.0
) -> np.ndarray:
    """CLIP zero-shot class probabilities (N, K): softmax of ``scale`` × cosine similarity between image
    features (N, D) and class-prompt text features (K, D)."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    logits = scale * unit(image_features.astype(np.float64)) @ unit(text_features.astype(np.float64)).T
    logits -= logits.max(axis=1, keepdims=True)
    expo = np.exp(logits)
    return expo / expo.sum(axis=1, keepdims=True)
