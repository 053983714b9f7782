"""Loading hooked models: TransformerLens names, local Hugging Face folders, GGUF files, the embedded
SmolLM2-135M default and tiny random configurations.

Every route returns a :class:`LoadedModel`: a ``HookedTransformer`` with unprocessed weights (no fold_ln, no
centering, so W_Q/W_K mean what they mean in the checkpoint) and the model's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._tl import HookedTransformer, HookedTransformerConfig


def tiny_model(
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = 2,
    d_model: int = 32,
    d_head: int = 8,
    d_vocab: int = 64,
    n_ctx: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
) -> HookedTransformer:
    """A randomly initialised Llama-style hooked model (RMSNorm, rotary, gated SiLU MLP, optional GQA).

    ``n_kv_heads=None`` gives plain multi-head attention. Used by tests and notebooks; seconds to build.
    """
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv_heads,
        d_vocab=d_vocab if tokenizer is None else len(tokenizer),
        d_mlp=4 * d_model,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        gated_mlp=True,
        final_rms=True,
        default_prepend_bos=False,
        seed=seed,
        dtype=dtype,
        init_weights=True,
        tokenizer_prepends_bos=False,
    )
    padding = {"default_padding_side": "left"} if tokenizer is not None else {}
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, **padding)
    model.eval()
    return model
