"""Loading hooked models: TransformerLens names, local Hugging Face folders, GGUF files, the embedded
SmolLM2-135M default and tiny random configurations.

Every route returns the model itself: a ``HookedTransformer`` with unprocessed weights (no fold_ln, no
centering, so W_Q/W_K mean what they mean in the checkpoint) carrying the model's own tokenizer, and a
:class:`~abft_lens.backends.provenance.ModelInfo` (where it came from) read by ``model_info(model)``. Nothing here
touches the network except route 1 (an official TransformerLens name), and that only when the hub is on.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from abft_lens.backends.provenance import (LoadedModel, ModelInfo, attach_info, model_info, tokenizer_adds_bos,
                                           use_own_tokenizer)
from abft_lens.backends.hf_cache import (EMBEDDED_NAME, GEMMA_NAME, HF_CONFIG_FILE, QWEN_NAME, embedded_hf_dir,
                                        gemma_hf_dir, gguf_hf_dir, is_hf_folder, qwen_hf_dir)
from abft_lens.backends.relayout import relayout_for_forward
from abft_lens.backends.tiny import tiny_model, tiny_tokenizer
from abft_lens.backends.tl import HAS_HOOKED, HookedTransformer, HookedTransformerConfig, quiet_deprecation
from abft_lens.arguments import check_device, check_text
from abft_lens.errors import AbftLensError

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny"
_NO_PROCESSING = dict(
    fold_ln=False,
    center_writing_weights=False,
    center_unembed=False,
    fold_value_biases=False,
    refactor_factored_attn_matrices=False,
)


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quantized: bool = False) -> LoadedModel:
    """Load a hooked model from any supported source.

    ``spec`` is one of: ``"smollm2-135m"`` (the embedded default); ``"gemma3-270m"``; ``"qwen2.5-coder-0.5b"``
    (Qwen2.5-Coder-0.5B-Instruct, the ``qwen`` extra); ``"tiny"`` or
    ``"tiny-mha"`` (random tiny models with a small byte-level BPE tokenizer); a path to a Hugging Face model
    folder; a path to a ``.gguf`` file; or a TransformerLens official name such as ``"gpt2"`` (needs the hub).

    ``quantized=True`` loads a 4-bit NF4 base through ``TransformerBridge`` instead (:mod:`abft_lens.backends.bridge`;
    train it with LoRA). It needs a Hugging Face folder behind the spec: the embedded models, a folder, a
    ``.gguf``; ``dtype`` must stay float32 (the compute dtype follows the device).

    Returns the model (``model.tokenizer`` is its tokenizer); ``model_info(model)`` says where it came from.
    Under TransformerLens 4.x every route returns a ``TransformerBridge`` over the Hugging Face model (raw
    weights, eager attention); the tiny models are seeded random Llamas there (:mod:`abft_lens.backends.tiny`).
    """
    check_text("spec", spec, "smollm2-135m")
    check_device(device)
    if not isinstance(dtype, torch.dtype):
        raise AbftLensError(f"dtype={dtype!r} is not a torch dtype.", "pass e.g. dtype=torch.float32.")
    if quantized:
        return _quantized(spec, dtype=dtype, device=device)
    start = time.perf_counter()
    if spec.split(":")[0] in ("tiny", "tiny-mha"):
        model = _tiny_from_spec(spec, dtype=dtype)
    elif (route := _hf_route(spec)) is not None:
        hf_dir, source, converted = route
        name = spec if source == "embedded" else str(Path(spec).expanduser())
        if HAS_HOOKED:
            model = _from_hf_dir(hf_dir, name=name, source=source, dtype=dtype, device=device)
        else:
            from abft_lens.backends.bridge import load_bridge

            model = load_bridge(hf_dir, name=name, source=source, device=device, quantize=False, dtype=dtype)
        model_info(model).converted = converted
    else:
        model = _from_official_name(spec, dtype=dtype, device=device)
    model_info(model).load_seconds = time.perf_counter() - start
    return model


def _hf_route(spec: str) -> tuple[Path, str, bool] | None:
    """``(hf_dir, source, converted_now)`` when a Hugging Face folder lies behind ``spec`` (the embedded models,
    a ``.gguf`` file converted once into the cache, a local folder); None for other names (official names)."""
    path = Path(spec).expanduser()
    embedded = {EMBEDDED_NAME: embedded_hf_dir, GEMMA_NAME: gemma_hf_dir, QWEN_NAME: qwen_hf_dir}
    if spec in embedded:
        hf_dir, converted = embedded[spec]()
        return hf_dir, "embedded", converted
    if path.is_file() and path.suffix == ".gguf":
        hf_dir, converted = gguf_hf_dir(path)
        return hf_dir, "gguf", converted
    if path.is_dir():
        _check_hf_folder(path)
        return path, "hf-folder", False
    if path.exists():
        raise AbftLensError(f"{path} exists but is not a model: neither a .gguf file nor a Hugging Face folder.",
                            "point --model at a .gguf file or a folder written by save_pretrained.")
    if path.suffix == ".gguf" or "/" in spec and spec.startswith((".", "/", "~")):
        raise AbftLensError(f"model path {spec} does not exist.", "check the path.")
    return None


def _check_hf_folder(path: Path) -> None:
    """A local model folder holds config.json, weights and tokenizer files (what save_pretrained writes)."""
    fix = "point --model at a folder written by save_pretrained (config.json, weights, tokenizer files)."
    if not is_hf_folder(path):
        raise AbftLensError(f"{path} is a folder but holds no config.json, so it is not a Hugging Face model folder.", fix)
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise AbftLensError(f"could not read the Hugging Face model folder {path}: it holds no weights "
                            "(*.safetensors or pytorch_model*.bin).", fix)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        raise AbftLensError(f"could not read the Hugging Face model folder {path}: it holds no tokenizer files "
                            "(tokenizer.json, tokenizer.model or vocab.json).", fix)


def load_model_like(described: dict, **overrides) -> LoadedModel:
    """Load the model a run folder's ``config.json["model"]`` (:func:`describe_model`) names, quantized
    when that run's base was; ``overrides`` go to :func:`load_model` (e.g. ``quantized=False``).

    A model the user built (source ``"user"``) cannot be rebuilt from its description: AbftLensError.
    """
    if described.get("source") == "user":
        raise AbftLensError(f"the run's base model {described['name']!r} was built by hand (not by load_model), so "
                            "abft-lens cannot load it again from the run folder.",
                            "pass the untrained base model yourself, e.g. compare_run(run_dir, model=base) or "
                            "report_from_run(run_dir, model=base).")
    kwargs = {"quantized": bool(described.get("quantized", False)), **overrides}
    return load_model(described["name"], **kwargs)


def _quantized(spec: str, *, dtype: torch.dtype, device: str) -> LoadedModel:
    from abft_lens.backends.bridge import load_bridge

    if dtype != torch.float32:
        raise AbftLensError(f"a 4-bit base was asked for with dtype {dtype}.",
                            "drop --dtype with --quantized: the compute dtype is float32 on CPU and bfloat16 on CUDA.")
    route = None if spec.split(":")[0] in ("tiny", "tiny-mha") else _hf_route(spec)
    if route is None:
        raise AbftLensError(f"--quantized needs a Hugging Face model behind the model spec, and {spec!r} has none.",
                            f"use {EMBEDDED_NAME}, {GEMMA_NAME}, {QWEN_NAME}, a Hugging Face folder or a .gguf file "
                            "(a tiny model can be exported to a folder first: abft-lens export).")
    hf_dir, source, _ = route
    return load_bridge(hf_dir, name=spec, source=source, device=device)


# ----------------------------------------------------------------------------------------------- routes


def _from_hf_dir(hf_dir: Path, *, name: str, source: str, dtype: torch.dtype, device: str) -> HookedTransformer:
    """Build a HookedTransformer from a local Hugging Face folder without asking the hub anything."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        cfg_dict = _tl_config_dict(hf_dir)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise AbftLensError(
            f"could not read the Hugging Face model folder {hf_dir}: {error}",
            "check that the folder holds config.json, the weights and the tokenizer files "
            "(save_pretrained writes all three).",
        ) from error
    adds_bos = tokenizer_adds_bos(tokenizer)
    cfg_dict.update(dtype=dtype, device=device, init_weights=False, default_prepend_bos=adds_bos)
    with quiet_deprecation():
        cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = get_pretrained_state_dict(str(hf_dir), cfg, hf_model=hf_model, dtype=torch.float32)
    del hf_model
    with quiet_deprecation():  # init_weights=False: parameters are allocated but never written (not resident)
        model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left", move_to_device=False)
    # Lean load: the converted tensors become the parameters themselves, one by one, instead of being copied
    # into a second full model. Most are views of the Hugging Face weights (which transformers memory-maps
    # from the safetensors file, copy-on-write), already in the layout relayout_for_forward asks for; the
    # rest are converted or cast here one tensor at a time, so no two full models are ever alive together.
    # No weight processing, as with load_and_process_state_dict(**_NO_PROCESSING): the values are the same.
    state_dict = model.fill_missing_keys(state_dict)
    parameters = dict(model.named_parameters())
    for key in list(state_dict):
        tensor, parameter = state_dict.pop(key), parameters.get(key)
        if parameter is None or parameter.shape != tensor.shape:
            model.load_state_dict({key: tensor}, strict=False)  # a buffer: copied as before
        else:
            parameter.data = tensor.detach().to(parameter.dtype)
        del tensor
    if device != "cpu":
        model.to(device)
    relayout_for_forward(model)
    use_own_tokenizer(model, tokenizer)
    model.eval()
    return attach_info(model, ModelInfo(name=name, source=source, hf_dir=Path(hf_dir), adds_bos=adds_bos))


