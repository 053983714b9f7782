"""A run's options as one flat mapping of Python names, and the :class:`TrainConfig` they make (config layer).

The names are :class:`TrainConfig`'s fields plus the run's own options (``lr``, ``lora_r``, ``train_bias``,
``n_test``, ``dtype``, ``quantized``, ``test_type``, ``generalization_test``, ``MAUVE_test``, ...), each None
where not given. ``abft-lens train`` parses its flags into this mapping and a study's settings are one
(:class:`~abft_lens.studies.study_config.StudyConfig`), so both resolve a preset, pick the default learning
rate and refuse an option the others would leave unused here, once, with messages that name the options as
Python names (the CLI rewrites them into its flags).

    from abft_lens.training.options import train_config_from_options

    config = train_config_from_options({"lora_r": 4, "train_samples": 8, "pseudo_batch_size": 4})
    config.lr, config.trainable.kind    # (0.0001, 'lora'): the LoRA learning rate
"""

from __future__ import annotations

from typing import Mapping

from abft_lens.errors import AbftLensError
from abft_lens.training.presets import DEFAULT_N_TEST, FULL_LR, LORA_LR, contradictions, preset
from abft_lens.training.train import TrainConfig
from abft_lens.training.trainable import TrainableConfig

__all__ = ["CONFIG_OPTIONS", "QUANTIZED_LORA_R", "given_options", "resolve_preset", "train_config_from_options",
           "check_mauve_options"]

QUANTIZED_LORA_R = 16  # the paper's LoRA rank on 4-bit bases
CONFIG_OPTIONS = ("method", "k", "train_samples", "epochs", "pseudo_batch_size", "seed", "award", "penalty",
                  "penalty_mode", "p_gain", "pid_kp", "pid_ki", "pid_kd", "threshold", "restricted_gradient",
                  "validation_examples", "validation_prompts", "validate_every", "keep_best", "select_metric",
                  "select_max_p", "micro_batch_size", "balance_query_labels")

# option given -> (is it used here, what it needs, the options the message names): refused, never ignored
IGNORED_UNLESS = (
    ("award", lambda o: o.get("method", "ABFT") == "ABFT", "method='ABFT' (E2E trains cross-entropy)", ("method",)),
    ("penalty", lambda o: o.get("method", "ABFT") == "ABFT", "method='ABFT' (E2E trains cross-entropy)",
     ("method",)),
    ("p_gain", lambda o: (o.get("penalty_mode") or "PID") == "P", "penalty_mode='P'", ("penalty_mode",)),
    ("pid_kp", lambda o: (o.get("penalty_mode") or "PID") == "PID", "penalty_mode='PID'", ("penalty_mode",)),
    ("pid_ki", lambda o: (o.get("penalty_mode") or "PID") == "PID", "penalty_mode='PID'", ("penalty_mode",)),
    ("pid_kd", lambda o: (o.get("penalty_mode") or "PID") == "PID", "penalty_mode='PID'", ("penalty_mode",)),
    ("validation_prompts", lambda o: o.get("validation_examples"), "validation_examples", ("validation_examples",)),
    ("generalization_n_test", lambda o: o.get("generalization_test"), "generalization_test",
     ("generalization_test",)),
    ("robustness_queries", lambda o: o.get("test_type", "Normal") != "Normal",
     "test_type='TempSensitivity' or test_type='DemoSensitivity'", ("test_type",)),
    ("MAUVE_max_new_tokens", lambda o: o.get("MAUVE_test"), "MAUVE_test", ("MAUVE_test",)),
)


def given_options(options: Mapping) -> dict:
    """The options that define a run's regime (TrainConfig fields, ``lr``, ``n_test``), where given."""
    return {name: options[name] for name in CONFIG_OPTIONS + ("lr", "n_test") if options.get(name) is not None}


