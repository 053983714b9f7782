"""The tables of a study folder (``abft-lens study``), computed from the folder alone (:mod:`study_folder`).

Table 1, per model: rows = methods (vanilla, cc, prior, then the trained methods), columns = datasets + average.

- Accuracy and macro-F1 in percent, mean ± sample std over seeds (:class:`~abft_lens.reporting.tables.ResultTable`).
- **Against vanilla**, every other cell is tested on its queries (:func:`~abft_lens.evaluation.paired.query_sign_test`):
  per query, the change in correct answers summed over its two prompts and over the seeds, exact sign test; the
  p-values of a method's datasets are Holm-adjusted (:func:`~abft_lens.evaluation.paired.holm`). ↑/↓: adjusted
  p < 0.05. The per-seed McNemar p's are shown beside it, in the tests grid.
- **Prior shift** (⇢, trained methods): a run whose predicted-label distribution moved from vanilla's by a total
  variation of at least :data:`~abft_lens.evaluation.label_prior.PRIOR_SHIFT` toward its training queries'
  label shares (read from the ``prior`` cell of its seed). A cell with a flagged run counts as improved only if
  it also beats the ``prior`` control (same test, Holm over datasets); otherwise its ↑ becomes ⇢.
- **Collapse** (⚠): the share of prompts given the most frequent predicted label exceeds
  ``min(COLLAPSE_SHARE, majority rate + COLLAPSE_MARGIN)`` and vanilla's own share on the same prompts by at least
  ``COLLAPSE_OVER_VANILLA`` (vanilla is never flagged against itself).
- Head to head (:func:`head_to_head`): every pair of non-vanilla methods, the same test over the seeds both have
  (a baseline without seeds pairs with every seed), Holm over the datasets of the pair.
- Cost (trained methods): training seconds, optimizer steps, prompts per second and peak RSS per run (from
  ``study.json``), and each method's time relative to ABFT.

Table 2 (runs with ``--generalization-test``), per model and method: in-domain accuracy (the trained dataset),
out-of-domain accuracy (mean over the other paper datasets), averaged over the study's datasets per seed, then
mean ± std over seeds; and per trained dataset, every evaluated dataset's accuracy beside vanilla's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from abft_lens.data.tasks import load_task
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.label_prior import label_distribution, prior_shift
from abft_lens.evaluation.paired import Paired, SignTest, correct, holm, paired, query_sign_test
from abft_lens.run_files import CONFIG_FILE, METRICS_FILE, POST_TEST_FILE, read_run_json, step_seconds
from abft_lens.reporting.study_folder import (BASELINE_KINDS, SEEDED_BASELINE_KINDS, baseline_path,
                                              cell_files_exist, dataset_name, read_baseline, read_study, run_path)
from abft_lens.reporting.tables import DISPLAY, ResultTable, mean_std

__all__ = ["StudyTables", "study_tables", "collapse_threshold", "head_to_head", "COLLAPSE_SHARE", "COLLAPSE_MARGIN",
           "SIGNIFICANCE", "MISSING", "query_count"]

COLLAPSE_SHARE = 0.9
COLLAPSE_MARGIN = 0.2
COLLAPSE_OVER_VANILLA = 0.01  # and at least this far above vanilla's own top share
SIGNIFICANCE = 0.05
MISSING = "done in study.json but its files are gone: run the study again to redo it"
AVERAGE = "Avg."
PRIOR = "prior"


def collapse_threshold(majority_rate: float) -> float:
    """A run is flagged when its top predicted label's share exceeds this (see the module docstring)."""
    return min(COLLAPSE_SHARE, majority_rate + COLLAPSE_MARGIN)


def top_share(predictions: list[int]) -> float:
    """Share of prompts given the most frequent predicted label."""
    return max(predictions.count(label) for label in set(predictions)) / len(predictions) if predictions else 0.0


