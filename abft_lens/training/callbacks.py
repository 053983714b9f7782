"""Callbacks of the training loop: each sees ``(trainer, step_result)`` after every optimizer step, under
``torch.no_grad()``. Logging, validation, checkpoints and progress live here, not inside the loop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import evaluate_prompts
from abft_lens.evaluation.paired import paired
from abft_lens.io import append_jsonl, atomic_write_bytes
from abft_lens.data.prompts import ICLPrompt
from abft_lens.training.train import StepResult, Trainer


class FiniteCheck:
    """Stops training with one message when a step's loss or a trained tensor is NaN or infinite.

    Put it first among the callbacks, so no later one logs, validates or checkpoints the diverged step: the
    last checkpoint and log line stay those of the last finite step, and no "success" is reported on NaNs.
    """

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        if not math.isfinite(result.loss):
            what = f"the loss is {result.loss}"
        else:
            bad = [name for name, p in trainer.trainable.named_parameters() if not bool(p.isfinite().all())]
            if not bad:
                return
            what = f"{bad[0]} holds NaN or infinite values"
        raise AbftLensError(f"training diverged at step {result.step}: {what} (lr={trainer.config.lr:g}).",
                            "train again with a lower --lr (e.g. 10x lower) in a new --run-dir.")


class JsonlLogger:
    """One JSON line per optimizer step (and per validation) in ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        append_jsonl(self.path, {"event": "step", **result.to_dict()})


class ValidationGuard:
    """Evaluates held-out validation prompts every ``every`` steps and remembers the best trainable state.
    The passes compute in the run's ``compute_dtype`` (bfloat16 autocast when the run trains under it).

    Best = highest validation ``trainer.config.select_metric`` (accuracy or macro-F1), ties broken by mean
    true-label probability, then by the earlier step (step 0 is the untrained model: if nothing beats it, keeping
    the best keeps the base weights). Each later record also counts the validation prompts gained and lost
    against step 0 with their exact McNemar p (``gained_vs_base``, ``lost_vs_base``, ``p_vs_base``); with
    ``trainer.config.select_max_p`` set, only steps with more gained than lost and p below it can be the best.
    """

    def __init__(self, prompts: Sequence[ICLPrompt], every: int, *, batch_size: int = 8, log_path: Path | None = None):
        self.prompts = list(prompts)
        self.every = every
        self.batch_size = batch_size
        self.log_path = log_path
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.base_correct: list[bool] | None = None  # per validation prompt, right at step 0

    def evaluate(self, trainer: Trainer, step: int) -> dict:
        result = evaluate_prompts(trainer.model, trainer.builder, self.prompts, batch_size=self.batch_size,
                                  compute_dtype=trainer.config.compute_dtype)
        correct = [prediction == gold for prediction, gold in zip(result.predictions, result.gold)]
        record = {"event": "validation", "step": step, **result.metrics}
        if step == 0:
            self.base_correct = correct
        elif self.base_correct is not None:
            change = paired(self.base_correct, correct)
            record.update(gained_vs_base=change.gained, lost_vs_base=change.lost, p_vs_base=change.p_value)
        self.history.append(record)
        if self.log_path is not None:
            append_jsonl(self.log_path, record)
        metric, max_p = trainer.config.select_metric, trainer.config.select_max_p
        key = (record[metric], record["mean_true_label_probability"])
        finite = all(math.isfinite(value) for value in key)  # NaN probabilities never make a step the best
        significant = max_p is None or step == 0 or (
            "p_vs_base" in record and record["gained_vs_base"] > record["lost_vs_base"] and record["p_vs_base"] < max_p)
        if finite and significant and (
                self.best is None or key > (self.best[metric], self.best["mean_true_label_probability"])):
            self.best = record
            self.best_state = trainer.trainable.state_dict()
        return record

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        if result.step % self.every == 0 or result.step == trainer.config.total_steps:
            self.evaluate(trainer, result.step)

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "best_state": self.best_state,
                "base_correct": self.base_correct}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best, self.best_state = state["history"], state["best"], state["best_state"]
        self.base_correct = state.get("base_correct")  # None in checkpoints written before it was kept


class Checkpointer:
    """Writes the trainer's full state (and the guard's) atomically to ``path`` every ``every`` steps."""

    def __init__(self, path: str | Path, every: int = 1, guard: ValidationGuard | None = None):
        self.path = Path(path)
        self.every = every
        self.guard = guard

    def save(self, trainer: Trainer) -> None:
        import io

        state = {"trainer": trainer.state_dict(), "guard": self.guard.state_dict() if self.guard else None}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        if result.step % self.every == 0:
            self.save(trainer)


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, taking-part heads and the penalty A."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train"):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step")

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        self.bar.set_postfix(loss=f"{result.loss:.3f}", heads=f"{result.mean_heads:.1f}", A=f"{result.next_penalty:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
