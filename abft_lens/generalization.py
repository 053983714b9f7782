"""Out-of-domain generalization and result tables in the paper's layout.

- :func:`evaluate_datasets` runs the StaICC "Normal" evaluation (or contextual calibration) of one model on
  the paper's eight datasets (indices 0, 1, 2, 3, 4, 6, 7, 8).
- :func:`generalization_summary` turns per-dataset accuracies of a run trained on one dataset into
  in-domain (the trained dataset) and out-of-domain (the mean over the other datasets) accuracy.
- :class:`ResultTable` holds values per (method row, dataset column) over seeds and renders
  ``mean ± std`` (percent; std is the sample standard deviation, n - 1, 0 for one seed) as markdown, CSV or
  HTML, with an average column over the dataset columns (per seed, then mean ± std; blank unless the row has
  every dataset column).
- :func:`table_from_runs` builds a table from run folders: the base model's row from ``fore_test.json`` /
  ``generalization.json["fore"]`` (one entry per distinct model, k and n_test: it does not depend on the seed),
  the method's row from ``post_test.json`` / ``generalization.json["post"]``. Runs without
  ``generalization.json`` fill their trained dataset's column of the method's row (the paper's main table:
  one run per dataset); runs with it get a row "METHOD (trained on DATASET)" with in-domain / OOD columns.
  Runs with ``calibration.json`` (``train --calibration-test``) add the training-free baseline, the base model
  with contextual calibration, as the row "ICL+CC (base)" right after the base row (once per model, k, n_test
  and dataset, like the base row), on the trained dataset or, with ``--generalization_test``, on all eight.
"""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import AbftLensError
from .evaluate import EvalResult, evaluate
from .io import atomic_write_text, read_json
from .models import LoadedModel
from .tasks import PAPER_DATASETS, STAICC_DATASETS, load_task

DATASET_ORDER = tuple(name for name, _ in STAICC_DATASETS)
DISPLAY = {"sst2": "SST-2", "mr": "MR", "fp": "FP", "sst5": "SST-5", "trec": "TREC", "agnews": "AGNews",
           "subj": "Subj", "tee": "TEE", "teh": "TEH", "hs18": "HS18"}
AVERAGE, IN_DOMAIN, OUT_OF_DOMAIN = "Avg.", "ID", "OOD"
CALIBRATION_FILE = "calibration.json"
BASE_METHOD = "ICL (base)"
CC_METHOD = "ICL+CC (base)"  # the base model with contextual calibration (Zhao et al. 2021)


def evaluate_datasets(
    loaded: LoadedModel, indices: Sequence[int] = PAPER_DATASETS, *, k: int = 4, n_test: int | None = None,
    calibrated: bool = False, batch_size: int = 8, progress: bool | str = False,
) -> dict[str, EvalResult]:
    """Evaluate ``loaded`` on each StaICC dataset of ``indices``: ``{task name: EvalResult}`` in that order.

    ``calibrated=True`` evaluates with contextual calibration (4x the forward passes), see
    :func:`abft_lens.robustness.calibrated_evaluate`.
    """
    from .robustness import calibrated_evaluate

    results = {}
    for index in indices:
        task = load_task(index)
        desc = f"{task.name}" if progress else False
        run = calibrated_evaluate if calibrated else evaluate
        results[task.name] = run(loaded, task, k=k, n_test=n_test, batch_size=batch_size, progress=desc)
    return results


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
        record[name] = {task: result.metrics for task, result in results.items()}
        record[f"{name}_summary"] = generalization_summary(
            {task: result.accuracy for task, result in results.items()}, trained)
    return record


