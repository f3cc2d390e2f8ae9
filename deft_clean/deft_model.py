"""The DeFT detector network: a tuned image tower + dual prompts → scaled similarities, and its files.

``s⁺ = scale · cos(f(x), T⁺)`` and ``s⁻ = scale · cos(f(x).detach(), T⁻)``, both ``(B, K)``, with
``scale = logit_scale.exp()`` of the backbone (frozen). open_clip initialises ``logit_scale`` to
``log(1/0.07)`` for every model it builds, so backbones that were not trained as CLIP (``offline``,
random weights) use ``1/0.07 ≈ 14.3``.

Saved detector layout (``--save-model DIR``; everything small, the backbone itself is not copied)::

    DIR/detector.json  format, version, the backbone and detect configs, class ids and names, files
    DIR/prompts.pt     DualPromptLearner state: pos_ctx, neg_ctx
    DIR/lora/          peft save_pretrained of the image tower's LoRA (--peft lora)
    DIR/vpt.pt         deep visual prompts (--peft vpt)
    DIR/heads.pt       always-trained parameters by model name (e.g. the offline backbone's heads)

:func:`load_detector` rebuilds the backbone from the saved :class:`BackboneConfig` (same weights
source; random ``test-tiny`` weights are re-drawn from the saved seed) and loads the learned parts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deft_clean.adapters import ImageTuning, apply_peft, feature_split, load_tuning, save_tuning
from deft_clean.backbone import Backbone, load_backbone_on
from deft_clean.config import BackboneConfig, DetectConfig, from_dict, to_dict
from deft_clean.files import atomic_folder, read_description, write_description
from deft_clean.prompts import DualPromptLearner
from deft_clean.runtime import is_conv, seed_everything

DETECTOR_FORMAT = "deft-clean-detector"
DETECTOR_VERSION = 1
DETECTOR_FILE = "detector.json"
DEFAULT_SCALE = 1 / 0.07


class DeftModel(nn.Module):
    """Backbone model with its image-tower tuning and a :class:`DualPromptLearner` for ``class_names``."""

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        config: DetectConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.model, self.embed_dim = backbone.model, backbone.embed_dim
        self.tuning: ImageTuning = apply_peft(backbone, config.tuning)
        self.prompts = DualPromptLearner(
            self.model,
            backbone.tokenizer,
            class_names,
            n_ctx=config.n_ctx,
            ctx_init=config.ctx_init,
            class_specific=config.class_specific_ctx,
            generator=generator,
        )
        self.split = feature_split(self.model) if config.peft == "none" else None
        logit_scale = getattr(self.model, "logit_scale", None)
        self.scale = float(logit_scale.exp()) if logit_scale is not None else DEFAULT_SCALE

    def train(self, mode: bool = True) -> DeftModel:
        """The backbone stays in eval mode (frozen BatchNorm statistics); LoRA dropout follows ``mode``."""
        super().train(mode)
        self.model.eval()
        for name, module in self.model.named_modules():
            if name.endswith("lora_dropout"):
                module.train(mode)
        return self

    def param_groups(self, config: DetectConfig) -> list[dict[str, Any]]:
        """What the optimizer updates, in groups with their ``peak_lr`` for the schedule: the prompts and
        always-trained heads at ``config.lr``, the image-tower adapters at ``config.adapter_peak_lr``."""
        rest = list(self.prompts.parameters()) + self.tuning.head_parameters(self.model)
        adapters = self.tuning.adapter_parameters(self.model)
        peak = config.adapter_peak_lr(is_conv(self.model.visual))
        groups = [{"params": rest, "lr": config.lr, "peak_lr": config.lr}]
        return groups + ([{"params": adapters, "lr": peak, "peak_lr": peak}] if adapters else [])

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of every trained parameter (prompts, heads, adapters), to restart from with :meth:`restore`
        (cross-fitting trains one model per fold from the same initial weights)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trained parameters back to ``state`` (from :meth:`trainable_state`)."""
        params = dict(self.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)

    @property
    def caches_features(self) -> bool:
        """True when the image tower's trunk is frozen: its features can be computed once."""
        return self.split is not None

    def trunk_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, F) frozen trunk features (``caches_features`` only)."""
        return self.split[0](images)

    def image_features(
        self, images: torch.Tensor | None = None, trunk: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised (B, E) image features, from images or from cached trunk features."""
        features = self.split[1](trunk) if trunk is not None else self.model.encode_image(images)
        return F.normalize(features.float(), dim=-1)

    def similarities(
        self, features: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, E) normalised image features → ``(s⁺, s⁻)``, each (B, C); s⁻ does not train the image tower.

        ``text``: the ``(T⁺, T⁻)`` (C, E) each to compare with, from ``self.prompts(classes)`` or
        ``self.prompts.encode_all()``; None encodes all K classes here (C = K).
        """
        t_pos, t_neg = self.prompts() if text is None else text  # (C, E) each
        with torch.autocast(features.device.type, enabled=False):  # cosines in fp32: bf16 would blur them
            features, t_pos, t_neg = features.float(), t_pos.float(), t_neg.float()
            return self.scale * features @ t_pos.t(), self.scale * features.detach() @ t_neg.t()


def save_detector(
    net: DeftModel,
    directory: str | Path,
    *,
    backbone_config: BackboneConfig,
    detect_config: DetectConfig,
    class_ids: list[str],
    class_names: list[str],
) -> Path:
    """Write the learned prompts and adapters with the configs (layout in the module docstring) atomically."""
    if net.tuning.peft_model is not None and not detect_config.lora_targets:
        # record the targets this run used, so a later change of the backbone's defaults cannot break loading
        targets = sorted(net.tuning.peft_model.peft_config["default"].target_modules)
        detect_config = dataclasses.replace(detect_config, lora_targets=",".join(targets))
    with atomic_folder(directory) as folder:
        torch.save({k: v.detach().cpu() for k, v in net.prompts.state_dict().items()}, folder / "prompts.pt")
        files = ["prompts.pt", *save_tuning(net.tuning, net.model, folder)]
        body = {
            "configs": {"backbone": to_dict(backbone_config), "detect": to_dict(detect_config)},
            "class_ids": list(class_ids),
            "class_names": list(class_names),
            "n_ctx": net.prompts.n_ctx,
            "logit_scale": net.scale,
            "files": files,
        }
        write_description(folder, DETECTOR_FILE, DETECTOR_FORMAT, DETECTOR_VERSION, body)
    return Path(directory)


def load_detector(directory: str | Path, *, device: str | None = None) -> tuple[DeftModel, dict[str, Any]]:
    """Rebuild a saved detector: ``(DeftModel in eval mode, detector.json contents)``.

    ``device`` overrides the saved backbone device ('cpu', 'cuda', ...).
    """
    directory = Path(directory)
    hint = "Pass a folder written by 'deft-clean detect --save-model' (this version or older)."
    meta = read_description(directory, DETECTOR_FILE, DETECTOR_FORMAT, DETECTOR_VERSION, hint=hint)
    backbone_values = dict(meta["configs"]["backbone"], **({"device": device} if device else {}))
    backbone_config = from_dict(BackboneConfig, backbone_values)
    config = from_dict(DetectConfig, meta["configs"]["detect"])
    seed_everything(config.seed)  # random-weight backbones are re-drawn as in the run that saved them
    backbone, _ = load_backbone_on(backbone_config)
    net = DeftModel(backbone, meta["class_names"], config)
    net.prompts.load_state_dict(torch.load(directory / "prompts.pt", map_location="cpu"))
    load_tuning(net.tuning, net.model, directory)
    return net.eval(), meta
