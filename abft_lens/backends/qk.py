"""The query/key tensors of a model: their names and layout, grouped-query heads, and a bit-identical snapshot.

Everything that changes W_Q/W_K (training, weight mixing, the study runner, the MAUVE test) or reads them
(export, reports) goes through here.

- **Names.** Attention block ``l`` of a ``HookedTransformer`` holds ``W_Q`` and ``b_Q``; the key side is
  ``W_K``/``b_K``, or under grouped-query attention (TransformerLens's ``GroupedQueryAttention``) the stored
  ``_W_K``/``_b_K``, one slice per kv head (``W_K`` is then a property repeating each kv head for its group).
  A trained tensor is named ``blocks.{l}.attn.{attr}``, with ``.lora_A``/``.lora_B`` for LoRA adapters on it
  (:func:`tensor_name`, :func:`parse_name`), on the hooked model and on a bridge alike.
- **Layout.** ``W_Q[h]`` is ``[d_model, d_head]`` and ``b_Q[h]`` ``[d_head]``; Hugging Face's ``q_proj``/
  ``k_proj`` hold the heads row-major: ``weight[h*d_head:(h+1)*d_head, :] = W[h].T`` (:func:`hf_layout`).
- **Grouped-query heads.** Query head ``h`` reads kv head ``h // group_size(cfg)``.
- **Where they live.** On a ``HookedTransformer`` each named tensor is a parameter in that layout. On a
  ``TransformerBridge`` (every model under TransformerLens 4.x) the parameter is the Hugging Face leaf
  ``blocks.{l}.attn.q.original_component.weight`` ``[n*d_head, d_model]`` (``k`` for keys, with the kv heads);
  :func:`leaf` returns it with its rows per head, :func:`value` / :func:`grad` read any named tensor in
  TransformerLens layout on either model, so names, shapes and meaning are the same under both versions.
- **Snapshot.** :func:`snapshot` copies the Q/K tensors (to CPU, TransformerLens layout), :func:`restore`
  writes them back bit-identically, :func:`restored` does both around a block. A bridge's 4-bit weights are
  never rewritten (its training adds adapters), so its snapshot is empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from abft_lens.backends.bridge import is_bridge, qk_weights

__all__ = ["QK_ATTRS", "HF_PROJ", "LORA_ROLES", "n_kv_heads", "group_size", "attr_names", "tensor_name", "parse_name",
           "effective_name", "is_bias", "hf_layout", "tl_layout", "qk_names", "layer_qk", "leaf", "value", "grad",
           "is_quantized", "snapshot", "restore", "restored"]

QK_ATTRS = ("W_Q", "W_K", "_W_K", "b_Q", "b_K", "_b_K")  # every Q/K attribute of a hooked attention block
HF_PROJ = {"W_Q": "q_proj", "_W_K": "k_proj", "W_K": "k_proj", "b_Q": "q_proj", "_b_K": "k_proj", "b_K": "k_proj"}
LORA_ROLES = ("lora_A", "lora_B")
_NAME = re.compile(rf"^blocks\.(\d+)\.attn\.({'|'.join(QK_ATTRS)})(?:\.({'|'.join(LORA_ROLES)}))?$")


def n_kv_heads(cfg) -> int:
    """Key/value heads per layer (``n_heads`` without grouped-query attention)."""
    return cfg.n_key_value_heads or cfg.n_heads


def group_size(cfg) -> int:
    """Query heads per kv head."""
    return cfg.n_heads // n_kv_heads(cfg)


def attr_names(model, layer: int) -> dict[str, str]:
    """The attribute of each Q/K tensor of ``layer``: ``{"q", "k", "bq", "bk"}`` -> ``W_Q``, ``_W_K`` or ``W_K``, ...

    A hooked model says by its parameters whether the key side is stored per kv head (``_W_K``, also while a LoRA
    parametrization holds it); a bridge has no such parameters and names it so when the model has fewer kv heads
    than heads.
    """
    if is_bridge(model):
        grouped = n_kv_heads(model.cfg) < model.cfg.n_heads
    else:
        grouped = _holds(model.blocks[layer].attn, "_W_K")
    return {"q": "W_Q", "k": "_W_K" if grouped else "W_K", "bq": "b_Q", "bk": "_b_K" if grouped else "b_K"}


def tensor_name(layer: int, attr: str, role: str | None = None) -> str:
    """``blocks.{layer}.attn.{attr}``, or ``...{attr}.{role}`` for a LoRA adapter (role lora_A / lora_B)."""
    return f"blocks.{layer}.attn.{attr}" + (f".{role}" if role else "")


def parse_name(name: str) -> tuple[int, str, str | None] | None:
    """``(layer, attr, LoRA role or None)`` of a trained tensor's name; None for any other name."""
    match = _NAME.match(name)
    return None if match is None else (int(match[1]), match[2], match[3])


