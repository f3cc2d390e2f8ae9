"""The TeS loss (Wang et al., ICCV 2023): text supervision for a vision classifier. Pure functions.

A fixed text classifier (class-name prompts through the text tower, L2-normalised, frozen) and a
projection head on the image features give *text logits* ``z_t = proj(f) · T / τ`` of shape
``(B, K)``. TeS then trains the vision head on a soft target mixing the text distribution with the
given label, and the projection head on the given label:

    q = λv · softmax(z_t) + (1 − λv) · onehot(y)          (no gradient)
    loss = CE(z_v, q) + λt · CE(z_t, y)

τ divides once, inside ``z_t``, exactly as the authors' ``TeS_loss.py`` (``softmax(x_proj @ T.T / tau)``).
With ``λv = 0`` and ``λt = 0`` the loss is plain cross-entropy on the vision logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_logits(projected: torch.Tensor, text_embeddings: torch.Tensor, tau: float) -> torch.Tensor:
    """Cosine logits against the fixed text classifier.

    ``projected`` (B, D) and ``text_embeddings`` (K, D) must be L2-normalised; returns (B, K) = cos / τ.
    """
    return projected @ text_embeddings.t() / tau


@torch.no_grad()
def tes_soft_targets(text_logits: torch.Tensor, labels: torch.Tensor, *, lambda_v: float) -> torch.Tensor:
    """The vision head's target, (B, K) float32, rows summing to 1: λv·softmax(z_t) + (1 − λv)·onehot(y)."""
    probs = torch.softmax(text_logits.float(), dim=1)  # (B, K)
    onehot = F.one_hot(labels, num_classes=text_logits.shape[1]).float()  # (B, K)
    return lambda_v * probs + (1.0 - lambda_v) * onehot


def tes_loss(
    vision_logits: torch.Tensor,
    text_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lambda_t: float,
    lambda_v: float,
) -> torch.Tensor:
    """Scalar TeS loss, averaged over the batch.

    Parameters
    ----------
    vision_logits : (B, K) logits of the linear vision head.
    text_logits : (B, K) ``proj(f) · T / τ`` from :func:`text_logits`.
    labels : (B,) int64 class indices (the given, or relabelled, labels).
    lambda_t : weight of the text-classifier cross-entropy.
    lambda_v : weight of the text distribution inside the vision head's soft target.
    """
    target = tes_soft_targets(text_logits, labels, lambda_v=lambda_v)  # (B, K), no gradient
    loss_vision = F.cross_entropy(vision_logits.float(), target)
    loss_text = F.cross_entropy(text_logits.float(), labels)
    return loss_vision + lambda_t * loss_text
