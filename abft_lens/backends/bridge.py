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
- :func:`qk_weights`, :func:`ov_weights`: the effective (dequantized, adapter-merged) weights the reports read.

Training a bridge (PEFT LoRA on q/k behind the ``Trainable`` interface) lives in
:mod:`abft_lens.training.peft_lora`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from abft_lens.backends import tl as _tl
from abft_lens.errors import AbftLensError

ADAPTER = "default"  # PEFT's adapter name

__all__ = ["ADAPTER", "load_bridge", "boot_bridge", "is_bridge", "bridge_residual", "qk_weights", "ov_weights",
           "quantize_linears", "lora_layer", "dense_weight"]


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


def load_bridge(hf_dir: Path, *, name: str, source: str, device: str = "cpu", quantize: bool = True,
                dtype: torch.dtype = torch.float32):
    """A ``TransformerBridge`` over the Hugging Face model in ``hf_dir``, its decoder Linears in 4-bit NF4.

    ``quantize=False`` keeps full precision in ``dtype`` (the same backend without bitsandbytes: what
    ``load_model`` returns under TransformerLens 4.x, and what the tests use to compare PEFT LoRA on the
    bridge with the hooked LoRA). Returns the bridge, with a
    :class:`~abft_lens.backends.provenance.ModelInfo` attached: ``quantized`` set and ``info["memory_mib"]``, the
    model's parameter and buffer bytes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abft_lens.backends.provenance import ModelInfo, attach_info, tokenizer_adds_bos

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
    elif dtype != torch.float32:
        hf_model.to(dtype)  # boot_transformers ignores dtype= when it is given hf_model=
    bridge = boot_bridge(hf_model, tokenizer, str(hf_dir), device=device, dtype=dtype)
    memory = sum(t.numel() * t.element_size() for t in (*hf_model.parameters(), *hf_model.buffers()))
    info = ModelInfo(name=name, source=source, hf_dir=Path(hf_dir), adds_bos=tokenizer_adds_bos(tokenizer),
                     quantized=quantize)
    info.info.update(memory_mib=round(memory / 2**20, 1), backend="TransformerBridge",
                     quantization="bitsandbytes NF4, double quantization" if quantize else None)
    info.load_seconds = time.perf_counter() - start
    return attach_info(bridge, info)


def boot_bridge(hf_model: nn.Module, tokenizer, name: str, *, device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    """``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)`` offline, in eval mode, carrying
    ``tokenizer`` itself (left padding, the checkpoint's own BOS convention); ``cfg.dtype`` set to ``dtype``."""
    from abft_lens.backends.provenance import use_own_tokenizer

    hf_model.to(device)  # Params4bit quantizes on this move
    hf_model.eval()
    with _tl.quiet_deprecation():
        bridge = _tl.bridge_class().boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    use_own_tokenizer(bridge, tokenizer)
    for block in bridge.blocks:
        block.attn.hook_attn_scores.register_forward_hook(_finite_scores)
    bridge.cfg.dtype = dtype
    bridge.cfg.default_prepend_bos = bridge.cfg.tokenizer_prepends_bos
    bridge.eval()
    return bridge


def _finite_scores(module, args, scores: Tensor) -> Tensor:
    """The bridge masks attention scores with the lowest value of the model's dtype, then softmaxes in float32.
    For a float64 model (and under bfloat16 autocast) that value is -inf after the cast: the fully masked query
    rows of left padding become NaN, and backward spreads them into every gradient. Clamped to bfloat16's lowest
    value the masked scores stay finite in every dtype (the masked keys still get weight 0, a fully masked row
    a uniform one, as in float32); no real score comes near it, so nothing else changes."""
    return scores.clamp(min=torch.finfo(torch.bfloat16).min)


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


def lora_layer(component):
    """The PEFT LoRA layer wrapped in a bridge Linear component, or None."""
    from peft.tuners.lora import LoraLayer

    inner = component.original_component
    return inner if isinstance(inner, LoraLayer) else None


def dense_weight(linear: nn.Module) -> Float[Tensor, "out in"]:
    """A Linear's weight in float32 (dequantized for bitsandbytes 4-bit), plus an active PEFT delta."""
    from peft.tuners.lora import LoraLayer

    if isinstance(linear, LoraLayer):
        base = dense_weight(linear.get_base_layer())
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
                dense = dense_weight(getattr(block.attn, attr).original_component).cpu()
                # a copy: a float32 weight's .float() is the weight itself, which training moves afterwards
                pair.append(rearrange(dense, "(n h) m -> n m h", h=model.cfg.d_head).clone())
            out.append(tuple(pair))
    return out


def ov_weights(model, layer: int) -> tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_head d_model"]]:
    """``(W_V, W_O)`` of one bridge layer in TransformerLens layout, float32 on CPU (dequantized when 4-bit).

    Under GQA each kv head's ``W_V`` is repeated for the query heads of its group, like ``attn.W_V``.
    """
    attn, cfg = model.blocks[layer].attn, model.cfg
    with torch.no_grad():
        w_v = rearrange(dense_weight(attn.v.original_component).cpu(), "(n h) m -> n m h", h=cfg.d_head)
        w_o = rearrange(dense_weight(attn.o.original_component).cpu(), "m (n h) -> n h m", h=cfg.d_head)
    return w_v.repeat_interleave(cfg.n_heads // w_v.shape[0], dim=0), w_o
