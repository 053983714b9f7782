"""The second backend: 4-bit NF4 bases through TransformerLens's ``TransformerBridge``, trained with PEFT LoRA.

``HookedTransformer`` copies every weight into its own layout, so a bitsandbytes 4-bit weight (packed uint8)
can be neither run nor trained there. ``TransformerBridge`` keeps the raw Hugging Face modules and fires the
same hook names (``blocks.{l}.attn.hook_pattern`` with live gradients), so the capture, filter, loss,
controller, evaluator and report code of the hooked pipeline serve it unchanged. The seam is three functions
and one class:

- :func:`load_bridge`: a local Hugging Face folder → fp32 model → every ``nn.Linear`` of the decoder blocks
  replaced by a bitsandbytes ``Linear4bit`` (NF4, double quantization; compute in float32 on CPU, bfloat16
  on CUDA) → ``TransformerBridge.boot_transformers(..., hf_model=...)``. The embeddings, norms and
  ``lm_head`` stay full precision, as with ``BitsAndBytesConfig(load_in_4bit=True)``.
  On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for good on its first eval-mode forward
  into a bfloat16 format whose kernel (``gemv_4bit``) rounds inputs to bfloat16 (a left-padded batch then
  differs from the same prompt alone by 0.21 in SmolLM2's logits, against 4e-5 without the repack) and has
  no autograd (gradients through the base weights are silently dropped). Both the ``BitsAndBytesConfig``
  route and a plain ``Linear4bit`` do this; the layers are quantized here so that the repack is switched
  off on every layer before any forward runs.
- :func:`bridge_residual`: the residual stream before block ``stop_at_layer``; for ``stop_at_layer =
  n_layers`` a hook on ``ln_final.hook_in`` stops the pass, so the final norm and the unembedding are skipped
  as in the hooked path.
- :class:`PeftLoraTrainable`: :class:`abft_lens.trainable.Trainable` wired to PEFT LoRA adapters
  (``peft.inject_adapter_in_model``) on the query and key projections. :func:`abft_lens.trainable.attach`
  returns it for a bridge model.

LoRA on a bridge is the same adapter as the hooked LoRA of :mod:`abft_lens.trainable`: ``delta = (alpha / r)
B @ A`` on the ``[n_out * d_head, d_model]`` Hugging Face weight, ``A`` drawn from the same generator in the
same order, the same parameter names (``blocks.{l}.attn.W_Q.lora_A``, ``..._W_K.lora_B`` under GQA). A run
trained on the 4-bit base therefore loads onto the full-precision hooked model (``abft-lens export`` merges it
into the full-precision base).

Restricted gradient with LoRA: the per-head slice of an adapter is its block of ``d_head`` output rows of
``B``. Hooks on ``lora_A``/``lora_B`` route the gradient of the adapter's output by head: closed heads'
columns reach only the layer input (through a copy computed with A and B detached), so closed rows of ``B``
get no gradient and ``A`` (shared by the heads of its layer and target) learns only through the open heads,
while the gradient sent to the layers below is the full one (exactly the hooked LoRA's masked weight delta);
:func:`abft_lens.trainable.masked_step` keeps closed rows and their Adam moments bit-identical.
``A`` moves whenever any head of its layer is open, so a closed head whose ``B`` rows are already non-zero
sees its delta move; a head that was never open keeps ``B`` rows at zero, so its weights stay the base's.
Keys under GQA follow the union rule (a K slice opens when any query head of its group is open).

The 4-bit weights are never rewritten: :meth:`PeftLoraTrainable.merge` freezes the adapters and leaves them
in the model (requantizing W + delta would lose most of a small update); :meth:`~PeftLoraTrainable.remove`
takes them out and gives back the exact base.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from einops import rearrange, repeat
from jaxtyping import Float, Int
from torch import Tensor, nn

from . import _tl  # first: its warning filters must precede transformer_lens/bitsandbytes imports
from .errors import AbftLensError
from .trainable import _ATTACHED, Trainable, _Slot

ADAPTER = "default"  # PEFT's adapter name

__all__ = ["load_bridge", "is_bridge", "bridge_residual", "qk_weights", "ov_weights", "PeftLoraTrainable",
           "quantize_linears"]


# ---------------------------------------------------------------------------------------------- loading


def quantize_linears(module: nn.Module, *, compute_dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` under ``module`` (except names in ``skip``) by a bitsandbytes NF4 ``Linear4bit``.

    Double quantization of the absmax statistics, block size 64; the quantization state keeps the weights'
    dtype (float32 here), so dequantized weights are float32. The weights are quantized when the layer moves
    to its device. bitsandbytes' bfloat16 CPU repacking is switched off (see the comment inside). Returns the
    number of layers replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name not in skip:
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            # Off: in eval mode bitsandbytes would repack the weight once, for good, into a bfloat16 CPU format
            # whose kernel (gemv_4bit) has no autograd: gradients through the base weights would be dropped.
            layer.support_avx512bf16_for_cpu = False
            setattr(module, name, layer)
            replaced += 1
        elif not isinstance(child, nn.Linear):
            replaced += quantize_linears(child, compute_dtype=compute_dtype, skip=skip)
    return replaced


def load_bridge(hf_dir: Path, *, name: str, source: str, device: str = "cpu", quantize: bool = True):
    """A ``TransformerBridge`` over the Hugging Face model in ``hf_dir``, its decoder Linears in 4-bit NF4.

    ``quantize=False`` keeps full precision (the same backend without bitsandbytes: used by the tests to
    compare PEFT LoRA on the bridge with the hooked LoRA). Returns a :class:`abft_lens.models.LoadedModel`
    with ``quantized`` set and ``info["memory_mib"]``, the model's parameter and buffer bytes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    from .models import LoadedModel, _tokenizer_adds_bos

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as error:
        raise AbftLensError(f"could not read the Hugging Face model folder {hf_dir}: {error}",
                            "check that the folder holds config.json, the weights and the tokenizer files.") from error
    if quantize:
        compute_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        layers = getattr(getattr(hf_model, "model", hf_model), "layers", None)
        if layers is None or quantize_linears(layers, compute_dtype=compute_dtype) == 0:
            raise AbftLensError(f"found no decoder Linear layers to quantize in {hf_dir} "
                                f"({type(hf_model).__name__}).", "use a Llama- or Gemma-style causal LM folder.")
    hf_model.to(device)  # Params4bit quantizes on this move
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(str(hf_dir), hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device)
    bridge.eval()
    memory = sum(t.numel() * t.element_size() for t in (*hf_model.parameters(), *hf_model.buffers()))
    loaded = LoadedModel(bridge, tokenizer, name=name, source=source, hf_dir=Path(hf_dir),
                         adds_bos=_tokenizer_adds_bos(tokenizer), quantized=quantize)
    loaded.info.update(memory_mib=round(memory / 2**20, 1), backend="TransformerBridge",
                       quantization="bitsandbytes NF4, double quantization" if quantize else None)
    loaded.load_seconds = time.perf_counter() - start
    return loaded


