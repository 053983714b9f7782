"""Weights stored in the memory layout TransformerLens 3.9's forward reads (bit-identical outputs, no copies)."""

from __future__ import annotations

import torch

from abft_lens.backends.tl import HookedTransformer

__all__ = ["relayout_for_forward"]


def relayout_for_forward(model: HookedTransformer) -> HookedTransformer:
    """Store the weights in the memory layout TransformerLens 3.9's forward reads them in; values, shapes and
    parameter objects are unchanged, only strides differ. Returns ``model``.

    TL's forward re-materialises weights on every call: the gated MLP runs ``F.linear(x, W.T.contiguous())``
    on W_gate / W_in / W_out, attention rearranges W_Q / W_K / W_V ``[head, d_model, d_head]`` to
    ``[(head d_head), d_model]`` and W_O to ``[d_model, (head d_head)]``. With the weights already stored
    that way those calls are views, not copies (about 425 MB per forward for SmolLM2 in float32). Results
    are bit-identical; ``bench/README.md`` measures the speed-up. The unembedding runs
    ``F.linear(x, W_U.T.contiguous())``: W_U is stored transposed (Hugging Face's ``lm_head`` layout, so a
    tied or converted W_U stays a view of it). Every other parameter is made contiguous (TL's own layout).
    """
    with torch.no_grad():
        handled = set()
        for block in model.blocks:
            mlp_params, attn_params = block.mlp._parameters, block.attn._parameters
            if "W_gate" in mlp_params:  # the plain MLP multiplies W_in / W_out as stored: leave it alone
                for name in ("W_gate", "W_in", "W_out"):
                    p = mlp_params[name]
                    p.data = p.data.T.contiguous().T
                    handled.add(id(p))
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                p = attn_params.get(name)
                if p is not None and p.ndim == 3:
                    p.data = p.data.permute(0, 2, 1).contiguous().permute(0, 2, 1)
                    handled.add(id(p))
            w_o = attn_params.get("W_O")
            if w_o is not None and w_o.ndim == 3:
                w_o.data = w_o.data.permute(2, 0, 1).contiguous().permute(1, 2, 0)
                handled.add(id(w_o))
        w_u = model.unembed._parameters.get("W_U") if hasattr(model, "unembed") else None
        if w_u is not None and w_u.ndim == 2:
            w_u.data = w_u.data.T.contiguous().T
            handled.add(id(w_u))
        for p in model.parameters():
            if id(p) not in handled:
                p.data = p.data.contiguous()
    return model
