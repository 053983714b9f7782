"""Export a training run as a standard Hugging Face model folder (and, for LoRA runs, a PEFT adapter).

``export_run(run_dir, output)`` reads the run's base model from its Hugging Face folder (``config.json``'s
``model.hf_dir``: the folder the hooked model was read from; for the embedded models, the cached conversion of
the GGUF, rebuilt if the cache was cleared), writes the trained W_Q/W_K into ``q_proj``/``k_proj`` and saves
with ``save_pretrained``, the tokenizer, a model card ``README.md`` and ``abft_lens_run.json`` (the run's
config and metrics). ``AutoModelForCausalLM.from_pretrained(output)`` then gives the tuned model, no
abft-lens or TransformerLens needed.

Layout: :mod:`abft_lens.backends.hf_weights` converts the run's TransformerLens-named tensors into
``q_proj``/``k_proj`` (PEFT scale ``lora_alpha / r`` for LoRA runs).

Trained biases on a base without attention biases (Llama, Gemma) switch on ``attention_bias`` in the exported
config; the v_proj/o_proj biases this adds are zero, so the model computes what the hooked model computed.

``peft=True`` (LoRA runs only) also writes ``output/adapter``: ``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names, to apply to the *base* model
(``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output / "adapter")``). LoRA runs
that also trained biases cannot be written as an adapter (the base has no bias to carry them).

The output folder is built under a temporary name beside it and renamed into place when complete; an existing
non-empty folder is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from abft_lens.errors import AbftLensError
from abft_lens.io import check_folder
from abft_lens.backends import hf_cache
from abft_lens.backends.hf_weights import load_hf_base, merge_trained, parse_trained, peft_tensors
from abft_lens.run_files import METRICS_FILE, read_run_json
from abft_lens.training.run_folder import read_run_config, read_trained
from abft_lens.training.train import TrainConfig
from abft_lens.reporting.formatting import format_value

ADAPTER_DIR = "adapter"
RUN_INFO_FILE = "abft_lens_run.json"

# Base models this project knows by name: (Hub id of the original checkpoint, licence line, YAML licence fields)
_GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
_KNOWN_BASES = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0", {"license": "apache-2.0"}),
    "gemma3-270m": ("google/gemma-3-270m", f"Gemma Terms of Use ({_GEMMA_TERMS})",
                    {"license": "gemma", "license_link": _GEMMA_TERMS}),
}


@dataclass
class ExportResult:
    """Where the export went and what changed: ``changed`` lists the Hugging Face tensors written."""

    output: Path
    base_hf_dir: Path
    adapter_dir: Path | None = None
    changed: list[str] = field(default_factory=list)
    attention_bias_added: bool = False


def export_run(run_dir: str | Path, output: str | Path, *, peft: bool = False) -> ExportResult:
    """Write ``run_dir``'s tuned model as a Hugging Face folder ``output`` (see the module docstring)."""
    run_dir, output = Path(run_dir), Path(output)
    _check_output(output)
    meta, metrics = _read_run(run_dir)
    config = TrainConfig.from_dict(meta["train"])
    trainable = config.trainable
    if peft and trainable.kind != "lora":
        raise AbftLensError(f"--peft needs a LoRA run; {run_dir} trained the full W_Q/W_K matrices.",
                            "drop --peft (the merged model folder holds the trained weights), or train with --lora-r.")
    if peft and trainable.bias:
        raise AbftLensError(f"the LoRA run {run_dir} also trained b_Q/b_K, which a PEFT LoRA adapter cannot carry "
                            "(the base model has no attention biases).", "drop --peft and use the merged model folder.")
    trained = read_trained(run_dir)  # readable and finite
    base = _base_hf_dir(meta["model"], run_dir)
    parsed = parse_trained(trained)
    needs_bias = any(role == "bias" and tensor.abs().max() > 0 for (_, _, role), tensor in parsed.items())

    model, tokenizer, bias_added = load_hf_base(base, needs_bias)
    changed = merge_trained(model, parsed, trainable.lora_scale, run_dir)
    if needs_bias:
        model.config.attention_bias = True

    _write_folder(output, model, tokenizer, peft=peft, parsed=parsed, trainable=trainable, base=base,
                  info={"run_dir": str(run_dir.resolve()), "config": meta, "metrics": metrics,
                        "base_hf_dir": str(base), "changed": changed},
                  card=model_card(meta, metrics, peft=peft, bias_added=bias_added))
    return ExportResult(output, base, output / ADAPTER_DIR if peft else None, changed, bias_added)