def effective_name(name: str) -> str:
    """The model tensor a trained tensor changes: a LoRA adapter's name without ``.lora_A``/``.lora_B``."""
    return name.rsplit(".lora_", 1)[0]


def is_bias(attr: str) -> bool:
    return attr.startswith(("b_", "_b_"))


def hf_layout(tensor: Tensor) -> Tensor:
    """A TransformerLens weight ``[n, d_model, d_head]`` as Hugging Face's ``[n*d_head, d_model]``, a bias
    ``[n, d_head]`` as ``[n*d_head]``."""
    return rearrange(tensor, "n m h -> (n h) m") if tensor.ndim == 3 else rearrange(tensor, "n h -> (n h)")


def tl_layout(tensor: Tensor, d_head: int) -> Tensor:
    """Inverse of :func:`hf_layout`: ``[n*d_head, d_model]`` -> ``[n, d_model, d_head]``, ``[n*d_head]`` -> ``[n, d_head]``
    (views, no copy)."""
    if tensor.ndim == 2:
        return rearrange(tensor, "(n h) m -> n m h", h=d_head)
    return rearrange(tensor, "(n h) -> n h", h=d_head)


def _hf_linear(model, layer: int, attr: str) -> nn.Module:
    """The Hugging Face q/k projection a bridge's ``attr`` lives in (the base layer under a PEFT adapter)."""
    inner = getattr(model.blocks[layer].attn, "q" if attr in ("W_Q", "b_Q") else "k").original_component
    return inner.get_base_layer() if hasattr(inner, "get_base_layer") else inner


def is_quantized(model) -> bool:
    """True for a bridge whose q/k projections are 4-bit (bitsandbytes): their weights are never rewritten."""
    return is_bridge(model) and hasattr(_hf_linear(model, 0, "W_Q").weight, "quant_state")


def _holds(attn: nn.Module, attr: str) -> bool:
    """Whether a hooked attention block stores ``attr``: as its own parameter, or as the base (``original``) of a
    LoRA parametrization on it."""
    return attn._parameters.get(attr) is not None or parametrize.is_parametrized(attn, attr)


def qk_names(model) -> list[str]:
    """Names of every attention W_Q/W_K (and bias) tensor: what training can change (none on a 4-bit bridge)."""
    if not is_bridge(model):
        return [tensor_name(layer, attr) for layer, block in enumerate(model.blocks) for attr in QK_ATTRS
                if _holds(block.attn, attr)]
    if is_quantized(model):
        return []
    names = []
    for layer in range(model.cfg.n_layers):
        attrs = attr_names(model, layer)
        for weight, bias in (("q", "bq"), ("k", "bk")):
            names.append(tensor_name(layer, attrs[weight]))
            if _hf_linear(model, layer, attrs[weight]).bias is not None:
                names.append(tensor_name(layer, attrs[bias]))
    return names


