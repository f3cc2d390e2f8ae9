"""Which model scores which row, and the score itself: in-sample or cross-fitted DeFT, epoch-averaged.

``--scoring insample`` (default): one model trains on every row and scores every row. ``--scoring
crossfit``: the rows are split into ``--folds`` K folds stratified by given label; for each fold a model
restarted from the same initial weights trains on the other K-1 folds and scores only this fold, so no
row is scored by a model that saw its label (cost: K-1 times one fit). Measured on 2,000 CIFAR-10
images (docs/benchmarks.md), cross-fitting ranked worse than the in-sample score below: DeFT's clean
selection already keeps suspect rows out of the classification loss, and a fold model sees fewer rows.

Either way a row's score is averaged over the scoring model's post-warm-up epochs (each such epoch ends
with an un-augmented pass over the rows that model scores): the positive prompts' class probabilities
are averaged over those epochs and mixed with the row's neighbour votes (:func:`fold_votes`, weight
``--neighbour-weight``) and a linear probe's leave-one-out probabilities on the untuned tower's
features (:mod:`deft_clean.probe`, ``--probe-weight``; fitted again without the rows the first verdict flags,
which then decides). The margin of that mix, ``P(given) - max P(other
class)`` in [-1, 1] (the area-under-the-margin idea of Pleiss et al., 2020), is negative when the mix
predicts another class; as many rows as the prompts-and-votes mix (without the probe) predicts another
class for are flagged (``--flag-rule margin``). Which rows, is decided by the margin blended with the
posterior of the class transitions (:mod:`deft_clean.transitions`, ``--transition-weight``), and the
clean score is that blend mapped onto [-1, 1] with 0 at the cut, negative exactly for the flagged rows,
so ranks and flags tell one story.
Averaging over epochs reads the model before it memorises the noisy labels of the last epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from deft_clean.config import DetectConfig
from deft_clean.distributed import World
from deft_clean.neighbours import neighbour_votes
from deft_clean.probe import loo_probe
from deft_clean.progress import Reporter
from deft_clean.results import Scores
from deft_clean.runtime import autocast
from deft_clean.scoring import clean_probability
from deft_clean.transitions import MAX_CLASSES, Blend, blend, cut

IN_SAMPLE = -1  # the fold column's value for rows scored by the one model that trained on every row


def fold_plan(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) int fold of each row: within each given class the rows are shuffled (seeded) and dealt to the
    folds in turn, so every fold holds about 1/K of each class. ``folds`` 1 means in-sample (all -1)."""
    if folds <= 1:
        return np.full(len(labels), IN_SAMPLE, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0  # continue dealing across classes, so small classes do not all land in fold 0
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)
    return fold


@dataclass
class EpochAverage:
    """Running sums, over the epochs seen, of some rows' class and clean probabilities.

    ``probs`` (N, K) sums ``softmax(s⁺)``; ``p_clean`` (N, K) the dual-prompt clean probabilities;
    ``margin`` (N,) cos⁺ − cos⁻ of the given label; ``epochs`` counts the passes added.
    """

    probs: np.ndarray
    p_clean: np.ndarray
    margin: np.ndarray
    epochs: int = 0

    @classmethod
    def empty(cls, n: int, num_classes: int) -> EpochAverage:
        return cls(np.zeros((n, num_classes)), np.zeros((n, num_classes)), np.zeros(n))

    def add(self, s_pos: torch.Tensor, s_neg: torch.Tensor, labels: torch.Tensor, scale: float) -> None:
        """Add one pass: ``s_pos``/``s_neg`` (N, K) scaled similarities of the rows, ``labels`` (N,)."""
        rows = torch.arange(len(labels), device=labels.device)
        self.probs += torch.softmax(s_pos, dim=1).double().cpu().numpy()
        self.p_clean += clean_probability(s_pos, s_neg).double().cpu().numpy()
        self.margin += ((s_pos - s_neg)[rows, labels] / scale).double().cpu().numpy()
        self.epochs += 1

    def place(self, rows: np.ndarray, part: EpochAverage) -> None:
        """Put ``part`` (the average of some rows, e.g. one fold's) at ``rows`` (M,) of this average."""
        self.probs[rows], self.p_clean[rows], self.margin[rows] = part.probs, part.p_clean, part.margin

    def mean(self) -> EpochAverage:
        """The average over the passes added (``epochs`` 1)."""
        count = max(self.epochs, 1)
        return EpochAverage(self.probs / count, self.p_clean / count, self.margin / count, 1)


