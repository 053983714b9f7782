"""PEFT LoRA on the query and key projections of a ``TransformerBridge`` (the 4-bit backend), behind the
same :class:`~abft_lens.training.trainable.Trainable` interface as the hooked model.

LoRA on a bridge is the same adapter as the hooked LoRA of :mod:`abft_lens.training.trainable`: ``delta = (alpha / r)
B @ A`` on the ``[n_out * d_head, d_model]`` Hugging Face weight, ``A`` drawn from the same generator in the
same order, the same parameter names (``blocks.{l}.attn.W_Q.lora_A``, ``..._W_K.lora_B`` under GQA). A run
trained on the 4-bit base therefore loads onto the full-precision hooked model (``abft-lens export`` merges it
into the full-precision base).

Restricted gradient with LoRA: the per-head slice of an adapter is its block of ``d_head`` output rows of
``B``. Hooks on ``lora_A``/``lora_B`` route the gradient of the adapter's output by head: closed heads'
columns reach only the layer input (through a copy computed with A and B detached), so closed rows of ``B``
get no gradient and ``A`` (shared by the heads of its layer and target) learns only through the open heads,
while the gradient sent to the layers below is the full one (exactly the hooked LoRA's masked weight delta);
:func:`abft_lens.training.adapters.masked_step` keeps closed rows and their Adam moments bit-identical.
``A`` moves whenever any head of its layer is open, so a closed head whose ``B`` rows are already non-zero
sees its delta move; a head that was never open keeps ``B`` rows at zero, so its weights stay the base's.
Keys under GQA follow the union rule (a K slice opens when any query head of its group is open).
In a batched forward the routing is per prompt (``restricted()`` given ``[batch, layer, head]`` masks): each
prompt's columns are routed by its own open heads, which is the per-sample loop's gradient in one backward.

The 4-bit weights are never rewritten: :meth:`PeftLoraTrainable.merge` freezes the adapters and leaves them
in the model (requantizing W + delta would lose most of a small update); :meth:`~PeftLoraTrainable.remove`
takes them out and gives back the exact base.
"""

from __future__ import annotations

import math

import torch
from einops import repeat
from torch import Tensor, nn

from abft_lens.backends import qk
from abft_lens.backends.bridge import ADAPTER, lora_layer, qk_weights
from abft_lens.training.slots import Slot
from abft_lens.training.trainable import Trainable, attached, register_attached

__all__ = ["PeftLoraTrainable"]

class _RouteByHead(torch.autograd.Function):
    """``forward(full, detached, get_mask) = full``; backward sends ``mask * grad`` to ``full`` and
    ``~mask * grad`` to ``detached`` (``get_mask()`` None: everything to ``full``). The mask is
    ``[n_out * d_head]`` for every prompt alike, or ``[batch, 1, n_out * d_head]``, one per prompt."""

    @staticmethod
    def forward(ctx, full: Tensor, detached: Tensor, get_mask) -> Tensor:
        ctx.get_mask = get_mask
        return full.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        mask = ctx.get_mask()
        if mask is None:
            return grad, None, None
        mask = mask.to(grad.device)
        return grad.masked_fill(~mask, 0), grad.masked_fill(mask, 0), None


