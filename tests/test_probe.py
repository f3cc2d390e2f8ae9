"""The leave-one-out linear probe: each row's probabilities come from a ridge fit without that row (an
exact identity, checked against explicit refits), it outvotes planted wrong labels, and it enters the
verdict only through --probe-weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LogLines

from deft_clean import probe as probe_module
from deft_clean.config import DetectConfig
from deft_clean.crossfit import EpochAverage, Evidence, logged_verdict, mix, verdict
from deft_clean.errors import ConfigError
from deft_clean.probe import loo_probe
from deft_clean.progress import SilentReporter

QUIET = SilentReporter()  # a verdict whose log lines a test does not read


def _noisy_clusters(seed: int = 0, width: int = 6) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(60, width) features in 3 overlapping clusters, their true labels, and given labels with rows 0,
    20, 40 moved to the next class."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), 20)
    features = np.eye(width)[truth] * 2 + rng.normal(0, 0.6, (60, width))
    given = truth.copy()
    given[[0, 20, 40]] = (truth[[0, 20, 40]] + 1) % 3
    return torch.from_numpy(features), truth, given


def _explicit_fit(
    features: np.ndarray,
    given: np.ndarray,
    row: int,
    penalty: float,
    fitted: np.ndarray | None = None,
    raw: bool = False,
) -> np.ndarray:
    """Ridge of one-hot labels on the unit-length features of the ``fitted`` rows (default all) other
    than ``row`` (intercept not penalised), written out directly: the prediction for ``row``, clipped at
    0 and normalised (``raw``: as it is)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    fitted = np.ones(len(given), bool) if fitted is None else fitted
    centred_all = unit[fitted] - unit[fitted].mean(axis=0)
    scale = np.linalg.eigvalsh(centred_all.T @ centred_all).clip(0).mean()  # the grid is relative to it
    keep = fitted & (np.arange(len(given)) != row)
    mean, onehot = unit[keep].mean(axis=0), np.eye(3)[given[keep]]
    centred = unit[keep] - mean
    weights = np.linalg.solve(
        centred.T @ centred + penalty * scale * np.eye(unit.shape[1]), centred.T @ onehot
    )
    predicted = (unit[row] - mean) @ weights + onehot.mean(axis=0)
    return predicted if raw else predicted.clip(0) / predicted.clip(0).sum()


@pytest.mark.parametrize("width", [6, 90])  # more rows than features (the scatter), fewer (the Gram)
def test_each_row_is_predicted_by_a_fit_that_never_saw_it(width):
    features, _, given = _noisy_clusters(width=width)
    found = loo_probe(features, given, 3)
    for row in (0, 5, 20, 59):
        expected = _explicit_fit(features.numpy(), given, row, found.penalty)
        np.testing.assert_allclose(found.probs[row], expected, atol=1e-6)


def test_non_negative_features_are_fitted_by_their_square_roots_and_signed_ones_as_they_are():
    features, _, given = _noisy_clusters()
    pooled = features.abs()  # non-negative, as a convolutional tower's pooled activations
    found = loo_probe(pooled, given, 3)
    assert found.square_roots
    for row in (0, 5, 20, 59):
        expected = _explicit_fit(pooled.sqrt().numpy(), given, row, found.penalty)
        np.testing.assert_allclose(found.probs[row], expected, atol=1e-6)
    one_negative = pooled.clone()
    one_negative[7, 2] = -1e-3
    signed = loo_probe(one_negative, given, 3)
    assert not signed.square_roots
    expected = _explicit_fit(one_negative.numpy(), given, 20, signed.penalty)
    np.testing.assert_allclose(signed.probs[20], expected, atol=1e-6)


@pytest.mark.parametrize("width", [6, 90])
def test_a_fit_on_some_rows_predicts_them_left_out_and_the_rest_as_it_stands(width):
    features, _, given = _noisy_clusters(width=width)
    fitted = np.ones(60, bool)
    fitted[[0, 20, 40, 3]] = False  # the planted rows and one right one sit out
    found = loo_probe(features, given, 3, fitted_on=fitted)
    for row in (0, 3, 5, 20, 21, 59):
        expected = _explicit_fit(features.numpy(), given, row, found.penalty, fitted)
        np.testing.assert_allclose(found.probs[row], expected, atol=1e-6)
    assert loo_probe(features, given, 3, fitted_on=np.arange(60) < 2) is None  # two rows cannot fit


