"""``abft-lens study``: every cell of a :class:`~abft_lens.studies.study_plan.StudyPlan` in one process.

- **One model load per model.** The cells of a model run one after another on the same ``HookedTransformer``.
  Before its first cell the runner copies every attention W_Q/W_K (and bias) tensor; after every cell, finished,
  failed or interrupted, it closes any Trainable still attached, removes hooks and writes the copies back, so
  each cell starts from the bit-identical base (tested).
- **Baselines once.** ``vanilla`` and ``cc`` are evaluated once per (model, dataset, k, n_test) into
  ``OUT/<model>/<dataset>/{vanilla,cc}/k<k>-n<n>.json``. A trained cell does not repeat its fore test: the shared
  vanilla evaluation is handed to ``run_training(fore_result=...)``, which writes it as the run folder's
  ``fore_test.json``; with ``--generalization-test`` the base model's eight-dataset evaluation is assembled from
  the same shared files.
- **Resumable.** A cell is finished when ``study.json`` says so and its files exist; the same command again skips
  finished cells. An interrupted trained cell continues through ``run_training(resume=True)`` (bit-identical to
  an uninterrupted run); one whose training finished but whose extra evaluations did not gets only those,
  on the saved tensors. Every file is written atomically, so Ctrl-C leaves nothing half-written.
- **Failures** (a prompt longer than the context, any exception) are recorded in ``study.json`` with their
  message; the study goes on with the next cell; the tables show the cell as missing. Failed cells are tried
  again on the next run.
- **Threads.** The runner never sets torch's thread count: set ``OMP_NUM_THREADS`` (one per process when
  several model processes share the machine).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from abft_lens.backends import qk
from abft_lens.backends.loading import LoadedModel, load_model
from abft_lens.backends.provenance import describe_model
from abft_lens.data.prompts import prompt_builder
from abft_lens.data.tasks import PAPER_DATASETS, ICLTask, load_task
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import EvalResult, evaluate
from abft_lens.evaluation.generalization import RunExtras, dataset_entry
from abft_lens.evaluation.label_prior import prior_reweighted
from abft_lens.evaluation.robustness import calibrated_evaluate
from abft_lens.io import write_json
from abft_lens.resources import peak_rss_mib, reset_peak_rss
from abft_lens.run_files import (CONFIG_FILE, GENERALIZATION_FILE, GENERATION_FILE, METRICS_FILE, has_after,
                                 is_finished, is_run_folder, read_run_json)
from abft_lens.reporting.study_folder import baseline_path, cell_files_exist, read_baseline
from abft_lens.reporting.study_render import write_study_tables
from abft_lens.studies.generation_report import MauveExtra, MauveTest
from abft_lens.studies.study_config import StudyConfig
from abft_lens.studies.study_plan import Cell, MethodSpec, StudyPlan, TrainRecipe, check_model, check_plan_fits
from abft_lens.studies.study_state import StudyState, study_lock
from abft_lens.training.runs import give_back, load_run, run_training
from abft_lens.training.train import query_label_shares

__all__ = ["run_study", "run_plan", "restore_base", "shared_evaluation", "run_prior_cell"]

log = logging.getLogger(__name__)
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} cells [{elapsed}{postfix}]"


def run_study(config: StudyConfig, *, progress: bool = True) -> StudyState:
    """Run the study ``config`` describes into ``config.out`` (what ``abft-lens study`` runs): every model is
    checked without loading it, then :func:`run_plan`. Returns the state (``state.counts()``: cells per state)."""
    if not isinstance(config, StudyConfig):
        raise AbftLensError(f"run_study takes a StudyConfig, not {type(config).__name__}.",
                            "pass abft_lens.StudyConfig(out=..., models=..., ...).")
    plan = config.plan()
    for model in plan.models:
        check_model(model)
    return run_plan(plan, config.out, config.recipe_for, dtype=getattr(torch, config.settings()["dtype"]),
                    device=config.torch_device, extend=config.extend, progress=progress)


def run_plan(plan: StudyPlan, out: str | Path, recipe_for: Callable[[MethodSpec], TrainRecipe], *,
             dtype: torch.dtype = torch.float32, device: str = "cpu", extend: bool = False,
             progress: bool = True) -> StudyState:
    """Run every unfinished cell of ``plan`` into the study folder ``out``; write the tables; return the state.

    ``recipe_for(method)`` gives a trained method's :class:`TrainRecipe` (:meth:`StudyConfig.recipe_for`); it is
    called for every trained method before any cell runs, so a bad variant fails first. ``extend``: add the
    plan's cells to a study made with another plan.
    """
    recipes = _recipes(plan, recipe_for)
    check_plan_fits(plan, recipes)  # before the folder exists: nothing written when refused
    with study_lock(out):  # one study per folder, for the whole run
        state = StudyState.open(out, plan, extend=extend)
        if state.plan.methods != plan.methods:  # --extend united the saved plan's methods with these
            recipes = _recipes(state.plan, recipe_for)
        plan, out = state.plan, state.out
        state.data["recipes"] = {name: recipe.to_dict() for name, recipe in recipes.items()}
        state.write()
        cells = plan.cells()
        todo = [cell for cell in cells if not finished(state, cell)]
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="study", unit="cell",
                   bar_format=BAR_FORMAT, disable=not progress)
        try:
            for model_name in plan.models:
                mine = [cell for cell in todo if cell.model == model_name]
                if mine:
                    _run_model_cells(state, model_name, mine, recipes, bar, dtype=dtype, device=device,
                                     progress=progress)
        finally:
            bar.close()
        write_study_tables(out)
    return state


def _recipes(plan: StudyPlan, recipe_for: Callable[[MethodSpec], TrainRecipe]) -> dict[str, TrainRecipe]:
    """Each trained method's recipe; ``prior`` gets plain ABFT's (the control reads its training prompts)."""
    recipes = {method.name: recipe_for(method) for method in plan.methods if method.trained}
    if any(method.kind == "prior" for method in plan.methods):
        recipes["prior"] = recipe_for(MethodSpec("ABFT", "ABFT"))
    return recipes


def _run_model_cells(state: StudyState, model_name: str, cells: list[Cell], recipes: dict[str, TrainRecipe], bar,
                     *, dtype: torch.dtype, device: str, progress: bool) -> None:
    try:  # bfloat16 trains under autocast over float32 weights (float32 gradients and Adam state), as `train` does
        model = load_model(model_name, dtype=torch.float32 if dtype == torch.bfloat16 else dtype, device=device)
    except Exception as error:  # every cell of an unloadable model fails with the loader's message
        for cell in cells:
            state.update(cell, state="failed", error=_message(error), attempts=state.record(cell)["attempts"] + 1)
        bar.update(len(cells))
        return
    base = qk.snapshot(model)
    for cell in cells:
        bar.set_description_str(f"study {cell.key}")
        _run_cell(state, cell, model, base, recipes.get(cell.method.name if cell.method.kind != "prior" else "prior"),
                  progress=progress)
        bar.update(1)
        eta = eta_seconds(state)
        bar.set_postfix_str("" if eta is None else f"ETA {_clock(eta)}")
        try:
            write_study_tables(state.out)
        except Exception as error:  # tables never stop a study; the final write at the end raises
            log.warning("could not write the study tables: %s", error)


def _run_cell(state: StudyState, cell: Cell, model: LoadedModel, base: dict, recipe: TrainRecipe | None,
              *, progress: bool) -> None:
    """Run one cell; ``study.json`` records its state, metrics (with its peak RSS), wall seconds and error."""
    record = state.update(cell, state="running", attempts=state.record(cell)["attempts"] + 1, error=None)
    previous, start = record["seconds"], time.perf_counter()
    reset_peak_rss()
    try:
        if cell.method.trained:
            metrics = run_trained_cell(model, cell, state.out, recipe, progress=progress)
        elif cell.method.kind == "prior":
            metrics = run_prior_cell(model, cell, state.out, state.plan, recipe, progress=progress)
        else:
            metrics = run_baseline_cell(model, cell, state.out, state.plan, progress=progress)
        metrics["peak_rss_mib"] = peak_rss_mib()  # this cell's own peak (the mark was reset before it)
    except KeyboardInterrupt:
        state.update(cell, state="interrupted", seconds=round(previous + time.perf_counter() - start, 2))
        raise
    except Exception as error:
        log.debug("cell %s failed", cell.key, exc_info=True)
        state.update(cell, state="failed", error=_message(error),
                     seconds=round(previous + time.perf_counter() - start, 2))
    else:
        state.update(cell, state="done", metrics=metrics, seconds=round(previous + time.perf_counter() - start, 2))
    finally:
        restore_base(model, base)


def restore_base(model: LoadedModel, base: dict[str, torch.Tensor]) -> None:
    """Back to the base model: close a Trainable left attached (a failed or interrupted cell), drop hooks,
    write the saved W_Q/W_K (and bias) tensors back bit-identically."""
    give_back(model, base)
    if hasattr(model, "reset_hooks"):
        model.reset_hooks()


def finished(state: StudyState, cell: Cell) -> bool:
    """Done in ``study.json`` and its files still there (a deleted run folder or baseline file runs again)."""
    record = state.record(cell)
    return record["state"] == "done" and cell_files_exist(state.out, record)


# --------------------------------------------------------------------------------------------------- baselines


def shared_evaluation(model: LoadedModel, task: ICLTask, out: Path, model_name: str, kind: str, *, k: int,
                      n_test: int, batch_size: int, progress: bool = True) -> EvalResult:
    """The untrained model's evaluation (``kind`` vanilla) or its contextually calibrated one (cc), computed once
    into the study folder and read back afterwards."""
    path = baseline_path(out, model_name, task.name, kind, k=k, n_test=n_test)
    if path.is_file():
        return EvalResult.from_dict(read_baseline(path))
    run = evaluate if kind == "vanilla" else calibrated_evaluate
    result = run(model, task, k=k, n_test=n_test, batch_size=batch_size,
                 progress=f"{kind} {task.name}" if progress else False)
    result.info.update(model=describe_model(model), baseline=kind)
    write_json(path, result.to_dict())
    return result


def run_baseline_cell(model: LoadedModel, cell: Cell, out: Path, plan: StudyPlan, *, progress: bool) -> dict:
    result = shared_evaluation(model, load_task(cell.dataset), out, cell.model, cell.method.kind, k=plan.k,
                               n_test=plan.n_test, batch_size=int(plan.settings.get("batch_size", 8)),
                               progress=progress)
    return dict(result.metrics)


def run_prior_cell(model: LoadedModel, cell: Cell, out: Path, plan: StudyPlan, recipe: TrainRecipe, *,
                   progress: bool) -> dict:
    """The label-prior control of one seed: the shared cc evaluation re-weighted by the label shares of the
    training queries that ``recipe`` draws at this seed (:mod:`abft_lens.evaluation.label_prior`)."""
    task = load_task(cell.dataset)
    calibrated = shared_evaluation(model, task, out, cell.model, "cc", k=plan.k, n_test=plan.n_test,
                                   batch_size=int(plan.settings.get("batch_size", 8)), progress=progress)
    shares = query_label_shares(prompt_builder(model, task), recipe.config_for(cell.seed))
    result = prior_reweighted(calibrated, shares)
    result.info.update(baseline="prior", seed=cell.seed)
    write_json(cell.path(out, k=plan.k, n_test=plan.n_test), result.to_dict())
    return dict(result.metrics)


# ----------------------------------------------------------------------------------------------- trained cells


def run_trained_cell(model: LoadedModel, cell: Cell, out: Path, recipe: TrainRecipe, *, progress: bool) -> dict:
    """Train (or resume, or finish) one run folder; return its summary metrics for ``study.json``."""
    task = load_task(cell.dataset)
    config = recipe.config_for(cell.seed)
    run_dir = cell.path(out, k=config.k, n_test=recipe.n_test)
    shared = dict(k=config.k, batch_size=recipe.batch_size, progress=progress)
    vanilla = shared_evaluation(model, task, out, cell.model, "vanilla", n_test=recipe.n_test, **shared) \
        if recipe.fore_test else None
    extras = _extras(task, run_dir, config.k, recipe)
    if extras is not None and recipe.generalization and not (run_dir / GENERALIZATION_FILE).is_file():
        n_test = recipe.generalization_n_test or recipe.n_test
        extra = (task.index,) if task.index is not None and task.index not in PAPER_DATASETS else ()
        extras.fore[GENERALIZATION_FILE] = {  # the shared vanilla results: RunExtras.before reuses them
            other.name: dataset_entry(shared_evaluation(model, other, out, cell.model, "vanilla", n_test=n_test,
                                                        **shared))
            for other in map(load_task, PAPER_DATASETS + extra)}
    mauve = MauveTest(recipe.mauve_prefix, max_new_tokens=recipe.mauve_max_new_tokens, progress=progress) \
        if recipe.mauve_prefix else None
    if not is_finished(run_dir):
        run_extras = [step for step in (extras, None if mauve is None else MauveExtra(mauve, run_dir)) if step]
        run_training(model, task, config, run_dir=run_dir, n_test=recipe.n_test, fore_test=recipe.fore_test,
                     post_test=recipe.post_test, save_model=recipe.save_model,
                     resume=is_run_folder(run_dir), checkpoint_every=recipe.checkpoint_every,
                     batch_size=recipe.batch_size, progress=progress, fore_result=vanilla, extras=run_extras,
                     dtype_reason=recipe.dtype_reason)
        if not is_finished(run_dir):
            raise AbftLensError(f"training of {run_dir} stopped before the end.", "run the study again to resume it.")
    elif _unfinished_extras(run_dir, extras, mauve):  # stopped after training, before its extra evaluations
        for step in (mauve, extras):
            if step is not None:
                step.before(model)
        load_run(run_dir, model)
        _after(model, run_dir, extras, mauve)
    return run_summary(run_dir)


def _extras(task: ICLTask, run_dir: Path, k: int, recipe: TrainRecipe) -> RunExtras | None:
    if recipe.test_type == "Normal" and not recipe.generalization:
        return None
    return RunExtras(task=task, run_dir=run_dir, k=k, test_type=recipe.test_type, generalization=recipe.generalization,
                     robustness_queries=recipe.robustness_queries, robustness_n_test=recipe.n_test,
                     generalization_n_test=recipe.generalization_n_test or recipe.n_test,
                     batch_size=recipe.batch_size, resume=True)


def _after(model: LoadedModel, run_dir: Path, extras: RunExtras | None, mauve: MauveTest | None) -> None:
    if not is_finished(run_dir):
        raise AbftLensError(f"training of {run_dir} stopped before the end.", "run the study again to resume it.")
    if extras is not None:
        extras.after(model)
    if mauve is not None:
        mauve.after(model, run_dir)


def _unfinished_extras(run_dir: Path, extras: RunExtras | None, mauve: MauveTest | None) -> bool:
    names = extras.after_files() if extras is not None else []
    missing = [name for name in names if not has_after(run_dir, name)]
    return bool(missing) or (mauve is not None and not (run_dir / GENERATION_FILE).is_file())


def run_summary(run_dir: Path) -> dict:
    """What ``study.json`` keeps of a finished run: post metrics, fore accuracy, the kept validation step (and
    the metric that chose it), training seconds, optimizer steps and training prompts per second (forward and
    backward passes of one prompt, over the whole run)."""
    metrics, config = read_run_json(run_dir, METRICS_FILE), read_run_json(run_dir, CONFIG_FILE)["train"]
    summary = dict(metrics.get("post") or {})
    seconds, steps = metrics.get("train_seconds"), metrics.get("steps")
    prompts = config["train_samples"] * config["epochs"]
    summary.update(fore_accuracy=(metrics.get("fore") or {}).get("accuracy"),
                   best_validation_step=metrics.get("best_validation_step"), kept_best=metrics.get("kept_best"),
                   select_metric=config.get("select_metric", "accuracy") if config.get("validate_every") else None,
                   train_seconds=seconds, steps=steps, preset=config.get("preset"),
                   prompts_per_second=round(prompts / seconds, 4) if seconds else None)
    return summary


# ----------------------------------------------------------------------------------------------------- progress


def eta_seconds(state: StudyState) -> float | None:
    """Seconds left: each unfinished cell at the mean time of the finished cells of its method (of its kind,
    of any cell when none), from ``study.json`` (earlier sessions count); None before any cell finished."""
    records = [state.record(cell) for cell in state.plan.cells()]
    done = [r for r in records if r["state"] == "done" and r["seconds"]]
    if not done:
        return None

    def mean(rows: list[dict]) -> float | None:
        return sum(r["seconds"] for r in rows) / len(rows) if rows else None

    left = 0.0
    for record in records:
        if record["state"] in ("done", "failed"):
            continue
        left += mean([r for r in done if r["method"] == record["method"]]) \
            or mean([r for r in done if r["kind"] == record["kind"]]) or mean(done)
    return left


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _message(error: BaseException) -> str:
    return str(error) if isinstance(error, AbftLensError) else f"{type(error).__name__}: {error}"
