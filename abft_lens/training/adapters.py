"""Attaching the trainable set to a model and stepping it: :func:`attach` picks the hooked ``Trainable`` or the
PEFT-backed one for a bridge; :func:`masked_step` keeps closed head slices bit-identical."""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from abft_lens.backends import qk
from abft_lens.backends.bridge import is_bridge
from abft_lens.training.peft_lora import PeftLoraTrainable
from abft_lens.training.trainable import Trainable, TrainableConfig

__all__ = ["attach", "masked_step"]


def attach(model, config: TrainableConfig | None = None) -> Trainable:
    """Freeze every parameter of ``model``, then make exactly the configured W_Q/W_K (and biases) trainable.

    LoRA adapters are registered with ``torch.nn.utils.parametrize`` on the attention modules (``W_Q``,
    ``_W_K`` under GQA, ``W_K`` otherwise); while attached, ``model.state_dict()`` uses parametrize's names
    (``...parametrizations.W_Q.original``) and the model cannot be deep-copied or pickled: merge() first.

    LoRA on a ``TransformerBridge`` (every model under TransformerLens 4.x; the 4-bit backend under 3.9) gets a
    :class:`abft_lens.training.peft_lora.PeftLoraTrainable`: the same masks, names and state dict over PEFT LoRA
    adapters. Full training of a full-precision bridge trains its Hugging Face q/k leaves (same names and
    state dict); a 4-bit bridge trains through LoRA only.
    """
    config = TrainableConfig() if config is None else config
    if is_bridge(model) and (config.kind == "lora" or qk.is_quantized(model)):
        return PeftLoraTrainable(model, config)
    return Trainable(model, config)


def masked_step(optimizer: torch.optim.Optimizer, trainable: Trainable,
                open_heads: Bool[Tensor, "layer head"] | None = None) -> None:
    """``optimizer.step()`` that leaves closed head slices bit-identical: parameters and optimizer state.

    ``open_heads``: the union (logical OR) of the per-sample participating masks of the pseudo-batch; None =
    all heads (the fixed ``heads=`` selection still applies). Adam/AdamW move zero-gradient entries through
    stale moments and weight decay; here the closed slices of each parameter and of every optimizer-state
    tensor of the same shape (exp_avg, exp_avg_sq, max_exp_avg_sq, ...) are snapshotted and restored after
    the step, the SparseAdam semantic. State that the step creates starts at zero in its closed slices (Adam's
    initial moments). Adam's ``step`` counter is per tensor and advances every step, as in SparseAdam.
    """
    masks = trainable.head_masks(open_heads, own_layout=True)
    saved = []
    for name, p in trainable.named_parameters():
        closed = (~masks[name]).reshape(-1).expand(p.shape[0]).nonzero().flatten()
        if closed.numel() == 0:
            continue
        state = {k: v.index_select(0, closed) for k, v in optimizer.state.get(p, {}).items()
                 if isinstance(v, Tensor) and v.shape == p.shape}
        saved.append((p, closed, p.detach().index_select(0, closed), state))
    optimizer.step()
    with torch.no_grad():
        for p, closed, value, state in saved:
            p.index_copy_(0, closed, value)
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    if k in state:
                        v.index_copy_(0, closed, state[k])
                    else:
                        v.index_fill_(0, closed, 0)