class PeftLoraTrainable(Trainable):
    """:class:`~abft_lens.training.trainable.Trainable` over PEFT LoRA adapters on a bridge's query/key projections.

    Masks, restricted gradient, :func:`~abft_lens.training.adapters.masked_step` and the state dict are the parent's;
    only the wiring differs (module docstring). Only ``kind="lora"`` without bias training is possible on a
    4-bit base.
    """

    keeps_adapters = True

    def _wire(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        model, config = self.model, self.config
        if config.kind != "lora" or config.bias:
            raise ValueError("a TransformerBridge (4-bit) base trains through LoRA adapters only: use "
                             "TrainableConfig(kind='lora', bias=False) (the CLI's --quantized does this)")
        live = attached(model)
        # the bridge's attention names its query/key projection components "q" and "k", like the targets
        components = {(layer, t): getattr(model.blocks[layer].attn, t)
                      for layer in range(self.n_layers) for t in config.targets}
        if (live is not None and live._open) or any(lora_layer(c) is not None for c in components.values()):
            raise ValueError("attach: this model already carries LoRA adapters (an attached, merged or loaded "
                             "run); call remove() on its Trainable, or load a fresh model")
        register_attached(model, self)
        for p in model.parameters():
            p.requires_grad_(False)
        base = model.original_model
        module_names = {id(m): n for n, m in base.named_modules()}
        alpha = config.lora_r if config.lora_alpha is None else config.lora_alpha
        lora_config = LoraConfig(r=config.lora_r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                 target_modules=[module_names[id(c.original_component)] for c in components.values()])
        inject_adapter_in_model(lora_config, base, adapter_name=ADAPTER)
        gen = torch.Generator().manual_seed(config.lora_init_seed)
        self._components = components
        self._out_masks: dict[tuple[int, str], Tensor | None] = {}
        self._inputs: dict[tuple[int, str], Tensor] = {}
        for (layer, t), component in components.items():  # layer-major, q before k: the hooked LoRA's order
            lora = lora_layer(component)
            a, b = lora.lora_A[ADAPTER].weight, lora.lora_B[ADAPTER].weight
            with torch.no_grad():  # the hooked LoraDelta's initialisation, so both backends start identical
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_((torch.rand(a.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound)
                b.zero_()
            for role, param in (("lora_A", a), ("lora_B", b)):
                param.requires_grad_(True)
                self._slots.append(Slot(qk.tensor_name(layer, qk.attr_names(model, layer)[t], role), layer, t, role,
                                        param))
            self._hooks.append(lora.lora_A[ADAPTER].register_forward_pre_hook(
                lambda module, inputs, key=(layer, t): self._keep_input(key, inputs)))
            self._hooks.append(lora.lora_B[ADAPTER].register_forward_hook(
                lambda module, inputs, output, key=(layer, t): self._route_output(key, module, output)))
        self._refresh_masks()

    def _keep_input(self, key: tuple[int, str], inputs: tuple[Tensor, ...]) -> None:
        """Forward pre-hook on ``lora_A``: remember its input x for the routing in :meth:`_route_output`."""
        self._inputs[key] = inputs[0]

    def _route_output(self, key: tuple[int, str], module: nn.Module, output: Tensor) -> Tensor | None:
        """Forward hook on ``lora_B``: the same output, with its gradient routed by the head mask (read at
        backward time, since ``restricted()`` may wrap only the backward).

        Open heads' columns of the gradient reach A, B and x through the output; closed heads' columns reach
        only x, through a copy computed with A and B detached. So closed rows of B and A's share of closed
        heads get no gradient, while the signal to the layers below stays complete, as with a masked weight
        delta in the hooked LoRA.
        """
        x = self._inputs.pop(key, None)
        if not output.requires_grad or x is None:
            return None
        a = self._components[key].original_component.lora_A[ADAPTER].weight
        params_detached = nn.functional.linear(nn.functional.linear(x, a.detach()), module.weight.detach())
        return _RouteByHead.apply(output, params_detached, lambda: self._out_masks.get(key))

    def _refresh_masks(self) -> None:
        heads = self._active_heads()  # [layer, head], or [batch, layer, head]: one mask per prompt of a batch
        for (layer, t) in self._components:
            self._out_masks[(layer, t)] = None if heads is None else repeat(
                self._out_open(heads[..., layer, :], t), "... n -> ... 1 (n h)" if heads.ndim == 3 else "n -> (n h)",
                h=self.d_head)

    def merged_state_dict(self) -> dict[str, Tensor]:
        """Effective W_Q / W_K (or _W_K) per layer: dequantized 4-bit weights plus the LoRA delta, float32."""
        weights = qk_weights(self.model)  # per layer (W_Q, W_K)
        return {qk.effective_name(slot.name): weights[slot.layer][0 if slot.target == "q" else 1].contiguous()
                for slot in self._live_slots()}

    def _close(self, leave_parametrized: bool) -> None:
        for h in self._hooks:
            h.remove()
        for s in self._slots:
            s.param.requires_grad_(False)
        if not leave_parametrized:
            for component in self._components.values():
                component._original_component = lora_layer(component).get_base_layer()
        self._open = False

    def merge(self) -> None:
        """End training; the adapters stay in the model, frozen (4-bit weights are not requantized)."""
        self._live_slots()
        self._close(leave_parametrized=True)
