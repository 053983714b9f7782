"""Per-sample restricted gradients for a batched forward pass of a ``HookedTransformer`` or a bridge.

Restricted gradient: sample b's loss may change only the W_Q/W_K slices of the heads open for sample b.
Run one prompt at a time, a mask on the weight's gradient does this. In a batch it cannot: ``F.linear``
has already summed ``x_bᵀ · dq_b`` over the samples when the weight's gradient exists. The mask is therefore
applied one step earlier, on the gradient of the projection's output ``q = x W + b`` (``hook_q``, and
``hook_k`` for keys), where the samples are still apart. :class:`RouteToInput` takes over the projection's
backward there:

- the weight (and bias) get ``Σ_b x_bᵀ (mask_b ⊙ dq_b)``: only each sample's open heads;
- the input x gets the full ``dq · Wᵀ``, so the layers below see every path, through closed heads too.

That is exactly the sum of the per-sample loop's gradients. Masking the activation gradient itself (e.g. a
hook on ``hook_q`` that zeroes closed columns) would be wrong: it would also cut the paths through closed
heads to the layers below. The weight gradient is formed in float32 (under bfloat16 autocast too: CPU
bfloat16 kernels for the transposed product ``xᵀ dq`` fall back to a slow generic GEMM).

:func:`install_router` wires this into a model with PyTorch hooks: a forward pre-hook on each attention
module keeps its ``query_input``/``key_input``, a forward hook on ``hook_q``/``hook_k`` wraps the output in
:class:`RouteToInput` together with the weight and bias that made it. The mask is read at backward time
(``get_mask(layer, target)``), so the forward can run before the filter has decided. Without a mask, in
float32 or float64, the usual backward runs unchanged; without a mask under bfloat16 the routing takes over
with every head open (the same gradient, formed in float32).

On a ``TransformerBridge`` (TransformerLens 4.x) the attention is not called with ``query_input``/``key_input``;
the projection is the Hugging Face Linear inside ``attn.q`` / ``attn.k``, whose hook points see its input
(``attn.q.hook_in``, ``[batch, pos, d_model]``) and its output (``attn.q.hook_out``, ``[batch, pos, n*d_head]`` to a
PyTorch hook). The router keeps the input and wraps the output the same way, with the weight and bias viewed in
TransformerLens layout (:func:`abft_lens.backends.qk.value`), so the gradient reaches the Hugging Face leaf.
"""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from abft_lens.backends import qk
from abft_lens.backends.bridge import is_bridge

__all__ = ["RouteToInput", "install_router"]

MaskGetter = Callable[[], "Bool[Tensor, 'batch n_out'] | None"]


