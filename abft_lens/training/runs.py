"""A training run end to end, and its folder on disk.

``run_training`` evaluates before (fore test), trains, evaluates after (post test) and writes a run folder
(its files: :mod:`abft_lens.run_files`; ``config.json`` also records ``resolved``: the micro-batch size and
compute dtype the run used, each with why).

Stages, in order (each a function of a :class:`PreparedRun`): :func:`prepare_run` checks every input (the
options, the folder, the task's sizes, the label words) before anything is written; :func:`open_run_folder`
locks the folder and writes config.json; :func:`fore_test`; :func:`start_training` and :func:`train`;
:func:`finish_training` (keep-best, the trained tensors); :func:`post_test`; :func:`save_run`. A fresh run
refused before its first step (say, a prompt longer than the context) leaves no folder behind. Training stops
with one message when the loss or a trained tensor becomes NaN or infinite.

The model is given back as it came: the trained tensors live in the run folder and in
:attr:`RunResult.trained` (:meth:`RunResult.apply_to` or :func:`load_run` put them into a model), so a second
run on the same model starts from the same base that its folder names.

Every file is written atomically. A run interrupted at any point resumes with ``resume=True`` and ends with
the same weights as an uninterrupted run with the same seed.

Data parallel (``dist``, or an initialized ``torch.distributed`` default group, see
:mod:`abft_lens.training.distributed`): every rank trains its share of each pseudo-batch; rank 0 alone runs the
fore/post tests, the extras and the validation guard, writes the run folder and shows progress; every rank
reads the checkpoint on resume (the run folder must be on a file system all ranks see). Other ranks return a
:class:`RunResult` without ``fore``/``post``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from abft_lens.version import __version__
from abft_lens.backends import qk
from abft_lens.training import distributed
from abft_lens.training.callbacks import Checkpointer, FiniteCheck, JsonlLogger, ProgressBar, ValidationGuard
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import EvalResult, evaluate
from abft_lens.data.prompts import PromptBuilder, prompt_builder
from abft_lens.io import atomic_write_bytes, write_json
from abft_lens.backends.provenance import LoadedModel, describe_model, model_info
from abft_lens.data.tasks import ICLTask
from abft_lens.training.checks import check_run_fits_task
from abft_lens.run_files import (CHECKPOINT_FILE, FORE_TEST_FILE, LOG_FILE, METRICS_FILE, POST_TEST_FILE,
                                 TRAINED_FILE, read_run_json)
from abft_lens.training.run_folder import (CHECKPOINT_FIX, RunLock, check_finite, check_same_base, check_run_dir,
                                           clear_folder, read_checkpoint, read_run_config, read_trained,
                                           remove_empty_folder, resolved_block, saved_micro_batch, start_or_resume,
                                           truncate_log)
from abft_lens.training.train import (StepResult, TrainConfig, Trainer, resolve_micro_batch, training_prompts,
                                      validation_prompts)
from abft_lens.training.adapters import attach
from abft_lens.training.trainable import Trainable, TrainableConfig, attached


@dataclass
class RunOptions:
    """How a run is carried out (what it trains is its :class:`TrainConfig`); checked at construction.

    ``extras``: objects with ``before(model)`` (run on the base model, rank 0, once the folder is ready) and
    ``after(model) -> list of (name, value) rows`` (on the trained model, after the post test), e.g.
    :class:`~abft_lens.evaluation.generalization.RunExtras`. ``fore_result``: the fore test already evaluated
    elsewhere (a study's shared baseline of the same model, task, k and ``n_test``); it is written to
    ``fore_test.json`` instead of evaluating again. ``dtype_reason``: why the compute dtype is what it is, when
    the caller picked it (``--dtype auto``); recorded in ``config.json`` (``resolved.compute_dtype.reason``).
    ``checked``: the caller already ran :func:`check_run` with these options (``abft-lens train`` does, before it
    loads the model), so :func:`prepare_run` does not run those checks a second time.
    """

    run_dir: str | Path | None = None
    n_test: int | None = 256
    fore_test: bool = True
    post_test: bool = True
    save_model: bool = True
    resume: bool = False
    checkpoint_every: int = 1
    batch_size: int = 8
    progress: bool = True
    callbacks: Sequence = ()
    dist: distributed.DistributedContext | None = None
    extras: Sequence = ()
    fore_result: EvalResult | None = None
    dtype_reason: str | None = None
    checked: bool = False

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir) if self.run_dir is not None else None
        for name in ("n_test", "checkpoint_every", "batch_size"):
            value = getattr(self, name)
            if (value is not None or name != "n_test") and (isinstance(value, bool) or not isinstance(value, int)
                                                            or value < 1):
                raise AbftLensError(f"{name}={value!r} must be a positive integer.", f"pass {name} >= 1.")
        if self.resume and self.run_dir is None:
            raise AbftLensError("resume needs the run_dir of the interrupted run.", "pass run_dir.", names=("run_dir",))


@dataclass
class RunResult:
    """What a run produced; ``fore``/``post`` are None when skipped. ``trained``: the trained tensors (as in
    ``trained.safetensors``; None after an interrupted run), ``extra_rows``: the extras' summary rows."""

    run_dir: Path | None
    config: TrainConfig
    fore: EvalResult | None
    post: EvalResult | None
    steps: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    best_step: int | None = None
    train_seconds: float = 0.0
    trained: dict[str, torch.Tensor] | None = None
    extra_rows: list[tuple[str, str]] = field(default_factory=list)

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = []
        for name in ("accuracy", "macro_f1", "mean_true_label_probability", "ece"):
            before = f"{self.fore.metrics[name]:.4f}" if self.fore else "-"
            after = f"{self.post.metrics[name]:.4f}" if self.post else "-"
            rows.append((name, f"{before} -> {after}"))
        return rows

    def apply_to(self, model: LoadedModel) -> None:
        """Merge this run's trained tensors into ``model`` (its base model), as :func:`load_run` does."""
        if self.trained is None:
            raise AbftLensError("this run was interrupted and has no trained tensors.", "resume it first.")
        apply_trained(model, self.config, self.trained, where="this run")


@dataclass
class PreparedRun:
    """A run whose inputs passed every check: what the stages share. ``main``: this process writes the folder."""

    model: LoadedModel
    task: ICLTask
    config: TrainConfig
    options: RunOptions
    builder: PromptBuilder
    meta: dict
    dist: distributed.DistributedContext | None
    resuming: bool = False
    started: bool = False

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def run_dir(self) -> Path | None:
        return self.options.run_dir

    @property
    def writes(self) -> bool:
        return self.run_dir is not None and self.main

    def on_main(self, fn):
        return self.dist.on_main(fn) if self.dist is not None else fn()


def run_training(model: LoadedModel, task: ICLTask, config: TrainConfig, options: RunOptions | None = None,
                 **kwargs) -> RunResult:
    """Fore test, train ``model`` with ``config``, post test; write the run folder if ``run_dir`` is given.

    ``options`` (or the same names as keyword arguments: ``run_dir``, ``n_test``, ``fore_test``, ``post_test``,
    ``save_model``, ``resume``, ``checkpoint_every``, ``batch_size``, ``progress``, ``callbacks``, ``dist``,
    ``extras``, ``fore_result``, ``dtype_reason``, ``checked``): see :class:`RunOptions`. ``callbacks`` run on
    every rank (a stop on any rank stops all). The model ends as it began; the result holds the trained tensors.
    """
    if options is not None and kwargs:
        raise TypeError("run_training: pass either options or keyword arguments, not both")
    run = prepare_run(model, task, config, options if options is not None else RunOptions(**kwargs))
    with open_run_folder(run):
        for extra in run.options.extras if run.main else ():
            extra.before(model)
        fore = fore_test(run)
        base, previous = qk.snapshot(model), attached(model)
        try:
            trainer, guard = start_training(run)
            steps, seconds = train(run, trainer, guard)
            validation = guard.history if guard else []
            if trainer.stop_requested:
                return RunResult(run.run_dir, config, fore, None, steps, validation, None, seconds)
            trained, best_step = finish_training(run, trainer, guard)
            post = post_test(run)
            result = RunResult(run.run_dir, config, fore, post, steps, validation, best_step, seconds, trained)
            for extra in run.options.extras if run.main else ():
                result.extra_rows += extra.after(model)
            save_run(run, result)
            return result
        finally:
            give_back(model, base, previous)


def prepare_run(model: LoadedModel, task: ICLTask, config: TrainConfig, options: RunOptions) -> PreparedRun:
    """Check everything that can be checked before a file is written: the folder, the task's sizes, the
    label words (through the prompt builder, which needs the tokenizer)."""
    dist = options.dist if options.dist is not None else distributed.current()
    if dist is not None:  # rank 0's folder (a default name may hold a timestamp)
        options.run_dir = dist.broadcast_object(options.run_dir)
    if not options.checked:  # rank 0 looks at the folder; its refusal reaches every rank (none is left waiting)
        check = lambda: check_run(task, config, options)  # noqa: E731
        dist.on_main(check) if dist is not None else check()
    builder = prompt_builder(model, task)
    micro_batch = resolve_micro_batch(model, config, [p.n_tokens for p in training_prompts(builder, config)], dist)
    meta = {"train": config.to_dict(), "model": describe_model(model), "task": task.describe(),
            "n_test": options.n_test, "abft_lens_version": __version__,
            "resolved": resolved_block(model, config, micro_batch, options.dtype_reason)}
    return PreparedRun(model, task, config, options, builder, meta, dist)


def check_run(task: ICLTask, config: TrainConfig, options: RunOptions) -> None:
    """The checks that need no model: the run folder can be written (or resumed) and the task holds the run."""
    if options.run_dir is not None:
        check_run_dir(options.run_dir, resume=options.resume)
    check_run_fits_task(config, task, options.n_test, tests=options.fore_test or options.post_test)


@contextlib.contextmanager
def open_run_folder(run: PreparedRun):
    """Hold the folder's lock for the whole run and write config.json (or check the resumed run's). A fresh
    folder refused before the first training step (an :class:`AbftLensError`) is removed again."""
    if run.run_dir is None:
        yield
        return
    run_dir, existed, lock = run.run_dir, run.run_dir.exists(), RunLock(run.run_dir)

    def open_() -> bool:
        run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as undo:
            undo.callback(lambda: None if existed else remove_empty_folder(run_dir))
            undo.callback(lock.__exit__)
            lock.__enter__()
            resuming = start_or_resume(run_dir, run.meta, resume=run.options.resume)
            undo.pop_all()
        return resuming

    run.resuming = run.on_main(open_)
    refused = False
    try:
        yield
    except AbftLensError:
        refused = run.main and not run.resuming and not run.started
        raise
    finally:
        if run.main:
            if refused:
                clear_folder(run_dir)
            lock.__exit__()
            if refused and not existed:
                remove_empty_folder(run_dir)


def fore_test(run: PreparedRun) -> EvalResult | None:
    """The evaluation before training (rank 0); a resumed run reuses its fore_test.json."""
    if not (run.options.fore_test and run.main):
        return None
    if run.resuming and run.run_dir is not None:
        saved = read_run_json(run.run_dir, FORE_TEST_FILE, keys=("metrics",))
        if saved is not None:
            return EvalResult.from_dict(saved)
    result = run.options.fore_result if run.options.fore_result is not None else _evaluate(run, "fore test")
    if run.run_dir is not None:
        write_json(run.run_dir / FORE_TEST_FILE, result.to_dict())
    return result


def start_training(run: PreparedRun) -> tuple[Trainer, ValidationGuard | None]:
    """The trainer (the trainable set attached to the model) and the validation guard, both restored from the
    checkpoint of a resumed run; the guard has evaluated step 0 (the base)."""
    if run.dist is not None:
        run.dist.barrier()  # the fore test (rank 0) precedes training on every rank
    resolved = run.meta["resolved"]["micro_batch_size"]  # or, resuming, what the interrupted run used
    saved = run.resuming and run.on_main(lambda: saved_micro_batch(run.run_dir, run.config, run.model.cfg.device))
    trainer = Trainer(run.model, run.builder, run.config, run.dist, saved or (resolved["value"], resolved["reason"]))
    config, log_path = run.config, _path(run, LOG_FILE)
    guard = None
    if config.validate_every and config.validation_examples and run.main:
        guard = ValidationGuard(validation_prompts(run.builder, config), config.validate_every,
                                batch_size=run.options.batch_size, log_path=log_path)
    checkpoint = _path(run, CHECKPOINT_FILE)
    if run.resuming and run.on_main(checkpoint.is_file):
        _resume_from(read_checkpoint(run.run_dir), trainer, guard, checkpoint)
        if run.main:
            truncate_log(log_path, trainer.completed_steps)
    elif run.writes:
        log_path.unlink(missing_ok=True)
    if guard is not None and not guard.history:
        with torch.no_grad():
            guard.evaluate(trainer, step=0)
    return trainer, guard


def _resume_from(state: dict, trainer: Trainer, guard: ValidationGuard | None, path: Path) -> None:
    try:
        trainer.load_state_dict(state["trainer"])
        if guard is not None and state["guard"] is not None:
            guard.load_state_dict(state["guard"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # another run's state, or a damaged one
        raise AbftLensError(f"{path} is damaged: it does not fit this run ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200] if str(error) else ''}).", CHECKPOINT_FIX) from error


def train(run: PreparedRun, trainer: Trainer, guard: ValidationGuard | None) -> tuple[list[dict], float]:
    """Every remaining step: ``(step records, training seconds)``, the seconds of the whole run, the sessions
    before a resume included (``Trainer.train_seconds``). The finite check runs first after each step, so a
    diverged step is never logged, validated or checkpointed."""
    steps: list[dict] = []
    chain = [FiniteCheck(), lambda _, result: steps.append(result.to_dict())]
    if run.writes:
        chain.append(JsonlLogger(_path(run, LOG_FILE)))
    if guard is not None:
        chain.append(guard)
    if run.writes:
        chain.append(Checkpointer(_path(run, CHECKPOINT_FILE), run.options.checkpoint_every, guard))
    chain += list(run.options.callbacks)
    bar = ProgressBar(run.config.total_steps, trainer.completed_steps, desc=run.config.method) \
        if run.options.progress and run.main else None
    if bar:
        chain.append(bar)
    run.started = True
    try:
        trainer.run(chain)
    finally:
        if bar:
            bar.close()
    return steps, trainer.train_seconds


def finish_training(run: PreparedRun, trainer: Trainer, guard: ValidationGuard | None
                    ) -> tuple[dict[str, torch.Tensor], int | None]:
    """Keep the best validation step if asked; ``(trained tensors, best step)``. A hooked model's trainable set
    is merged (a bridge keeps its adapters attached: its 4-bit weights are never rewritten)."""
    best_step = guard.best["step"] if guard is not None and guard.best is not None else None
    if run.config.keep_best and guard is not None and guard.best_state is not None:
        trainer.trainable.load_state_dict(guard.best_state)
    if run.dist is not None:
        best_step = run.dist.broadcast_object(best_step)
        if run.config.keep_best:
            run.dist.broadcast_parameters(trainer.trainable.parameters())  # rank 0 kept the best step
    trained = trainer.trainable.state_dict()
    check_finite(trained, "the trained tensors")
    if not trainer.trainable.keeps_adapters:
        trainer.trainable.merge()
    return trained, best_step


def post_test(run: PreparedRun) -> EvalResult | None:
    """The evaluation of the trained model (rank 0), on the fore test's prompts."""
    return _evaluate(run, "post test") if run.options.post_test and run.main else None


def save_run(run: PreparedRun, result: RunResult) -> None:
    """trained.safetensors, post_test.json and metrics.json (rank 0); the checkpoint goes: the run is complete."""
    if run.writes:
        if run.options.save_model:
            from safetensors.torch import save

            atomic_write_bytes(run.run_dir / TRAINED_FILE, save(result.trained, metadata={"format": "pt"}))
        if result.post is not None:
            write_json(run.run_dir / POST_TEST_FILE, result.post.to_dict())
        write_json(run.run_dir / METRICS_FILE, {
            "fore": result.fore.metrics if result.fore else None, "post": result.post.metrics if result.post else None,
            "best_validation_step": result.best_step, "kept_best": run.config.keep_best,
            "train_seconds": round(result.train_seconds, 2), "steps": run.config.total_steps,
        })
        _path(run, CHECKPOINT_FILE).unlink(missing_ok=True)
    if run.dist is not None:
        run.dist.barrier()  # the folder is complete when any rank returns


def give_back(model, base: dict[str, torch.Tensor], previous: Trainable | None = None) -> None:
    """End the trainable set a run attached (not ``previous``, the one attached before it) and put the base
    tensors back: a bridge's adapters are removed; a hooked model gets ``base`` (a :func:`qk.snapshot`) copied in."""
    trainable = attached(model)
    if trainable is not None and trainable is not previous and trainable.is_open:
        trainable.remove() if trainable.keeps_adapters else trainable.merge()
    qk.restore(model, base, prune=True)


def _evaluate(run: PreparedRun, desc: str) -> EvalResult:
    return evaluate(run.model, run.task, k=run.config.k, n_test=run.options.n_test,
                    batch_size=run.options.batch_size, progress=desc if run.options.progress else False)


def _path(run: PreparedRun, name: str) -> Path | None:
    return run.run_dir / name if run.run_dir is not None else None


def apply_trained(model: LoadedModel, config: TrainConfig, tensors: dict[str, torch.Tensor], *,
                  where: str) -> None:
    """Merge trained tensors (a run's) into ``model`` in place; a bridge keeps them as frozen adapters."""
    check_finite(tensors, where)
    trainable = attach(model, config.trainable)
    try:
        trainable.load_state_dict(tensors)
    except ValueError as error:
        trainable.remove() if config.trainable.kind == "lora" else trainable.merge()
        raise AbftLensError(f"the tensors of {where} do not fit model {model_info(model).name}: {error}",
                            "load the base model the run was trained on.") from error
    trainable.merge()


def load_run(run_dir: str | Path, model: LoadedModel) -> TrainConfig:
    """Apply a run's trained tensors to ``model`` (the run's base model, checked) in place; return its
    config. A damaged folder or NaN/inf tensors are refused with one message."""
    run_dir = Path(run_dir)
    meta = read_run_config(run_dir, trained=True)
    check_same_base(meta["model"], describe_model(model), run_dir)
    config = TrainConfig.from_dict(meta["train"])
    apply_trained(model, config, read_trained(run_dir), where=str(run_dir / TRAINED_FILE))
    return config


__all__ = ["RunOptions", "RunResult", "PreparedRun", "run_training", "prepare_run", "open_run_folder", "fore_test",
           "start_training", "train", "finish_training", "post_test", "save_run", "give_back",
           "apply_trained", "load_run", "TrainableConfig", "StepResult"]
