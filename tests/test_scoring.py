"""DeFT's pure pieces against hand-computed values: p_clean, the clean rule, the loss, ranks, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deft_clean.scoring import (
    class_balanced_weights,
    clean_probability,
    complementary_labels,
    deft_loss,
    flag_metrics,
    noise_rank,
    select_clean,
    suggest_labels,
    training_failure,
)

S_POS = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
S_NEG = torch.tensor([[1.0, 0.0], [1.0, 3.0]])


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_clean_probability_is_the_two_way_softmax():
    p = clean_probability(S_POS, S_NEG)
    expected = torch.tensor([[sigmoid(1.0), 0.5], [sigmoid(-1.0), sigmoid(-2.0)]])
    torch.testing.assert_close(p, expected)


def test_clean_rule_threshold_and_strict():
    p = torch.tensor([[0.6, 0.9], [0.7, 0.2], [0.5, 0.1]])
    labels = torch.tensor([0, 0, 0])
    assert select_clean(p, labels).tolist() == [True, True, False]  # 0.5 is not > 0.5
    assert select_clean(p, labels, strict=True).tolist() == [False, True, False]  # row 0: argmax is 1
    assert select_clean(p, labels, threshold=0.65).tolist() == [False, True, False]


@pytest.mark.parametrize("k", [2, 3, 10])
def test_complementary_labels_never_equal_the_label_and_cover_the_rest(k):
    labels = torch.arange(k).repeat_interleave(400)
    comp = complementary_labels(labels, k, torch.Generator().manual_seed(0))
    assert not (comp == labels).any()
    assert comp.min() >= 0 and comp.max() < k
    for c in range(k):  # every other class is drawn, roughly uniformly
        counts = torch.bincount(comp[labels == c], minlength=k)
        assert counts[c] == 0
        others = counts[torch.arange(k) != c].float()
        assert others.min() > 0.5 * others.mean()


def test_complementary_labels_follow_the_generator():
    labels = torch.randint(0, 5, (50,), generator=torch.Generator().manual_seed(3))
    a = complementary_labels(labels, 5, torch.Generator().manual_seed(7))
    b = complementary_labels(labels, 5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def _hand_loss(labels, comp, selected):
    """The loss written out for S_POS/S_NEG with plain math."""
    p_yes = [[sigmoid(1.0), 0.5], [sigmoid(-1.0), sigmoid(-2.0)]]
    ce = [math.log(1 + math.exp(0 - 2)) if labels[0] == 0 else math.log(1 + math.exp(2)),
          math.log(1 + math.exp(-1)) if labels[1] == 1 else math.log(1 + math.exp(1))]  # fmt: skip
    predicted = [0, 1]
    if selected is None:
        ce_term, yes = sum(ce) / 2, labels
    else:
        chosen = [c for c, s in zip(ce, selected, strict=True) if s]
        ce_term = sum(chosen) / len(chosen) if chosen else 0.0
        yes = [y if s else p for y, s, p in zip(labels, selected, predicted, strict=True)]
    no_term = -sum(math.log(max(1 - p_yes[i][comp[i]], 1e-5)) for i in range(2)) / 2
    yes_term = -sum(math.log(max(p_yes[i][yes[i]], 1e-5)) for i in range(2)) / 2
    return ce_term, no_term + yes_term


@pytest.mark.parametrize("selected", [None, [True, False], [False, True], [True, True]])
def test_loss_matches_hand_computation(selected):
    labels, comp = [1, 0], [0, 1]
    mask = None if selected is None else torch.tensor(selected)
    total, ce, neg = deft_loss(S_POS, S_NEG, torch.tensor(labels), torch.tensor(comp), mask)
    ce_hand, neg_hand = _hand_loss(labels, comp, selected)
    assert ce.item() == pytest.approx(ce_hand, rel=1e-5)
    assert neg.item() == pytest.approx(neg_hand, rel=1e-5)
    assert total.item() == pytest.approx(ce_hand + neg_hand, rel=1e-5)


def test_after_warmup_ce_uses_only_selected_samples():
    s_pos = S_POS.clone().requires_grad_(True)
    s_neg = S_NEG.clone().requires_grad_(True)
    _, ce, _ = deft_loss(
        s_pos, s_neg, torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([True, False])
    )
    ce.backward()
    assert s_pos.grad[0].abs().sum() > 0
    assert torch.equal(s_pos.grad[1], torch.zeros(2))  # the unselected sample gets no CE gradient


def test_class_balanced_weights_by_hand():
    # class 0: 3 of 6 samples, all selected -> 0.5 / 3 each; class 1: 2 samples, none selected -> its
    # sample of higher p_clean (index 4) carries 2/6; class 2: 1 sample, unselected -> kept with 1/6
    selected = torch.tensor([True, True, True, False, False, False])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    p_given = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.4, 0.1])
    weight = class_balanced_weights(selected, labels, p_given, num_classes=4)  # class 3 absent
    assert weight.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.0, 1 / 3, 1 / 6])
    assert weight.sum().item() == pytest.approx(1.0)


def test_class_balanced_ce_equals_plain_ce_when_every_class_has_the_same_selected_share():
    s_pos, s_neg = torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 2)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    selected = torch.tensor([True, True, False, False, True, False, True, False])  # half of each class
    comp = 1 - labels
    _, plain, _ = deft_loss(s_pos, s_neg, labels, comp, selected)
    _, balanced, _ = deft_loss(s_pos, s_neg, labels, comp, selected, balance=True)
    assert balanced.item() == pytest.approx(plain.item(), rel=1e-6)


def test_class_balanced_ce_keeps_a_class_that_dropped_out_of_the_selection():
    s_pos = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 0.5]], requires_grad=True)
    labels, comp = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 1, 0])
    selected = torch.tensor([True, True, True, False])  # class 1's only sample is not selected
    _, ce, _ = deft_loss(s_pos, torch.zeros(4, 2), labels, comp, selected, balance=True)
    ce.backward()
    assert s_pos.grad[3, 1].item() < 0  # still pulled towards its given class, with weight 1/4
    assert s_pos.grad[3, 1].item() == pytest.approx(-(1 - torch.softmax(s_pos[3], 0)[1].item()) / 4)


def test_negative_loss_trains_only_negative_prompts():
    s_pos = S_POS.clone().requires_grad_(True)
    s_neg = S_NEG.clone().requires_grad_(True)
    _, _, neg = deft_loss(s_pos, s_neg, torch.tensor([1, 0]), torch.tensor([0, 1]), None)
    neg.backward()
    assert s_pos.grad is None and s_neg.grad.abs().sum() > 0


def test_empty_selection_gives_finite_loss_and_zero_ce():
    s_pos = S_POS.clone().requires_grad_(True)
    total, ce, neg = deft_loss(
        s_pos, S_NEG, torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([False, False])
    )
    assert ce.item() == 0.0 and torch.isfinite(total) and total.item() == pytest.approx(neg.item())
    total.backward()
    assert torch.isfinite(s_pos.grad).all()


def test_log_is_clamped():
    s_pos, s_neg = torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    _, _, neg = deft_loss(s_pos, s_neg, torch.tensor([1]), torch.tensor([0]), None)
    # no-prob of class 0 is ~e^-100, clamped to 1e-5; yes-prob of class 1 is 0.5
    assert neg.item() == pytest.approx(-math.log(1e-5) - math.log(0.5), rel=1e-5)


def test_noise_rank_is_a_total_order_by_p_clean_then_margin():
    p_clean = np.array([0.9, 0.1, 0.1, 0.5, 0.1])
    margin = np.array([0.3, 0.2, -0.1, 0.0, 0.2])
    ranks = noise_rank(p_clean, margin)
    assert ranks.tolist() == [5, 2, 1, 4, 3]  # ties on both keep input order
    assert sorted(ranks.tolist()) == [1, 2, 3, 4, 5]


def test_suggest_labels():
    assert suggest_labels(
        np.array([0, 1, 2]), np.array([2, 2, 2]), np.array([True, False, False])
    ).tolist() == [
        2,
        1,
        2,
    ]


def test_flag_metrics():
    flags = np.array([True, True, False, False, True])
    truth = np.array([True, False, True, False, True])
    m = flag_metrics(flags, truth)
    assert (m["precision"], m["recall"]) == pytest.approx((2 / 3, 2 / 3))
    assert m["f1"] == pytest.approx(2 / 3) and (m["n"], m["n_flagged"], m["n_wrong"], m["n_caught"]) == (
        5,
        3,
        3,
        2,
    )
    empty = flag_metrics(np.zeros(3, bool), np.zeros(3, bool))
    assert (empty["precision"], empty["recall"], empty["f1"]) == (0.0, 0.0, 0.0)


def _history(*losses: float, ce: float = 1.0) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "loss": loss, "ce": ce} for i, loss in enumerate(losses)]


def test_training_failure_names_a_non_finite_loss():
    given = np.arange(100) % 10
    assert "nan in epoch 2" in training_failure(_history(1.0, float("nan")), given, given, num_classes=10)


def test_training_failure_names_collapsed_predictions_on_spread_labels():
    given = np.arange(100) % 10  # 10% per class
    reason = training_failure(_history(1.0), np.zeros(100, np.int64), given, num_classes=10)
    assert "one class for 100.0% of the images" in reason and "10.0%" in reason
    assert (
        training_failure(_history(1.0), np.zeros(100, np.int64), given, num_classes=10, collapse=False)
        is None
    )


def test_training_failure_accepts_healthy_and_dominant_class_runs():
    given = np.arange(100) % 10
    assert training_failure(_history(2.0, 1.0), given, given, num_classes=10) is None
    mostly_zero = np.where(np.arange(100) < 97, 0, 1)  # a real 97% class: predicting it is not a collapse
    assert training_failure(_history(1.0), np.zeros(100, np.int64), mostly_zero, num_classes=10) is None


def test_training_failure_names_a_dead_tower_at_chance_level_loss():
    given = np.arange(100) % 10
    dead = _history(3.4, 3.6, ce=2.301)  # CE at ln 10 = 2.303 after warm-up: constant features
    reason = training_failure(dead, given, given, num_classes=10)
    assert "ended at 2.301, chance level for 10 classes (ln 10 = 2.303)" in reason
    assert training_failure(_history(3.4, ce=2.301), given, given, num_classes=10) is None  # warm-up only
    assert training_failure(dead, given, given, num_classes=10, collapse=False) is None