class RouteToInput(torch.autograd.Function):
    """``forward(out, x, weight, bias, get_mask) = out``, where ``out = x · weight + bias`` was computed by the
    model: ``out`` ``[batch, pos, n_out, d_head]``, ``x`` ``[batch, pos, d_model]``, ``weight``
    ``[n_out, d_model, d_head]``, ``bias`` ``[n_out, d_head]`` (or None).

    Backward, with ``mask = get_mask()`` Bool ``[batch, n_out]``: ``x`` gets ``grad · Wᵀ``; ``weight`` and
    ``bias`` get the products with ``mask ⊙ grad`` (float32 at least); ``out`` gets nothing, so the model's
    own projection backward does not run. ``mask`` None: in float32/float64 everything goes to ``out`` (the
    model's usual backward); in lower precision, the routing runs with every head open.
    """

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, get_mask: MaskGetter) -> Tensor:
        ctx.get_mask = get_mask
        ctx.save_for_backward(x, weight)
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Float[Tensor, "batch pos n_out d_head"]):
        mask = ctx.get_mask()
        if mask is None and grad.dtype in (torch.float32, torch.float64):
            return grad, None, None, None, None
        x, weight = ctx.saved_tensors
        if mask is None:
            mask = torch.ones(grad.shape[0], grad.shape[2], dtype=torch.bool)
        if tuple(mask.shape) != (grad.shape[0], grad.shape[2]):
            raise ValueError(f"per-sample head masks of shape {tuple(mask.shape)} do not fit a batch of "
                             f"{grad.shape[0]} prompts with {grad.shape[2]} heads: pass restricted() one "
                             "[layer, head] mask per prompt of the forward pass, in batch order")
        flat = rearrange(grad, "b p n h -> (b p) (n h)")
        dx = d_weight = d_bias = None
        if ctx.needs_input_grad[1]:  # the full gradient: every head's path to the layers below
            w_flat = rearrange(weight.detach(), "n m h -> (n h) m").to(grad.dtype)
            dx = rearrange(flat @ w_flat, "(b p) m -> b p m", b=grad.shape[0]).to(x.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dtype = torch.promote_types(grad.dtype, torch.float32)
            open_ = rearrange(mask.to(grad.device), "b n -> b 1 n 1")
            opened = rearrange(grad.masked_fill(~open_, 0), "b p n h -> (b p) (n h)").to(dtype)
            if ctx.needs_input_grad[2]:
                d_weight = rearrange(rearrange(x, "b p m -> m (b p)").to(dtype) @ opened, "m (n h) -> n m h",
                                     h=grad.shape[3]).to(weight.dtype)
            if ctx.needs_input_grad[3]:
                d_bias = rearrange(opened.sum(0), "(n h) -> n h", h=grad.shape[3])
        return None, dx, d_weight, d_bias, None


def install_router(model, targets: tuple[str, ...], weight_names: list[dict[str, str]],
                   get_mask: Callable[[int, str], "Bool[Tensor, 'batch n_out'] | None"]) -> list:
    """Route the query/key projections of every layer of ``model`` by per-sample head masks.

    ``targets``: a subset of ``("q", "k")``; ``weight_names[layer]`` maps each target to the attention
    module's attribute holding its ``[n_out, d_model, d_head]`` weight (``W_Q``, ``_W_K`` under GQA) and
    ``"b" + target`` to its bias;
    ``get_mask(layer, target)`` is called at backward time. Nothing is done where gradients are off.
    Returns the hook handles (``handle.remove()`` undoes everything).
    """
    if is_bridge(model):
        return _install_bridge_router(model, targets, weight_names, get_mask)
    handles = []
    for layer, block in enumerate(model.blocks):
        attn, inputs = block.attn, {}

        def keep_inputs(module, args, kwargs, inputs=inputs) -> None:
            if torch.is_grad_enabled():
                for target in targets:
                    inputs[target] = kwargs.get("query_input" if target == "q" else "key_input")

        handles.append(attn.register_forward_pre_hook(keep_inputs, with_kwargs=True))
        for target in targets:
            name, bias_name = weight_names[layer][target], weight_names[layer]["b" + target]

            def route(module, args, out, attn=attn, name=name, bias_name=bias_name, inputs=inputs,
                      key=(layer, target)):
                x = inputs.pop(key[1], None)
                if not out.requires_grad:
                    return None
                if x is None or out.ndim != 4:
                    raise RuntimeError(f"layer {key[0]}: the {key[1]} projection's input was not seen by the "
                                       "attention pre-hook; per-sample routing supports TransformerLens 3.9 "
                                       "attention called with query_input/key_input keywords")
                bias = getattr(attn, bias_name)
                return RouteToInput.apply(out, x, getattr(attn, name), bias if bias.requires_grad else None,
                                          lambda: get_mask(*key))

            handles.append(getattr(attn, f"hook_{target}").register_forward_hook(route))
    return handles


def _install_bridge_router(model, targets: tuple[str, ...], weight_names: list[dict[str, str]],
                           get_mask: Callable[[int, str], "Bool[Tensor, 'batch n_out'] | None"]) -> list:
    """:func:`install_router` on a bridge: PyTorch hooks on ``attn.{q,k}.hook_in`` (keep x) and ``hook_out``
    (``[batch, pos, n*d_head]``, wrapped in :class:`RouteToInput` as ``[batch, pos, n, d_head]``)."""
    handles = []
    for layer, block in enumerate(model.blocks):
        for target in targets:
            component, inputs = getattr(block.attn, target), {}
            name, bias_name = (qk.tensor_name(layer, weight_names[layer][key]) for key in (target, "b" + target))
            has_bias = getattr(component.original_component, "bias", None) is not None

            def keep_input(module, args, out, inputs=inputs) -> None:
                if torch.is_grad_enabled():
                    inputs["x"] = out

            def route(module, args, out, inputs=inputs, name=name, bias_name=bias_name, has_bias=has_bias,
                      key=(layer, target)):
                x = inputs.pop("x", None)
                if not out.requires_grad:
                    return None
                if x is None or out.ndim != 3:
                    raise RuntimeError(f"layer {key[0]}: the {key[1]} projection's input was not seen by its "
                                       "hook_in; per-sample routing needs the bridge's attn.q/attn.k hook points")
                weight = qk.value(model, name)
                bias = qk.value(model, bias_name) if has_bias else None
                d_head = weight.shape[2]
                routed = RouteToInput.apply(rearrange(out, "b p (n h) -> b p n h", h=d_head), x, weight,
                                            bias if bias is not None and bias.requires_grad else None,
                                            lambda: get_mask(*key))
                return rearrange(routed, "b p n h -> b p (n h)")

            handles.append(component.hook_in.register_forward_hook(keep_input))
            handles.append(component.hook_out.register_forward_hook(route))
    return handles
