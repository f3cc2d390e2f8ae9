"""Parameter-efficient tuning of the image tower for DeFT: LoRA (via peft), deep VPT, or none.

:func:`apply_peft` freezes the whole image-text model, then makes trainable exactly:

* ``lora``: peft LoRA layers on the image tower's modules named by ``--lora-targets`` (default: the
  backbone's ``lora_targets``), injected in place through peft's public ``get_peft_model``;
* ``vpt``: deep visual prompts, ``vpt_len`` learnable tokens fed to every block of an open_clip
  ViT image tower (appended before block 0, replaced before every later block, dropped after the
  last block so the tower's pooling sees only its own tokens);
* ``none``: nothing in the tower (its features can then be computed once and cached);

plus, whatever the choice, every parameter whose name starts with one of the backbone's
``always_train`` prefixes (e.g. the fresh projection heads of the ``offline`` backbone).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deft_clean.backbone import Backbone
from deft_clean.config import TuningSpec
from deft_clean.errors import ConfigError


class VisualPrompts(nn.Module):
    """Deep visual prompt tuning on an open_clip ``VisionTransformer`` through forward hooks.

    ``prompts``: ``(n_blocks, length, width)``, initialised uniformly in ±√(6 / (3·patch² + width))
    as in VPT. The hooks live as long as this module's owner keeps it.
    """

    def __init__(self, visual: nn.Module, length: int) -> None:
        super().__init__()
        blocks = visual.transformer.resblocks
        width = visual.transformer.width
        patch = visual.conv1.kernel_size
        bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + width))
        weight = visual.conv1.weight
        self.prompts = nn.Parameter(torch.empty(len(blocks), length, width, device=weight.device))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.length = length
        self.active = True  # False: the hooks pass tokens through (:meth:`ImageTuning.untuned`)
        self.token_dim = 1 if getattr(visual.transformer, "batch_first", True) else 0
        self.handles = [
            block.register_forward_pre_hook(self._make_insert(i)) for i, block in enumerate(blocks)
        ]
        self.handles.append(blocks[-1].register_forward_hook(self._strip))

    def _make_insert(self, index: int) -> Any:
        def insert(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            if not self.active:
                return args
            x = args[0]  # (N, L, D) batch-first, else (L, N, D)
            if index > 0:
                x = x.narrow(self.token_dim, 0, x.shape[self.token_dim] - self.length)
            batch = x.shape[1 - self.token_dim]
            prompt = self.prompts[index].to(x.dtype).unsqueeze(1 - self.token_dim)
            prompt = prompt.expand(-1, batch, -1) if self.token_dim == 0 else prompt.expand(batch, -1, -1)
            return (torch.cat([x, prompt], dim=self.token_dim), *args[1:])

        return insert

    def _strip(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return output
        return output.narrow(self.token_dim, 0, output.shape[self.token_dim] - self.length)

    def remove(self) -> None:
        """Detach the hooks: the tower runs as before."""
        for handle in self.handles:
            handle.remove()


@dataclass
class ImageTuning:
    """What :func:`apply_peft` made trainable, and what is needed to save it."""

    kind: str
    peft_model: Any = None  # peft.PeftModel wrapping the (modified in place) image tower, for ``lora``
    visual_prompts: VisualPrompts | None = None  # for ``vpt``
    head_names: list[str] = field(default_factory=list)  # always-trained parameter names of the model

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every trainable parameter of the tuned model (always-trained heads, adapters, visual prompts)."""
        return self.head_parameters(model) + self.adapter_parameters(model)

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The always-trained parameters (e.g. the offline backbone's fresh projection heads)."""
        named = dict(model.named_parameters())
        return [named[name] for name in self.head_names]

    def adapter_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The image tower's own tuning (LoRA weights, visual prompts), without the always-trained heads."""
        heads = set(self.head_names)
        params = [p for n, p in model.named_parameters() if p.requires_grad and n not in heads]
        if self.visual_prompts is not None:
            params.append(self.visual_prompts.prompts)
        return params

    @contextlib.contextmanager
    def untuned(self) -> Iterator[None]:
        """Run the image tower as it was before tuning (LoRA layers and visual prompts off), e.g. for the
        linear probe's features, which must not move as the tower trains; the always-trained heads are
        left as they are (the probe reads the features before them, :func:`untuned_trunk`)."""
        if self.visual_prompts is not None:
            self.visual_prompts.active = False
        lora_off = (
            self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext()
        )
        try:
            with lora_off:
                yield
        finally:
            if self.visual_prompts is not None:
                self.visual_prompts.active = True


def apply_peft(backbone: Backbone, spec: TuningSpec) -> ImageTuning:
    """Freeze ``backbone.model`` and make the image-tower tuning ``spec`` asks for trainable.

    The model is modified in place; the returned :class:`ImageTuning` says what is trainable.
    LoRA targets default to the backbone's ``lora_targets``.
    """
    model = backbone.model
    model.requires_grad_(False)
    tuning = ImageTuning(kind=spec.peft)
    if spec.peft == "lora":
        targets = list(spec.lora_targets or backbone.lora_targets)
        tuning.peft_model = _add_lora(model.visual, targets, spec)
    elif spec.peft == "vpt":
        tuning.visual_prompts = _add_vpt(model.visual, backbone.name, spec.vpt_len)
    tuning.head_names = _unfreeze(model, list(backbone.always_train or []))
    return tuning


def _add_lora(visual: nn.Module, targets: list[str], spec: TuningSpec) -> Any:
    from peft import LoraConfig, get_peft_model  # lazy: peft imports transformers (seconds), LoRA runs only

    lora = LoraConfig(
        r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=targets
    )
    try:
        return get_peft_model(visual, lora)
    except ValueError as error:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in visual.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"LoRA targets {targets} do not fit the image tower ({error}).",
            hint=f"Pass --lora-targets with module names such as: {', '.join(names[:12])}.",
        ) from None