def resolve_preset(options: Mapping, name: str | None, *, strict: bool = True) -> tuple[dict, str | None, list[str]]:
    """``options`` with the values the preset ``name`` fixes filled in where not given, the preset the run
    names, and the names it filled; ``n_test`` defaults to :data:`DEFAULT_N_TEST`.

    ``strict`` (an explicit preset) refuses every given value that contradicts the preset, naming both; a
    default preset (``abft-lens demo``'s) yields to given values instead, and the run then names no preset.
    """
    resolved, filled = dict(options), []
    if name is not None:
        chosen = preset(name)
        clash = contradictions(chosen, given_options(options))
        if clash and strict:
            raise AbftLensError(
                f"preset={name!r} fixes " + ", ".join(f"{f}={want!r}" for f, _, want in clash)
                + "; also given: " + ", ".join(f"{f}={got!r}" for f, got, _ in clash) + ".",
                f"drop {', '.join(f for f, _, _ in clash)} (or preset={name!r}).",
                names=("preset", *(f for f, _, _ in clash)))
        name = None if clash else name
        filled = [f for f, value in chosen.fixed().items() if resolved.get(f) is None and value is not None]
        resolved.update({f: chosen.fixed()[f] for f in filled})
    if resolved.get("n_test") is None:
        resolved["n_test"] = DEFAULT_N_TEST
    return resolved, name, filled


def train_config_from_options(options: Mapping, *, filled: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """The run's :class:`TrainConfig`, after refusing options that the other options would leave unused.

    ``lr`` defaults to the paper's (:data:`FULL_LR`, or :data:`LORA_LR` for LoRA adapters); ``lora_r`` None is
    full W_Q/W_K (rank :data:`QUANTIZED_LORA_R` on a ``quantized`` base); ``dtype="bfloat16"`` trains under
    autocast; ``filled``: names a preset filled in (never "given", so never refused as unused).
    """
    for name, needed, needs, names in IGNORED_UNLESS:
        if options.get(name) is not None and name not in filled and not needed(options):
            raise AbftLensError(f"{name} is used only with {needs}; here it would be ignored.",
                                f"drop {name}, or set {needs}.", names=(name, *names))
    lora_r, quantized = options.get("lora_r"), bool(options.get("quantized"))
    if lora_r is not None and (isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 0):
        raise AbftLensError(f"lora_r={lora_r!r} must be >= 0.", "pass a LoRA rank (e.g. 16), or 0 for full W_Q/W_K.",
                            names=("lora_r",))
    if quantized and options.get("train_bias"):
        raise AbftLensError("train_bias cannot be combined with quantized (the 4-bit base trains LoRA adapters "
                            "only).", "drop train_bias, or drop quantized.", names=("train_bias", "quantized"))
    if quantized and lora_r == 0:
        raise AbftLensError("quantized trains LoRA adapters on the 4-bit base; lora_r=0 (full W_Q/W_K) is not "
                            "possible there.", f"drop lora_r (rank {QUANTIZED_LORA_R}) or pass a rank >= 1.",
                            names=("quantized", "lora_r"))
    if quantized and options.get("dtype") == "bfloat16":
        raise AbftLensError("dtype='bfloat16' cannot be combined with quantized.",
                            "drop dtype with quantized: the 4-bit base computes in float32 on CPU and bfloat16 on "
                            "CUDA already.", names=("dtype", "quantized"))
    check_mauve_options(options)
    rank = lora_r if lora_r is not None else (QUANTIZED_LORA_R if quantized else 0)
    trainable = TrainableConfig(kind="lora" if rank > 0 else "full", lora_r=rank if rank > 0 else 16,
                                bias=bool(options.get("train_bias")))
    given = {name: options[name] for name in CONFIG_OPTIONS if options.get(name) is not None}
    lr = options.get("lr")
    return TrainConfig(**given, trainable=trainable, lr=lr if lr is not None else (LORA_LR if rank > 0 else FULL_LR),
                       compute_dtype="bfloat16" if options.get("dtype") == "bfloat16" else None,
                       preset=options.get("preset"))


def check_mauve_options(options: Mapping) -> None:
    """``MAUVE_test`` needs ``MAUVE_prefix`` (and the reverse) and a hooked base (generation uses its KV cache)."""
    test, prefix = options.get("MAUVE_test"), options.get("MAUVE_prefix")
    if test and prefix is None:
        raise AbftLensError("MAUVE_test needs MAUVE_prefix FILE (one prefix per line).", "pass MAUVE_prefix.",
                            names=("MAUVE_test", "MAUVE_prefix"))
    if test and options.get("quantized"):
        raise AbftLensError("MAUVE_test cannot run on a 4-bit (quantized) base: generation needs the "
                            "HookedTransformer's KV cache.", "drop MAUVE_test, or drop quantized.",
                            names=("MAUVE_test", "quantized"))
    if prefix is not None and not test:
        raise AbftLensError("MAUVE_prefix is used only with MAUVE_test.", "add MAUVE_test, or drop it.",
                            names=("MAUVE_test", "MAUVE_prefix"))
