"""A training run end to end, and its folder on disk.

``run_training`` evaluates before (fore test), trains, evaluates after (post test) and writes a run folder:

- ``config.json``        the resolved :class:`~abft_lens.training.train.TrainConfig`, model and task descriptions
- ``log.jsonl``          one line per optimizer step (``event: step``) and per validation (``event: validation``)
- ``fore_test.json``, ``post_test.json``  full evaluation results (per-prompt probabilities)
- ``metrics.json``       before/after metrics, best validation step, timings
- ``trained.safetensors`` the trained tensors only (W_Q/W_K or LoRA adapters), unless ``save_model=False``
- ``checkpoint.pt``      trainer + optimizer + controller + guard state while the run is in progress

Every file is written atomically. A run interrupted at any point resumes with ``resume=True`` and ends with
the same weights as an uninterrupted run with the same seed.

Data parallel (``dist``, or an initialized ``torch.distributed`` default group, see
:mod:`abft_lens.training.distributed`): every rank trains its share of each pseudo-batch; rank 0 alone runs the
fore/post tests and the validation guard, writes the run folder and shows progress; every rank reads the
checkpoint on resume (the run folder must be on a file system all ranks see). Other ranks return a
:class:`RunResult` without ``fore``/``post``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from abft_lens.version import __version__
from abft_lens.training import distributed
from abft_lens.training.callbacks import Checkpointer, JsonlLogger, ProgressBar, ValidationGuard
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import EvalResult, evaluate
from abft_lens.data.prompts import prompt_builder
from abft_lens.io import atomic_write_text, read_json, write_json
from abft_lens.backends.provenance import LoadedModel, describe_model, model_info
from abft_lens.data.tasks import ICLTask
from abft_lens.training.train import StepResult, TrainConfig, Trainer, validation_prompts
from abft_lens.training.adapters import attach
from abft_lens.training.trainable import TrainableConfig

TRAINED_FILE = "trained.safetensors"


@dataclass
class RunResult:
    """What a run produced; ``fore``/``post`` are None when skipped."""

    run_dir: Path | None
    config: TrainConfig
    fore: EvalResult | None
    post: EvalResult | None
    steps: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    best_step: int | None = None
    train_seconds: float = 0.0

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = []
        for name in ("accuracy", "macro_f1", "mean_true_label_probability", "ece"):
            before = f"{self.fore.metrics[name]:.4f}" if self.fore else "-"
            after = f"{self.post.metrics[name]:.4f}" if self.post else "-"
            rows.append((name, f"{before} -> {after}"))
        return rows


def run_training(
    model: LoadedModel,
    task: ICLTask,
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    n_test: int | None = 256,
    fore_test: bool = True,
    post_test: bool = True,
    save_model: bool = True,
    resume: bool = False,
    checkpoint_every: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    callbacks=(),
    dist: distributed.DistributedContext | None = None,
    fore_result: EvalResult | None = None,
) -> RunResult:
    """Fore test, train ``model`` in place with ``config``, post test; write ``run_dir`` if given.

    ``dist``: data-parallel context; default: the initialized ``torch.distributed`` group, if any.
    ``fore_result``: the fore test already evaluated elsewhere (a study's shared baseline of the same model, task,
    k and ``n_test``); it is written to ``fore_test.json`` and used instead of evaluating again.
    ``callbacks`` run on every rank (a stop requested on any rank stops all of them).
    """
    dist = dist if dist is not None else distributed.current()
    main = dist is None or dist.is_main
    on_main = dist.on_main if dist is not None else (lambda fn: fn())
    run_dir = Path(run_dir) if run_dir is not None else None
    if dist is not None:
        run_dir = dist.broadcast_object(run_dir)  # rank 0's folder (a default name may hold a timestamp)
    builder = prompt_builder(model, task)
    meta = {"train": config.to_dict(), "model": describe_model(model), "task": task.describe(),
            "n_test": n_test, "abft_lens_version": __version__}
    checkpoint = run_dir / "checkpoint.pt" if run_dir else None
    resuming = on_main(lambda: _prepare_run_dir(run_dir, meta, resume))

    fore = None
    if fore_test and main:
        fore = _cached_eval(run_dir, "fore_test.json", resuming,
                            lambda: fore_result if fore_result is not None else
                            evaluate(model, task, k=config.k, n_test=n_test, batch_size=batch_size,
                                     progress="fore test" if progress else False))

    if dist is not None:
        dist.barrier()  # the fore test (rank 0) precedes training on every rank
    trainer = Trainer(model, builder, config, dist=dist)
    guard = None
    log_path = run_dir / "log.jsonl" if run_dir else None
    if config.validate_every and config.validation_examples and main:
        guard = ValidationGuard(validation_prompts(builder, config), config.validate_every,
                                batch_size=batch_size, log_path=log_path)
    if resuming and on_main(checkpoint.is_file):
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        trainer.load_state_dict(state["trainer"])
        if guard is not None and state["guard"] is not None:
            guard.load_state_dict(state["guard"])
        if main:
            _truncate_log(log_path, trainer.completed_steps)
    elif run_dir and main:
        log_path.unlink(missing_ok=True)
    if guard is not None and not guard.history:
        with torch.no_grad():
            guard.evaluate(trainer, step=0)

    steps: list[dict] = []
    chain = [lambda _, result: steps.append(result.to_dict())]
    if run_dir and main:
        chain += [JsonlLogger(log_path)]
    if guard is not None:
        chain.append(guard)
    if run_dir and main:
        chain.append(Checkpointer(checkpoint, checkpoint_every, guard))
    chain += list(callbacks)
    bar = ProgressBar(config.total_steps, trainer.completed_steps, desc=config.method) \
        if progress and main else None
    if bar:
        chain.append(bar)
    start = time.perf_counter()
    try:
        trainer.run(chain)
    finally:
        if bar:
            bar.close()
    train_seconds = time.perf_counter() - start
    if trainer.stop_requested:
        return RunResult(run_dir, config, fore, None, steps, guard.history if guard else [], None, train_seconds)

    best_step = None
    if guard is not None:
        best_step = guard.best["step"]
        if config.keep_best:
            trainer.trainable.load_state_dict(guard.best_state)
    if dist is not None:
        best_step = dist.broadcast_object(best_step)
        if config.keep_best:
            dist.broadcast_parameters(trainer.trainable.parameters())  # rank 0 kept the best step
    trained = trainer.trainable.state_dict()
    trainer.trainable.merge()

    post = None
    if post_test and main:
        post = evaluate(model, task, k=config.k, n_test=n_test, batch_size=batch_size,
                        progress="post test" if progress else False)
    result = RunResult(run_dir, config, fore, post, steps, guard.history if guard else [], best_step, train_seconds)
    if run_dir and main:
        if save_model:
            from safetensors.torch import save

            from abft_lens.io import atomic_write_bytes

            atomic_write_bytes(run_dir / TRAINED_FILE, save(trained, metadata={"format": "pt"}))
        if post is not None:
            write_json(run_dir / "post_test.json", post.to_dict())
        write_json(run_dir / "metrics.json", {
            "fore": fore.metrics if fore else None, "post": post.metrics if post else None,
            "best_validation_step": best_step, "kept_best": config.keep_best,
            "train_seconds": round(train_seconds, 2), "steps": config.total_steps,
        })
        checkpoint.unlink(missing_ok=True)
    if dist is not None:
        dist.barrier()  # the folder is complete when any rank returns
    return result


def _prepare_run_dir(run_dir: Path | None, meta: dict, resume: bool) -> bool:
    """Create ``run_dir`` and write config.json; return True when an interrupted run is being resumed."""
    if run_dir is None:
        return False
    config_path = run_dir / "config.json"
    if config_path.is_file():
        if not resume:
            raise AbftLensError(f"{run_dir} already holds a run; abft-lens never overwrites one.",
                                "choose another --run-dir, or pass --resume to continue an interrupted run.")
        saved = read_json(config_path)
        # n_test: the cached fore test must cover the same prompts as the post test; dtype: bit-identical weights
        if saved["train"] != meta["train"] or saved["model"]["name"] != meta["model"]["name"] \
                or saved["model"].get("dtype") != meta["model"]["dtype"] \
                or saved["model"].get("quantized", False) != meta["model"].get("quantized", False) \
                or saved["task"]["name"] != meta["task"]["name"] or saved.get("n_test") != meta["n_test"]:
            raise AbftLensError(f"{run_dir} holds a run with different settings; a resumed run must match.",
                                "resume with the settings in its config.json, or start a new --run-dir.")
        if (run_dir / "metrics.json").is_file():
            raise AbftLensError(f"the run in {run_dir} is already complete.", "start a new --run-dir.")
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(config_path, meta)
    return False


def _cached_eval(run_dir: Path | None, name: str, resuming: bool, compute) -> EvalResult:
    path = run_dir / name if run_dir else None
    if resuming and path.is_file():
        return EvalResult.from_dict(read_json(path))
    result = compute()
    if path is not None:
        write_json(path, result.to_dict())
    return result


def _truncate_log(path: Path, completed_steps: int) -> None:
    """Drop log lines written after the checkpoint being resumed from."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= completed_steps]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def load_run(run_dir: str | Path, model: LoadedModel) -> TrainConfig:
    """Apply a run's trained tensors to ``model`` (the same base model) in place; return its config."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config_path, trained_path = run_dir / "config.json", run_dir / TRAINED_FILE
    if not config_path.is_file():
        raise AbftLensError(f"{run_dir} is not an abft-lens run folder (no config.json).", "point at a run folder.")
    if not trained_path.is_file():
        raise AbftLensError(f"{run_dir} holds no {TRAINED_FILE} (trained with --dont_save_model, or unfinished).",
                            "re-run training without --dont_save_model.")
    meta = read_json(config_path)
    config = TrainConfig.from_dict(meta["train"])
    trainable = attach(model, config.trainable)
    try:
        trainable.load_state_dict(load_file(trained_path))
    except ValueError as error:
        trainable.remove() if config.trainable.kind == "lora" else trainable.merge()
        raise AbftLensError(f"the tensors in {trained_path} do not fit model {model_info(model).name}: {error}",
                            f"load the base model the run was trained on ({meta['model']['name']}).") from error
    trainable.merge()
    return config


__all__ = ["RunResult", "run_training", "load_run", "TrainableConfig", "StepResult"]