def _add_vpt(visual: nn.Module, name: str, length: int) -> VisualPrompts:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1"):
        raise ConfigError(
            f"--peft vpt needs an open_clip ViT image tower; backbone {name!r} has a "
            f"{type(visual).__name__}.",
            hint="Use --peft lora or --peft none with this backbone.",
        )
    return VisualPrompts(visual, length)


def _unfreeze(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Make parameters starting with any prefix trainable; returns their names."""
    names = [n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)]
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return names


def feature_split(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(frozen trunk, trainable head)`` with ``head(trunk(x)) == model.visual(x)``, or None.

    With a frozen tower (``--peft none``) the trunk's features are computed once and only the
    head runs each step. None when trainable parameters sit where the tower cannot be split (the
    tower must then run every step).
    """
    return _split(model.visual, [n for n, p in model.visual.named_parameters() if p.requires_grad])


def untuned_trunk(model: nn.Module, tuning: ImageTuning) -> nn.Module | None:
    """The trunk :func:`feature_split` would cache for this backbone with ``--peft none`` (where only the
    always-trained parameters train), or None where there is none. Run under :meth:`ImageTuning.untuned`,
    it gives a tuned tower the features a frozen one would have."""
    trained = [name.removeprefix("visual.") for name in tuning.head_names if name.startswith("visual.")]
    split = _split(model.visual, trained)
    return None if split is None else split[0]


def _split(visual: nn.Module, trained: list[str]) -> tuple[nn.Module, nn.Module] | None:
    """``visual``'s (trunk, head) when only its parameters ``trained`` (names within it) train: the whole
    tower when none do, a timm tower's trunk when they are all in its head, else None."""
    if not trained:
        return visual, nn.Identity()
    if hasattr(visual, "trunk") and hasattr(visual, "head") and all(n.startswith("head.") for n in trained):
        return visual.trunk, visual.head
    return None


def save_tuning(tuning: ImageTuning, model: nn.Module, directory: Path) -> list[str]:
    """Write the tuned weights under ``directory``; returns the file/dir names written.

    ``lora/`` (peft ``save_pretrained``: adapter_config.json + adapter_model.safetensors),
    ``vpt.pt`` (the visual prompts), ``heads.pt`` (always-trained parameters by model name).
    """
    written = []
    if tuning.peft_model is not None:
        tuning.peft_model.save_pretrained(str(directory / "lora"))
        written.append("lora/")
    if tuning.visual_prompts is not None:
        torch.save({"prompts": tuning.visual_prompts.prompts.detach().cpu()}, directory / "vpt.pt")
        written.append("vpt.pt")
    if tuning.head_names:
        params = dict(model.named_parameters())
        torch.save({n: params[n].detach().cpu() for n in tuning.head_names}, directory / "heads.pt")
        written.append("heads.pt")
    return written


def load_tuning(tuning: ImageTuning, model: nn.Module, directory: Path) -> None:
    """Load what :func:`save_tuning` wrote into a freshly :func:`apply_peft`-ed model (same config)."""
    if tuning.peft_model is not None:
        from peft import set_peft_model_state_dict  # lazy, as in _add_lora
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(tuning.peft_model, load_peft_weights(str(directory / "lora")))
    if tuning.visual_prompts is not None:
        saved = torch.load(directory / "vpt.pt", map_location="cpu")["prompts"]
        tuning.visual_prompts.prompts.data.copy_(saved)
    if tuning.head_names:
        params = dict(model.named_parameters())
        for name, value in torch.load(directory / "heads.pt", map_location="cpu").items():
            params[name].data.copy_(value)