def test_the_penalty_is_chosen_by_the_leave_one_out_error_of_the_fitted_rows_alone(monkeypatch):
    monkeypatch.setattr(probe_module, "PENALTY_GRID", (1e-3, 1e-1, 10.0))
    features, _, given = _noisy_clusters(seed=5)
    fitted = np.ones(60, bool)
    fitted[40:] = False
    given[40:] = np.random.default_rng(5).integers(0, 3, 20)  # labels the fit never sees: noise
    found = loo_probe(features, given, 3, fitted_on=fitted)
    errors = [
        sum(
            (
                (_explicit_fit(features.numpy(), given, row, p, fitted, raw=True) - np.eye(3)[given[row]])
                ** 2
            ).sum()
            for row in np.flatnonzero(fitted)
        )
        for p in probe_module.PENALTY_GRID
    ]
    assert found.penalty == probe_module.PENALTY_GRID[int(np.argmin(errors))]


def test_a_rows_own_label_cannot_move_its_probabilities(monkeypatch):
    monkeypatch.setattr(probe_module, "PENALTY_GRID", (1.0,))  # the penalty is the one shared choice
    features, _, given = _noisy_clusters()
    before = loo_probe(features, given, 3).probs
    for new_label in (1, 2):
        relabelled = given.copy()
        relabelled[7] = new_label
        after = loo_probe(features, relabelled, 3).probs
        np.testing.assert_allclose(after[7], before[7], atol=1e-6)  # row 7 never entered its own fit
        assert not np.allclose(after[8], before[8], atol=1e-6)  # but it entered row 8's


def test_planted_wrong_labels_are_outvoted_by_the_other_rows():
    features, truth, given = _noisy_clusters()
    found = loo_probe(features, given, 3)
    assert found.probs[[0, 20, 40]].argmax(axis=1).tolist() == truth[[0, 20, 40]].tolist()
    np.testing.assert_allclose(found.probs.sum(axis=1), 1.0, atol=1e-6)
    assert (found.probs >= 0).all()
    assert found.agreement == pytest.approx((found.probs.argmax(axis=1) == given).mean())


@pytest.mark.parametrize("width", [6, 90])
def test_row_blocks_and_label_types_give_the_same_probabilities(width):
    features, _, given = _noisy_clusters(seed=3, width=width)
    whole = loo_probe(features, given, 3)
    blocked = loo_probe(features, given.astype(np.int32), 3, chunk=width * 7)  # blocks of 7 rows
    np.testing.assert_allclose(blocked.probs, whole.probs, atol=1e-6)
    assert blocked.penalty == whole.penalty


def test_what_cannot_be_fitted_is_not_probed(monkeypatch):
    features, _, given = _noisy_clusters()
    assert loo_probe(features[:2], given[:2], 3) is None  # a leave-one-out fit needs two other rows
    assert loo_probe(features, np.zeros(60, np.int64), 1) is None  # one class
    nan = features.clone()
    nan[4, 2] = float("nan")
    assert loo_probe(nan, given, 3) is None
    monkeypatch.setattr(probe_module, "MAX_FEATURES", 5)
    assert loo_probe(features, given, 3) is None  # 6 features above the cap