@dataclass
class Cell:
    """One (model, method, dataset): per-seed values, and its tests against vanilla and the prior control."""

    seeds: list = field(default_factory=list)  # None for a baseline evaluated once
    accuracy: list[float] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    correct: list[list[bool]] = field(default_factory=list)
    distributions: list[list[float]] = field(default_factory=list)
    train_shares: list = field(default_factory=list)  # the seed's training-query label shares, or None
    kept_steps: list = field(default_factory=list)
    collapsed: int = 0
    shifted: int = 0  # runs flagged as a prior shift
    test: SignTest | None = None  # against vanilla
    per_seed: list[Paired] = field(default_factory=list)
    adjusted_p: float | None = None
    prior_test: SignTest | None = None
    prior_adjusted_p: float | None = None

    @property
    def p_value(self) -> float | None:
        """The Holm-adjusted p of the test against vanilla."""
        return self.adjusted_p

    @property
    def beats_prior(self) -> bool:
        return self.prior_test is not None and self.prior_test.direction > 0 \
            and self.prior_adjusted_p is not None and self.prior_adjusted_p < SIGNIFICANCE

    @property
    def significant(self) -> int:
        """+1 / -1 when significantly better / worse than vanilla after Holm, else 0 (prior shift ignored)."""
        if self.test is None or self.adjusted_p is None or self.adjusted_p >= SIGNIFICANCE:
            return 0
        return self.test.direction

    @property
    def sign(self) -> int:
        """:attr:`significant`, except that a gain with a prior-shift flag counts only if it beats the prior."""
        if self.significant > 0 and self.shifted and not self.beats_prior:
            return 0
        return self.significant

    def by_seed(self) -> dict:
        return dict(zip(self.seeds, self.correct))


@dataclass
class ModelResults:
    model: str
    datasets: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    majority: dict[str, float] = field(default_factory=dict)
    n_queries: dict[str, int] = field(default_factory=dict)
    trained: set = field(default_factory=set)  # names of trained methods
    runs: list[dict] = field(default_factory=list)  # every finished trained run: method, dataset, seed, run_dir
    costs: dict[str, list[dict]] = field(default_factory=dict)  # trained method -> study.json metrics per run

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
    missing: list[str] = field(default_factory=list)  # keys of done cells whose files are gone


def study_tables(study_dir: str | Path) -> StudyTables:
    """Read a study folder into :class:`StudyTables` (baseline files, run folders and ``study.json`` only)."""
    study_dir = Path(study_dir)
    data = read_study(study_dir)
    plan, records = data["plan"], data["cells"]
    done = {(r["model"], dataset_name(r["dataset"]), r["method"], r["seed"]): r for r in records.values()
            if r["state"] == "done" and cell_files_exist(study_dir, r)}
    models = [_model_results(study_dir, plan, done, model) for model in plan["models"]]
    current = [(key, r) for key, r in records.items() if _in_plan(r, plan)]
    failed = [f"{key}: {r.get('error') or 'failed'}" for key, r in current if r["state"] == "failed"]
    missing = [key for key, r in current if r["state"] == "done" and not cell_files_exist(study_dir, r)]
    unfinished: dict[str, int] = {}
    for _, record in current:
        if record["state"] not in ("done", "failed"):
            unfinished[record["state"]] = unfinished.get(record["state"], 0) + 1
    select = sorted({(r.get("metrics") or {}).get("select_metric") for r in records.values()} - {None})
    return StudyTables(study_dir, plan, models, failed, unfinished, select, missing)


