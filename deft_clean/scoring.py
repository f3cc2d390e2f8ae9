"""Pure functions of DeFT: dual-prompt similarities → clean probability, flags, loss, ranks, metrics.

Notation (shapes): ``N`` samples, ``K`` classes. ``s_pos``/``s_neg`` are scaled cosine similarities
``scale · cos(f(x), T⁺ₖ)`` and ``scale · cos(f(x), T⁻ₖ)``, both ``(N, K)``.

Direction: **a low clean probability means a likely wrong label.** ``p_clean`` of the given label
is the per-class two-way softmax over ``[s⁺ₖ, s⁻ₖ]``; a sample is clean when it exceeds the
threshold (0.5 by default: the image is closer to the positive than to the negative prompt).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LOG_CLAMP = 1e-5  # probabilities are clamped here before the log, as in the reference implementation


def clean_probability(s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """Per-class probability that the image matches class k's positive prompt rather than its negative.

    ``softmax([s⁺ₖ, s⁻ₖ])[0]`` for every sample and class: ``(N, K)`` → ``(N, K)`` in [0, 1].
    """
    return torch.softmax(torch.stack([s_pos, s_neg], dim=-1), dim=-1)[..., 0]


def select_clean(
    p_clean: torch.Tensor, labels: torch.Tensor, *, threshold: float = 0.5, strict: bool = False
) -> torch.Tensor:
    """The clean rule: ``p_clean[i, yᵢ] > threshold`` (and, when ``strict``, ``yᵢ = argmaxₖ p_clean[i, k]``).

    ``p_clean`` is ``(N, K)``, ``labels`` ``(N,)`` long; returns a ``(N,)`` bool mask, True = clean.
    """
    rows = torch.arange(labels.shape[0], device=labels.device)
    clean = p_clean[rows, labels] > threshold
    if strict:
        clean = clean & (p_clean.argmax(dim=1) == labels)
    return clean


def complementary_labels(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One label drawn uniformly from the ``K - 1`` classes other than each given label, ``(N,)`` long.

    Drawing ``r ∈ [0, K-2]`` and skipping the label (``r + (r >= y)``) is exact and never equals ``y``.
    """
    draw = torch.randint(
        0, num_classes - 1, labels.shape, generator=generator, device=labels.device, dtype=labels.dtype
    )
    return draw + (draw >= labels).to(labels.dtype)


