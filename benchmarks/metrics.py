"""Detection quality of noisy-label flags and scores against the planted truth.

Convention used throughout the harness: a *noise score* is higher for samples more likely to be
mislabelled (deft's ``1 - p_clean``, cleanlab's ``1 - label_quality``, ...).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

METRIC_NAMES = ("precision", "recall", "f1", "auroc", "auprc")
# The DeFT paper's view of the same verdict: how clean is the set a user keeps, and how much of the clean
# data it keeps.
CLEAN_SET_METRICS = ("clean_precision", "clean_recall")


def detection_metrics(
    flags: np.ndarray, scores: np.ndarray | None, truth: np.ndarray
) -> dict[str, float | None]:
    """Precision, recall and F1 of ``flags``; AUROC and AUPRC of ``scores``, all against ``truth``.

    Parameters
    ----------
    flags : (N,) bool — the method's verdict "this label is wrong".
    scores : (N,) float or None — noise score, higher = more likely wrong. ``None`` (a method that only
        flags) ranks by the flags themselves, so AUROC/AUPRC then describe a two-level ranking.
    truth : (N,) bool — the label was planted wrong.

    Returns a dict with ``METRIC_NAMES`` and ``CLEAN_SET_METRICS`` keys plus ``n_flagged`` and
    ``n_noisy``. ``clean_precision`` is the share of truly clean rows among the kept (unflagged) ones and
    ``clean_recall`` the share of clean rows that are kept (the DeFT paper's metrics). A precision is 0
    when its set is empty; AUROC/AUPRC are ``None`` when ``truth`` has a single class (undefined).
    """
    flags, truth = np.asarray(flags, dtype=bool), np.asarray(truth, dtype=bool)
    ranking = flags.astype(np.float64) if scores is None else np.asarray(scores, dtype=np.float64)
    if not (flags.shape == truth.shape == ranking.shape) or flags.ndim != 1:
        raise ValueError(
            f"flags {flags.shape}, scores {ranking.shape} and truth {truth.shape} must be equal (N,)."
        )
    hits = int(np.sum(flags & truth))
    precision = hits / max(int(flags.sum()), 1)
    recall = hits / max(int(truth.sum()), 1)
    f1 = 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)
    kept_clean = int(np.sum(~flags & ~truth))
    both = 0 < truth.sum() < truth.size
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": float(roc_auc_score(truth, ranking)) if both else None,
        "auprc": float(average_precision_score(truth, ranking)) if both else None,
        "clean_precision": kept_clean / max(int((~flags).sum()), 1),
        "clean_recall": kept_clean / max(int((~truth).sum()), 1),
        "n_flagged": int(flags.sum()),
        "n_noisy": int(truth.sum()),
    }