def is_bridge(model) -> bool:
    """True for a TransformerBridge (the raw-HF backend), False for a HookedTransformer."""
    return not isinstance(model, _tl.HookedTransformer) and hasattr(model, "original_model")


# ---------------------------------------------------------------------------------------------- forward


def _stop_before_final_norm(residual: Tensor, *, hook) -> None:
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(residual)


def bridge_residual(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    stop_at_layer: int,
) -> Float[Tensor, "batch pos d_model"]:
    """The bridge's residual stream before block ``stop_at_layer`` (``n_layers``: after the last block).

    The bridge's own ``stop_at_layer`` stops at the start of a block; after the last block a hook on
    ``ln_final.hook_in`` ends the pass the same way, so the final norm and the unembedding never run.
    """
    if stop_at_layer < model.cfg.n_layers:
        return model(tokens, attention_mask=attention_mask, stop_at_layer=stop_at_layer)
    with model.hooks(fwd_hooks=[("ln_final.hook_in", _stop_before_final_norm)]):
        return model(tokens, attention_mask=attention_mask)


# ---------------------------------------------------------------------------------------------- weights


def _lora_layer(component):
    """The PEFT LoRA layer wrapped in a bridge Linear component, or None."""
    from peft.tuners.lora import LoraLayer

    inner = component.original_component
    return inner if isinstance(inner, LoraLayer) else None


