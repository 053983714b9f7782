"""Out-of-domain generalization: one model on the paper's eight datasets, and a run's extra evaluations.

- :func:`evaluate_datasets` runs the StaICC "Normal" evaluation (or contextual calibration) of one model on
  the paper's eight datasets (indices 0, 1, 2, 3, 4, 6, 7, 8).
- :func:`generalization_summary` turns per-dataset accuracies of a run trained on one dataset into
  in-domain (the trained dataset) and out-of-domain (the mean over the other datasets) accuracy.
- :class:`RunExtras`: the before/after robustness, generalization and calibration files of a training run.

Tables over run folders are in :mod:`abft_lens.reporting.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from abft_lens.evaluation.evaluator import EvalResult, evaluate
from abft_lens.evaluation.robustness import (CONTENT_FREE, calibrated_evaluate, check_robustness_options,
                                             robustness_report)
from abft_lens.io import write_json
from abft_lens.backends.provenance import LoadedModel
from abft_lens.data.tasks import PAPER_DATASETS, load_task
from abft_lens.run_files import CALIBRATION_FILE, GENERALIZATION_FILE, ROBUSTNESS_FILE, read_run_json

__all__ = ["evaluate_datasets", "dataset_entry", "generalization_summary", "generalization_record", "RunExtras"]


def evaluate_datasets(
    model: LoadedModel, indices: Sequence[int] = PAPER_DATASETS, *, k: int = 4, n_test: int | None = None,
    calibrated: bool = False, batch_size: int = 8, progress: bool | str = False,
) -> dict[str, EvalResult]:
    """Evaluate ``model`` on each StaICC dataset of ``indices``: ``{task name: EvalResult}`` in that order.

    ``calibrated=True`` evaluates with contextual calibration (4x the forward passes), see
    :func:`abft_lens.evaluation.robustness.calibrated_evaluate`.
    """
    results = {}
    for index in indices:
        task = load_task(index)
        desc = f"{task.name}" if progress else False
        run = calibrated_evaluate if calibrated else evaluate
        results[task.name] = run(model, task, k=k, n_test=n_test, batch_size=batch_size, progress=desc)
    return results


def dataset_entry(result: EvalResult) -> dict:
    """One dataset's entry in ``generalization.json`` (``fore`` / ``post``): its metrics and ``correct``, one
    ``"1"`` (right) or ``"0"`` per test prompt in prompt order, for paired out-of-domain tests (fore against post,
    one method against another on the same prompts)."""
    answers = "".join("1" if prediction == gold else "0" for prediction, gold in zip(result.predictions, result.gold))
    return {**result.metrics, "correct": answers}


def generalization_summary(accuracy: dict[str, float], trained: str) -> dict[str, float | None]:
    """``in_domain`` = accuracy on ``trained``; ``out_of_domain`` = mean over the other datasets; ``average``
    = mean over all (None where a part is missing)."""
    others = [value for name, value in accuracy.items() if name != trained]
    return {"in_domain": accuracy.get(trained), "out_of_domain": sum(others) / len(others) if others else None,
            "average": sum(accuracy.values()) / len(accuracy) if accuracy else None}


def generalization_record(fore: dict[str, EvalResult] | None, post: dict[str, EvalResult] | None, trained: str,
                          *, k: int, n_test: int | None) -> dict:
    """The content of a run's ``generalization.json``: metrics per dataset before/after and the summaries."""
    record: dict = {"trained_dataset": trained, "k": k, "n_test": n_test}
    for name, results in (("fore", fore), ("post", post)):
        if results is None:
            continue
        record[name] = {task: dataset_entry(result) for task, result in results.items()}
        record[f"{name}_summary"] = generalization_summary(
            {task: result.accuracy for task, result in results.items()}, trained)
    return record




# --------------------------------------------------------------------------------------------- run integration