def class_balanced_weights(
    selected: torch.Tensor, labels: torch.Tensor, p_given: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Per-sample CE weights ``(N,)`` (summing to 1) that give every given class its share of the batch.

    Plain selection averages CE over the selected samples, so a class the model is unsure of loses
    its weight as its samples drop out of the selection; with a tuned image tower that feeds back
    until one class holds the whole selection and the tower maps every image there (the LoRA
    collapse in docs/benchmarks.md). Here class ``c``, holding ``n_c`` of the ``N`` samples, keeps
    weight ``n_c / N`` spread over its selected samples, and a class with none selected keeps its
    sample of highest ``p_given`` (the p_clean of its given label). When every class has the same
    selected share this equals the plain average. Sync-free: no data-dependent shapes.
    """
    onehot = F.one_hot(labels, num_classes).to(p_given.dtype)  # (N, K)
    selected = selected.to(p_given.dtype)
    emptied = (onehot.sum(dim=0) > 0) & (onehot.T @ selected == 0)  # (K,) present, nothing selected
    best = torch.where(onehot.bool(), p_given[:, None], -1.0).argmax(dim=0)  # (K,) top sample per class
    floor = torch.zeros_like(p_given).scatter_reduce(0, best, emptied.to(p_given.dtype), reduce="amax")
    chosen = torch.maximum(selected, floor)  # (N,) 0/1
    per_class = onehot.T @ chosen  # (K,) chosen samples per class (≥ 1 where present)
    share = onehot.sum(dim=0) / labels.shape[0]  # (K,)
    return chosen * (share / per_class.clamp(min=1.0))[labels]


def deft_loss(
    s_pos: torch.Tensor,
    s_neg: torch.Tensor,
    labels: torch.Tensor,
    complementary: torch.Tensor,
    selected: torch.Tensor | None,
    *,
    balance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeFT training loss: ``CE(s⁺, y)`` + negative-prompt loss; returns ``(total, ce, neg)`` scalars.

    ``selected`` is None during warm-up (CE on every sample, "yes" target = the given label). After
    warm-up it is the ``(N,)`` clean mask: CE averages over the selected samples only (0, not NaN,
    when none is selected) and unselected samples take the pseudo-label ``argmax s⁺`` as "yes"
    target. ``balance`` weighs that CE per class instead (:func:`class_balanced_weights`). The
    negative-prompt loss is ``NLL(no | complementary) + NLL(yes | target)`` on the two-way softmax
    of ``[s⁺.detach(), s⁻]``, so it trains the negative prompts only.
    """
    p_yes = clean_probability(s_pos.detach(), s_neg)  # (N, K)
    log_yes = torch.log(p_yes.clamp(min=LOG_CLAMP, max=1.0))
    log_no = torch.log((1.0 - p_yes).clamp(min=LOG_CLAMP, max=1.0))
    ce_each = F.cross_entropy(s_pos, labels, reduction="none")  # (N,)
    if selected is None:
        ce = ce_each.mean()
        yes_target = labels
    else:
        if balance:
            rows = torch.arange(labels.shape[0], device=labels.device)
            weight = class_balanced_weights(selected, labels, p_yes.detach()[rows, labels], s_pos.shape[1])
        else:
            weight = selected.to(ce_each.dtype) / selected.sum().clamp(min=1).to(ce_each.dtype)
        ce = (ce_each * weight).sum()
        yes_target = torch.where(selected, labels, s_pos.detach().argmax(dim=1))
    neg = F.nll_loss(log_no, complementary) + F.nll_loss(log_yes, yes_target)
    return ce + neg, ce, neg


COLLAPSE_SHARE = 0.98  # the final model's top predicted class covering this share of the rows ...
COLLAPSE_GIVEN_MAX = 0.5  # ... while no given label covers more than this share: a collapsed model
DEAD_CE_SHARE = 0.98  # a last-epoch CE at this share of ln K: uniform class scores, nothing learnt


def training_failure(
    history: list[dict[str, float]],
    predicted: np.ndarray,
    given: np.ndarray,
    *,
    num_classes: int,
    collapse: bool = True,
) -> str | None:
    """Why the trained detector cannot be trusted, or None: a non-finite loss, a dead or collapsed model.

    A tuned tower can fail two ways (both seen with LoRA on the offline backbone, docs/benchmarks.md):
    once the clean selection holds a single class, CE on the selected rows rewards predicting that class
    everywhere, and every image ends up there; or the adapters drive the image features to a constant,
    and the CE stays at chance (ln K) while the predictions still look spread. Either way the flags
    would be nonsense that looks confident, so the run must fail loudly instead. ``predicted`` and
    ``given`` are (N,) class indices of the scored rows. ``collapse=False`` skips both model checks
    (random-weight backbones have near-constant features from the start).
    """
    for record in history:
        if not np.isfinite(record["loss"]):
            return f"the training loss became {record['loss']} in epoch {record['epoch']}"
    if not collapse or len(given) < 20:  # too few rows to call a concentrated prediction a collapse
        return None
    chance = math.log(num_classes) if num_classes > 1 else math.inf
    if len(history) >= 2 and history[-1]["ce"] >= DEAD_CE_SHARE * chance:
        return (
            f"the classification loss ended at {history[-1]['ce']:.3f}, chance level for {num_classes} "
            f"classes (ln {num_classes} = {chance:.3f}): the image features became constant"
        )
    top_predicted = np.bincount(predicted).max() / len(predicted)
    top_given = np.bincount(given).max() / len(given)
    if top_predicted >= COLLAPSE_SHARE and top_given <= COLLAPSE_GIVEN_MAX:
        return (
            f"the trained model predicts one class for {top_predicted:.1%} of the images, although no given "
            f"label covers more than {top_given:.1%} of them (the image features collapsed)"
        )
    return None


def noise_rank(p_clean: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """A total order, 1 = most likely mislabelled: ``p_clean`` ascending, ties by ``margin`` ascending.

    Both ``(N,)``; remaining ties keep input order. Returns ``(N,)`` int64 ranks 1..N.
    """
    order = np.lexsort((np.arange(len(p_clean)), margin, p_clean))
    ranks = np.empty(len(p_clean), dtype=np.int64)
    ranks[order] = np.arange(1, len(p_clean) + 1)
    return ranks


def suggest_labels(given: np.ndarray, predicted: np.ndarray, is_noisy: np.ndarray) -> np.ndarray:
    """The predicted label where a sample is flagged, else the given one, ``(N,)``."""
    return np.where(is_noisy, predicted, given)


def flag_metrics(is_noisy: np.ndarray, truly_noisy: np.ndarray) -> dict[str, float | int]:
    """Precision, recall and F1 of the flags against known truth (``truly_noisy`` = given ≠ true label).

    Both ``(N,)`` bool. A ratio with an empty denominator is reported as 0.0.
    """
    flagged, wrong = np.asarray(is_noisy, bool), np.asarray(truly_noisy, bool)
    hits = int((flagged & wrong).sum())
    precision = hits / int(flagged.sum()) if flagged.any() else 0.0
    recall = hits / int(wrong.sum()) if wrong.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "n": int(len(flagged)),
        "n_flagged": int(flagged.sum()),
        "n_wrong": int(wrong.sum()),
        "n_caught": hits,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }
