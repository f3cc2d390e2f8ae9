"""--text-classes: a training step encodes the classes its loss needs (+ a sample); scoring encodes all.

The step is checked against the full-softmax step written out here (every class encoded, the loss on
the whole (B, K) similarities): equal below the cap, and equal to that loss restricted to the encoded
columns above it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deft_clean.backbone import load_backbone
from deft_clean.config import BackboneConfig, DetectConfig
from deft_clean.deft_model import DeftModel
from deft_clean.errors import ConfigError
from deft_clean.scoring import clean_probability, complementary_labels, deft_loss, select_clean
from deft_clean.text_sampling import step_classes, to_local
from deft_clean.training import _train_step

BATCH = 6


def _net(num_classes: int, **config) -> tuple[DeftModel, DetectConfig]:
    torch.manual_seed(0)
    config = DetectConfig(peft="none", n_ctx=4, **config)
    names = [f"class {k}" for k in range(num_classes)]
    net = DeftModel(load_backbone(BackboneConfig(model="test-tiny")), names, config)
    return net.train(), config


def _batch(net: DeftModel, num_classes: int) -> tuple[SimpleNamespace, torch.Tensor]:
    """A stand-in for detect's Batches (labels, device) and frozen-trunk features of random images."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        trunk = net.trunk_features(torch.randn(BATCH, 3, 32, 32, generator=gen))
    labels = torch.randint(0, num_classes, (BATCH,), generator=gen)
    return SimpleNamespace(labels=labels, device=torch.device("cpu")), trunk


def _sampled_step(net, config, data, trunk, *, warm, seed=5):
    """detect's step with lr 0 (parameters unchanged, gradients kept): (loss, gradients)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    index = torch.arange(BATCH)
    gen = torch.Generator().manual_seed(seed)
    totals = _train_step(net, data, index, trunk, optimizer, config, warm=warm, generator=gen)
    return totals[0] / BATCH, [p.grad.clone() for p in net.prompts.parameters()]


def _full_loss(net, config, labels, complementary, trunk, *, warm, columns=None):
    """The full-softmax step's loss: all K prompts encoded; ``columns`` restricts the (B, K) similarities."""
    net.zero_grad(set_to_none=True)
    s_pos, s_neg = net.similarities(net.image_features(trunk=trunk))  # (B, K)
    if columns is not None:
        s_pos, s_neg = s_pos[:, columns], s_neg[:, columns]
    selected = None
    if not warm:
        selected = select_clean(clean_probability(s_pos.detach(), s_neg.detach()), labels)
    loss = deft_loss(s_pos, s_neg, labels, complementary, selected)[0]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.prompts.parameters()]


@pytest.mark.parametrize("warm", [True, False])
def test_step_equals_the_full_step_when_classes_fit_under_the_cap(warm):
    net, config = _net(5, text_classes=5)
    data, trunk = _batch(net, 5)
    loss, grads = _sampled_step(net, config, data, trunk, warm=warm)
    complementary = complementary_labels(data.labels, 5, torch.Generator().manual_seed(5))
    expected_loss, expected_grads = _full_loss(net, config, data.labels, complementary, trunk, warm=warm)
    assert loss.item() == expected_loss.item()
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert torch.equal(grad, expected)


@pytest.mark.parametrize("warm", [True, False])
def test_step_over_the_cap_encodes_what_the_loss_needs_and_matches_those_columns(monkeypatch, warm):
    k, cap = 40, 2 * BATCH + 3
    net, config = _net(k, text_classes=cap)
    data, trunk = _batch(net, k)
    encoded = []
    forward = net.prompts.forward
    monkeypatch.setattr(
        net.prompts, "forward", lambda classes=None: encoded.append(classes) or forward(classes)
    )
    loss, grads = _sampled_step(net, config, data, trunk, warm=warm, seed=5)
    (classes,) = encoded  # one text-tower call per step
    assert classes.shape == (cap,) and classes.unique().numel() == cap
    complementary = complementary_labels(data.labels, k, torch.Generator().manual_seed(5))
    assert set(data.labels.tolist()) | set(complementary.tolist()) <= set(classes.tolist())
    local = to_local(classes, k, data.labels, complementary)
    expected_loss, expected_grads = _full_loss(net, config, *local, trunk, warm=warm, columns=classes)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_step_classes_keeps_every_needed_class_and_samples_the_rest():
    labels, complementary = torch.tensor([3, 3, 7]), torch.tensor([0, 9, 7])
    assert step_classes(labels, complementary, 8, cap=8) is None  # K <= cap: every class
    assert len(step_classes(labels, complementary, 10, cap=4)) == 6  # the cap is raised to 2B = 6
    classes = step_classes(labels, complementary, 100, cap=10, generator=torch.Generator().manual_seed(0))
    assert classes.tolist() == sorted(set(classes.tolist())) and len(classes) == 10
    assert {0, 3, 7, 9} <= set(classes.tolist())
    draws = [
        step_classes(labels, complementary, 100, 10, torch.Generator().manual_seed(s)) for s in range(50)
    ]
    others = torch.cat(draws)[~torch.isin(torch.cat(draws), torch.tensor([0, 3, 7, 9]))]
    assert others.unique().numel() > 60  # the fill is spread over the other classes, not fixed
    assert to_local(classes, 100, torch.tensor([9, 0]))[0].tolist() == [
        classes.tolist().index(9),
        classes.tolist().index(0),
    ]


def test_cap_below_twice_the_batch_is_raised_to_it():
    labels = torch.arange(4)
    classes = step_classes(labels, labels + 4, 50, cap=2, generator=torch.Generator().manual_seed(0))
    assert classes.tolist() == list(range(8))


def test_prompts_encode_the_chosen_classes_and_scoring_encodes_all_in_chunks():
    net, _ = _net(7)
    with torch.no_grad():
        pos, neg = net.prompts()
        some_pos, some_neg = net.prompts(torch.tensor([1, 4, 6]))
        torch.testing.assert_close(some_pos, pos[[1, 4, 6]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(some_neg, neg[[1, 4, 6]], rtol=1e-5, atol=1e-6)
    chunked_pos, chunked_neg = net.prompts.encode_all(chunk=3)
    assert not chunked_pos.requires_grad
    torch.testing.assert_close(chunked_pos, pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_neg, neg, rtol=1e-5, atol=1e-6)
    whole_pos, _ = net.prompts.encode_all()  # K <= chunk: one call, the full encoding exactly
    assert torch.equal(whole_pos, pos)


def test_class_specific_contexts_are_picked_with_their_classes():
    net, _ = _net(6, class_specific_ctx=True)
    with torch.no_grad():
        net.prompts.pos_ctx.add_(torch.randn_like(net.prompts.pos_ctx))
        pos, _ = net.prompts()
        torch.testing.assert_close(net.prompts(torch.tensor([5, 0]))[0], pos[[5, 0]], rtol=1e-5, atol=1e-6)


def test_text_classes_must_be_at_least_two():
    with pytest.raises(ConfigError, match="--text-classes 1"):
        DetectConfig(text_classes=1)


def test_cli_refuses_a_text_classes_below_two(tmp_path):
    from typer.testing import CliRunner

    from deft_clean.cli import app

    result = CliRunner().invoke(app, ["detect", str(tmp_path), "--text-classes", "1"])
    assert result.exit_code != 0
    assert "--text-classes 1 is invalid" in result.output and "Traceback" not in result.output
