"""The TeS loss against hand-computed values and its limiting cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deft_clean.tes import tes_loss, tes_soft_targets, text_logits


def test_soft_targets_hand_computed() -> None:
    # softmax([ln 3, 0]) = [0.75, 0.25]; y = 0; λv = 0.2 → [0.2·0.75 + 0.8, 0.2·0.25]
    z_t = torch.tensor([[math.log(3.0), 0.0]])
    q = tes_soft_targets(z_t, torch.tensor([0]), lambda_v=0.2)
    assert torch.allclose(q, torch.tensor([[0.95, 0.05]]))


def test_loss_hand_computed() -> None:
    z_v = torch.tensor([[math.log(4.0), 0.0]])  # log_softmax = [ln 0.8, ln 0.2]
    z_t = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    expected = -(0.95 * math.log(0.8) + 0.05 * math.log(0.2)) + 0.4 * -math.log(0.75)
    loss = tes_loss(z_v, z_t, torch.tensor([0]), lambda_t=0.4, lambda_v=0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.407532, abs=1e-6)


def test_text_logits_divide_by_tau_once() -> None:
    proj = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    text = torch.eye(2)
    z = text_logits(proj, text, tau=0.03)
    assert torch.allclose(z, torch.full((1, 2), (1 / math.sqrt(2)) / 0.03))


def test_soft_target_rows_sum_to_one_and_carry_no_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn(8, 5, generator=gen, requires_grad=True)
    labels = torch.randint(0, 5, (8,), generator=gen)
    q = tes_soft_targets(z_t, labels, lambda_v=0.3)
    assert q.shape == (8, 5)
    assert torch.allclose(q.sum(1), torch.ones(8))
    assert not q.requires_grad
    assert torch.all(q.argmax(1)[q.max(1).values > 0.7] == labels[q.max(1).values > 0.7])


def test_zero_lambdas_reduce_to_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    z_v = torch.randn(16, 7, generator=gen)
    z_t = torch.randn(16, 7, generator=gen)
    labels = torch.randint(0, 7, (16,), generator=gen)
    loss = tes_loss(z_v, z_t, labels, lambda_t=0.0, lambda_v=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(z_v, labels).item(), abs=1e-6)


def test_gradients_reach_both_heads() -> None:
    z_v = torch.zeros(2, 3, requires_grad=True)
    z_t = torch.zeros(2, 3, requires_grad=True)
    tes_loss(z_v, z_t, torch.tensor([0, 2]), lambda_t=0.4, lambda_v=0.2).backward()
    assert z_v.grad is not None and z_v.grad.abs().sum() > 0
    assert z_t.grad is not None and z_t.grad.abs().sum() > 0
    # the soft target is a constant: d/dz_t only comes from the λt term, λt · (softmax − onehot) / B
    expected = 0.4 * (torch.full((2, 3), 1 / 3) - F.one_hot(torch.tensor([0, 2]), 3)) / 2
    assert torch.allclose(z_t.grad, expected, atol=1e-6)