def _tl_config_dict(hf_dir: Path) -> dict:
    """TransformerLens's config for a local folder, read from the folder's own config.json.

    ``convert_hf_model_config`` picks some architectures from substrings of the name it is given ("llama",
    "gemma", ...) and then reads no config at all, so a folder such as ``models/tinyllama`` (or the cached
    conversion of a Gemma GGUF) failed with an AttributeError. It is given a copy of config.json in a neutrally
    named temporary folder instead.
    """
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    hf_config = json.loads((Path(hf_dir) / HF_CONFIG_FILE).read_text())
    if hf_config.get("architectures") == ["Gemma3ForCausalLM"]:  # TL 3.9 knows Gemma-3 only by official name
        cfg_dict = _gemma3_tl_config(hf_config)
        cfg_dict["tokenizer_name"] = str(hf_dir)
        return cfg_dict
    with tempfile.TemporaryDirectory(prefix="abft-lens-config-") as neutral:
        shutil.copyfile(Path(hf_dir) / HF_CONFIG_FILE, Path(neutral) / HF_CONFIG_FILE)
        cfg_dict = convert_hf_model_config(neutral)
    cfg_dict["tokenizer_name"] = str(hf_dir)
    return cfg_dict


def _gemma3_tl_config(hf: dict) -> dict:
    """TransformerLens config for a text-only Gemma-3 (``Gemma3ForCausalLM``) folder, read from its config.json.

    TransformerLens 3.9 has Gemma-3 configurations only as hard-coded dicts keyed by official Hub names
    (``google/gemma-3-270m`` ...) and raises NotImplementedError for a local folder; this builds the same dict
    (same keys as TL's 270m entry) from the folder's own values: sliding-window ("local") layers from
    ``layer_types`` with ``sliding_window``, per-layer-type rotary bases, one KV head, query/key RMSNorm,
    attention scale sqrt(query_pre_attn_scalar), pre+post norms. The sqrt(d_model) embedding scale is folded
    into W_E by TL's Gemma weight conversion.
    """
    rope = hf.get("rope_parameters") or {}
    full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    for kind, params in (("full_attention", full), ("sliding_attention", local)):
        if params.get("rope_type", "default") != "default":
            raise AbftLensError(f"Gemma-3 {kind} layers use rope_type={params.get('rope_type')!r}, which this "
                                "loader does not map to TransformerLens.", "use a Gemma-3 text model with default RoPE.")
    if hf.get("attn_logit_softcapping") or hf.get("final_logit_softcapping") or hf.get("use_bidirectional_attention"):
        raise AbftLensError("this Gemma-3 folder uses logit soft-capping or bidirectional attention, which this "
                            "loader does not map to TransformerLens.", "use a Gemma-3 text model without them.")
    types = {"sliding_attention": "local", "full_attention": "global"}
    return {
        "d_model": hf["hidden_size"], "d_head": hf["head_dim"], "n_heads": hf["num_attention_heads"],
        "d_mlp": hf["intermediate_size"], "n_layers": hf["num_hidden_layers"],
        "n_ctx": min(hf.get("max_position_embeddings", 8192), 8192), "eps": hf["rms_norm_eps"],
        "d_vocab": hf["vocab_size"], "act_fn": hf.get("hidden_activation", "gelu_pytorch_tanh"),
        "initializer_range": hf.get("initializer_range", 0.02), "normalization_type": "RMS",
        "rotary_base": full.get("rope_theta", 1_000_000.0), "rotary_base_local": local.get("rope_theta", 10_000.0),
        "rotary_dim": hf["head_dim"], "positional_embedding_type": "rotary",
        "use_attn_scale": True, "attn_scale": float(hf.get("query_pre_attn_scalar", hf["head_dim"])) ** 0.5,
        "n_key_value_heads": hf["num_key_value_heads"], "gated_mlp": True, "final_rms": True,
        "use_normalization_before_and_after": True, "use_qk_norm": True,
        "window_size": hf["sliding_window"], "use_local_attn": True,
        "attn_types": [types[t] for t in hf["layer_types"]],
        "original_architecture": "Gemma3ForCausalLM", "tie_word_embeddings": hf.get("tie_word_embeddings", True),
    }


