"""Baseline noisy-label detectors on frozen image features (and one on fine-tuning losses).

Every detector returns a :class:`Detection`: boolean flags "this label is wrong" and a noise score
where HIGHER means more likely wrong, both shape (N,). Features are (N, D) float32 from
``deft_clean.embed.embed_images`` (L2-normalised); labels are the given (noisy) labels, (N,) int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class Detection:
    """A detector's verdict: ``flags`` (N,) bool and ``scores`` (N,) float, higher = more likely wrong."""

    flags: np.ndarray
    scores: np.ndarray


def _probe(seed: int) -> object:
    """The linear probe shared by the baselines: standardised features → multinomial logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))


def _full_probs(probs: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Widen (N, len(classes)) probabilities to (N, n_classes); absent classes get 0."""
    full = np.zeros((len(probs), n_classes), dtype=np.float64)
    full[:, classes] = probs
    return full


def cross_val_probs(
    features: np.ndarray, labels: np.ndarray, *, n_classes: int, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-sample class probabilities (N, n_classes) from ``folds``-fold cross-validated logistic
    regression: every row is predicted by a probe that never saw it."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(_probe(seed), features, labels, cv=splitter, method="predict_proba")
    return _full_probs(probs, np.unique(labels), n_classes)


def cleanlab_baseline(probs: np.ndarray, labels: np.ndarray) -> Detection:
    """Confident learning (the real ``cleanlab`` package, default options) on out-of-sample ``probs``
    (N, K): flags from ``find_label_issues``, scores ``1 - get_label_quality_scores`` (self-confidence)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flags = find_label_issues(labels, probs)
    quality = get_label_quality_scores(labels, probs)
    return Detection(np.asarray(flags, dtype=bool), 1.0 - np.asarray(quality, dtype=np.float64))


def knn_baseline(features: np.ndarray, labels: np.ndarray, *, k: int = 10, chunk: int = 2048) -> Detection:
    """kNN label agreement: the fraction of a sample's ``k`` nearest neighbours (cosine, itself excluded)
    that carry its given label. Flag when fewer than half agree; score = 1 - agreement."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float32)
    agree = np.empty(len(labels), dtype=np.float64)
    for start in range(0, len(labels), chunk):
        sims = unit[start : start + chunk] @ unit.T  # (B, N)
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # a sample is not its own neighbour
        neighbours = np.argpartition(-sims, k, axis=1)[:, :k]  # (B, k)
        agree[start : start + chunk] = (labels[neighbours] == labels[start : start + chunk, None]).mean(
            axis=1
        )
    return Detection(agree < 0.5, 1.0 - agree)


def small_loss_baseline(
    features: np.ndarray, labels: np.ndarray, *, n_classes: int, rate: float, seed: int = 0
) -> Detection:
    """Oracle-rate small-loss: fit the linear probe on all (noisy) labels, score each sample by its
    training cross-entropy, and flag the ``round(rate * N)`` highest losses (``rate`` = the TRUE noise
    rate, which a real user does not know: an upper bound for loss-ranking methods)."""
    probe = _probe(seed).fit(features, labels)
    probs = _full_probs(probe.predict_proba(features), probe.classes_, n_classes)
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
