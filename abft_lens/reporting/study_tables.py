"""The tables of a study folder (``abft-lens study``), computed from the folder alone (:mod:`study_folder`).

Table 1, per model: rows = methods (vanilla, cc, then the trained methods), columns = datasets + their average.

- Accuracy and macro-F1 in percent, mean ± sample std over seeds (:class:`~abft_lens.reporting.tables.ResultTable`).
- Every cell other than vanilla carries its paired exact McNemar p-value against vanilla on the same prompts:
  the discordant prompts of all its seeds are pooled (``gained`` = vanilla wrong and the method right, ``lost``
  the reverse; two-sided binomial test with p = 1/2). ↑/↓ mark p < 0.05 with more gained / more lost; the
  column "improved / hurt" counts the datasets so marked.
- Label balance: each dataset's gold majority-label rate over its test prompts, and per cell the share of
  prompts given the most frequent *predicted* label (mean over seeds). A run is flagged as collapsed (⚠) when
  that share exceeds ``min(COLLAPSE_SHARE, majority rate + COLLAPSE_MARGIN)``: above 90 %, or 20 points above
  what always answering the majority label would give. Accuracy can rise while a model collapses onto an
  unbalanced test split's majority label; the flag and macro-F1 show it.
- The step each run's validation guard kept, and the metric that chose it.

Table 2 (runs with ``--generalization-test``), per model and method: in-domain accuracy (the trained dataset),
out-of-domain accuracy (mean over the other paper datasets), both averaged over the study's datasets per seed,
then mean ± std over seeds; the number of trained parameters (from ``trained.safetensors``); training time
relative to the ``ABFT`` row. The HTML page adds a figure of per-dataset accuracy (one point per seed) and the
validation curves (:mod:`abft_lens.reporting.study_figures`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from abft_lens.evaluation.metrics import mcnemar_exact
from abft_lens.io import read_json
from abft_lens.reporting.study_folder import (BASELINE_KINDS, baseline_path, dataset_name, read_study, run_path)
from abft_lens.reporting.tables import DISPLAY, ResultTable, mean_std

__all__ = ["StudyTables", "study_tables", "mcnemar_exact", "collapse_threshold",
           "COLLAPSE_SHARE", "COLLAPSE_MARGIN", "SIGNIFICANCE"]

COLLAPSE_SHARE = 0.9
COLLAPSE_MARGIN = 0.2
SIGNIFICANCE = 0.05
AVERAGE = "Avg."


def collapse_threshold(majority_rate: float) -> float:
    """A run is flagged when its top predicted label's share exceeds this (see the module docstring)."""
    return min(COLLAPSE_SHARE, majority_rate + COLLAPSE_MARGIN)


def top_share(predictions: list[int]) -> float:
    """Share of prompts given the most frequent predicted label."""
    return max(predictions.count(label) for label in set(predictions)) / len(predictions) if predictions else 0.0


@dataclass
class Cell:
    """One (model, method, dataset): per-seed values and the pooled comparison with vanilla."""

    accuracy: list[float] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    collapsed: int = 0
    gained: int = 0
    lost: int = 0
    paired: bool = False
    kept_steps: list = field(default_factory=list)

    @property
    def p_value(self) -> float | None:
        return mcnemar_exact(self.gained, self.lost) if self.paired else None

    @property
    def sign(self) -> int:
        """+1 / -1 when significantly better / worse than vanilla, else 0."""
        p = self.p_value
        if p is None or p >= SIGNIFICANCE or self.gained == self.lost:
            return 0
        return 1 if self.gained > self.lost else -1


@dataclass
class ModelResults:
    model: str
    datasets: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    majority: dict[str, float] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)  # every finished trained run: method, dataset, seed, run_dir

    def table(self, metric: str) -> ResultTable:
        table = ResultTable(metric=metric)
        for method in self.methods:
            for dataset in self.datasets:
                cell = self.cells.get((method, dataset))
                for seed, value in enumerate(getattr(cell, metric) if cell else []):
                    table.add(method, dataset, value, seed)
        return table


@dataclass
class StudyTables:
    """Everything the tables show (written by :mod:`abft_lens.reporting.study_render`)."""

    study_dir: Path
    plan: dict
    models: list[ModelResults]
    failed: list[str]
    unfinished: dict[str, int]
    select_metrics: list[str]


