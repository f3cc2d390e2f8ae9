"""Neighbour votes: each row's votes come from the labels of its nearest other rows, k is chosen by
leave-one-out agreement, and the votes move flags and ranks only through --neighbour-weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deft_clean import neighbours
from deft_clean.config import DetectConfig
from deft_clean.crossfit import EpochAverage, fold_votes, verdict
from deft_clean.errors import ConfigError
from deft_clean.neighbours import neighbour_votes


def clusters(per_class: int = 12, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Tight clusters around orthogonal directions, one per class: (N, 8) features and (N,) labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = np.eye(8)[:classes] * 10
    return torch.from_numpy(centres[labels] + rng.normal(0, 0.3, (len(labels), 8))).float(), labels


def test_a_wrong_label_is_outvoted_by_its_neighbours_and_never_votes_for_itself():
    features, labels = clusters()
    given = labels.copy()
    given[0] = 2  # an image of class 0 labelled 2
    votes, k = neighbour_votes(features, given, 3, seed=0)
    assert k == 5  # the cluster has 11 other rows: of K_GRID, 5 and 10 agree equally; ties take the smaller
    assert votes[0].tolist() == [1.0, 0.0, 0.0]  # its own label 2 is not among its neighbours
    np.testing.assert_allclose(votes.sum(axis=1), 1.0)
    assert votes[1:12, 2].max() <= 1 / k  # the wrong row is at most one vote for its cluster-mates


def test_k_is_the_one_whose_vote_agrees_most_with_the_given_labels():
    features, labels = clusters(per_class=40, classes=2)
    rng = np.random.default_rng(1)
    given = labels.copy()
    flip = rng.choice(len(labels), 16, replace=False)
    given[flip] = 1 - given[flip]  # 20% noise: a larger k outvotes it better
    _, k = neighbour_votes(features, given, 2, seed=0)
    assert k >= 10
    _, tiny_k = neighbour_votes(features[:4], given[:4], 2, seed=0)
    assert tiny_k == 3  # fewer rows than any k in the grid: every other row votes


def test_one_row_has_no_neighbours():
    votes, k = neighbour_votes(torch.ones(1, 4), np.array([0]), 2, seed=0)
    assert k == 0 and votes.tolist() == [[0.0, 0.0]]


def test_beyond_the_cap_neighbours_come_from_a_seeded_sample(monkeypatch):
    monkeypatch.setattr(neighbours, "REFERENCE_CAP", 10)
    features, labels = clusters(per_class=10)
    reference = neighbours._reference(len(labels), seed=3)
    assert len(reference) == 10 and (reference == neighbours._reference(len(labels), seed=3)).all()
    found = neighbours._nearest(features, reference, 4, chunk=7)
    assert set(found.ravel()) <= set(reference.tolist())
    assert all(row not in found[row] for row in range(len(labels)))


def _average(probs: np.ndarray) -> EpochAverage:
    return EpochAverage(probs, np.full_like(probs, 0.9), np.zeros(len(probs)), 1)


def test_votes_enter_the_clean_score_by_the_neighbour_weight():
    probs = np.array([[0.7, 0.3], [0.6, 0.4]])
    votes = np.array([[0.0, 1.0], [1.0, 0.0]])
    labels, fold = np.array([0, 0]), np.full(2, -1)
    only = {"transition_weight": 0.0}  # the neighbour mix alone (transitions: tests/test_transitions.py)
    plain, _ = verdict(_average(probs), labels, fold, DetectConfig(neighbour_weight=0.0, **only), votes)
    np.testing.assert_allclose(plain.clean_score, [0.4, 0.2])  # weight 0: the prompts alone
    mixed, _ = verdict(_average(probs), labels, fold, DetectConfig(neighbour_weight=0.5, **only), votes)
    np.testing.assert_allclose(mixed.clean_score, [-0.3, 0.6])  # (0.35 - 0.65), (0.8 - 0.2)
    assert mixed.is_noisy.tolist() == [True, False] and mixed.predicted.tolist() == [1, 0]
    np.testing.assert_allclose(mixed.predicted_prob, [0.65, 0.8])


def test_fold_votes_stay_inside_each_fold_and_weight_zero_skips_them():
    features, labels = clusters(per_class=8)
    fold = np.arange(len(labels)) % 2
    embedded = {k: features[torch.from_numpy(np.flatnonzero(fold == k))] for k in (0, 1)}
    votes, chosen = fold_votes(embedded, labels, fold, 3, DetectConfig())
    assert len(chosen) == 2
    for k in (0, 1):  # the same as voting within the fold alone: rows of another model's fold never vote
        rows = np.flatnonzero(fold == k)
        alone, _ = neighbour_votes(features[rows], labels[rows], 3, seed=0)
        np.testing.assert_array_equal(votes[rows], alone)
    assert fold_votes(embedded, labels, fold, 3, DetectConfig(neighbour_weight=0)) == (None, [])


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_neighbour_weight_outside_0_1_is_refused(weight):
    with pytest.raises(ConfigError, match="--neighbour-weight"):
        DetectConfig(neighbour_weight=weight)