def test_the_mix_weighs_each_source_and_a_missing_probe_leaves_prompts_and_votes_as_asked():
    prompts, votes, probe = np.array([[0.9, 0.1]]), np.array([[0.0, 1.0]]), np.array([[0.3, 0.7]])
    defaults = DetectConfig()  # the probe 3/4; votes half of the rest: prompts and votes 1/8 each
    np.testing.assert_allclose(mix(prompts, defaults, votes, probe), [[0.3375, 0.6625]])
    np.testing.assert_allclose(mix(prompts, defaults, votes, None), [[0.45, 0.55]])  # no probe: halves
    mostly_votes = DetectConfig(neighbour_weight=0.9)
    np.testing.assert_allclose(mix(prompts, mostly_votes, votes, None), [[0.09, 0.91]])
    only_probe = DetectConfig(neighbour_weight=0.0, probe_weight=0.25)
    np.testing.assert_allclose(mix(prompts, only_probe, votes, probe), [[0.75, 0.25]])
    np.testing.assert_allclose(
        mix(prompts, DetectConfig(neighbour_weight=0.5, probe_weight=0.5), None, None), prompts
    )


def _memorised_but_doubting(given: np.ndarray) -> tuple[EpochAverage, list[int]]:
    """Prompts' probabilities of a model that memorised the ``given`` labels, except 3 right labels (rows
    1, 21, 41) it narrowly doubts: the count of flags is 3."""
    prompts = np.eye(3)[given] * 0.8 + 0.1
    doubted = [1, 21, 41]
    prompts[doubted] = 0.15 + 0.25 * np.eye(3)[given[doubted]] + 0.3 * np.eye(3)[(given[doubted] + 2) % 3]
    return EpochAverage(prompts, np.full_like(prompts, 0.9), np.zeros(60), 1), doubted


def test_the_probe_chooses_which_rows_are_flagged_not_how_many_and_the_log_says_how_it_fitted():
    features, truth, given = _noisy_clusters()
    average, doubted = _memorised_but_doubting(given)
    log = LogLines()
    config = DetectConfig(neighbour_weight=0.0, probe_weight=0.6, transition_weight=0.0)
    alone = logged_verdict(average, given, np.full(60, -1), Evidence({}, None, ["a", "b", "c"]), config, log)
    assert np.flatnonzero(alone.is_noisy).tolist() == doubted and log.lines == []  # no features: no probe
    evidence = Evidence({}, features, ["a", "b", "c"])
    scores = logged_verdict(average, given, np.full(60, -1), evidence, config, log)
    assert np.flatnonzero(scores.is_noisy).tolist() == [0, 20, 40]  # as many, now the planted ones
    assert scores.predicted[[0, 20, 40]].tolist() == truth[[0, 20, 40]].tolist()
    assert (scores.clean_score[[0, 20, 40]] < 0).all() and (
        np.delete(scores.clean_score, [0, 20, 40]) >= 0
    ).all()
    assert len(log.lines) == 2 and log.lines[0].startswith("Linear probe: a ridge fit on the untuned tower's")
    assert "square roots" not in log.lines[0]  # signed features: as they are
    assert log.lines[1].startswith("Linear probe, second fit: without the 3 rows first flagged (penalty")


def _recorded_fits(monkeypatch) -> list[np.ndarray | None]:
    """The ``fitted_on`` of every probe fit the verdict asks for, in order."""
    fits: list[np.ndarray | None] = []

    def recorded(*args, fitted_on=None, **kwargs):
        fits.append(fitted_on)
        return loo_probe(*args, fitted_on=fitted_on, **kwargs)

    monkeypatch.setattr("deft_clean.crossfit.loo_probe", recorded)
    return fits


def test_the_second_fit_leaves_out_the_rows_the_first_flagged_and_decides(monkeypatch):
    features, _, given = _noisy_clusters()
    average, _ = _memorised_but_doubting(given)
    fits = _recorded_fits(monkeypatch)
    config = DetectConfig(neighbour_weight=0.0, probe_weight=0.6, transition_weight=0.0)
    fold, evidence = np.full(60, -1), Evidence({}, features, list("abc"))
    scores = logged_verdict(average, given, fold, evidence, config, QUIET)
    assert fits[0] is None and len(fits) == 2  # first on every row, then ...
    assert not fits[1][[0, 20, 40]].any() and fits[1].sum() == 57  # ... without the planted ones
    assert np.flatnonzero(scores.is_noisy).tolist() == [0, 20, 40]
    second = loo_probe(features, given, 3, fitted_on=fits[1]).probs
    expected, _ = verdict(average, given, fold, config, None, second)
    np.testing.assert_array_equal(scores.clean_score, expected.clean_score)  # the second fit's verdict
    first = verdict(average, given, fold, config, None, loo_probe(features, given, 3).probs)[0]
    assert not np.array_equal(first.clean_score, expected.clean_score)


