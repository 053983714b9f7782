"""Per-sample restricted gradients for a batched forward pass of a ``HookedTransformer``.

Restricted gradient: sample b's loss may change only the W_Q/W_K slices of the heads open for sample b.
Run one prompt at a time, a mask on the weight's gradient does this. In a batch it cannot: ``F.linear``
has already summed ``x_bᵀ · dq_b`` over the samples when the weight's gradient exists. The mask is therefore
applied one step earlier, on the gradient of the projection's output ``q = x W + b`` (``hook_q``, and
``hook_k`` for keys), where the samples are still apart:

- the open heads' columns of each sample's ``dq`` flow back through the projection as usual, reaching W, b
  and the input x;
- the closed heads' columns are added to x's gradient directly (``dq_closed · Wᵀ``) and never reach W or b.

So W's gradient is ``Σ_b mask_b ⊙ (x_bᵀ dq_b)`` per head, while the layers below receive the full
``dq · Wᵀ``: exactly the sum of the per-sample loop's gradients. Masking the activation gradient itself
(e.g. a hook on ``hook_q`` that zeroes closed columns) would be wrong: it would also cut the paths through
closed heads to the layers below. Cost: one extra ``[tokens, n_out·d_head] × [n_out·d_head, d_model]``
matmul per projection in the backward pass (none when the input needs no gradient, as in layer 0).

:func:`install_router` wires this into a model with PyTorch hooks: a forward pre-hook on each attention
module keeps its ``query_input``/``key_input``, a forward hook on ``hook_q``/``hook_k`` wraps the output in
:class:`RouteToInput`. The mask is read at backward time (``get_mask(layer, target)``, ``None``: no routing,
every gradient takes the usual path), so the forward can run before the filter has decided.
"""

from __future__ import annotations

from typing import Callable

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["RouteToInput", "install_router"]

MaskGetter = Callable[[], "Bool[Tensor, 'batch n_out'] | None"]
WeightGetter = Callable[[], "Float[Tensor, 'n_out d_model d_head']"]


class RouteToInput(torch.autograd.Function):
    """``forward(out, x, get_weight, get_mask) = out``; in backward, with ``mask = get_mask()`` Bool
    ``[batch, n_out]``: ``mask ⊙ grad`` goes to ``out`` (and through its graph to W, b and x) and
    ``(~mask ⊙ grad) · Wᵀ`` to ``x`` directly. ``out`` is ``[batch, pos, n_out, d_head]``, ``x``
    ``[batch, pos, d_model]`` and W (``get_weight()``) ``[n_out, d_model, d_head]``, the weight that made ``out``."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, get_weight: WeightGetter, get_mask: MaskGetter) -> Tensor:
        ctx.get_weight, ctx.get_mask, ctx.x_dtype = get_weight, get_mask, x.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Float[Tensor, "batch pos n_out d_head"]):
        mask = ctx.get_mask()
        if mask is None:
            return grad, None, None, None
        if tuple(mask.shape) != (grad.shape[0], grad.shape[2]):
            raise ValueError(f"per-sample head masks of shape {tuple(mask.shape)} do not fit a batch of "
                             f"{grad.shape[0]} prompts with {grad.shape[2]} heads: pass restricted() one "
                             "[layer, head] mask per prompt of the forward pass, in batch order")
        open_ = rearrange(mask.to(grad.device), "batch n -> batch 1 n 1")
        dx = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                weight = ctx.get_weight().to(grad.dtype)
            dx = einsum(grad.masked_fill(open_, 0), weight, "b p n h, n m h -> b p m").to(ctx.x_dtype)
        return grad.masked_fill(~open_, 0), dx, None, None


def install_router(model, targets: tuple[str, ...], weight_names: list[dict[str, str]],
                   get_mask: Callable[[int, str], "Bool[Tensor, 'batch n_out'] | None"]) -> list:
    """Route the query/key projections of every layer of ``model`` by per-sample head masks.

    ``targets``: a subset of ``("q", "k")``; ``weight_names[layer]`` maps each target to the attention
    module's attribute holding its ``[n_out, d_model, d_head]`` weight (``W_Q``, ``_W_K`` under GQA);
    ``get_mask(layer, target)`` is called at backward time. Nothing is done where gradients are off.
    Returns the hook handles (``handle.remove()`` undoes everything).
    """
    handles = []
    for layer, block in enumerate(model.blocks):
        attn, inputs = block.attn, {}

        def keep_inputs(module, args, kwargs, inputs=inputs) -> None:
            if torch.is_grad_enabled():
                for target in targets:
                    inputs[target] = kwargs.get("query_input" if target == "q" else "key_input")

        handles.append(attn.register_forward_pre_hook(keep_inputs, with_kwargs=True))
        for target in targets:
            name = weight_names[layer][target]

            def route(module, args, out, attn=attn, name=name, inputs=inputs, key=(layer, target)):
                x = inputs.pop(key[1], None)
                if not out.requires_grad:
                    return None
                if x is None or out.ndim != 4:
                    raise RuntimeError(f"layer {key[0]}: the {key[1]} projection's input was not seen by the "
                                       "attention pre-hook; per-sample routing supports TransformerLens 3.9 "
                                       "attention called with query_input/key_input keywords")
                return RouteToInput.apply(out, x, lambda: getattr(attn, name), lambda: get_mask(*key))

            handles.append(getattr(attn, f"hook_{target}").register_forward_hook(route))
    return handles