def _model_results(study_dir: Path, plan: dict, done: dict, model: str) -> ModelResults:
    settings = plan.get("settings", {})
    k, n_test = int(settings.get("k", 4)), settings.get("n_test", 256)
    specs = {dataset_name(spec): spec for spec in plan["datasets"]}
    kinds = {m["name"]: m["kind"] for m in plan["methods"]}
    results = ModelResults(model, list(specs), ["vanilla"] + [m for m in kinds if m != "vanilla"],
                           trained={m for m, kind in kinds.items() if kind not in BASELINE_KINDS + SEEDED_BASELINE_KINDS})
    for dataset, spec in specs.items():
        vanilla = _read(baseline_path(study_dir, model, dataset, "vanilla", k=k, n_test=n_test))
        if vanilla is None:
            continue
        results.majority[dataset] = top_share([row["gold"] for row in vanilla["per_prompt"]])
        results.n_queries[dataset] = query_count(spec, len(vanilla["per_prompt"]))
        _add(results, "vanilla", dataset, vanilla, None)
        for method, kind in kinds.items():
            if kind in BASELINE_KINDS:
                if kind != "vanilla" and (model, dataset, method, None) in done:
                    _add(results, method, dataset, _read(baseline_path(study_dir, model, dataset, kind, k=k,
                                                                       n_test=n_test)), None)
                continue
            for seed in plan["seeds"]:
                record = done.get((model, dataset, method, seed))
                if record is None:
                    continue
                if kind in SEEDED_BASELINE_KINDS:
                    _add(results, method, dataset,
                         _read(baseline_path(study_dir, model, dataset, kind, k=k, n_test=n_test, seed=seed)), seed)
                    continue
                run_dir = run_path(study_dir, model, dataset, method, seed)
                if _add(results, method, dataset, read_run_json(run_dir, POST_TEST_FILE), seed):
                    metrics = read_run_json(run_dir, METRICS_FILE) or {}
                    results.cells[(method, dataset)].kept_steps.append(metrics.get("best_validation_step"))
                    results.runs.append({"method": method, "dataset": dataset, "seed": seed, "run_dir": run_dir})
                    results.costs.setdefault(method, []).append(dict(record.get("metrics") or {},
                                                                     seconds=record.get("seconds"),
                                                                     step_seconds=step_seconds(run_dir),
                                                                     trained_prompts=_trained_prompts(run_dir)))
    results.methods = [m for m in results.methods if any((m, d) in results.cells for d in results.datasets)]
    _compare(results)
    return results


def query_count(spec: str, n_prompts: int) -> int:
    """Distinct queries of a dataset's test prompts (prompt j asks query j % len(test)); every prompt its own
    query when the dataset cannot be read any more (a deleted file)."""
    try:
        return min(n_prompts, len(load_task(spec).test))
    except (AbftLensError, OSError):
        return n_prompts


def _in_plan(record: dict, plan: dict) -> bool:
    names = {m["name"] for m in plan["methods"]}
    return record["model"] in plan["models"] and record["dataset"] in plan["datasets"] \
        and record["method"] in names and (record["seed"] is None or record["seed"] in plan["seeds"])


def _add(results: ModelResults, method: str, dataset: str, evaluation: dict | None, seed) -> bool:
    """Add one evaluation (a run's post test or a baseline file) to its cell; False when there is none."""
    if evaluation is None:
        return False
    cell = results.cells.setdefault((method, dataset), Cell())
    rows = evaluation["per_prompt"]
    predictions = [row["prediction"] for row in rows]
    cell.seeds.append(seed)
    cell.accuracy.append(evaluation["metrics"]["accuracy"])
    cell.macro_f1.append(evaluation["metrics"]["macro_f1"])
    cell.shares.append(top_share(predictions))
    cell.correct.append(correct(rows))
    cell.distributions.append(label_distribution(predictions, len(evaluation["label_words"])))
    cell.train_shares.append(evaluation.get("label_shares"))
    return True


def _compare(results: ModelResults) -> None:
    """Fill every cell's tests against vanilla and the prior control, its flags and Holm-adjusted p's."""
    for method in results.methods:
        if method == "vanilla":
            continue
        against_vanilla, against_prior = {}, {}
        for dataset in results.datasets:
            cell, vanilla = results.cells.get((method, dataset)), results.cells.get(("vanilla", dataset))
            if cell is None or vanilla is None:
                continue
            n = results.n_queries[dataset]
            cell.test = query_sign_test(vanilla.correct, cell.correct, n)
            cell.per_seed = [paired(vanilla.correct[0], right) for right in cell.correct]
            against_vanilla[dataset] = cell.test.p_value
            majority, base_share = results.majority[dataset], vanilla.shares[0]
            cell.collapsed = sum(share > collapse_threshold(majority) and share > base_share + COLLAPSE_OVER_VANILLA
                                 for share in cell.shares)
            prior = results.cells.get((PRIOR, dataset))
            if method in results.trained:
                shares = (prior.by_seed() if prior else {})
                train_shares = {seed: s for seed, s in zip(prior.seeds, prior.train_shares)} if prior else {}
                cell.shifted = sum(prior_shift(dist, vanilla.distributions[0], train_shares.get(seed))
                                   for seed, dist in zip(cell.seeds, cell.distributions))
                seeds = [s for s in cell.seeds if s in shares]
                if seeds:
                    mine = cell.by_seed()
                    cell.prior_test = query_sign_test([shares[s] for s in seeds], [mine[s] for s in seeds], n)
                    against_prior[dataset] = cell.prior_test.p_value
        for name, tests in (("adjusted_p", against_vanilla), ("prior_adjusted_p", against_prior)):
            for dataset, p in holm(tests).items():
                setattr(results.cells[(method, dataset)], name, p)