def study_tables(study_dir: str | Path) -> StudyTables:
    """Read a study folder into :class:`StudyTables` (baseline files, run folders and ``study.json`` only)."""
    study_dir = Path(study_dir)
    data = read_study(study_dir)
    plan, records = data["plan"], data["cells"]
    settings = plan.get("settings", {})
    k, n_test = int(settings.get("k", 4)), settings.get("n_test", 256)
    datasets = [dataset_name(spec) for spec in plan["datasets"]]
    methods = [m["name"] for m in plan["methods"]]
    kinds = {m["name"]: m["kind"] for m in plan["methods"]}
    done = {(r["model"], dataset_name(r["dataset"]), r["method"], r["seed"]) for r in records.values()
            if r["state"] == "done"}
    models = []
    for model in plan["models"]:
        results = ModelResults(model, datasets, ["vanilla"] + [m for m in methods if m != "vanilla"])
        for dataset in datasets:
            vanilla = _read(baseline_path(study_dir, model, dataset, "vanilla", k=k, n_test=n_test))
            if vanilla is not None:
                gold = [row["gold"] for row in vanilla["per_prompt"]]
                results.majority[dataset] = top_share(gold)
                _add(results, "vanilla", dataset, vanilla, None)
            for method in methods:
                if kinds[method] in BASELINE_KINDS:
                    if kinds[method] != "vanilla" and (model, dataset, method, None) in done:
                        evaluation = _read(baseline_path(study_dir, model, dataset, kinds[method], k=k, n_test=n_test))
                        _add(results, method, dataset, evaluation, vanilla)
                    continue
                for seed in plan["seeds"]:
                    run_dir = run_path(study_dir, model, dataset, method, seed)
                    post = _read(run_dir / "post_test.json") if (model, dataset, method, seed) in done else None
                    if post is None:
                        continue
                    _add(results, method, dataset, post, _read(run_dir / "fore_test.json") or vanilla)
                    metrics = _read(run_dir / "metrics.json") or {}
                    results.cells[(method, dataset)].kept_steps.append(metrics.get("best_validation_step"))
                    results.runs.append({"method": method, "dataset": dataset, "seed": seed, "run_dir": run_dir})
        results.methods = [m for m in results.methods if any((m, d) in results.cells for d in datasets)]
        models.append(results)
    current = [(key, r) for key, r in records.items() if _in_plan(r, plan)]
    failed = [f"{key}: {r.get('error') or 'failed'}" for key, r in current if r["state"] == "failed"]
    unfinished: dict[str, int] = {}
    for _, record in current:
        if record["state"] not in ("done", "failed"):
            unfinished[record["state"]] = unfinished.get(record["state"], 0) + 1
    select = sorted({(r.get("metrics") or {}).get("select_metric") for r in records.values()} - {None})
    return StudyTables(study_dir, plan, models, failed, unfinished, select)


def _in_plan(record: dict, plan: dict) -> bool:
    names = {m["name"] for m in plan["methods"]}
    return record["model"] in plan["models"] and record["dataset"] in plan["datasets"] \
        and record["method"] in names and (record["seed"] is None or record["seed"] in plan["seeds"])


def _add(results: ModelResults, method: str, dataset: str, evaluation: dict | None, vanilla: dict | None) -> None:
    """Add one evaluation (a run's post test or a baseline file) to its cell, paired with vanilla's predictions."""
    if evaluation is None:
        return
    cell = results.cells.setdefault((method, dataset), Cell())
    rows = evaluation["per_prompt"]
    predictions = [row["prediction"] for row in rows]
    cell.accuracy.append(evaluation["metrics"]["accuracy"])
    cell.macro_f1.append(evaluation["metrics"]["macro_f1"])
    cell.shares.append(top_share(predictions))
    majority = top_share([row["gold"] for row in rows])
    cell.collapsed += cell.shares[-1] > collapse_threshold(majority)
    if vanilla is not None and evaluation is not vanilla and method != "vanilla":
        base = vanilla["per_prompt"]
        if [row["gold"] for row in base] == [row["gold"] for row in rows]:
            before = [row["prediction"] == row["gold"] for row in base]
            after = [row["prediction"] == row["gold"] for row in rows]
            cell.gained += sum(a and not b for b, a in zip(before, after))
            cell.lost += sum(b and not a for b, a in zip(before, after))
            cell.paired = True


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def trained_parameters(run_dir: Path) -> int | None:
    """Number of trained scalars in a run's ``trained.safetensors`` (read from its header; no tensor loaded)."""
    path = run_dir / "trained.safetensors"
    if not path.is_file():
        return None
    with open(path, "rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def generalization_rows(results: ModelResults) -> list[dict]:
    """Per method: ID and OOD accuracy (mean, std over seeds of the per-seed average over datasets), trained
    parameters, mean training seconds; vanilla first (from the runs' ``generalization.json`` "fore")."""
    by_method: dict[str, dict] = {}
    fore: dict[str, dict] = {}
    for run in results.runs:
        general = _read(run["run_dir"] / "generalization.json")
        if general is None or "post_summary" not in general:
            continue
        entry = by_method.setdefault(run["method"], {"id": {}, "ood": {}, "seconds": [], "parameters": None})
        entry["id"].setdefault(run["seed"], {})[run["dataset"]] = general["post_summary"]["in_domain"]
        entry["ood"].setdefault(run["seed"], {})[run["dataset"]] = general["post_summary"]["out_of_domain"]
        metrics = _read(run["run_dir"] / "metrics.json") or {}
        if metrics.get("train_seconds") is not None:
            entry["seconds"].append(metrics["train_seconds"])
        entry["parameters"] = entry["parameters"] or trained_parameters(run["run_dir"])
        fore[run["dataset"]] = general.get("fore_summary", {})
    if not by_method:
        return []
    rows = []
    if all(d in fore for d in results.datasets):
        rows.append({"method": "vanilla",
                     "id": (sum(fore[d]["in_domain"] for d in results.datasets) / len(results.datasets), 0.0, 1),
                     "ood": (sum(fore[d]["out_of_domain"] for d in results.datasets) / len(results.datasets), 0.0, 1),
                     "parameters": 0, "seconds": None})
    for method in results.methods:
        entry = by_method.get(method)
        if entry is None:
            continue
        row = {"method": method, "parameters": entry["parameters"],
               "seconds": sum(entry["seconds"]) / len(entry["seconds"]) if entry["seconds"] else None}
        for part in ("id", "ood"):
            per_seed = [sum(values.values()) / len(values) for values in entry[part].values()
                        if set(values) == set(results.datasets)]
            row[part] = (*mean_std(per_seed), len(per_seed)) if per_seed else None
        rows.append(row)
    abft = next((row["seconds"] for row in rows if row["method"] == "ABFT" and row["seconds"]), None)
    for row in rows:
        row["relative_time"] = row["seconds"] / abft if abft and row["seconds"] is not None else None
    return rows


def display(dataset: str) -> str:
    return DISPLAY.get(dataset, dataset)
