"""Head to head: every pair of a study's methods on the same test prompts, per dataset (Table 1 compares each
method with vanilla; this answers "does ABFT beat CC?" and "where does E2E win?").

The test is Table 1's (:func:`abft_lens.reporting.study_tables.head_to_head`): per query, the change in correct
answers summed over its prompts and over the seeds both methods have (a baseline such as CC has no seed and
pairs with every seed of the other), exact sign test, Holm over the datasets of a pair. Read from the study
folders; nothing is re-run.

    .venv/bin/python bench/study_pairs.py bench/results/study-smollm2 --output bench/results/pairs-smollm2.md

More study folders after the first add their methods (a variant studied in a folder of its own, on the same
test prompts: the same k and --n-test); a method name the first folder already has is taken from the first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from abft_lens.reporting.study_folder import read_study
from abft_lens.reporting.study_tables import SIGNIFICANCE, display, head_to_head, study_tables
from study_diagnostics import write_outputs  # bench/ is the script's own folder, first on sys.path


def prompt_settings(study: dict) -> tuple:
    """(k, n_test, test type): what decides which test prompts a study's cells answered."""
    settings = study["plan"].get("settings", {})
    return int(settings.get("k", 4)), settings.get("n_test", 256), settings.get("test_type", "Normal")


def merged_results(folders: list[Path]) -> list:
    """The first folder's per-model results, with the methods of the later folders added (same prompts)."""
    first = prompt_settings(read_study(folders[0]))
    merged = study_tables(folders[0]).models
    for folder in folders[1:]:
        if prompt_settings(read_study(folder)) != first:
            raise SystemExit(f"{folder} tests other prompts than {folders[0]} (k, --n-test, --test-type).")
        for extra in study_tables(folder).models:
            target = next((m for m in merged if m.model == extra.model), None)
            if target is None:
                merged.append(extra)
                continue
            for (method, dataset), cell in extra.cells.items():
                if method not in target.methods:
                    target.cells[(method, dataset)] = cell
            target.methods += [m for m in extra.methods if m not in target.methods]
            target.datasets += [d for d in extra.datasets if d not in target.datasets]
            target.n_queries = {**extra.n_queries, **target.n_queries}
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=Path, nargs="+", metavar="study")
    parser.add_argument("--output", type=Path, help="markdown file (default: print); a .json beside it")
    args = parser.parse_args()
    lines = [f"# Head to head in {', '.join(folder.name for folder in args.studies)}", "",
             "Per dataset: queries where the first / the second method answers more prompts right, summed over "
             "the seeds both have; exact sign test and its Holm adjustment over the pair's datasets; **bold**: "
             f"Holm p < {SIGNIFICANCE}.", ""]
    rows = []
    for results in merged_results(args.studies):
        current = None
        for row in head_to_head(results):
            pair = (row["first"], row["second"])
            if pair != current:
                current = pair
                lines += ["", f"## {results.model}: {pair[0]} vs {pair[1]}", "",
                          f"| Dataset | {pair[0]} better | {pair[1]} better | seeds | p | p Holm |",
                          "|---|---|---|---|---|---|"]
            holm = f"{row['p_holm']:.3f}" if row["p_holm"] >= 0.001 else "<0.001"
            lines.append(f"| {display(row['dataset'])} | {row['first_better']} | {row['second_better']} | "
                         f"{row['seeds']} | {row['p']:.3g} | {f'**{holm}**' if row['p_holm'] < SIGNIFICANCE else holm} |")
            rows.append(row)
    write_outputs(args.output, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
