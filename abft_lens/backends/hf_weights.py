"""A training run's tensors written into a Hugging Face causal LM (the conversion behind ``abft-lens export``).

TransformerLens's ``W_Q[h]`` (``[d_model, d_head]``) is ``q_proj.weight[h*d_head:(h+1)*d_head, :].T``;
``_W_K`` (grouped-query) / ``W_K`` likewise with the key/value heads; ``b_Q[h]`` is
``q_proj.bias[h*d_head:(h+1)*d_head]`` (:func:`abft_lens.backends.qk.hf_layout`). LoRA runs store ``lora_A
[r, d_model]`` and ``lora_B [n_out*d_head, r]`` with rows head-major, so ``scale * (B @ A)`` is already a
``q_proj``/``k_proj`` delta and ``A``/``B`` are PEFT's ``lora_A.weight``/``lora_B.weight`` as they stand.

Works on Hugging Face modules only (``model.layers.{l}.self_attn.{q,k}_proj``), whatever TransformerLens
version trained the run: the run folder's tensors have the same names and layout under both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from abft_lens.backends import qk
from abft_lens.errors import AbftLensError
from abft_lens.run_files import TRAINED_FILE

__all__ = ["TrainedKey", "parse_trained", "load_hf_base", "merge_trained", "peft_tensors"]

TrainedKey = tuple[int, str, str]  # (layer, "q_proj" | "k_proj", "weight" | "bias" | "lora_A" | "lora_B")


def load_hf_base(base: Path, needs_bias: bool) -> tuple[torch.nn.Module, object, bool]:
    """The base model's Hugging Face folder as a float32 model and its tokenizer; with ``needs_bias``, attention
    biases added (zero) where the architecture has none. Returns (model, tokenizer, biases were added)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        overrides, bias_added = {}, False
        if needs_bias:
            overrides["config"] = AutoConfig.from_pretrained(base)
            bias_added = not getattr(overrides["config"], "attention_bias", False)
            overrides["config"].attention_bias = True
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise AbftLensError(f"could not read the run's base model folder {base}: {error}",
                            "check that the folder still holds the model written by save_pretrained.") from error
    if bias_added:
        _zero_added_biases(model)
    return model, tokenizer, bias_added


def parse_trained(trained: dict[str, torch.Tensor]) -> dict[TrainedKey, torch.Tensor]:
    """``{(layer, proj, role): tensor}``, role in weight / bias / lora_A / lora_B, proj q_proj / k_proj."""
    parsed = {}
    for key, tensor in trained.items():
        parts = qk.parse_name(key)
        if parts is None:
            raise AbftLensError(f"{TRAINED_FILE} holds an unexpected tensor {key!r}.",
                                "export runs written by this version of abft-lens.")
        layer, attr, lora = parts
        role = lora or ("bias" if qk.is_bias(attr) else "weight")
        parsed[(layer, qk.HF_PROJ[attr], role)] = tensor
    return parsed


def _self_attention(model, layer: int):
    try:
        return model.get_submodule(f"model.layers.{layer}.self_attn")
    except AttributeError:
        raise AbftLensError(f"{type(model).__name__} has no model.layers.{layer}.self_attn (q_proj/k_proj); "
                            "export supports Llama-style decoders (Llama, Mistral, Qwen, Gemma).", None) from None


def _zero_added_biases(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(module, name, None)
                if isinstance(linear, torch.nn.Linear) and linear.bias is not None:
                    linear.bias.zero_()


def merge_trained(model, parsed: dict[TrainedKey, torch.Tensor], scale: float, run_dir: Path) -> list[str]:
    changed = []
    with torch.no_grad():
        for (layer, proj, role), tensor in sorted(parsed.items()):
            linear = getattr(_self_attention(model, layer), proj)
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            if role == "lora_B":
                continue
            if role == "lora_A":
                delta = scale * (parsed[(layer, proj, "lora_B")] @ tensor)
                target, value, name = linear.weight, linear.weight + delta.to(linear.weight.dtype), "weight"
            elif role == "weight":
                target, value, name = linear.weight, qk.hf_layout(tensor), "weight"
            else:
                target, value, name = linear.bias, qk.hf_layout(tensor), "bias"
            if target is None or tuple(value.shape) != tuple(target.shape):
                got = None if target is None else tuple(target.shape)
                raise AbftLensError(
                    f"the trained {proj} {name} of layer {layer} in {run_dir} has shape {tuple(value.shape)}, "
                    f"the base model's is {got}.", "export a run against the base model it was trained on.")
            target.copy_(value.to(target.dtype))
            changed.append(f"{prefix}.{name}")
    return changed


def peft_tensors(parsed: dict[TrainedKey, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A LoRA run's ``lora_A``/``lora_B`` under PEFT's key names (float32), and the target modules they cover."""
    tensors, targets = {}, []
    for (layer, proj, role), tensor in sorted(parsed.items()):
        if role in ("lora_A", "lora_B"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}.{role}.weight"
            tensors[key] = tensor.to(torch.float32).contiguous()
            if proj not in targets:
                targets.append(proj)
    return tensors, targets
