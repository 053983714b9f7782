"""Table 2 of a study: in-domain vs out-of-domain accuracy of runs trained with ``--generalization-test``.

Each run's ``generalization.json`` holds the base model's ("fore") and the trained model's ("post") accuracy on
every paper dataset, on the same prompts (``--generalization-n-test`` per dataset).

- :func:`generalization_rows`: per method, in-domain (the trained dataset) and out-of-domain (mean over the other
  datasets) accuracy, averaged over the study's datasets per seed, then mean ± std over seeds; vanilla first.
- :func:`generalization_grid_rows`: per method and trained dataset, every evaluated dataset's accuracy (mean over
  seeds) beside vanilla's; the off-diagonal mean is that row's out-of-domain accuracy.
- :func:`ood_tests`: paired sign tests of the out-of-domain answers, against vanilla and between methods.
"""

from __future__ import annotations

from abft_lens.run_files import GENERALIZATION_FILE, METRICS_FILE, read_run_json, step_seconds, trained_parameters
from abft_lens.evaluation.paired import holm, query_sign_test, sign_test
from abft_lens.reporting.study_tables import ModelResults, query_count
from abft_lens.reporting.tables import mean_std

__all__ = ["generalization_rows", "generalization_grid_rows", "ood_tests"]

def _finished(run: dict) -> dict | None:
    general = read_run_json(run["run_dir"], GENERALIZATION_FILE)
    return general if general is not None and "post_summary" in general else None


def generalization_rows(results: ModelResults) -> list[dict]:
    """Per method: ID and OOD accuracy (mean, std over seeds of the per-seed average over datasets, seeds),
    trained parameters, mean training seconds (the steps' own, :func:`abft_lens.run_files.step_seconds`, where
    logged) and time relative to ABFT; vanilla first."""
    by_method: dict[str, dict] = {}
    fore: dict[str, dict] = {}
    for run in results.runs:
        general = _finished(run)
        if general is None:
            continue
        entry = by_method.setdefault(run["method"], {"id": {}, "ood": {}, "seconds": [], "parameters": None})
        entry["id"].setdefault(run["seed"], {})[run["dataset"]] = general["post_summary"]["in_domain"]
        entry["ood"].setdefault(run["seed"], {})[run["dataset"]] = general["post_summary"]["out_of_domain"]
        seconds = step_seconds(run["run_dir"])
        if seconds is None:
            seconds = (read_run_json(run["run_dir"], METRICS_FILE) or {}).get("train_seconds")
        if seconds is not None:
            entry["seconds"].append(seconds)
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


def generalization_grid_rows(results: ModelResults) -> tuple[list[str], list[dict]]:
    """(evaluated datasets, rows): per (method, trained dataset), ``{"method", "trained", "seeds", "post":
    {dataset: mean accuracy}, "fore": {dataset: vanilla accuracy}, "ood_post", "ood_fore"}``."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for run in results.runs:
        general = _finished(run)
        if general is not None:
            grouped.setdefault((run["method"], run["dataset"]), []).append(general)
    evaluated: list[str] = []
    rows = []
    for (method, trained), runs in grouped.items():
        names = list(runs[0]["post"])
        evaluated += [name for name in names if name not in evaluated]
        post = {name: sum(r["post"][name]["accuracy"] for r in runs) / len(runs) for name in names}
        fore = {name: runs[0]["fore"][name]["accuracy"] for name in names}
        others = [name for name in names if name != trained]
        rows.append({"method": method, "trained": trained, "seeds": len(runs), "post": post, "fore": fore,
                     "ood_post": sum(post[n] for n in others) / len(others) if others else None,
                     "ood_fore": sum(fore[n] for n in others) / len(others) if others else None})
    order = {m: i for i, m in enumerate(results.methods)}
    rows.sort(key=lambda row: (order.get(row["method"], len(order)), results.datasets.index(row["trained"])
                               if row["trained"] in results.datasets else 0))
    return evaluated, rows


def ood_tests(results: ModelResults) -> list[dict]:
    """Paired tests of the out-of-domain accuracy, per trained dataset: each trained method against vanilla (its
    runs' answers before and after training) and each pair of trained methods (the seeds both have), on the same
    prompts of every evaluated dataset but the trained one. Per dataset the design of Table 1's test (per query,
    the change in right answers summed over its prompts and the seeds); the queries' better / worse counts are
    summed over the datasets and tested with one exact sign test; Holm over the trained datasets of each
    comparison. Rows ``{"first", "second", "trained", "first_better", "second_better", "seeds", "p",
    "p_holm"}``; only runs whose ``generalization.json`` records per-prompt answers (``correct``) take part."""
    post: dict[tuple[str, str], dict] = {}  # (method, trained) -> seed -> {dataset: answers}
    fore: dict[str, dict[str, list[bool]]] = {}  # trained -> {dataset: vanilla's answers}
    for run in results.runs:
        general = _finished(run)
        others = [name for name in (general or {}).get("post", {}) if name != run["dataset"]]
        if not others or any("correct" not in general[phase][name] for phase in ("fore", "post") for name in others):
            continue
        post.setdefault((run["method"], run["dataset"]), {})[run["seed"]] = {
            name: [c == "1" for c in general["post"][name]["correct"]] for name in others}
        fore[run["dataset"]] = {name: [c == "1" for c in general["fore"][name]["correct"]] for name in others}
    methods = [method for method in results.methods if any(key[0] == method for key in post)]
    pairs = [("vanilla", method) for method in methods] + [
        (first, second) for i, first in enumerate(methods) for second in methods[i + 1:]]
    rows = []
    for first, second in pairs:
        pair = []
        for trained, vanilla in fore.items():
            right = post.get((second, trained), {})
            left = {seed: vanilla for seed in right} if first == "vanilla" else post.get((first, trained), {})
            seeds = [seed for seed in right if seed in left]
            if not seeds:
                continue
            better = worse = 0
            for name, answers in vanilla.items():
                test = query_sign_test([left[s][name] for s in seeds], [right[s][name] for s in seeds],
                                       query_count(name, len(answers)))
                better, worse = better + test.better, worse + test.worse
            pair.append({"first": first, "second": second, "trained": trained, "first_better": worse,
                         "second_better": better, "seeds": len(seeds), "p": sign_test(better, worse)})
        for row, adjusted in zip(pair, holm({row["trained"]: row["p"] for row in pair}).values()):
            row["p_holm"] = adjusted
        rows += pair
    return rows
