"""abft-lens: Attention Behavior Fine-Tuning of induction heads for in-context learning.

The public API, in the order data flows (imported lazily, so ``import abft_lens`` is instant)::

    loaded = abft_lens.load_model("smollm2-135m")                 # hooked model + tokenizer
    task = abft_lens.load_task("sst2")                            # StaICC dataset (or a CSV/JSONL file)
    before = abft_lens.evaluate(loaded, task, k=4, n_test=256)    # StaICC "Normal" metrics
    run = abft_lens.run_training(loaded, task, abft_lens.TrainConfig(lr=5e-4), run_dir="runs/demo")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models", "LoadedModel": "models", "tiny_model": "models",
    "load_task": "tasks", "ICLTask": "tasks", "Template": "tasks", "Example": "tasks",
    "PromptBuilder": "prompts", "ICLPrompt": "prompts", "test_prompts": "prompts", "sample_prompts": "prompts",
    "capture_attention_rows": "capture",
    "abft_loss": "objectives", "e2e_loss": "objectives", "PenaltyController": "objectives",
    "induction_threshold": "objectives",
    "TrainableConfig": "trainable", "attach": "trainable",
    "TrainConfig": "train", "Trainer": "train", "StepResult": "train",
    "evaluate": "evaluate", "evaluate_prompts": "evaluate", "prompt_builder": "evaluate", "EvalResult": "evaluate",
    "run_training": "runs", "load_run": "runs", "RunResult": "runs",
    "head_scores": "heads", "HeadScores": "heads", "HeadSet": "heads",
    "compare_run": "compare", "Comparison": "compare", "build_report": "report", "report_from_run": "report",
    "template_sensitivity": "robustness", "demonstration_sensitivity": "robustness",
    "unseen_label_test": "robustness", "contextual_bias": "robustness", "calibrated_evaluate": "robustness",
    "evaluate_datasets": "generalization", "table_from_runs": "generalization",
    "mix_runs": "mixing", "generation_report": "generation", "perplexity": "generation",
    "export_run": "export",
    "AbftLensError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'abft_lens' has no attribute {name!r}")