def _dense_weight(linear: nn.Module) -> Float[Tensor, "out in"]:
    """A Linear's weight in float32 (dequantized for bitsandbytes 4-bit), plus an active PEFT delta."""
    from peft.tuners.lora import LoraLayer

    if isinstance(linear, LoraLayer):
        base = _dense_weight(linear.get_base_layer())
        return base + linear.get_delta_weight(ADAPTER).float()
    weight = linear.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def qk_weights(model) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(W_Q [head, d_model, d_head], W_K [kv_head, d_model, d_head])`` of a bridge, float32 on CPU.

    Effective weights: dequantized 4-bit weights plus any attached LoRA delta, in TransformerLens layout.
    """
    out = []
    with torch.no_grad():
        for block in model.blocks:
            pair = []
            for attr in ("q", "k"):
                dense = _dense_weight(getattr(block.attn, attr).original_component).cpu()
                pair.append(rearrange(dense, "(n h) m -> n m h", h=model.cfg.d_head))
            out.append(tuple(pair))
    return out


def ov_weights(model, layer: int) -> tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_head d_model"]]:
    """``(W_V, W_O)`` of one bridge layer in TransformerLens layout, float32 on CPU (dequantized when 4-bit).

    Under GQA each kv head's ``W_V`` is repeated for the query heads of its group, like ``attn.W_V``.
    """
    attn, cfg = model.blocks[layer].attn, model.cfg
    with torch.no_grad():
        w_v = rearrange(_dense_weight(attn.v.original_component).cpu(), "(n h) m -> n m h", h=cfg.d_head)
        w_o = rearrange(_dense_weight(attn.o.original_component).cpu(), "m (n h) -> n h m", h=cfg.d_head)
    return w_v.repeat_interleave(cfg.n_heads // w_v.shape[0], dim=0), w_o


# ---------------------------------------------------------------------------------------------- training


class _RouteByHead(torch.autograd.Function):
    """``forward(full, detached, get_mask) = full``; backward sends ``mask * grad`` to ``full`` and
    ``~mask * grad`` to ``detached`` (``get_mask()`` None: everything to ``full``)."""

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
    """:class:`~abft_lens.trainable.Trainable` over PEFT LoRA adapters on a bridge's query/key projections.

    Masks, restricted gradient, :func:`~abft_lens.trainable.masked_step` and the state dict are the parent's;
    only the wiring differs (module docstring). Only ``kind="lora"`` without bias training is possible on a
    4-bit base.
    """

    def _wire(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        model, config = self.model, self.config
        if config.kind != "lora" or config.bias:
            raise ValueError("a TransformerBridge (4-bit) base trains through LoRA adapters only: use "
                             "TrainableConfig(kind='lora', bias=False) (the CLI's --quantized does this)")
        live = _ATTACHED.get(model)
        # the bridge's attention names its query/key projection components "q" and "k", like the targets
        components = {(layer, t): getattr(model.blocks[layer].attn, t)
                      for layer in range(self.n_layers) for t in config.targets}
        if (live is not None and live._open) or any(_lora_layer(c) is not None for c in components.values()):
            raise ValueError("attach: this model already carries LoRA adapters (an attached, merged or loaded "
                             "run); call remove() on its Trainable, or load a fresh model")
        _ATTACHED[model] = self
        for p in model.parameters():
            p.requires_grad_(False)
        base = model.original_model
        module_names = {id(m): n for n, m in base.named_modules()}
        alpha = config.lora_r if config.lora_alpha is None else config.lora_alpha
        lora_config = LoraConfig(r=config.lora_r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                 target_modules=[module_names[id(c.original_component)] for c in components.values()])
        inject_adapter_in_model(lora_config, base, adapter_name=ADAPTER)
        gqa = (model.cfg.n_key_value_heads or self.n_heads) < self.n_heads
        weight_names = {"q": "W_Q", "k": "_W_K" if gqa else "W_K"}
        gen = torch.Generator().manual_seed(config.lora_init_seed)
        self._components = components
        self._out_masks: dict[tuple[int, str], Tensor | None] = {}
        self._inputs: dict[tuple[int, str], Tensor] = {}
        for (layer, t), component in components.items():  # layer-major, q before k: the hooked LoRA's order
            lora = _lora_layer(component)
            a, b = lora.lora_A[ADAPTER].weight, lora.lora_B[ADAPTER].weight
            with torch.no_grad():  # the hooked LoraDelta's initialisation, so both backends start identical
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_((torch.rand(a.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound)
                b.zero_()
            prefix = f"blocks.{layer}.attn.{weight_names[t]}"
            for role, param in (("lora_A", a), ("lora_B", b)):
                param.requires_grad_(True)
                self._slots.append(_Slot(f"{prefix}.{role}", layer, t, role, param))
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
        heads = self._active_heads()
        for (layer, t) in self._components:
            self._out_masks[(layer, t)] = None if heads is None else repeat(
                self._out_open(heads[layer], t), "n -> (n h)", h=self.d_head)

    def merged_state_dict(self) -> dict[str, Tensor]:
        """Effective W_Q / W_K (or _W_K) per layer: dequantized 4-bit weights plus the LoRA delta, float32."""
        weights = qk_weights(self.model)  # per layer (W_Q, W_K)
        return {slot.name.rsplit(".", 1)[0]: weights[slot.layer][0 if slot.target == "q" else 1].contiguous()
                for slot in self._live_slots()}

    def _close(self, leave_parametrized: bool) -> None:
        for h in self._hooks:
            h.remove()
        for s in self._slots:
            s.param.requires_grad_(False)
        if not leave_parametrized:
            for component in self._components.values():
                component._original_component = _lora_layer(component).get_base_layer()
        self._open = False

    def merge(self) -> None:
        """End training; the adapters stay in the model, frozen (4-bit weights are not requantized)."""
        self._live_slots()
        self._close(leave_parametrized=True)
