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
- **Snapshot.** :func:`snapshot` copies the Q/K tensors (to CPU), :func:`restore` writes them back
  bit-identically, :func:`restored` does both around a block. A bridge's 4-bit weights are never rewritten
  (its training adds adapters), so its snapshot is empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from einops import rearrange
from torch import Tensor

from abft_lens.backends.bridge import is_bridge, qk_weights

__all__ = ["QK_ATTRS", "HF_PROJ", "LORA_ROLES", "n_kv_heads", "group_size", "attr_names", "tensor_name", "parse_name",
           "effective_name", "is_bias", "hf_layout", "qk_names", "layer_qk", "snapshot", "restore", "restored"]

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

    A hooked model says by its parameters whether the key side is stored per kv head (``_W_K``); a bridge has no
    such parameters and names it so when the model has fewer kv heads than heads.
    """
    if is_bridge(model):
        grouped = n_kv_heads(model.cfg) < model.cfg.n_heads
    else:
        grouped = "_W_K" in dict(model.blocks[layer].attn.named_parameters(recurse=False))
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


def qk_names(model) -> list[str]:
    """Names of every attention W_Q/W_K (and bias) parameter of a hooked model: what training can change."""
    return [name for name, _ in model.named_parameters()
            if ".attn." in name and name.rsplit(".", 1)[-1] in QK_ATTRS]


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
    """CPU copies of the model's current ``names`` (default: every Q/K tensor; none for a bridge)."""
    if names is None:
        names = [] if is_bridge(model) else qk_names(model)
    return {name: model.get_parameter(name).detach().to("cpu", copy=True) for name in names}


def restore(model, values: Mapping[str, Tensor]) -> None:
    """Copy ``values`` (a :func:`snapshot`, or any tensors of the same names) into the model's parameters in place."""
    with torch.no_grad():
        for name, value in values.items():
            param = model.get_parameter(name)
            param.copy_(value.to(device=param.device, dtype=param.dtype))


@contextmanager
def restored(model, names: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Snapshot ``names``; whatever happens inside, write the snapshot back bit-identically on exit."""
    saved = snapshot(model, names)
    try:
        yield saved
    finally:
        restore(model, saved)