def leaf(model, name: str, *, create: bool = False) -> tuple[nn.Parameter, int]:
    """``(parameter, rows per head)`` holding the Q/K tensor ``name``: on a hooked model the parameter itself
    (TransformerLens layout, one head per index of dim 0: rows 1); on a bridge the Hugging Face weight or bias
    (``d_head`` rows per head, :func:`hf_layout`). Under attached LoRA adapters it is the base tensor on both: the
    parametrization's ``original`` on a hooked model, PEFT's base layer's on a bridge.

    A ``HookedTransformer`` always has ``b_Q``/``b_K`` (zeros where the checkpoint has none); a Hugging Face
    projection may have no bias. ``create=True`` gives it a zero bias then (the outputs do not change), so
    bias training means the same on both."""
    parsed = parse_name(name)
    if parsed is None or parsed[2] is not None:
        raise ValueError(f"{name!r} is not the name of a W_Q/W_K tensor (blocks.{{l}}.attn.W_Q ...)")
    if not is_bridge(model):
        attn = model.blocks[parsed[0]].attn
        if parametrize.is_parametrized(attn, parsed[1]):
            return getattr(attn.parametrizations, parsed[1]).original, 1
        return model.get_parameter(name), 1
    linear = _hf_linear(model, parsed[0], parsed[1])
    param = linear.bias if is_bias(parsed[1]) else linear.weight
    if param is None and create:
        weight = linear.weight
        linear.bias = param = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                           requires_grad=False)
    if param is None:
        raise ValueError(f"{name}: this model's projection has no bias")
    return param, model.cfg.d_head


def value(model, name: str) -> Float[Tensor, "n ..."]:
    """The Q/K tensor ``name`` in TransformerLens layout (``[n, d_model, d_head]`` / ``[n, d_head]``): the
    parameter on a hooked model, a view of the Hugging Face leaf on a bridge (gradients flow through both)."""
    param, rows = leaf(model, name)
    return param if rows == 1 else tl_layout(param, rows)


def grad(model, name: str) -> Tensor | None:
    """The gradient of the Q/K tensor ``name`` in TransformerLens layout, or None."""
    param, rows = leaf(model, name)
    return param.grad if rows == 1 or param.grad is None else tl_layout(param.grad, rows)


def layer_qk(model) -> list[tuple[Tensor, Tensor]]:
    """Per layer, float32 copies of ``(W_Q [head, d_model, d_head], K [kv_head, d_model, d_head])``.

    The stored key tensor (``_W_K`` under grouped-query attention), so a K change counts once per kv head; a
    bridge's effective weights (dequantized, plus the attached adapters' delta).
    """
    if is_bridge(model):
        return qk_weights(model)
    weights = []
    for layer, block in enumerate(model.blocks):
        key = getattr(block.attn, attr_names(model, layer)["k"])
        weights.append((block.attn.W_Q.detach().float().clone(), key.detach().float().clone()))
    return weights


def snapshot(model, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """CPU copies of the model's current ``names`` in TransformerLens layout (default: every Q/K tensor; none for
    a 4-bit bridge)."""
    if names is None:
        names = qk_names(model)
    return {name: value(model, name).detach().to("cpu", copy=True).contiguous() for name in names}


def restore(model, values: Mapping[str, Tensor], *, prune: bool = False) -> None:
    """Copy ``values`` (a :func:`snapshot`, or any tensors of the same names, TransformerLens layout) into the
    model's parameters in place. ``prune=True`` (``values`` a full snapshot) also takes away a bridge's biases
    that :func:`leaf` created since, so the model is the one snapshotted."""
    if prune and is_bridge(model):
        for name in qk_names(model):
            if is_bias(parse_name(name)[1]) and name not in values:
                layer, attr, _ = parse_name(name)
                _hf_linear(model, layer, attr).bias = None
    with torch.no_grad():
        for name, tensor in values.items():
            param, rows = leaf(model, name)
            tensor = tensor if rows == 1 else hf_layout(tensor)
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


@contextmanager
def restored(model, names: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Snapshot ``names``; whatever happens inside, write the snapshot back bit-identically on exit."""
    saved = snapshot(model, names)
    try:
        yield saved
    finally:
        restore(model, saved)
