"""apply_peft: exactly the right parameters train, LoRA/VPT change the tower, saving round-trips."""

from __future__ import annotations

import json
from types import SimpleNamespace

import open_clip
import pytest
import torch

from deft_clean.adapters import (
    ImageTuning,
    apply_peft,
    feature_split,
    load_tuning,
    save_tuning,
    untuned_trunk,
)
from deft_clean.config import DetectConfig
from deft_clean.errors import ConfigError

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def _register(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "deft-adapters-tiny.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)


def tiny(always_train=(), seed=0):
    torch.manual_seed(seed)
    model = open_clip.create_model("deft-adapters-tiny", pretrained=None).eval()
    return SimpleNamespace(
        model=model, lora_targets=["c_fc", "c_proj"], always_train=list(always_train), name="tiny"
    )


def images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def train_step(tuning, model, x):
    params = tuning.parameters(model)
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.encode_image(x).pow(2).sum().backward()
    optimizer.step()
    return params


def test_lora_trains_only_lora_weights():
    backbone = tiny()
    model = backbone.model
    tuning = apply_peft(backbone, DetectConfig(peft="lora", lora_rank=2).tuning)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("visual.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = images()
    out_before = model.encode_image(x).detach()
    train_step(tuning, model, x)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at 0 and must have moved
    assert not torch.allclose(model.encode_image(x), out_before)


def test_adapter_parameters_are_the_tower_tuning_without_the_always_trained_heads():
    backbone = tiny(always_train=["visual.proj"])
    tuning = apply_peft(backbone, DetectConfig(peft="lora", lora_rank=2).tuning)
    names = {id(p): n for n, p in backbone.model.named_parameters()}
    adapters = [names[id(p)] for p in tuning.adapter_parameters(backbone.model)]
    assert adapters and all("lora_" in n for n in adapters)
    assert len(tuning.parameters(backbone.model)) == len(adapters) + 1  # + visual.proj


def test_lora_save_and_load_round_trip(tmp_path):
    backbone = tiny()
    tuning = apply_peft(backbone, DetectConfig(peft="lora", lora_rank=2).tuning)
    x = images()
    train_step(tuning, backbone.model, x)
    assert save_tuning(tuning, backbone.model, tmp_path) == ["lora/"]
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    fresh = tiny()
    load_tuning(apply_peft(fresh, DetectConfig(peft="lora", lora_rank=2).tuning), fresh.model, tmp_path)
    torch.testing.assert_close(fresh.model.encode_image(x), backbone.model.encode_image(x))


def test_unknown_lora_target_is_refused_with_names():
    with pytest.raises(ConfigError, match=r"LoRA targets \['nope'\]") as info:
        apply_peft(tiny(), DetectConfig(peft="lora", lora_targets="nope").tuning)
    assert "c_fc" in info.value.hint


def test_vpt_adds_prompt_tokens_and_strips_them():
    backbone = tiny()
    model = backbone.model
    x = images()
    plain = model.encode_image(x).detach()
    tuning = apply_peft(backbone, DetectConfig(peft="vpt", vpt_len=3).tuning)
    assert tuning.visual_prompts.prompts.shape == (2, 3, 32)
    assert not any(p.requires_grad for p in model.parameters())
    prompted = model.encode_image(x)
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain)
    prompted.sum().backward()
    assert tuning.visual_prompts.prompts.grad.abs().sum() > 0
    tuning.visual_prompts.remove()
    torch.testing.assert_close(model.encode_image(x), plain)


@pytest.mark.parametrize("peft", ["lora", "vpt"])
def test_untuned_runs_a_trained_tower_as_before_tuning_then_tuned_again(peft):
    backbone = tiny()
    model, x = backbone.model, images()
    plain = model.encode_image(x).detach()
    tuning = apply_peft(backbone, DetectConfig(peft=peft, lora_rank=2, vpt_len=3).tuning)
    train_step(tuning, model, x)
    tuned = model.encode_image(x).detach()
    training = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not torch.allclose(tuned, plain)
    with torch.no_grad(), tuning.untuned():
        torch.testing.assert_close(model.encode_image(x), plain)
    torch.testing.assert_close(model.encode_image(x), tuned)
    with pytest.raises(RuntimeError, match="inside"), tuning.untuned():
        raise RuntimeError("inside")
    torch.testing.assert_close(model.encode_image(x), tuned)  # tuned again after an error too
    assert {n for n, p in model.named_parameters() if p.requires_grad} == training  # still trains


def test_untuned_trunk_is_the_trunk_a_frozen_tower_would_cache():
    vit = tiny()
    frozen = apply_peft(vit, DetectConfig(peft="none").tuning)
    assert untuned_trunk(vit.model, frozen) is feature_split(vit.model)[0] is vit.model.visual
    projected = tiny(always_train=["visual.proj"])  # a trained part inside the tower: nothing to cache
    assert untuned_trunk(projected.model, apply_peft(projected, DetectConfig(peft="none").tuning)) is None
    assert feature_split(projected.model) is None
    towered = tiny(always_train=["visual.head"])
    towered.model.visual = torch.nn.Module()
    towered.model.visual.trunk, towered.model.visual.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    frozen = apply_peft(towered, DetectConfig(peft="none").tuning)
    assert (
        untuned_trunk(towered.model, frozen) is feature_split(towered.model)[0] is towered.model.visual.trunk
    )
    # what LoRA on the same tower trains besides its adapters
    lora = ImageTuning(kind="lora", head_names=frozen.head_names)
    assert untuned_trunk(towered.model, lora) is towered.model.visual.trunk


def test_vpt_refuses_a_conv_tower():
    backbone = tiny()
    backbone.model.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ConfigError, match="--peft vpt needs an open_clip ViT.*Sequential"):
        apply_peft(backbone, DetectConfig(peft="vpt").tuning)


def test_none_freezes_everything_but_always_train():
    backbone = tiny(always_train=["visual.proj", "text_projection"])
    tuning = apply_peft(backbone, DetectConfig(peft="none").tuning)
    assert sorted(tuning.head_names) == ["text_projection", "visual.proj"]
    assert {n for n, p in backbone.model.named_parameters() if p.requires_grad} == set(tuning.head_names)
    assert feature_split(backbone.model) is None  # a ViT's proj sits inside the tower


def test_feature_split_of_a_frozen_tower_and_of_a_trunk_head_tower():
    backbone = tiny()
    apply_peft(backbone, DetectConfig(peft="none").tuning)
    trunk, head = feature_split(backbone.model)
    assert trunk is backbone.model.visual and isinstance(head, torch.nn.Identity)
    visual = torch.nn.Module()
    visual.trunk, visual.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    backbone.model.visual = visual
    visual.trunk.requires_grad_(False)
    assert feature_split(backbone.model) == (visual.trunk, visual.head)


def test_unknown_peft_kind():
    with pytest.raises(ConfigError, match="--peft 'prefix' is invalid"):
        apply_peft(tiny(), DetectConfig(peft="prefix").tuning)
