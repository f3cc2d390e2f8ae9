"""Learnable positive and negative text prompts (DeFT), encoded by the frozen text tower.

Each prompt is ``[start] ctx₁ … ctx_M <class name> . [end]``: ``M`` learnable context vectors
replace the token embeddings right after the start token (SOT for CLIP's tokenizer, [CLS] for
BERT-style ones), the class name's real token embeddings follow. One context is shared by all
classes unless ``class_specific``; there is one positive and one negative set.

Two kinds of text tower are fed with embeddings instead of token ids:

* open_clip's own transformer (a ``CLIP`` model's text attributes, or ``CustomTextCLIP.text``
  when it is a ``TextTransformer``): token + positional embeddings → transformer with its causal
  ``attn_mask`` → ``ln_final`` → pooling (at the end token for ``text_pool_type='argmax'``/``'eos'``,
  the first/last position otherwise) → ``text_projection``.
* an HF text tower (open_clip ``HFTextEncoder``): ``inputs_embeds`` + ``attention_mask`` into the HF
  transformer (which adds its own position embeddings), then the encoder's pooler and ``proj``.

Prompts run only up to the longest one's end token (padding after it reaches no pooled feature under
either tower's mask). With one shared context on open_clip's causal tower, ``[start] ctx`` is run once per
prompt set and each class only over its own tokens (:mod:`deft_clean.prefix_attention`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from deft_clean.errors import BackboneError, ConfigError
from deft_clean.prefix_attention import prefix_forward, supports_prefix

TEXT_CHUNK = 256  # classes per text-tower call when every class is encoded without gradient (scoring)


class _OpenClipText:
    """open_clip's text transformer fed with embeddings; ``src`` holds the text attributes."""

    def __init__(self, src: nn.Module) -> None:
        if getattr(src, "cls_emb", None) is not None or getattr(src, "use_pad_mask", False):
            raise BackboneError(
                "Text towers with a CLS embedding or a padding mask (CoCa-style) are not supported by "
                "the prompt learner.",
                hint="Use a CLIP-style backbone (e.g. ViT-B-16) or the 'offline' backbone.",
            )
        self.src = src
        self.pool_type = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise BackboneError(f"Text pooling '{self.pool_type}' is not supported by the prompt learner.")
        self.eos_id = getattr(src, "text_eos_id", getattr(src, "eos_id", None))
        self.pad_id = getattr(src, "pad_id", 0)
        self.width = src.token_embedding.weight.shape[1]
        self.device = src.token_embedding.weight.device
        # a causal tower pooled at the end token: a prefix shared by all prompts can be run once
        self.causal = self.pool_type in ("argmax", "eos") and supports_prefix(src.transformer, src.attn_mask)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.src.token_embedding(ids)  # (B, L, D)

    def end_index(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) position of each sequence's end token (what 'argmax'/'eos' pooling reads)."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(dim=-1)
        return (ids != self.pad_id).sum(dim=-1) - 1

    def encode(self, embeds: torch.Tensor, ids: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """(B, L, D) prompt embeddings → (B, E) text features (unnormalised)."""
        src, length = self.src, embeds.shape[1]
        cast = src.transformer.get_cast_dtype()
        x = embeds.to(cast) + src.positional_embedding[:length].to(cast)
        mask = src.attn_mask[:length, :length] if src.attn_mask is not None else None
        x = src.ln_final(src.transformer(x, attn_mask=mask))  # (B, L, D)
        if self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "last":
            x = x[:, -1]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), pool_index]
        return self._project(x)

    def encode_after_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, pool_index: torch.Tensor
    ) -> torch.Tensor:
        """Text features of ``cat(prefix[g], suffix[g, c])``, (G, C, E), with the prefix run once per g.

        ``prefix`` (G, P, D) and ``suffix`` (G, C, S, D) are token embeddings; ``pool_index`` (C,) is each
        class's end-token position within the suffix. Only for a ``causal`` tower (equals :meth:`encode`).
        """
        src, start, length = self.src, prefix.shape[1], suffix.shape[2]
        cast = src.transformer.get_cast_dtype()
        positions = src.positional_embedding.to(cast)
        prefix = prefix.to(cast) + positions[:start]
        suffix = suffix.to(cast) + positions[start : start + length]
        x = prefix_forward(src.transformer, prefix, suffix)  # (G, C, S, D)
        x = src.ln_final(x[:, torch.arange(x.shape[1], device=x.device), pool_index])  # (G, C, D)
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.src.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class _HFText:
    """An open_clip ``HFTextEncoder`` fed with ``inputs_embeds``; padding is masked out."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.pad_id = encoder.config.pad_token_id
        self.width = encoder.transformer.get_input_embeddings().weight.shape[1]
        self.device = encoder.transformer.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.transformer.get_input_embeddings()(ids)  # (B, L, D)

    def end_index(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.pad_id).sum(dim=-1) - 1  # the [SEP] position

    def encode(self, embeds: torch.Tensor, ids: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()  # (B, L)
        out = self.encoder.transformer(inputs_embeds=embeds, attention_mask=mask)
        return self.encoder.proj(self.encoder.pooler(out, mask))


def text_tower(model: nn.Module) -> _OpenClipText | _HFText:
    """The text tower of an open_clip ``CLIP``/``CustomTextCLIP``, wrapped to accept embeddings."""
    if hasattr(model, "token_embedding"):
        return _OpenClipText(model)
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "token_embedding"):
        return _OpenClipText(text)
    if text is not None and hasattr(text, "pooler") and hasattr(text, "transformer"):
        return _HFText(text)
    raise BackboneError(
        f"Cannot find a text tower on {type(model).__name__}: expected open_clip's CLIP text attributes, "
        "a TextTransformer or an HFTextEncoder at .text."
    )


class DualPromptLearner(nn.Module):
    """Positive and negative learnable prompts for ``K`` classes → ``(K, E)`` text features each.

    Learned parameters: ``pos_ctx``/``neg_ctx`` of shape ``(M, D)`` (shared) or ``(K, M, D)``
    (class-specific); they are the only entries of ``state_dict()``. The token embeddings of the
    class names are non-persistent buffers rebuilt from the class names.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        class_names: Sequence[str],
        *,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.tower = text_tower(model)
        self.class_names = [str(name).replace("_", " ") for name in class_names]
        ids = tokenizer([f"{name}." for name in self.class_names]).long()  # (K, L)
        device = self.tower.device
        ids = ids.to(device)
        init = self._init_vectors(tokenizer, ctx_init, device) if ctx_init else None
        n_ctx = init.shape[0] if init is not None else n_ctx
        end = self.tower.end_index(ids)
        _check_length(self.class_names, end, n_ctx, ids.shape[1])
        filler = ids[:, :1].expand(-1, n_ctx)  # any non-pad id: these embeddings are replaced
        full_ids = torch.cat([ids[:, :1], filler, ids[:, 1 : ids.shape[1] - n_ctx]], dim=1)
        if getattr(self.tower, "pool_type", None) != "last":
            # Padding after the longest prompt's end token never reaches a pooled feature (causal mask
            # or attention mask), so drop it: the text tower runs on ~20 tokens instead of 77.
            full_ids = full_ids[:, : int(end.max()) + n_ctx + 1]
        with torch.no_grad():
            embedding = self.tower.embed(full_ids).float()  # (K, L, D)
        self.register_buffer("token_ids", full_ids, persistent=False)
        self.register_buffer("pool_index", end + n_ctx, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # start token
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :], persistent=False)  # name, end, pad
        self.n_ctx, self.n_cls = n_ctx, len(self.class_names)
        # With one context for all classes, a causal tower runs [start] ctx once per prompt set and only the
        # class-name tokens per class (:mod:`deft_clean.prefix_attention`); False runs whole prompts.
        self.shared_prefix = (
            getattr(self.tower, "causal", False)
            and not class_specific
            and bool((full_ids[:, 0] == full_ids[0, 0]).all())  # one start token for every class
        )
        self.pos_ctx = nn.Parameter(self._context(init, class_specific, generator, device))
        self.neg_ctx = nn.Parameter(self._context(init, class_specific, generator, device))

    def _init_vectors(
        self, tokenizer: Callable[[Sequence[str]], torch.Tensor], phrase: str, device: torch.device
    ) -> torch.Tensor:
        """(M, D) token embeddings of ``phrase`` between its start and end tokens."""
        ids = tokenizer([phrase]).long().to(device)
        end = int(self.tower.end_index(ids)[0])
        if end <= 1:
            raise ConfigError(
                f"--ctx-init {phrase!r} has no tokens.", hint="Use a phrase like 'a photo of a'."
            )
        with torch.no_grad():
            return self.tower.embed(ids)[0, 1:end].float()

    def _context(
        self,
        init: torch.Tensor | None,
        class_specific: bool,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        shape = (
            (self.n_cls, self.n_ctx, self.tower.width) if class_specific else (self.n_ctx, self.tower.width)
        )
        if init is not None:
            return init.expand(shape).clone()
        return torch.randn(shape, generator=generator).to(device) * 0.02

    def _prompts(self, ctx: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """(M, D) or (K, M, D) context → (C, L, D) prompt embeddings of ``classes`` (C,), or all K."""
        prefix, suffix = self.token_prefix, self.token_suffix
        if classes is not None:
            prefix, suffix = prefix[classes], suffix[classes]
            ctx = ctx[classes] if ctx.dim() == 3 else ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)

    def forward(self, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ``(T⁺, T⁻)``, each ``(C, E)``, from one batched text-tower call over 2C prompts.

        ``classes`` (C,) long picks the classes to encode (row ``i`` is class ``classes[i]``): a training
        step with many classes encodes only the ones its loss needs (:mod:`deft_clean.text_sampling`).
        None encodes all ``K`` classes, in class order.
        """
        ids, pool = self.token_ids, self.pool_index
        if classes is not None:
            ids, pool = ids[classes], pool[classes]
        if self.shared_prefix:
            features = self._encode_after_prefix(classes, pool).flatten(0, 1).float()  # (2C, E)
        else:
            embeds = torch.cat([self._prompts(self.pos_ctx, classes), self._prompts(self.neg_ctx, classes)])
            features = self.tower.encode(embeds, ids.repeat(2, 1), pool.repeat(2)).float()  # (2C, E)
        features = features / features.norm(dim=-1, keepdim=True)
        return features[: ids.shape[0]], features[ids.shape[0] :]

    def _encode_after_prefix(self, classes: torch.Tensor | None, pool: torch.Tensor) -> torch.Tensor:
        """(2, C, E) positive and negative features: ``[start] ctx`` once per set, the rest per class."""
        start = self.token_prefix[:1].expand(2, -1, -1)  # (2, 1, D): the same start token for every class
        contexts = torch.stack([self.pos_ctx, self.neg_ctx]).to(start.dtype)  # (2, M, D)
        prefix = torch.cat([start, contexts], dim=1)  # (2, 1 + M, D)
        suffix = self.token_suffix if classes is None else self.token_suffix[classes]  # (C, S, D)
        return self.tower.encode_after_prefix(prefix, suffix.expand(2, -1, -1, -1), pool - prefix.shape[1])

    @torch.no_grad()
    def encode_all(self, chunk: int = TEXT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T⁺, T⁻)`` of all ``K`` classes, each ``(K, E)``, without gradient, ``chunk`` classes per call.

        For scoring: the text tower's activations then span ``chunk`` prompts, not ``K``, however many
        classes there are; with ``K <= chunk`` this is one call, equal to ``forward()``.
        """
        device = self.token_ids.device
        parts = [
            self(torch.arange(start, min(start + chunk, self.n_cls), device=device))
            for start in range(0, self.n_cls, chunk)
        ]
        return torch.cat([pos for pos, _ in parts]), torch.cat([neg for _, neg in parts])


def too_long_names(names: list[str], end: torch.Tensor, n_ctx: int, length: int) -> list[tuple[str, int]]:
    """(name, tokens needed) of each class whose prompt's end token would fall off the context window."""
    return [(names[i], int(end[i]) + 1 + n_ctx) for i in range(len(names)) if int(end[i]) + n_ctx >= length]


LENGTH_HINT = "Use fewer context vectors (--n-ctx) or shorter class names (in the --classes file)."


def _check_length(names: list[str], end: torch.Tensor, n_ctx: int, length: int) -> None:
    """Refuse prompts whose end token would fall off the text tower's context window."""
    too_long = too_long_names(names, end, n_ctx, length)
    if too_long:
        name, needed = too_long[0]
        raise ConfigError(
            f"Class name {name!r} needs {needed} tokens with {n_ctx} context vectors; the text tower takes "
            f"{length} ({len(too_long)} class name(s) too long).",
            hint=LENGTH_HINT,
        )
