"""bfloat16 training held to account: the same short run trained in float32 and under bfloat16 autocast, compared.

:func:`compare_bf16` builds two fresh copies of the same base model, trains ``config`` on each (same prompts,
same seed; ``compute_dtype`` None and ``"bfloat16"``; every step, no validation guard) and reports:

- ``loss``: the per-step losses of both runs and the largest relative difference;
- ``filter_decisions``: the fraction of (training prompt, layer, head) filter decisions that agree, at step 0
  (the same base weights: bfloat16's rounding alone) and at the end (each run's own trained weights);
- ``trained``: ||W_bf16 - W_fp32|| / ||W_fp32|| over every trained tensor (effective W_Q/W_K, LoRA merged), and
  the same difference relative to the float32 run's update ||W_fp32 - W_base||, the sharper measure when the
  learning rate is small;
- ``test``: both trained models evaluated in float32 on the same ``n_test`` test prompts: how many predictions
  agree, and each one's accuracy (and the base's).

``bench/bf16_numerics.py`` runs it on SmolLM2-135M (the README's numbers); ``tests/test_bf16_numerics.py`` on
``tiny``, with loose bounds.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from abft_lens.backends.provenance import LoadedModel
from abft_lens.data.prompts import prompt_builder
from abft_lens.data.tasks import ICLTask
from abft_lens.evaluation.evaluator import evaluate
from abft_lens.training.train import TrainConfig, Trainer

__all__ = ["compare_bf16", "relative_difference"]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        reference: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||reference|| over all tensors of ``a`` together (float64; 0/0 is 0, x/0 is inf)."""
    difference = torch.cat([(a[n].double() - b[n].double()).flatten() for n in a]).norm()
    scale = torch.cat([reference[n].double().flatten() for n in a]).norm()
    if float(scale) == 0.0:
        return 0.0 if float(difference) == 0.0 else float("inf")
    return float(difference / scale)


def _train(make_model: Callable[[], LoadedModel], task: ICLTask, config: TrainConfig, n_test: int, batch_size: int):
    """One run: (step-0 decisions, final decisions, losses, base tensors, trained tensors, test result)."""
    model = make_model()
    trainer = Trainer(model, prompt_builder(model, task), config)
    base = trainer.trainable.merged_state_dict()
    first = trainer.filter_decisions(trainer.prompts)
    losses = []
    trainer.run([lambda _, result: losses.append(result.loss)])
    last = trainer.filter_decisions(trainer.prompts)
    trained = trainer.trainable.merged_state_dict()
    trainer.trainable.merge()
    result = evaluate(model, task, k=config.k, n_test=n_test, batch_size=batch_size)
    return first, last, losses, base, trained, result


def compare_bf16(make_model: Callable[[], LoadedModel], task: ICLTask, config: TrainConfig, *, n_test: int,
                 batch_size: int = 8) -> dict:
    """Train ``config`` in float32 and under bfloat16 autocast from ``make_model()`` (a float32 base, a fresh
    copy per call) and compare the two runs (module docstring). Returns a JSON-able report."""
    fp32 = _train(make_model, task, replace(config, compute_dtype=None), n_test, batch_size)
    bf16 = _train(make_model, task, replace(config, compute_dtype="bfloat16"), n_test, batch_size)
    (first32, last32, loss32, base, w32, test32), (first16, last16, loss16, _, w16, test16) = fp32, bf16
    base_test = evaluate(make_model(), task, k=config.k, n_test=n_test, batch_size=batch_size)
    update = {name: w32[name] - base[name] for name in w32}
    agree = sum(a == b for a, b in zip(test32.predictions, test16.predictions))
    return {
        "steps": len(loss32),
        "loss": {"float32": loss32, "bfloat16": loss16,
                 "max_relative_difference": max(abs(b - a) / max(abs(a), 1e-12) for a, b in zip(loss32, loss16))},
        "filter_decisions": {"decisions": first32.numel(),
                             "agree_step_0": float((first32 == first16).float().mean()),
                             "agree_end": float((last32 == last16).float().mean()),
                             "pass_rate_end": {"float32": float(last32.float().mean()),
                                               "bfloat16": float(last16.float().mean())}},
        "trained": {"relative_to_weights": relative_difference(w16, w32, w32),
                    "relative_to_update": relative_difference(w16, w32, update)},
        "test": {"prompts": len(test32.predictions), "predictions_agree": agree,
                 "agreement": agree / max(len(test32.predictions), 1),
                 "accuracy": {"base": base_test.accuracy, "float32": test32.accuracy, "bfloat16": test16.accuracy}},
    }
