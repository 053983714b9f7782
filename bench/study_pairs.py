"""Head to head: every pair of a study's methods on the same test prompts, per dataset (Table 1 compares each
method with vanilla only; this answers "does ABFT beat CC?" and "where does E2E win?").

For each model, dataset and pair (A, B): the prompts only A answers right and only B answers right, pooled over the
seeds both have (a baseline such as CC has no seed and pairs with every seed of the other), and the two-sided exact
McNemar p. Read from the study folder's baseline files and post tests; nothing is re-run.

    .venv/bin/python bench/study_pairs.py bench/results/study-smollm2 --output bench/results/pairs-smollm2.md

More study folders after the first add their methods (a variant studied in a folder of its own, on the same
test prompts: the same k and --n-test); a baseline or method name the first folder already has is taken from
the first folder.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from abft_lens.evaluation.metrics import mcnemar_exact
from abft_lens.io import read_json
from abft_lens.reporting.study_folder import BASELINE_KINDS, baseline_path, dataset_name, read_study, run_path
from abft_lens.reporting.study_tables import display
from study_diagnostics import write_outputs  # bench/ is the script's own folder, first on sys.path


def correctness(study_dir: Path, study: dict, done: set, model: str, dataset: str, method: dict) -> dict:
    """seed (None for a baseline) -> per-prompt right/wrong, for the finished evaluations of ``method``;
    ``done`` holds the finished cells as (model, dataset name, method, seed)."""
    settings = study["plan"].get("settings", {})
    k, n_test = int(settings.get("k", 4)), settings.get("n_test", 256)
    if method["kind"] in BASELINE_KINDS:
        paths = {None: baseline_path(study_dir, model, dataset, method["kind"], k=k, n_test=n_test)}
    else:
        paths = {seed: run_path(study_dir, model, dataset, method["name"], seed) / "post_test.json"
                 for seed in study["plan"]["seeds"]}
    return {seed: [row["prediction"] == row["gold"] for row in read_json(path)["per_prompt"]]
            for seed, path in paths.items()
            if path.is_file() and (method["kind"] == "vanilla" or (model, dataset, method["name"], seed) in done)}


def compare(first: dict, second: dict) -> tuple[int, int, int] | None:
    """(only first right, only second right, seeds paired), pooled over the seeds both have."""
    pairs = [(a, b) for sa, a in first.items() for sb, b in second.items() if sa is None or sb is None or sa == sb]
    if not pairs:
        return None
    only_first = sum(x and not y for a, b in pairs for x, y in zip(a, b))
    only_second = sum(y and not x for a, b in pairs for x, y in zip(a, b))
    return only_first, only_second, len(pairs)


def prompt_settings(study: dict) -> tuple:
    """(k, n_test, test type): what decides which test prompts a study's cells answered."""
    settings = study["plan"].get("settings", {})
    return int(settings.get("k", 4)), settings.get("n_test", 256), settings.get("test_type", "Normal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=Path, nargs="+", metavar="study")
    parser.add_argument("--output", type=Path, help="markdown file (default: print); a .json beside it")
    args = parser.parse_args()
    sources = {}  # method name -> (study folder, study, finished cells, method)
    models, datasets = [], []
    first_prompts = prompt_settings(read_study(args.studies[0]))
    for folder in args.studies:
        study = read_study(folder)
        if prompt_settings(study) != first_prompts:
            raise SystemExit(f"{folder} tests other prompts than {args.studies[0]} (k, --n-test, --test-type).")
        done = {(r["model"], dataset_name(r["dataset"]), r["method"], r["seed"]) for r in study["cells"].values()
                if r["state"] == "done"}
        methods = study["plan"]["methods"]
        if not any(m["kind"] == "vanilla" for m in methods):
            methods = [{"name": "vanilla", "kind": "vanilla"}] + methods
        for method in methods:
            sources.setdefault(method["name"], (folder, study, done, method))
        models += [m for m in study["plan"]["models"] if m not in models]
        datasets += [d for d in map(dataset_name, study["plan"]["datasets"]) if d not in datasets]
    names = list(sources)
    lines = [f"# Head to head in {', '.join(folder.name for folder in args.studies)}", "",
             "Per dataset: prompts only the row method answers right / only the column method, pooled over seeds, "
             "and the exact McNemar p; **bold**: p < 0.05.", ""]
    rows = []
    for model in models:
        right = {(d, name): correctness(folder, study, done, model, d, method)
                 for d in datasets for name, (folder, study, done, method) in sources.items()}
        for first, second in itertools.combinations(names, 2):
            if "vanilla" in (first, second):
                continue  # against vanilla: Table 1
            lines += [f"## {model}: {first} vs {second}", "", "| Dataset | " + first + " only | " + second
                      + " only | seeds | p |", "|---|---|---|---|---|"]
            for dataset in datasets:
                result = compare(right[dataset, first], right[dataset, second])
                if result is None:
                    continue
                a, b, n = result
                p = mcnemar_exact(a, b)
                cell = f"{p:.3f}" if p >= 0.001 else "<0.001"
                lines.append(f"| {display(dataset)} | {a} | {b} | {n} | {f'**{cell}**' if p < 0.05 else cell} |")
                rows.append({"model": model, "dataset": dataset, "first": first, "second": second,
                             "first_only": a, "second_only": b, "seeds": n, "p": p})
            lines.append("")
    write_outputs(args.output, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
