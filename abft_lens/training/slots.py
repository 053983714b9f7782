"""The pieces of a trainable set: a :class:`Slot` per trained tensor (its name, head layout and parameter) and
:class:`LoraDelta`, the per-head LoRA parametrization of a hooked model's ``[n, d_model, d_head]`` weight."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from abft_lens.backends import qk

__all__ = ["Slot", "LoraDelta"]


class LoraDelta(nn.Module):
    """Parametrization ``W -> W + scale * (B @ A)`` viewed per head, for one ``[n_out, d_model, d_head]`` weight.

    ``lora_A`` [r, d_model] is drawn like PEFT (uniform ±1/sqrt(d_model)); ``lora_B`` [n_out*d_head, r] starts
    at zero, so attaching changes nothing. Adapters are float32 (float64 for float64 weights); the delta is
    cast to the weight's dtype. ``grad_mask`` (Bool [n_out, 1, 1] or None), read at backward time, zeroes the
    gradient of closed heads' delta before it reaches A and B.
    """

    def __init__(self, weight: Float[Tensor, "n d_model d_head"], r: int, scale: float, gen: torch.Generator):
        super().__init__()
        n_out, d_model, d_head = weight.shape
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        bound = 1.0 / math.sqrt(d_model)
        a = (torch.rand(r, d_model, generator=gen, dtype=dtype) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n_out * d_head, r, dtype=dtype, device=weight.device))
        self.scale, self.n_out = scale, n_out
        self.grad_mask: Tensor | None = None

    def delta(self) -> Float[Tensor, "n d_model d_head"]:
        """``scale * (B @ A)`` as ``[n_out, d_model, d_head]``, in the adapters' dtype."""
        return rearrange(self.scale * (self.lora_B @ self.lora_A), "(n h) m -> n m h", n=self.n_out)

    def _mask_grad(self, grad: Tensor) -> Tensor | None:
        return None if self.grad_mask is None or grad is None else grad.masked_fill(~self.grad_mask, 0)

    def forward(self, weight: Float[Tensor, "n d_model d_head"]) -> Float[Tensor, "n d_model d_head"]:
        delta = self.delta()
        if delta.requires_grad:
            delta.register_hook(self._mask_grad)
        return weight + delta.to(weight.dtype)


@dataclass
class Slot:
    """One trained tensor: stable name, (layer, target), role in weight/bias/lora_A/lora_B, the parameter.

    ``rows``: entries of dim 0 per output head. 1 for TransformerLens layout (``[n, d_model, d_head]``); a
    bridge's Q/K leaf is the Hugging Face weight ``[n*d_head, d_model]`` (``d_head`` rows per head), which
    :meth:`Trainable.state_dict` writes in TransformerLens layout under the same name.
    """

    name: str
    layer: int
    target: str
    role: str
    param: nn.Parameter
    rows: int = 1

    def to_tl(self, tensor: Tensor) -> Tensor:
        """``tensor`` (this slot's own layout) in TransformerLens layout."""
        return tensor if self.rows == 1 or self.role.startswith("lora") else qk.tl_layout(tensor, self.rows)

    def from_tl(self, tensor: Tensor) -> Tensor:
        """``tensor`` (TransformerLens layout) in this slot's own layout."""
        return tensor if self.rows == 1 or self.role.startswith("lora") else qk.hf_layout(tensor)