def _write_folder(output: Path, model, tokenizer, *, peft: bool, parsed, trainable, base: Path, info: dict,
                  card: str) -> None:
    """Everything into a temporary folder beside ``output``, then one rename: the export is whole or absent."""
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if peft:
            _write_adapter(tmp / ADAPTER_DIR, parsed, trainable, base)
        (tmp / RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        _check_output(output)  # a folder that appeared while exporting is not overwritten either
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------- reading


def _check_output(output: Path) -> None:
    check_folder(output, "--output")  # not under a file, no link loop, a folder we may write
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AbftLensError(f"{output} already exists and is not an empty folder; export never overwrites.",
                            "choose a new --output folder (or remove the old one yourself).")


def _read_run(run_dir: Path) -> tuple[dict, dict | None]:
    meta = read_run_config(run_dir, trained=True)
    return meta, read_run_json(run_dir, METRICS_FILE)


def _base_hf_dir(model: dict, run_dir: Path) -> Path:
    """The Hugging Face folder the run's hooked model was read from; the embedded models' caches are rebuilt."""
    name, hf_dir = model.get("name"), model.get("hf_dir")
    if hf_dir and hf_cache.is_hf_folder(hf_dir):
        return Path(hf_dir)
    if name == hf_cache.EMBEDDED_NAME:
        return hf_cache.embedded_hf_dir()[0]
    if name == hf_cache.GEMMA_NAME:
        return hf_cache.gemma_hf_dir()[0]
    if name and name.endswith(".gguf") and Path(name).is_file():
        return hf_cache.gguf_hf_dir(Path(name))[0]
    if not hf_dir:
        raise AbftLensError(
            f"the run in {run_dir} was trained on {name!r}, which has no Hugging Face folder to export into "
            "(tiny random models and TransformerLens official names have none).",
            "train on the embedded model, a Hugging Face folder or a .gguf file to export the result.")
    raise AbftLensError(f"the base model folder of {run_dir} ({hf_dir}) is gone.",
                        "restore that folder (the run stores only the trained W_Q/W_K, not the base model).")


# ---------------------------------------------------------------------------------------------- PEFT


def _write_adapter(folder: Path, parsed: dict, trainable, base: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    tensors, targets = peft_tensors(parsed)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    alpha = trainable.lora_r if trainable.lora_alpha is None else trainable.lora_alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": trainable.lora_r, "lora_alpha": alpha, "target_modules": sorted(targets),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------- model card


def model_card(meta: dict, metrics: dict | None, *, peft: bool = False, bias_added: bool = False) -> str:
    """README.md for an exported run: Hub front matter, the run's settings, fore/post metrics, the licence."""
    train, model, task = meta["train"], meta["model"], meta.get("task", {})
    trainable = train.get("trainable", {})
    name = model.get("name", "?")
    hub_id, licence, yaml_licence = _KNOWN_BASES.get(name, (None, None, {"license": "other"}))
    if licence is None:
        licence = "the base model's own licence (not recorded by abft-lens: check where the base model came from)"
    front = dict(yaml_licence)
    if hub_id:
        front["base_model"] = hub_id
    front_lines = [f"{key}: {value}" for key, value in front.items()]
    front_lines += ["library_name: transformers", "tags:", "- abft", "- abft-lens", "- in-context-learning"]
    steps = (metrics or {}).get("steps")
    kind = trainable.get("kind", "full")
    kind_text = kind if kind == "full" else (
        f"lora (r={trainable.get('lora_r')}, alpha={trainable.get('lora_alpha') or trainable.get('lora_r')})")
    rows = [
        ("method", train.get("method")), ("dataset", task.get("name")), ("k (demonstrations)", train.get("k")),
        ("learning rate", train.get("lr")), ("steps", steps), ("epochs", train.get("epochs")),
        ("train samples", train.get("train_samples")), ("pseudo-batch size", train.get("pseudo_batch_size")),
        ("seed", train.get("seed")), ("trainable", kind_text),
        ("targets", ", ".join(trainable.get("targets", ["q", "k"]))), ("biases trained", trainable.get("bias")),
        ("restricted gradient", train.get("restricted_gradient")), ("threshold", train.get("threshold")),
        ("penalty mode", train.get("penalty_mode")),
        ("balanced query labels", bool(train.get("balance_query_labels"))), ("training dtype", model.get("dtype")),
        ("4-bit NF4 base", bool(model.get("quantized"))),
    ]
    lines = ["---", *front_lines, "---", "", f"# {name} + ABFT ({task.get('name', '?')}, k={train.get('k')})", "",
             f"Base model `{name}`" + (f" ({hub_id}" + (", dequantized from a 4-bit GGUF)" if
                                                         model.get("source") == "embedded" else ")") if hub_id else "")
             + " with its attention query/key weights (W_Q/W_K, the `q_proj`/`k_proj` weights) fine-tuned by "
             "Attention Behavior Fine-Tuning, exported by abft-lens. Every other weight is the base model's.", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```", "",
             "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "## Metrics (StaICC Normal protocol, the run's fixed test prompts)", ""]
    if metrics and (metrics.get("fore") or metrics.get("post")):
        lines += ["| metric | before (fore test) | after (post test) |", "|---|---|---|"]
        for metric in ("accuracy", "macro_f1", "mean_true_label_probability", "ece"):
            before, after = ((metrics.get(side) or {}).get(metric) for side in ("fore", "post"))
            lines.append(f"| {metric} | {format_value(before)} | {format_value(after)} |")
        lines += ["", f"Test prompts: {meta.get('n_test')}."]
    else:
        lines.append("No fore/post test was recorded for this run.")
    if bias_added:
        lines += ["", "The run trained b_Q/b_K, so `attention_bias` is switched on; the v_proj/o_proj biases are zero."]
    if model.get("quantized"):
        lines += ["", "The adapters were trained on a 4-bit NF4 copy of the base (bitsandbytes, double quantization) and "
                  "are merged here into the full-precision base, as QLoRA does; the metrics above are the 4-bit "
                  "model's."]
    if peft:
        lines += ["", "## PEFT adapter", "", f"`{ADAPTER_DIR}/` holds the LoRA adapter, to apply to the base model "
                  "(not to this merged folder): `PeftModel.from_pretrained(base_model, \"adapter\")`."]
    lines += ["", "## Licence", "", f"This model is a derivative of the base model and is subject to {licence}.", ""]
    return "\n".join(lines)


__all__ = ["ExportResult", "export_run", "model_card", "ADAPTER_DIR"]
