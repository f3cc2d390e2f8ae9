"""The TeS loss (Wang et al., ICCV 2023): text supervision for a vision classifier, and the head it trains.

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
from torch import nn


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


class ClassifierHead(nn.Module):
    """Linear vision head and, for TeS, the authors' projection head to the text space.

    ``forward(features (B, E))`` returns ``(vision_logits (B, K), text_logits (B, K) or None)``.
    The projection is Linear-BN-ReLU-Linear, L2-normalised, as in the authors' ``model.py``.
    """

    def __init__(self, feature_dim: int, num_classes: int, text_embeddings: torch.Tensor | None, tau: float):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)
        self.projection: nn.Module | None = None
        self.tau = tau
        if text_embeddings is not None:
            self.projection = nn.Sequential(
                nn.Linear(feature_dim, feature_dim),
                nn.BatchNorm1d(feature_dim),
                nn.ReLU(inplace=True),
                nn.Linear(feature_dim, text_embeddings.shape[1]),
            )
            self.register_buffer("text_embeddings", text_embeddings, persistent=False)  # (K, D) frozen

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.fc(features)  # (B, K)
        if self.projection is None:
            return logits, None
        projected = F.normalize(self.projection(features).float(), dim=1)  # (B, D)
        with torch.autocast(features.device.type, enabled=False):  # cos / 0.03 needs fp32, not bf16
            return logits, text_logits(projected, self.text_embeddings.float(), self.tau)