def _from_official_name(name: str, *, dtype: torch.dtype, device: str) -> HookedTransformer:
    try:
        with quiet_deprecation():
            if HAS_HOOKED:
                model = HookedTransformer.from_pretrained_no_processing(name, dtype=dtype, device=device)
            else:
                from abft_lens.backends.tl import bridge_class

                model = bridge_class().boot_transformers(name, dtype=dtype, device=device)
    except Exception as error:  # the hub, TransformerLens and transformers all raise their own types
        raise AbftLensError(
            f"could not load model {name!r}. Tried: the embedded default ({EMBEDDED_NAME!r}), tiny random "
            f"models ('tiny', 'tiny-mha'), a local folder or .gguf file (no such path), and TransformerLens's "
            f"official names through the hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}).",
            f"use --model {EMBEDDED_NAME}, a path to a Hugging Face folder or .gguf file, or an official "
            "TransformerLens name on a machine that can reach the hub.",
        ) from error
    model.eval()
    tokenizer = model.tokenizer
    adds_bos = tokenizer_adds_bos(tokenizer)
    model.cfg.default_prepend_bos = adds_bos
    return attach_info(model, ModelInfo(name=name, source="official", adds_bos=adds_bos))


def _tiny_from_spec(spec: str, *, dtype: torch.dtype) -> HookedTransformer:
    """``tiny`` (GQA) or ``tiny-mha``, optionally ``tiny:n_layers=3,n_heads=4,seed=1``."""
    base, _, options = spec.partition(":")
    kwargs: dict = {"n_kv_heads": None} if base == "tiny-mha" else {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "seed", "n_ctx"):
            raise AbftLensError(f"unknown tiny-model option {key!r} in {spec!r}.",
                                "use n_layers, n_heads, n_kv_heads, d_model, d_head, n_ctx or seed.")
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise AbftLensError(f"tiny-model option {key!r} in {spec!r} needs an integer value, not {value!r}.",
                                f"write it as {key}=<integer>.") from None
        low, high = (0, 2**32 - 1) if key == "seed" else (1, 4096)
        if not low <= kwargs[key] <= high:
            raise AbftLensError(f"tiny-model option {key}={kwargs[key]} in {spec!r} is out of range.",
                                f"use {key} in {low}..{high}.")
    n_heads, n_kv_heads = kwargs.get("n_heads", 4), kwargs.get("n_kv_heads", 2)
    if n_kv_heads is not None and (n_kv_heads <= 0 or n_heads % n_kv_heads):
        raise AbftLensError(f"{spec!r}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}.",
                            "choose n_kv_heads dividing n_heads (or use tiny-mha for plain multi-head attention).")
    model = tiny_model(tokenizer=tiny_tokenizer(), dtype=dtype, **kwargs)
    return attach_info(model, ModelInfo(name=spec, source="tiny", adds_bos=False))