def clean_score(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) ``P(given) - max P(other class)`` of class probabilities ``probs`` (N, K): in [-1, 1], below 0
    exactly when another class is more probable than the given label ``labels`` (N,)."""
    rows = np.arange(len(labels))
    return probs[rows, labels] - probs[rows, best_other(probs, labels)]


def best_other(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) the most probable class of ``probs`` (N, K) other than each row's given label ``labels``."""
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return others.argmax(axis=1)


Similarities = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def score_pass(
    similarities: Similarities,
    n: int,
    labels: torch.Tensor,
    average: EpochAverage,
    scale: float,
    batch: int,
    *,
    world: World = World(),
    who: np.ndarray | None = None,
) -> None:
    """One un-augmented pass over ``n`` rows: ``similarities(index)`` → (s⁺, s⁻) of rows ``index``,
    added to ``average``. Under torchrun, process ``who[i]`` scores row ``i`` and every process adds
    the whole pass (gathered in order), so all hold the same average."""
    own = np.arange(n) if who is None else np.flatnonzero(who == world.rank)
    parts_pos, parts_neg = [], []
    for start in range(0, len(own), batch):
        index = torch.from_numpy(own[start : start + batch])
        with autocast(labels.device):
            s_pos, s_neg = similarities(index)
        parts_pos.append(s_pos.float())
        parts_neg.append(s_neg.float())
    if world.active and who is not None:
        empty = torch.zeros(0, average.probs.shape[1], device=labels.device)
        s_pos = world.gather_rows(torch.cat(parts_pos) if parts_pos else empty, who)
        s_neg = world.gather_rows(torch.cat(parts_neg) if parts_neg else empty, who)
        parts_pos, parts_neg = [s_pos], [s_neg]
    if n:
        average.add(torch.cat(parts_pos), torch.cat(parts_neg), labels, scale)


def fold_votes(
    embedded: dict[int, torch.Tensor],
    labels: np.ndarray,
    fold: np.ndarray,
    num_classes: int,
    config: DetectConfig,
) -> tuple[np.ndarray | None, list[int]]:
    """(N, K) neighbour votes (:mod:`deft_clean.neighbours`) of every row among the rows of its fold, in
    the embedding of the fold's model (``embedded[k]``: (rows of fold k, E), in row order; all rows
    in-sample), and the k chosen per fold; None and [] when ``--neighbour-weight`` is 0."""
    if config.neighbour_weight == 0 or not embedded:
        return None, []
    votes, chosen = np.zeros((len(labels), num_classes), np.float32), []
    for k, features in sorted(embedded.items()):
        rows = np.flatnonzero(fold == k)
        votes[rows], count = neighbour_votes(features, labels[rows], num_classes, seed=config.seed)
        chosen.append(count)
    return votes, chosen


@dataclass(frozen=True)
class Evidence:
    """What a verdict mixes in beside the prompts: each fold's ``embedded`` rows (fold → (rows, E), for
    the neighbour votes), the image tower's ``untuned`` features (N, F) of every row (for the linear
    probe: a frozen tower's, or a tuned tower's with its tuning off; None: no probe) and the class
    ``names`` the log uses."""

    embedded: dict[int, torch.Tensor]
    untuned: torch.Tensor | None
    names: list[str]


