"""A causal text transformer run once over a shared prefix and then over many suffixes that attend to it.

Every DeFT prompt is ``[SOT] ctx₁ … ctx_M <class name> . [EOT]`` with one context shared by all classes.
Under a causal mask a position only sees the positions before it, so the first ``P = 1 + M`` positions
(17 of CLIP ViT-B-16's 23 with 16 context vectors) come out of every layer identical for every class. The
plain forward computes them once per class; here they are computed once per prompt set (positive,
negative), and each class runs only its ``S`` suffix positions, which attend to the prefix's cached keys and
values of the same layer. The result is the plain forward's, up to float rounding (the tests check 1e-5);
gradients reach the context through the prefix and through every suffix's attention to it.

Only open_clip's default ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with one packed in-projection,
no extra key/value bias, no dropout) is supported: :func:`supports_prefix` says when a transformer is one,
and the prompt learner runs the plain forward otherwise (class-specific contexts, bidirectional towers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supports_prefix(transformer: nn.Module, attn_mask: torch.Tensor | None) -> bool:
    """True when ``transformer``'s blocks are ones :func:`prefix_forward` reproduces, under a causal mask."""
    if attn_mask is None or getattr(transformer, "grad_checkpointing", False):
        return False
    size = attn_mask.shape[0]
    causal = torch.full((size, size), float("-inf"), device=attn_mask.device).triu(1)
    if not torch.equal(attn_mask.float(), causal):
        return False
    return all(_plain_block(block) for block in getattr(transformer, "resblocks", [None]))


def _plain_block(block: nn.Module | None) -> bool:
    attn = getattr(block, "attn", None)
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and attn.dropout == 0.0
        and not hasattr(block, "ln_1_kv")
    )


def prefix_forward(transformer: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """The transformer's output at the suffix positions of ``cat(prefix[g], suffix[g, c])`` for every g, c.

    ``prefix`` (G, P, D): G prompt sets' shared first positions; ``suffix`` (G, C, S, D): the positions after
    them, per set and class; both with positional embeddings added. Returns (G, C, S, D).
    """
    groups, classes, length, width = suffix.shape
    x = suffix.reshape(groups * classes, length, width)
    for block in transformer.resblocks:
        prefix, keys, values = _block(block, prefix, None)
        past = (_per_class(keys, classes), _per_class(values, classes))  # (G·C, H, P, hd) each
        x = _block(block, x, past)[0]
    return x.reshape(groups, classes, length, width)


def _per_class(states: torch.Tensor, classes: int) -> torch.Tensor:
    """(G, H, P, hd) → (G·C, H, P, hd): each set's prefix keys or values, once per class of the set."""
    groups, *rest = states.shape
    return states.unsqueeze(1).expand(groups, classes, *rest).reshape(groups * classes, *rest)


def _block(
    block: nn.Module, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``ResidualAttentionBlock`` on (N, T, D) tokens that follow ``past`` (keys, values) positions.

    Returns the block's output and these tokens' own keys and values, (N, H, T, hd) each, for later ones.
    """
    attn = block.attn
    query, key, value = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    query, key, value = (_split_heads(t, attn.num_heads) for t in (query, key, value))
    length = x.shape[1]
    mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()  # causal among these
    all_keys, all_values = key, value
    if past is not None:  # every token sees the whole prefix
        all_keys, all_values = torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)
        seen = torch.ones(length, past[0].shape[2], dtype=torch.bool, device=x.device)
        mask = torch.cat([seen, mask], dim=1)
    out = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=mask)  # (N, H, T, hd)
    out = attn.out_proj(out.transpose(1, 2).reshape(x.shape))
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, key, value


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, T, D) → (N, H, T, D / H)."""
    n, length, width = t.shape
    return t.reshape(n, length, heads, width // heads).transpose(1, 2)