@dataclass
class RunExtras:
    """The extra before/after evaluations of a training run (``train --test_type`` / ``--generalization_test`` /
    ``--calibration-test``).

    :meth:`before` runs on the base model and writes the ``fore`` half at once (a resumed run reuses it);
    :meth:`after` runs on the trained model and completes ``robustness.json`` / ``generalization.json`` in
    ``run_dir``. Returns summary rows for the CLI table.

    ``calibration`` adds ``calibration.json``: the training-free baseline, contextual calibration of the
    **base** model (:func:`abft_lens.evaluation.robustness.calibrated_evaluate`, 4x the forward passes of a plain
    evaluation), on the trained dataset with ``robustness_n_test`` prompts, or with ``generalization`` on the
    same datasets and ``generalization_n_test`` as ``generalization.json``. It has a ``fore`` half only.
    """

    task: object
    run_dir: Path
    k: int
    test_type: str = "Normal"
    generalization: bool = False
    calibration: bool = False
    robustness_queries: int | None = None
    robustness_n_test: int | None = 256
    generalization_n_test: int | None = 256
    batch_size: int = 8
    resume: bool = False
    progress: bool = True
    fore: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse options the datasets cannot serve, before any model loads or file is written."""
        if self.test_type != "Normal":
            check_robustness_options(self.task, self.test_type, k=self.k, n_queries=self.robustness_queries,
                                     n_test=self.robustness_n_test)
        for index in self._indices() if self.generalization else ():
            load_task(index).check_test_prompts(self.k, self.generalization_n_test)

    def before(self, model: LoadedModel) -> None:
        """The ``fore`` halves, on the base model, in the run folder ``run_training`` has prepared."""
        for name, compute in self._jobs():
            cached = read_run_json(self.run_dir, name) if self.resume else None
            if name not in self.fore:  # given by the caller (a study's shared baselines), or computed here
                self.fore[name] = cached["fore"] if cached and "fore" in cached else compute(model)
            write_json(self.run_dir / name, {**self._meta(name), "fore": self.fore[name]})

    def after_files(self) -> list[str]:
        """The files :meth:`after` completes with a ``post`` half (``calibration.json`` has none)."""
        return [name for name, _ in self._jobs() if name != CALIBRATION_FILE]

    def after(self, model: LoadedModel) -> list[tuple[str, str]]:
        rows = []
        for name, compute in self._jobs():
            if name == CALIBRATION_FILE:  # the base model only: nothing to compute after training
                fore = self.fore[name]
                accuracy = fore[self.task.name]["accuracy"] if self.task.name in fore else None
                if accuracy is not None:
                    rows.append(("contextual calibration (base) accuracy", f"{accuracy:.4f}"))
                if len(fore) > 1:
                    average = sum(metrics["accuracy"] for metrics in fore.values()) / len(fore)
                    rows.append(("contextual calibration (base) average", f"{average:.4f}"))
                continue
            post = compute(model)
            record = {**self._meta(name), "fore": self.fore[name], "post": post}
            if name == GENERALIZATION_FILE:
                record.update({f"{p}_summary": generalization_summary(
                    {t: m["accuracy"] for t, m in record[p].items()}, self.task.name) for p in ("fore", "post")})
                rows += [(f"{key.replace('_', '-')} accuracy",
                          f"{record['fore_summary'][key]:.4f} -> {record['post_summary'][key]:.4f}")
                         for key in ("in_domain", "out_of_domain")]
            else:
                rows.append((f"{self.test_type} consistency", f"{self.fore[name]['consistency']:.4f} -> {post['consistency']:.4f}"))
                rows.append(("unseen-label accuracy", f"{self.fore[name]['unseen_label']['unseen_label']['accuracy']:.4f} -> "
                                                      f"{post['unseen_label']['unseen_label']['accuracy']:.4f}"))
                rows.append(("contextual bias entropy", f"{self.fore[name]['contextual_bias']['entropy']:.4f} -> "
                                                        f"{post['contextual_bias']['entropy']:.4f}"))
            write_json(self.run_dir / name, record)
        return rows

    def _jobs(self):
        jobs = []
        if self.test_type != "Normal":
            jobs.append((ROBUSTNESS_FILE, lambda model: robustness_report(
                model, self.task, self.test_type, k=self.k, n_queries=self.robustness_queries,
                n_test=self.robustness_n_test, batch_size=self.batch_size, progress=self.progress)))
        if self.generalization:
            jobs.append((GENERALIZATION_FILE, lambda model: {
                name: dataset_entry(result) for name, result in evaluate_datasets(
                    model, self._indices(), k=self.k, n_test=self.generalization_n_test, batch_size=self.batch_size,
                    progress=self.progress).items()}))
        if self.calibration:
            jobs.append((CALIBRATION_FILE, self._calibrated))
        return jobs

    def _indices(self) -> tuple[int, ...]:
        """The paper's eight datasets, plus the trained one when it is another StaICC dataset."""
        if self.task.index in PAPER_DATASETS or self.task.index is None:
            return tuple(PAPER_DATASETS)
        return tuple(PAPER_DATASETS) + (self.task.index,)

    def _calibrated(self, model: LoadedModel) -> dict:
        if self.generalization:
            return {name: result.metrics for name, result in evaluate_datasets(
                model, self._indices(), k=self.k, n_test=self.generalization_n_test, calibrated=True,
                batch_size=self.batch_size, progress=self.progress).items()}
        result = calibrated_evaluate(model, self.task, k=self.k, n_test=self.robustness_n_test,
                                     batch_size=self.batch_size, progress="calibrated eval" if self.progress else False)
        return {self.task.name: result.metrics}

    def _meta(self, name: str) -> dict:
        if name == GENERALIZATION_FILE:
            return {"trained_dataset": self.task.name, "k": self.k, "n_test": self.generalization_n_test}
        if name == CALIBRATION_FILE:
            return {"method": "contextual_calibration", "model": "base", "trained_dataset": self.task.name,
                    "k": self.k, "n_test": self.generalization_n_test if self.generalization else self.robustness_n_test,
                    "content_free": list(CONTENT_FREE)}
        return {"test_type": self.test_type, "trained_dataset": self.task.name, "k": self.k,
                "n_queries": self.robustness_queries, "n_test": self.robustness_n_test}
