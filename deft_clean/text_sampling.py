"""Which classes a DeFT training step encodes when there are many (``--text-classes``).

Every step runs the frozen text tower forward and backward over two prompts per encoded class, so
encoding all ``K`` classes makes a step's cost grow with ``K`` (at 1,000 classes the text side is
most of the step). A step's loss only reads a few columns of the ``(B, K)`` similarities: the given
labels (CE, the clean rule, the negative prompts' "yes"), the complementary labels (the negative
prompts' "no") and the pseudo-labels of unselected samples. The positive prompts' CE softmax needs
other classes as competitors, and a uniform sample of them stands in for the rest.

So a step encodes ``C = max(cap, 2B)`` classes: every given and complementary label of the batch
(at most ``2B``), the rest drawn uniformly from the other classes. ``C`` never depends on the
data, so the step keeps fixed shapes and never waits on the device. When ``K <= C`` nothing is
sampled and the step is exactly the full one. Pseudo-labels are then the argmax over the encoded
classes: they always include the given label, and a class outside them cannot be a target of the
negative prompts' loss in this step anyway.
"""

from __future__ import annotations

import torch


def step_classes(
    labels: torch.Tensor,
    complementary: torch.Tensor,
    num_classes: int,
    cap: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The ``(C,)`` sorted class indices a step encodes, or None to encode all ``num_classes``.

    ``labels`` and ``complementary`` are the batch's ``(B,)`` given and complementary labels; every
    one of them is in the result. ``C = max(cap, 2B)``; None when ``num_classes <= C``.
    """
    size = max(cap, labels.numel() + complementary.numel())
    if num_classes <= size:
        return None
    priority = torch.rand(num_classes, generator=generator, device=labels.device)  # (K,) in [0, 1)
    priority[labels] = 2.0  # needed classes rank above every sampled one
    priority[complementary] = 2.0
    return priority.topk(size).indices.sort().values


def to_local(classes: torch.Tensor, num_classes: int, *labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``labels`` tensor of class indices → positions in ``classes`` (the similarity columns).

    Every label must be in ``classes`` (:func:`step_classes` guarantees it for the batch's labels).
    """
    where = torch.full((num_classes,), -1, dtype=torch.long, device=classes.device)  # (K,)
    where[classes] = torch.arange(classes.numel(), device=classes.device)
    return tuple(where[label] for label in labels)
