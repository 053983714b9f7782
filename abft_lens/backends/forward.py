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

__all__ = ["forward_residual", "kv_decoder", "compute_autocast"]


def compute_autocast(model: HookedTransformer, compute_dtype: str | None) -> torch.autocast:
    """The context a forward runs in for ``compute_dtype``: ``"bfloat16"`` is ``torch.autocast`` on the
    model's device (matmuls in bfloat16; norms, softmax and the residual stream stay in the weights' float32),
    None is a disabled autocast (the model's own dtype). Training and evaluation both enter it here."""
    return torch.autocast(torch.device(model.cfg.device).type, dtype=torch.bfloat16,
                          enabled=compute_dtype == "bfloat16")


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


def kv_decoder(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]):
    """A step function for generation with a KV cache: ``step(new_tokens) -> logits [batch, vocab]`` (float32)
    at the last position. The first call takes the left-padded ``tokens`` themselves, each later call the
    ``[batch, 1]`` tokens just chosen; padding is masked and each row's positions start at its first real token.

    A ``HookedTransformer`` runs TransformerLens's own cache (only the last position goes through the final norm
    and ``@ W_U``); a bridge runs its Hugging Face model with ``past_key_values`` (the bridge's components are
    inside it, so trained weights and hooks apply), positions from the mask, ``logits_to_keep=1``.
    """
    n, device = tokens.shape[0], tokens.device
    if is_bridge(model):
        from transformers import DynamicCache

        state = {"mask": attention_mask, "positions": None, "cache": DynamicCache()}

        def bridge_step(new: Int[Tensor, "batch new"]) -> Float[Tensor, "batch vocab"]:
            if state["positions"] is None:
                positions = (state["mask"].cumsum(-1) - 1).clamp(min=0)
            else:
                positions = state["positions"][:, -1:] + 1
                state["mask"] = torch.cat([state["mask"], torch.ones_like(new)], dim=1)
            out = model.original_model(input_ids=new, attention_mask=state["mask"], position_ids=positions,
                                       past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
            state["positions"], state["cache"] = positions, out.past_key_values
            return out.logits[:, -1].float()

        return bridge_step
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, n)
    state = {"mask": attention_mask}

    def hooked_step(new: Int[Tensor, "batch new"]) -> Float[Tensor, "batch vocab"]:
        residual = model(new, attention_mask=state["mask"], past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
        state["mask"] = torch.ones(n, 1, dtype=attention_mask.dtype, device=device)
        # a plain matmul: TL's Unembed copies W_U transposed on every call (113 MB per step on SmolLM2)
        return (model.ln_final(residual[:, -1:])[:, 0] @ model.W_U + model.b_U).float()

    return hooked_step