# --------------------------------------------------------------------------------------------- tables


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class ResultTable:
    """``values[row][column]`` = one value per seed (accuracy in [0, 1]); ``seeds[row]`` the seeds seen.

    ``columns`` are dataset names (DATASET_ORDER order); rows keep insertion order.
    """

    columns: list[str] = field(default_factory=list)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seeds: dict[str, list] = field(default_factory=dict)
    metric: str = "accuracy"

    def add(self, row: str, column: str, value: float, seed=None) -> None:
        self.values.setdefault(row, {}).setdefault(column, []).append(float(value))
        if column not in self.columns and column not in (IN_DOMAIN, OUT_OF_DOMAIN):
            self.columns.append(column)
            self.columns.sort(key=lambda c: (DATASET_ORDER.index(c) if c in DATASET_ORDER else len(DATASET_ORDER), c))
        if seed is not None and seed not in self.seeds.setdefault(row, []):
            self.seeds[row].append(seed)

    def header(self) -> list[str]:
        extra = [c for c in (IN_DOMAIN, OUT_OF_DOMAIN) if any(c in cells for cells in self.values.values())]
        return self.columns + [AVERAGE] + extra

    def average(self, row: str) -> list[float] | None:
        """Per-seed mean over the dataset columns; None unless every column has the same number of values."""
        cells = self.values[row]
        counts = {len(cells.get(c, [])) for c in self.columns}
        if len(counts) != 1 or 0 in counts:
            return None
        n = counts.pop()
        return [sum(cells[c][i] for c in self.columns) / len(self.columns) for i in range(n)]

    def cell(self, row: str, column: str) -> tuple[float, float, int] | None:
        """(mean, std, n) of a cell, in the table's units (accuracy in [0, 1]); None when empty."""
        values = self.average(row) if column == AVERAGE else self.values[row].get(column)
        if not values:
            return None
        return (*mean_std(values), len(values))

    def rows(self) -> list[str]:
        return list(self.values)

    def to_markdown(self, digits: int = 2) -> str:
        header = ["Method"] + [DISPLAY.get(c, c) for c in self.header()]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows():
            lines.append("| " + " | ".join([row] + [self._text(row, c, digits) for c in self.header()]) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """One line per row: method, runs, then ``<column>`` (mean, percent) and ``<column>_std`` pairs."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["method", "runs"] + [f"{c}{suffix}" for c in self.header() for suffix in ("", "_std")])
        for row in self.rows():
            cells = []
            for column in self.header():
                cell = self.cell(row, column)
                cells += ["", ""] if cell is None else [f"{100 * cell[0]:.4f}", f"{100 * cell[1]:.4f}"]
            writer.writerow([row, self._runs(row)] + cells)
        return buffer.getvalue()

    def to_html(self, digits: int = 2) -> str:
        head = "".join(f"<th>{html.escape(DISPLAY.get(c, c))}</th>" for c in ["Method"] + self.header())
        body = "".join(
            "<tr><td>" + html.escape(row) + "</td>"
            + "".join(f"<td>{html.escape(self._text(row, c, digits))}</td>" for c in self.header()) + "</tr>"
            for row in self.rows())
        return (f"<table class=\"abft-lens-table\">\n<caption>{html.escape(self.metric)} (%), mean ± std over seeds"
                f"</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>\n")

    def render(self, fmt: str) -> str:
        if fmt not in ("markdown", "csv", "html"):
            raise AbftLensError(f"unknown table format {fmt!r}.", "use markdown, csv or html.")
        return {"markdown": self.to_markdown, "csv": self.to_csv, "html": self.to_html}[fmt]()

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write atomically; the format defaults from the suffix (.md, .csv, .html)."""
        path = Path(path)
        fmt = fmt or {".csv": "csv", ".html": "html", ".htm": "html"}.get(path.suffix.lower(), "markdown")
        return atomic_write_text(path, self.render(fmt))

    def _text(self, row: str, column: str, digits: int) -> str:
        cell = self.cell(row, column)
        if cell is None:
            return "–"
        mean, std, n = cell
        return f"{100 * mean:.{digits}f}" + (f" ± {100 * std:.{digits}f}" if n > 1 else "")

    def _runs(self, row: str) -> int:
        return max((len(v) for v in self.values[row].values()), default=0)


def table_from_runs(run_dirs: Iterable[str | Path], metric: str = "accuracy") -> ResultTable:
    """Aggregate run folders into a :class:`ResultTable` (see the module docstring for the layout)."""
    table = ResultTable(metric=metric)
    base_seen: set = set()
    for run_dir in map(Path, run_dirs):
        meta, fore, post, general, calibration = _read_run(run_dir)
        method, seed, trained = meta["train"]["method"], meta["train"].get("seed"), meta["task"]["name"]
        base_key = (meta["model"]["name"], meta["train"]["k"], meta.get("n_test"))
        if calibration is not None and "fore" in calibration:
            cc_key = (meta["model"]["name"], calibration.get("k", meta["train"]["k"]), calibration.get("n_test"))
            for task, metrics in calibration["fore"].items():
                if (cc_key, "cc", task) not in base_seen:
                    base_seen.add((cc_key, "cc", task))
                    table.add(CC_METHOD, task, metrics[metric])
        if general is not None:
            row = f"{method} (trained on {DISPLAY.get(trained, trained)})"
            for phase, name in (("post", row), ("fore", BASE_METHOD)):
                if phase not in general or (phase == "fore" and (base_key, "all") in base_seen):
                    continue
                accuracy = {task: metrics[metric] for task, metrics in general[phase].items()}
                for task, value in accuracy.items():
                    table.add(name, task, value, seed)
                if phase == "post":
                    summary = generalization_summary(accuracy, trained)
                    table.add(row, IN_DOMAIN, summary["in_domain"], seed)
                    table.add(row, OUT_OF_DOMAIN, summary["out_of_domain"], seed)
                else:
                    base_seen.add((base_key, "all"))
            continue
        if post is not None:
            table.add(method, post["task"], post["metrics"][metric], seed)
        if fore is not None and (base_key, fore["task"]) not in base_seen and (base_key, "all") not in base_seen:
            base_seen.add((base_key, fore["task"]))
            table.add(BASE_METHOD, fore["task"], fore["metrics"][metric])
    if not table.values:
        raise AbftLensError("none of the run folders holds test results.", "point at finished runs (with post_test.json).")
    first = [name for name in (BASE_METHOD, CC_METHOD) if name in table.values]
    table.values = {**{name: table.values.pop(name) for name in first}, **table.values}  # baselines first
    return table


def _read_run(run_dir: Path) -> tuple[dict, dict | None, dict | None, dict | None, dict | None]:
    if not (run_dir / "config.json").is_file():
        raise AbftLensError(f"{run_dir} is not an abft-lens run folder (no config.json).", "point at run folders.")
    parts = [read_json(run_dir / name) if (run_dir / name).is_file() else None
             for name in ("fore_test.json", "post_test.json", "generalization.json", CALIBRATION_FILE)]
    return (read_json(run_dir / "config.json"), *parts)


__all__ = ["evaluate_datasets", "generalization_summary", "generalization_record", "ResultTable", "table_from_runs",
           "mean_std", "BASE_METHOD", "CC_METHOD", "RunExtras"]


# --------------------------------------------------------------------------------------------- run integration


@dataclass
class RunExtras:
    """The extra before/after evaluations of a training run (``train --test_type`` / ``--generalization_test`` /
    ``--calibration-test``).

    :meth:`before` runs on the base model and writes the ``fore`` half at once (a resumed run reuses it);
    :meth:`after` runs on the trained model and completes ``robustness.json`` / ``generalization.json`` in
    ``run_dir``. Returns summary rows for the CLI table.

    ``calibration`` adds ``calibration.json``: the training-free baseline, contextual calibration of the
    **base** model (:func:`abft_lens.robustness.calibrated_evaluate`, 4x the forward passes of a plain
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

    def before(self, loaded: LoadedModel) -> None:
        if (self.run_dir / "config.json").is_file() and not self.resume:
            raise AbftLensError(f"{self.run_dir} already holds a run; abft-lens never overwrites one.",
                                "choose another --run-dir, or pass --resume to continue an interrupted run.")
        for name, compute in self._jobs():
            path = self.run_dir / name
            cached = read_json(path) if self.resume and path.is_file() else None
            self.fore[name] = cached["fore"] if cached and "fore" in cached else compute(loaded)
            from .io import write_json

            write_json(path, {**self._meta(name), "fore": self.fore[name]})

    def after(self, loaded: LoadedModel) -> list[tuple[str, str]]:
        from .io import write_json

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
            post = compute(loaded)
            record = {**self._meta(name), "fore": self.fore[name], "post": post}
            if name == "generalization.json":
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
        from .robustness import robustness_report

        jobs = []
        if self.test_type != "Normal":
            jobs.append(("robustness.json", lambda loaded: robustness_report(
                loaded, self.task, self.test_type, k=self.k, n_queries=self.robustness_queries,
                n_test=self.robustness_n_test, batch_size=self.batch_size, progress=self.progress)))
        if self.generalization:
            jobs.append(("generalization.json", lambda loaded: {
                name: result.metrics for name, result in evaluate_datasets(
                    loaded, self._indices(), k=self.k, n_test=self.generalization_n_test, batch_size=self.batch_size,
                    progress=self.progress).items()}))
        if self.calibration:
            jobs.append((CALIBRATION_FILE, self._calibrated))
        return jobs

    def _indices(self) -> tuple[int, ...]:
        """The paper's eight datasets, plus the trained one when it is another StaICC dataset."""
        if self.task.index in PAPER_DATASETS or self.task.index is None:
            return tuple(PAPER_DATASETS)
        return tuple(PAPER_DATASETS) + (self.task.index,)

    def _calibrated(self, loaded: LoadedModel) -> dict:
        from .robustness import calibrated_evaluate

        if self.generalization:
            return {name: result.metrics for name, result in evaluate_datasets(
                loaded, self._indices(), k=self.k, n_test=self.generalization_n_test, calibrated=True,
                batch_size=self.batch_size, progress=self.progress).items()}
        result = calibrated_evaluate(loaded, self.task, k=self.k, n_test=self.robustness_n_test,
                                     batch_size=self.batch_size, progress="calibrated eval" if self.progress else False)
        return {self.task.name: result.metrics}

    def _meta(self, name: str) -> dict:
        if name == "generalization.json":
            return {"trained_dataset": self.task.name, "k": self.k, "n_test": self.generalization_n_test}
        if name == CALIBRATION_FILE:
            from .robustness import CONTENT_FREE

            return {"method": "contextual_calibration", "model": "base", "trained_dataset": self.task.name,
                    "k": self.k, "n_test": self.generalization_n_test if self.generalization else self.robustness_n_test,
                    "content_free": list(CONTENT_FREE)}
        return {"test_type": self.test_type, "trained_dataset": self.task.name, "k": self.k,
                "n_queries": self.robustness_queries, "n_test": self.robustness_n_test}