def test_a_class_whose_rows_were_all_flagged_keeps_them_and_the_dual_rule_fits_once(monkeypatch):
    features, _, given = _noisy_clusters()
    prompts = np.eye(3)[given] * 0.8 + 0.1
    prompts[given == 2] = np.array([0.5, 0.3, 0.2])  # the prompts doubt every row given class 2
    average = EpochAverage(prompts, np.full_like(prompts, 0.9), np.zeros(60), 1)
    fits = _recorded_fits(monkeypatch)
    config = DetectConfig(neighbour_weight=0.0, probe_weight=0.2, transition_weight=0.0)
    scores = logged_verdict(
        average, given, np.full(60, -1), Evidence({}, features, list("abc")), config, QUIET
    )
    assert scores.is_noisy[given == 2].all()  # the first verdict flagged the whole class ...
    assert len(fits) == 1  # ... so nothing would be left out: the first fit stands
    fits.clear()
    average.probs[np.flatnonzero(given == 0)[:2]] = [0.2, 0.5, 0.3]  # two rows given 0 doubted as well
    scores = logged_verdict(
        average, given, np.full(60, -1), Evidence({}, features, list("abc")), config, QUIET
    )
    assert len(fits) == 2 and fits[1][given == 2].all()  # class 2 keeps its rows
    assert not fits[1][np.flatnonzero(given == 0)[:2]].any() and fits[1].sum() == 58
    fits.clear()
    average.p_clean[[1, 2], given[[1, 2]]] = 0.1  # the dual rule flags rows 1 and 2
    dual = DetectConfig(neighbour_weight=0.0, probe_weight=0.2, flag_rule="dual")
    scores = logged_verdict(average, given, np.full(60, -1), Evidence({}, features, list("abc")), dual, QUIET)
    assert (
        np.flatnonzero(scores.is_noisy).tolist() == [1, 2] and len(fits) == 1
    )  # p_clean flags: a second fit could not change which rows


def test_a_fit_mask_that_is_not_one_bool_per_row_is_refused():
    features, _, given = _noisy_clusters()
    with pytest.raises(ValueError, match="fitted_on must be a"):
        loo_probe(features, given, 3, fitted_on=np.ones(59, bool))
    with pytest.raises(ValueError, match="fitted_on must be a"):
        loo_probe(features, given, 3, fitted_on=np.ones(60, np.int64))


@pytest.mark.parametrize("weight", [-0.1, 1.2, float("nan")])
def test_a_probe_weight_outside_0_1_is_refused_and_any_neighbour_weight_still_fits_beside_it(weight):
    with pytest.raises(ConfigError, match="--probe-weight"):
        DetectConfig(probe_weight=weight)
    assert DetectConfig(neighbour_weight=0.9).probe_weight == 0.75  # the shares nest


def test_the_count_is_the_prompts_and_votes_own_even_when_the_probe_disagrees_more():
    prompts = np.array([[0.45, 0.55], [0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])  # only row 0 prefers class 1
    probe = np.array([[0.5, 0.5], [0.0, 1.0], [0.05, 0.95], [1.0, 0.0]])  # rows 1 and 2 look like class 1
    average, labels = EpochAverage(prompts, np.full_like(prompts, 0.9), np.zeros(4), 1), np.zeros(4, np.int64)
    for weight in (0.0, 0.5):  # with and without the class transitions
        config = DetectConfig(neighbour_weight=0.0, probe_weight=0.5, transition_weight=weight)
        scores, _ = verdict(average, labels, np.full(4, -1), config, None, probe)
        assert np.flatnonzero(scores.is_noisy).tolist() == [1]  # one flag, on the row the mix doubts most
        assert scores.clean_score[1] < 0 <= scores.clean_score[[0, 2, 3]].min()
