"""DualPromptLearner: prompts built from embeddings reproduce the text tower's own encoding."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from transformers import BertConfig

from deft_clean.errors import ConfigError
from deft_clean.prompts import DualPromptLearner

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "deft-prompts-tiny.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model("deft-prompts-tiny", pretrained=None).eval()
    return model, open_clip.get_tokenizer("deft-prompts-tiny")


class WordTokenizer:
    """BERT-shaped ids without a vocabulary file: [CLS]=1 words… [SEP]=2, pad=0, words hashed."""

    def __init__(self, length: int = 16) -> None:
        self.length = length

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, text in enumerate(texts):
            words = text.replace(".", " .").split()
            ids = [1] + [3 + sum(map(ord, w)) % 90 for w in words] + [2]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def hf_model():
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Module()  # stands in for CustomTextCLIP: only .text is read
    model.text = HFTextEncoder(
        "bert", output_dim=16, config=config, pooler_type="mean_pooler", proj_type="linear"
    )
    return model.eval()


def _ctx_from_phrase_matches_encode_text(model, tokenizer, encode):
    names = ["cat", "sea_lion"]
    learner = DualPromptLearner(model, tokenizer, names, ctx_init="a photo of a")
    assert learner.n_ctx == 4  # the phrase's tokens decide M
    pos, neg = learner()
    expected = encode(tokenizer(["a photo of a cat.", "a photo of a sea lion."]))
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(pos, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(neg, expected, atol=1e-5, rtol=1e-4)  # same init for both sets


def test_open_clip_tower_reproduces_encode_text(clip):
    model, tokenizer = clip
    with torch.no_grad():
        _ctx_from_phrase_matches_encode_text(model, tokenizer, model.encode_text)


def test_hf_tower_reproduces_its_forward():
    model, tokenizer = hf_model(), WordTokenizer()
    with torch.no_grad():
        _ctx_from_phrase_matches_encode_text(model, tokenizer, model.text)


def test_shapes_state_and_gradients(clip):
    model, tokenizer = clip
    learner = DualPromptLearner(
        model, tokenizer, ["a", "b", "c"], n_ctx=5, generator=torch.Generator().manual_seed(0)
    )
    assert learner.pos_ctx.shape == (5, 32) and set(learner.state_dict()) == {"pos_ctx", "neg_ctx"}
    assert 0.01 < float(learner.pos_ctx.detach().std()) < 0.03  # std 0.02 init
    pos, neg = learner()
    assert pos.shape == neg.shape == (3, 16)
    torch.testing.assert_close(pos.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(pos, neg)
    (pos.sum() + 2 * neg.sum()).backward()
    assert learner.pos_ctx.grad.abs().sum() > 0 and learner.neg_ctx.grad.abs().sum() > 0


def test_class_specific_context(clip):
    model, tokenizer = clip
    learner = DualPromptLearner(model, tokenizer, ["a", "b", "c"], n_ctx=4, class_specific=True)
    assert learner.pos_ctx.shape == (3, 4, 32)
    with torch.no_grad():
        before, _ = learner()
        learner.pos_ctx[1] += 1.0
        after, _ = learner()
    assert torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_too_long_class_name_is_refused(clip):
    model, tokenizer = clip
    with pytest.raises(ConfigError, match="'very long name indeed with many words'.*--n-ctx"):
        DualPromptLearner(model, tokenizer, ["ok", "very long name indeed with many words"], n_ctx=16)