def logged_verdict(
    average: EpochAverage,
    labels: np.ndarray,
    fold: np.ndarray,
    evidence: Evidence,
    config: DetectConfig,
    reporter: Reporter,
) -> Scores:
    """The flags and ranks of :func:`verdict` with the neighbour votes and the linear probe mixed in; the
    log says which k the votes chose, how the probe fitted, and the wrong labels the transitions found."""
    num_classes = average.probs.shape[1]
    votes, chosen = fold_votes(evidence.embedded, labels, fold, num_classes, config)
    probe = _probe(evidence.untuned, labels, num_classes, config, reporter)
    if chosen:
        share = config.neighbour_weight * (1 - config.probe_weight if probe is not None else 1)
        reporter.log(
            f"Neighbour votes: each image's {' / '.join(map(str, chosen))} nearest images (k chosen by "
            f"leave-one-out agreement) weigh {share:.3g} in its class probabilities."
        )
    scores, mixed = verdict(average, labels, fold, config, votes, probe)
    # a second probe fit chooses which rows the margin flags (under --flag-rule dual, p_clean flags)
    if config.flag_rule == "margin" and probe is not None and evidence.untuned is not None:
        second = _refit_probe(evidence.untuned, labels, scores.is_noisy, num_classes, reporter)
        if second is not None:
            scores, mixed = verdict(average, labels, fold, config, votes, second)
    names = evidence.names
    if mixed is not None and mixed.flows:
        flows = ", ".join(f"{names[j]} given '{names[i]}' (~{rows:.0f})" for i, j, rows in mixed.flows)
        reporter.log(f"Most frequent wrong labels by the class transitions: {flows}.")
    elif config.flag_rule == "margin" and config.transition_weight > 0 and num_classes > MAX_CLASSES:
        reporter.log(
            f"Class transitions are not estimated above {MAX_CLASSES:,} classes: the margin alone flags."
        )
    return scores


def _probe(
    untuned: torch.Tensor | None,
    labels: np.ndarray,
    num_classes: int,
    config: DetectConfig,
    reporter: Reporter,
) -> np.ndarray | None:
    """(N, K) the linear probe's leave-one-out probabilities (:mod:`deft_clean.probe`) on the ``untuned``
    features, or None (weight 0, no features, or features it cannot fit; the log says why it could not)."""
    if config.probe_weight == 0 or untuned is None:
        return None
    probe = loo_probe(untuned, labels, num_classes)
    if probe is None:
        reporter.log(
            "Linear probe: not fitted (too few rows or classes, features too wide or not finite, or the "
            "eigendecomposition failed)."
        )
        return None
    roots = " (their square roots, as all are non-negative)" if probe.square_roots else ""
    reporter.log(
        f"Linear probe: a ridge fit on the untuned tower's features{roots} of every other image predicts "
        f"each image's class (penalty {probe.penalty:.3g} chosen by leave-one-out error; it agrees with "
        f"{probe.agreement:.0%} of the given labels) and weighs {config.probe_weight:.3g} in its class "
        "probabilities."
    )
    return probe.probs


def _refit_probe(
    untuned: torch.Tensor, labels: np.ndarray, flagged: np.ndarray, num_classes: int, reporter: Reporter
) -> np.ndarray | None:
    """(N, K) the probe fitted again without the rows the first verdict ``flagged``, so they no longer
    teach it their labels (each row it fits still left out of its own fit, the flagged ones out of every
    fit); a class whose rows were all flagged keeps them, or the fit could never predict it. None when
    nothing is left out (the first fit stands) or it cannot be fitted. On 2,000 CIFAR-10 images the second
    fit ranked better at high and class-pair noise and within 0.003 AUROC elsewhere (docs/benchmarks.md,
    "The probe's second fit")."""
    fitted = ~flagged | ~np.isin(labels, labels[~flagged])
    if fitted.all():
        return None
    refit = loo_probe(untuned, labels, num_classes, fitted_on=fitted)
    if refit is None:
        reporter.log("Linear probe, second fit: too few rows kept to fit; the first fit decides.")
        return None
    reporter.log(
        f"Linear probe, second fit: without the {int((~fitted).sum()):,} rows first flagged (penalty "
        f"{refit.penalty:.3g}; it agrees with {refit.agreement:.0%} of the given labels), it chooses the "
        "rows flagged."
    )
    return refit.probs


