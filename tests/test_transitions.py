"""Class transitions: the confident joint finds a one-way flow of wrong labels, Bayes' rule then trusts
labels of classes that receive none, and the blend changes which rows are flagged, never how many."""

from __future__ import annotations

import numpy as np
import pytest

from deft_clean import transitions
from deft_clean.config import DetectConfig
from deft_clean.crossfit import EpochAverage, clean_score, verdict
from deft_clean.errors import ConfigError
from deft_clean.transitions import blend, confident_joint, posterior_clean


def one_way_noise(per_class: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three classes; a third of class 1's images are labelled 0 (never the reverse). Returns noisy-
    posterior-like probabilities (N, 3), given labels and true labels: class 1 images say 0.35 / 0.65,
    the others are sure of their class, with a little jitter."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), per_class)
    given = truth.copy()
    ones = np.flatnonzero(truth == 1)
    given[rng.choice(ones, per_class // 3, replace=False)] = 0
    probs = np.eye(3)[truth] * 0.9 + 0.05
    probs[truth == 1] = [0.35, 0.6, 0.05]
    probs = np.clip(probs + rng.normal(0, 0.02, probs.shape), 1e-3, None)
    return probs / probs.sum(axis=1, keepdims=True), given, truth


def test_the_confident_joint_finds_the_one_way_flow_and_keeps_every_row():
    probs, given, truth = one_way_noise()
    joint = confident_joint(probs, given, 3)
    np.testing.assert_allclose(joint.sum(axis=1), np.bincount(given))  # calibrated to the given counts
    # 20 rows given 0 are class 1; the joint counts those above class 1's mean confidence (about half)
    assert joint[0, 1] > 5 and joint[1, 0] < 1 and joint[2, :2].sum() < 1  # nothing flows elsewhere


def test_a_label_no_class_flows_into_is_trusted_where_the_margin_is_not():
    probs, given, _ = one_way_noise()
    posterior = posterior_clean(probs, given, confident_joint(probs, given, 3))
    ambiguous = np.array([[0.45, 0.5, 0.05]])  # an image a little more like class 1
    as_one = posterior_clean(ambiguous, np.array([1]), confident_joint(probs, given, 3))[0]
    as_zero = posterior_clean(ambiguous, np.array([0]), confident_joint(probs, given, 3))[0]
    assert as_one > 0.95 and as_zero < as_one - 0.1  # 1 receives no wrong labels; 0 receives class 1's
    assert posterior[given == 2].min() > 0.9


def test_the_blend_flags_as_many_rows_as_the_margin_and_its_score_says_which():
    probs, given, truth = one_way_noise()
    margin = clean_score(probs, given)
    mixed = blend(probs, given, np.full(len(given), -1), margin, 0.5)
    assert mixed.is_noisy.sum() == (margin < 0).sum()
    assert ((mixed.clean_score < 0) == mixed.is_noisy).all()
    assert mixed.flows[0][:2] == (0, 1)  # class 1 given '0', the largest flow
    assert (mixed.is_noisy == (given != truth)).all()  # here exactly the 20 wrong labels


def test_a_row_labelled_with_a_class_that_receives_no_noise_loses_its_flag_to_one_that_does():
    # Rows 0-1: the same ambiguous image, labelled 1 (receives nothing) and 0 (receives class 1's images).
    probs, given, _ = one_way_noise()
    probs = np.vstack([[[0.48, 0.47, 0.05], [0.49, 0.46, 0.05]], probs])
    given = np.concatenate([[1, 0], given])
    margin = clean_score(probs, given)
    assert margin[0] < 0 < margin[1]  # the margin alone flags the row labelled 1
    mixed = blend(probs, given, np.full(len(given), -1), margin, 0.5)
    assert not mixed.is_noisy[0] and mixed.is_noisy[1]


def test_under_cross_fitting_a_folds_transitions_come_from_the_other_folds(monkeypatch):
    monkeypatch.setattr(transitions, "cut", lambda mixed, count: (mixed < 0, mixed))  # the blend itself
    probs, given, _ = one_way_noise()
    fold = np.arange(len(given)) % 3
    mixed = blend(probs, given, fold, clean_score(probs, given), 1.0)  # weight 1: 2 * posterior - 1
    rows, others = np.flatnonzero(fold == 0), np.flatnonzero(fold != 0)
    expected = posterior_clean(probs[rows], given[rows], confident_joint(probs[others], given[others], 3))
    np.testing.assert_allclose(mixed.clean_score[rows], 2 * expected - 1)
    everyone = posterior_clean(probs[rows], given[rows], confident_joint(probs, given, 3))
    assert not np.allclose(mixed.clean_score[rows], 2 * everyone - 1, atol=1e-3)  # not the all-rows joint


def test_ties_across_the_cut_still_split_by_sign():
    is_noisy, shifted = transitions.cut(np.array([0.2, 0.2, 0.2, 0.5]), 2)
    assert is_noisy.tolist() == [True, True, False, False]
    assert ((shifted < 0) == is_noisy).all()
    nothing, shifted = transitions.cut(np.array([0.1, 0.3]), 0)
    assert not nothing.any() and (shifted >= 0).all()


def test_the_score_stays_in_minus_1_1_in_the_same_order_with_0_at_the_cut():
    mixed = np.array([-1.0, -0.5, 0.6, 0.7, 0.9, 1.0])
    is_noisy, shifted = transitions.cut(mixed, 3)  # the cut falls between 0.6 and 0.7: 0.65
    assert is_noisy.tolist() == [True, True, True, False, False, False]
    np.testing.assert_allclose(shifted, [-1.0, -1.15 / 1.65, -0.05 / 1.65, 0.05 / 0.35, 0.25 / 0.35, 1.0])


def test_one_class_or_a_non_finite_margin_leaves_the_margin_alone():
    one = np.ones((4, 1))
    assert blend(one, np.zeros(4, int), np.full(4, -1), clean_score(one, np.zeros(4, int)), 0.5) is None
    probs, given, _ = one_way_noise()
    margin = clean_score(probs, given)
    margin[3] = np.nan
    assert blend(probs, given, np.full(len(given), -1), margin, 0.5) is None


def test_weight_zero_and_too_many_classes_leave_the_margin_alone(monkeypatch):
    probs, given, _ = one_way_noise()
    average = EpochAverage(probs, np.full_like(probs, 0.9), np.zeros(len(given)), 1)
    fold = np.full(len(given), -1)
    plain, none = verdict(average, given, fold, DetectConfig(transition_weight=0.0))
    assert none is None and (plain.is_noisy == (clean_score(probs, given) < 0)).all()
    monkeypatch.setattr(transitions, "MAX_CLASSES", 2)
    capped, none = verdict(average, given, fold, DetectConfig())
    assert none is None and (capped.is_noisy == plain.is_noisy).all()


def test_a_flagged_row_never_suggests_its_own_label():
    probs, given, _ = one_way_noise()
    probs = np.vstack([[[0.47, 0.48, 0.05]], probs])  # the mix prefers its label 1 ...
    given = np.concatenate([[1], given])
    average = EpochAverage(probs, np.full_like(probs, 0.9), np.zeros(len(given)), 1)
    scores, _ = verdict(average, given, np.full(len(given), -1), DetectConfig(transition_weight=1.0))
    flagged = scores.is_noisy
    assert flagged.any() and (scores.predicted[flagged] != given[flagged]).all()
    rows = np.arange(len(given))
    np.testing.assert_allclose(scores.predicted_prob, probs[rows, scores.predicted], rtol=1e-6)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_transition_weight_outside_0_1_is_refused(weight):
    with pytest.raises(ConfigError, match="--transition-weight"):
        DetectConfig(transition_weight=weight)


def test_a_pair_never_seen_is_unlikely_not_impossible():
    probs, given, _ = one_way_noise()
    joint = confident_joint(probs, given, 3)
    assert joint[2, 1] == 0  # no class 1 image was given label 2 ...
    looks_like_one = posterior_clean(np.array([[0.05, 0.9, 0.05]]), np.array([2]), joint)[0]
    assert looks_like_one < 0.9  # ... yet an image this sure of class 1 still doubts its label 2
    joint[:, 2] = 0.0  # no row given 2 looked like class 2 ...
    assert posterior_clean(np.array([[0.1, 0.1, 0.8]]), np.array([2]), joint)[0] > 0.5  # ... it may still be


def test_chunked_rows_give_the_same_joint_and_posterior(monkeypatch):
    probs, given, _ = one_way_noise()
    joint = confident_joint(probs, given, 3)
    posterior = posterior_clean(probs, given, joint)
    whole = transitions._chunks
    monkeypatch.setattr(transitions, "_chunks", lambda n, k: whole(n, k, cells=3 * 7))  # 7 rows a chunk
    assert len(transitions._chunks(len(given), 3)) > 20
    np.testing.assert_array_equal(confident_joint(probs, given, 3), joint)
    np.testing.assert_array_equal(posterior_clean(probs, given, joint), posterior)
