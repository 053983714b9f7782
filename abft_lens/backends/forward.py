"""The one forward seam: the residual stream before a block, for a ``HookedTransformer`` or a bridge.

Evaluation, head scores and training all run the model through :func:`forward_residual`, which skips the final
norm and the unembedding (callers that need logits apply them at the positions they need).
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from abft_lens.backends.bridge import bridge_residual, is_bridge
from abft_lens.backends.tl import HookedTransformer

__all__ = ["forward_residual"]


def forward_residual(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    stop_at_layer: int | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Run the model up to (excluding) block ``stop_at_layer`` and return the residual stream.

    ``stop_at_layer=None`` means ``model.cfg.n_layers``: every block runs, but the final norm and the
    unembedding are skipped. Use ``store.stop_at_layer`` of a capture to run only what its layers need.

    ``attention_mask`` is ``[batch, pos]`` with 1 for real tokens and 0 for (left) padding. When it is
    ``None`` an all-ones mask is passed explicitly: with a left-padding tokenizer attached, TransformerLens
    would otherwise guess the mask by comparing tokens with ``pad_token_id`` and could mask a real leading
    token that shares the pad id (e.g. a BOS used as pad). Positions are identical either way.
    """
    n_layers = model.cfg.n_layers
    if stop_at_layer is None:
        stop_at_layer = n_layers
    if not 0 <= stop_at_layer <= n_layers:
        raise ValueError(
            f"stop_at_layer={stop_at_layer} out of range: use 0..{n_layers} (negative indices are not accepted)"
        )
    if tokens.ndim == 1:
        tokens = einops.rearrange(tokens, "pos -> 1 pos")
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(
            f"tokens must be an integer tensor [batch, pos] (or [pos]), got dtype {tokens.dtype} "
            f"and shape {tuple(tokens.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    elif attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens shape "
            f"{tuple(tokens.shape)}: pass one 0/1 entry per token"
        )
    if is_bridge(model):
        return bridge_residual(model, tokens, attention_mask, stop_at_layer)
    return model(tokens, attention_mask=attention_mask, stop_at_layer=stop_at_layer)
