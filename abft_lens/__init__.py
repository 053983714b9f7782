"""abft-lens: Attention Behavior Fine-Tuning of induction heads for in-context learning.

The public API, in the order data flows (imported lazily, so ``import abft_lens`` is instant). Every function
takes the model itself, a TransformerLens ``HookedTransformer`` (or a ``TransformerBridge`` for 4-bit bases),
whether abft-lens loaded it or the user built it; the tokenizer is ``model.tokenizer``::

    import abft_lens

    model = abft_lens.load_model("smollm2-135m")                  # HookedTransformer, unprocessed weights
    task = abft_lens.load_task("sst2")                            # StaICC dataset (or a CSV/JSONL file)
    before = abft_lens.evaluate(model, task, k=4, n_test=256)     # StaICC "Normal" metrics
    config = abft_lens.TrainConfig(lr=5e-4, train_samples=128, pseudo_batch_size=16, epochs=1)
    run = abft_lens.run_training(model, task, config, run_dir="runs/demo", n_test=256)
    info = abft_lens.model_info(model)                            # name, source, hf_dir, adds_bos, load_seconds
"""

from __future__ import annotations

import importlib

from abft_lens.version import __version__

_EXPORTS = {
    "load_model": "backends.loading", "tiny_model": "backends.loading",
    "LoadedModel": "backends.provenance", "ModelInfo": "backends.provenance", "model_info": "backends.provenance",
    "describe_model": "backends.provenance",
    "load_task": "data.tasks", "ICLTask": "data.tasks", "Template": "data.tasks", "Example": "data.tasks",
    "PromptBuilder": "data.prompts", "ICLPrompt": "data.prompts", "test_prompts": "data.prompts", "sample_prompts": "data.prompts",
    "capture_attention_rows": "interp.capture",
    "abft_loss": "training.objectives", "e2e_loss": "training.objectives", "PenaltyController": "training.objectives",
    "induction_threshold": "interp.induction_filter",
    "TrainableConfig": "training.trainable", "attach": "training.adapters",
    "TrainConfig": "training.train", "Trainer": "training.train", "StepResult": "training.train",
    "evaluate": "evaluation.evaluator", "evaluate_prompts": "evaluation.evaluator", "prompt_builder": "data.prompts", "EvalResult": "evaluation.evaluator",
    "run_training": "training.runs", "load_run": "training.runs", "RunResult": "training.runs",
    "head_scores": "interp.heads", "HeadScores": "interp.heads", "HeadSet": "interp.heads",
    "compare_run": "training.comparison", "Comparison": "training.comparison", "build_report": "reporting.report", "report_from_run": "reporting.report",
    "template_sensitivity": "evaluation.robustness", "demonstration_sensitivity": "evaluation.robustness",
    "unseen_label_test": "evaluation.robustness", "contextual_bias": "evaluation.robustness", "calibrated_evaluate": "evaluation.robustness",
    "evaluate_datasets": "evaluation.generalization", "table_from_runs": "reporting.tables",
    "StudyConfig": "studies.study_config", "run_study": "studies.study",
    "mix_runs": "studies.mixing", "generation_report": "studies.generation_report", "perplexity": "studies.generation",
    "export_run": "reporting.export",
    "AbftLensError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"abft_lens.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'abft_lens' has no attribute {name!r}")
