"""The rules a validated data set must meet before ``detect`` trains on it, in one list ``check`` runs too.

``load_manifest`` checks every row (files, labels, duplicates, class sizes). What is left depends on
the run: DeFT contrasts each class with the others (its negative prompts learn from labels drawn
among the *other* classes), so it needs two classes with readable images; and every class name must fit
the chosen backbone's text tower next to the learned context vectors. :func:`detect_problems` is that
list; ``detect`` refuses a data set it finds fault with before building the model, and ``deft-clean
check`` reports the same problems, so a dataset that passes ``check`` does not fail ``detect`` on them.
``finetune`` applies the class-count rule (:func:`refuse_one_class`) before it trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deft_clean.backbone import load_tokenizer
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, resolve_backbone
from deft_clean.data import Manifest, load_manifest
from deft_clean.errors import DataError, DeftCleanError, Problem
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.prompts import LENGTH_HINT, too_long_names


def class_count_problems(manifest: Manifest) -> list[Problem]:
    """One problem when fewer than two classes have a readable image (DeFT compares classes)."""
    present = np.unique(manifest.labels[manifest.readable & (manifest.labels >= 0)])
    if len(present) >= 2:
        return []
    names = ", ".join(repr(manifest.class_ids[k]) for k in present) or "none"
    fix = "Add images of the other classes (a label can only be judged wrong against another class)."
    if manifest.fingerprint.get("source") == "imagefolder":
        fix += " Without a labels CSV, DATA_DIR is read as an ImageFolder: each subfolder is a class."
    return [
        Problem(
            "one_class",
            f"{len(present)} class with readable images ({names}); DeFT needs at least 2",
            fix=fix,
        )
    ]


def refuse_one_class(manifest: Manifest, source: str) -> None:
    """``finetune``'s rule, before training: :func:`class_count_problems` (a classifier of one class
    learns nothing), raised with the message ``check`` gives."""
    problems = class_count_problems(manifest)
    if problems:
        raise DataError(problems, source=source)


def name_length_problems(names: list[str], backbone: BackboneConfig, detect: DetectConfig) -> list[Problem]:
    """One problem per class name whose prompt does not fit the text tower with ``--n-ctx`` (or
    ``--ctx-init``'s) context vectors; the rule of :class:`deft_clean.prompts.DualPromptLearner`."""
    tokenizer = load_tokenizer(backbone)
    ids = tokenizer([f"{name}." for name in names]).long()  # (K, L), padded with 0 after the end token
    end = (ids != 0).sum(dim=1) - 1
    n_ctx = detect.n_ctx
    if detect.ctx_init:
        n_ctx = int((tokenizer([detect.ctx_init]).long() != 0).sum()) - 2  # minus start and end tokens
    return [
        Problem(
            "long_class_name",
            f"class name {name!r} needs {needed} tokens with {n_ctx} context vectors; the text tower of "
            f"{backbone.model!r} takes {ids.shape[1]}",
            fix=LENGTH_HINT,
        )
        for name, needed in too_long_names(names, end, n_ctx, ids.shape[1])
    ]


def detect_problems(manifest: Manifest, backbone: BackboneConfig, detect: DetectConfig) -> list[Problem]:
    """Every rule ``detect`` applies to a validated data set, for the resolved ``backbone``."""
    problems = class_count_problems(manifest)
    return problems + name_length_problems(manifest.prompt_names(), backbone, detect)


def refuse_unfit(manifest: Manifest, backbone: BackboneConfig, detect: DetectConfig, source: str) -> None:
    """Raise one DataError listing :func:`detect_problems`, if any."""
    problems = detect_problems(manifest, backbone, detect)
    if problems:
        raise DataError(problems, source=source)


def check_dataset(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    *,
    data: DataConfig = DataConfig(),
    backbone: BackboneConfig = BackboneConfig(),
    detect: DetectConfig = DetectConfig(),
    reporter: Reporter = SilentReporter(),
) -> Manifest:
    """``deft-clean check``: every row check (:func:`load_manifest`) and every rule of ``detect`` for
    ``backbone`` and ``detect`` (:func:`detect_problems`), all problems in one DataError.

    When the backbone's tokenizer cannot be loaded here (e.g. its extra is not installed), the class-name
    rule is skipped with a warning instead of failing a check of the data."""
    manifest = load_manifest(data_dir, labels_csv, config=data, reporter=reporter)
    problems = class_count_problems(manifest)
    try:
        problems += name_length_problems(manifest.prompt_names(), resolve_backbone(backbone), detect)
    except DeftCleanError as error:
        reporter.log(f"class names not checked against the backbone: {error}", level="warning")
    if problems:
        raise DataError(problems, source=str(labels_csv or data_dir))
    return manifest