def head_to_head(results: ModelResults) -> list[dict]:
    """Every pair (A, B) of non-vanilla methods per dataset: queries where B does better / worse than A (summed
    over their shared seeds), the sign test's p and its Holm adjustment over the pair's datasets."""
    names = [m for m in results.methods if m != "vanilla"]
    rows = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            pair = []
            for dataset in results.datasets:
                a, b = results.cells.get((first, dataset)), results.cells.get((second, dataset))
                if a is None or b is None:
                    continue
                a_seeds, b_seeds = a.by_seed(), b.by_seed()
                shared = [s for s in a_seeds if s in b_seeds] if None not in a_seeds and None not in b_seeds \
                    else None
                if shared == []:
                    continue
                left = [a_seeds[s] for s in shared] if shared else a.correct
                right = [b_seeds[s] for s in shared] if shared else b.correct
                test = query_sign_test(left, right, results.n_queries[dataset])
                pair.append({"model": results.model, "dataset": dataset, "first": first, "second": second,
                             "first_better": test.worse, "second_better": test.better, "seeds": test.seeds,
                             "p": test.p_value})
            for row, adjusted in zip(pair, holm({row["dataset"]: row["p"] for row in pair}).values()):
                row["p_holm"] = adjusted
            rows += pair
    return rows


def _trained_prompts(run_dir: Path) -> int | None:
    """Training prompts a run passes forward and backward (``train_samples × epochs`` of its config.json)."""
    train = (read_run_json(run_dir, CONFIG_FILE) or {}).get("train") or {}
    return train["train_samples"] * train["epochs"] if "train_samples" in train and "epochs" in train else None


def _read(path: Path) -> dict | None:
    return read_baseline(path) if path.is_file() else None


def cost_rows(results: ModelResults) -> list[dict]:
    """Per trained method: mean training seconds, the steps' own seconds (:func:`abft_lens.run_files.step_seconds`),
    optimizer steps, prompts per second, peak RSS (MiB), runs, and training time relative to ABFT's. Prompts per
    second and the relative time are on the steps' seconds where every run logged them (a resumed run's sessions
    all count), else on the training seconds the runs recorded (None where a value was not recorded)."""
    rows = []
    for method in [m for m in results.methods if m in results.costs]:
        runs = results.costs[method]

        def mean(key: str) -> float | None:
            values = [run[key] for run in runs if run.get(key) is not None]
            return sum(values) / len(values) if values else None

        logged = all(run.get("step_seconds") and run.get("trained_prompts") for run in runs)
        rate = sum(run["trained_prompts"] / run["step_seconds"] for run in runs) / len(runs) if logged \
            else mean("prompts_per_second")
        rows.append({"method": method, "runs": len(runs), "train_seconds": mean("train_seconds"),
                     "step_seconds": mean("step_seconds") if all(run.get("step_seconds") for run in runs) else None,
                     "steps": mean("steps"), "prompts_per_second": rate,
                     "peak_rss_mib": mean("peak_rss_mib"), "cell_seconds": mean("seconds")})
    key = "step_seconds" if all(row["step_seconds"] for row in rows) else "train_seconds"
    abft = next((row[key] for row in rows if row["method"] == "ABFT"), None)
    for row in rows:
        row["relative_time"] = row[key] / abft if abft and row[key] else None
    return rows


def display(dataset: str) -> str:
    return DISPLAY.get(dataset, dataset)
