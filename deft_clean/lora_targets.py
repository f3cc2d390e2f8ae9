"""Which image-tower modules LoRA wraps by default, by the kind of tower (ViT, ResNet, conv, timm)."""

from __future__ import annotations

import re
from typing import Any

import torch

VIT_LORA_TARGETS = ("attn", "c_fc", "c_proj")  # nn.MultiheadAttention (Q/K/V + out) and the MLP Linears
RESNET_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "c_proj")  # ModifiedResNet's attention pool
CONV_LORA_TARGETS = ("conv_pw", "conv_pwl", "conv_head")  # EfficientNet/MobileNet 1x1 convs ...
CONV_LORA_STAGES = 3  # ... in the last 3 stages of ``blocks`` only (conv_head always); see _late_stages
_STAGE = re.compile(r"(?:^|\.)blocks\.(\d+)\.\d+\.")  # timm: blocks.<stage>.<block>.<layer>
TIMM_VIT_LORA_TARGETS = ("qkv", "fc1", "fc2")


def _late_stages(visual: torch.nn.Module | None) -> tuple[str, ...]:
    """LoRA targets of a conv tower: ``blocks.S.I.conv_pw``/``conv_pwl`` of the last stages, ``conv_head``.

    Leaving the high-resolution early stages without adapters means the backward pass stops before
    them: much faster training with the same detection (measured in docs/benchmarks.md).
    ``visual`` None (the registry listing): a readable description instead of module names. A tower
    without numbered ``blocks`` stages gets every matching convolution.
    """
    if visual is None:
        return (f"conv_pw/conv_pwl of the last {CONV_LORA_STAGES} stages", "conv_head")
    names = [name for name, _ in visual.named_modules() if name.rsplit(".", 1)[-1] in CONV_LORA_TARGETS]
    stage_of = {name: int(match.group(1)) for name in names if (match := _STAGE.search(name))}
    late = set(sorted(set(stage_of.values()))[-CONV_LORA_STAGES:])
    if not late:
        return tuple(names)
    return tuple(name for name in names if name.endswith("conv_head") or stage_of.get(name) in late)


def default_lora_targets(vision_cfg: dict[str, Any], visual: torch.nn.Module | None) -> tuple[str, ...]:
    """Default LoRA target suffixes for an image tower, by its kind; only those present when built.

    ViT: Q/K/V and output of each ``nn.MultiheadAttention`` (peft wraps the whole module) and the MLP.
    Conv towers (EfficientNet, MobileNet, MixNet): the 1x1 convolutions of the last stages only.
    Timm towers other than known kinds, with no match, fall back to the names of their Linear layers.
    """
    timm_name = vision_cfg.get("timm_model_name") or ""
    if any(kind in timm_name for kind in ("efficientnet", "mobilenet", "mixnet")):
        return _late_stages(visual)
    if timm_name:
        targets = TIMM_VIT_LORA_TARGETS
    elif isinstance(vision_cfg.get("layers"), (list, tuple)):
        targets = RESNET_LORA_TARGETS
    else:
        targets = VIT_LORA_TARGETS
    if visual is None:
        return targets
    leaves = {name.rsplit(".", 1)[-1]: module for name, module in visual.named_modules() if name}
    present = tuple(t for t in targets if t in leaves)
    if present:
        return present
    return tuple(sorted(n for n, m in leaves.items() if isinstance(m, torch.nn.Linear)))