def verdict(
    average: EpochAverage,
    labels: np.ndarray,
    fold: np.ndarray,
    config: DetectConfig,
    votes: np.ndarray | None = None,
    probe: np.ndarray | None = None,
) -> tuple[Scores, Blend | None]:
    """Flags, ranks and predictions from the (epoch-averaged) probabilities of each row, mixed with its
    neighbour ``votes`` and leave-one-out ``probe`` (N, K) when given (:func:`mix`). ``--flag-rule
    margin`` flags as many rows as the prompts and votes alone find another class more probable for,
    choosing them by the mix's clean score blended with the class transitions
    (:mod:`deft_clean.transitions`, ``--transition-weight``): the probe and the transitions change which
    rows are flagged, not how many. ``dual`` flags by the p_clean rule; ranks follow the deciding score.
    Also returns the blend (None when not used)."""
    rows = np.arange(len(labels))
    p_given = average.p_clean[rows, labels]
    counted = mix(average.probs, config, votes, None)  # prompts and votes: the count of flags
    probs = mix(counted, config, None, probe)
    score = clean_score(probs, labels)
    # with the probe in the count, low-noise sets lost F1 (docs/benchmarks.md)
    count = int((clean_score(counted, labels) < 0).sum())
    mixed = None
    if config.flag_rule == "margin" and config.transition_weight > 0:
        mixed = blend(probs, labels, fold, score, config.transition_weight, count)
    if mixed is not None:
        score, is_noisy, key = mixed.clean_score, mixed.is_noisy, mixed.clean_score
    elif config.flag_rule == "margin":
        is_noisy, score = cut(score, count) if probe is not None else (score < 0, score)
        key = score
    else:
        clean = p_given > config.threshold
        if config.strict:
            clean &= average.p_clean.argmax(axis=1) == labels
        is_noisy, key = ~clean, p_given
    predicted = _suggestions(probs, labels, is_noisy)
    scores = Scores(
        p_clean=p_given.astype(np.float32),
        margin=average.margin.astype(np.float32),
        is_noisy=is_noisy,
        predicted=predicted,
        predicted_prob=probs[rows, predicted].astype(np.float32),
        clean_score=score.astype(np.float32),
        fold=fold.astype(np.int64),
        rank_key=key,
    )
    return scores, mixed


def mix(
    probs: np.ndarray, config: DetectConfig, votes: np.ndarray | None, probe: np.ndarray | None
) -> np.ndarray:
    """(N, K) the prompts' ``probs`` mixed with the neighbour ``votes`` by ``--neighbour-weight``, then
    with the ``probe``'s probabilities by ``--probe-weight`` (defaults: the probe 3/4, prompts and votes
    1/8 each: the probe ranked best of the three; docs/benchmarks.md, "The probe's second fit"). A source not
    given drops out: without the probe (``--probe-weight 0``) prompts and votes mix exactly as asked."""
    if votes is not None:
        probs = (1 - config.neighbour_weight) * probs + config.neighbour_weight * votes
    if probe is not None:
        probs = (1 - config.probe_weight) * probs + config.probe_weight * probe
    return probs


def _suggestions(probs: np.ndarray, labels: np.ndarray, is_noisy: np.ndarray) -> np.ndarray:
    """(N,) the most probable class, or for a flagged row the most probable class other than its given
    label (a flag chosen with the transitions can fall on a row whose mix still prefers its label)."""
    if not len(labels):
        return np.zeros(0, np.int64)
    return np.where(is_noisy, best_other(probs, labels), probs.argmax(axis=1)).astype(np.int64)
