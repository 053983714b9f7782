"""What a study's trained cells did on the way, read from their run folders (no model, no test prompt re-run).

Per trained cell: test accuracy and macro-F1 before/after, the validation curve, the step the guard would keep when
it selects on accuracy and when it selects on macro-F1 (the evidence for ``--select-metric``), the heads the
induction filter passed (mean per prompt, first and last step) and the PID penalty A against the award B.
Then, over all cells: how often the two selection metrics disagree, and what each choice costs the other metric
on the validation prompts (test prompts never enter a choice).

    .venv/bin/python bench/study_diagnostics.py bench/results/study-smollm2 --output bench/results/diagnostics-smollm2.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from abft_lens.io import atomic_write_text
from abft_lens.reporting.study_folder import read_study
from abft_lens.reporting.study_tables import display

def guard_choice(validation: list[dict], metric: str) -> dict:
    """The validation record the guard keeps when it selects on ``metric`` (ties: true-label probability, then the
    earlier step), as :class:`abft_lens.training.callbacks.ValidationGuard` does."""
    return max(validation, key=lambda v: (v[metric], v["mean_true_label_probability"], -v["step"]))


def cell_diagnostics(study_dir: Path, record: dict) -> dict | None:
    run = study_dir / record["path"]
    if record["state"] != "done" or not (run / "log.jsonl").is_file():
        return None
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    validation = [e for e in events if e["event"] == "validation"]
    steps = [e for e in events if e["event"] == "step"]
    metrics = json.loads((run / "metrics.json").read_text())
    award = json.loads((run / "config.json").read_text())["train"]["award"]
    by_acc, by_f1 = guard_choice(validation, "accuracy"), guard_choice(validation, "macro_f1")
    return {
        "dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
        "test_accuracy": [metrics["fore"]["accuracy"], metrics["post"]["accuracy"]],
        "test_macro_f1": [metrics["fore"]["macro_f1"], metrics["post"]["macro_f1"]],
        "validation": [[v["step"], v["accuracy"], v["macro_f1"]] for v in validation],
        "kept_step": metrics.get("best_validation_step"),
        "step_by_accuracy": by_acc["step"], "step_by_macro_f1": by_f1["step"],
        "val_by_accuracy": [by_acc["accuracy"], by_acc["macro_f1"]],
        "val_by_macro_f1": [by_f1["accuracy"], by_f1["macro_f1"]],
        "mean_heads": [steps[0]["mean_heads"], steps[-1]["mean_heads"]] if steps else None,
        "final_penalty_A": steps[-1]["next_penalty"] if steps else None, "award_B": award,
    }


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def time_rows(study: dict) -> list[str]:
    """Wall seconds per finished cell, by method: n, mean, min, max (a baseline file copied in, under 1 s, is
    not a measurement and is left out)."""
    seconds: dict[str, list[float]] = {}
    for record in study["cells"].values():
        if record["state"] == "done" and (record.get("seconds") or 0) >= 1:
            seconds.setdefault(record["method"], []).append(record["seconds"])
    return [f"| {method} | {len(s)} | {sum(s) / len(s):.0f} | {min(s):.0f} | {max(s):.0f} |"
            for method, s in seconds.items()]


def render(rows: list[dict], study_dir: Path, study: dict) -> str:
    lines = [f"# Diagnostics of {study_dir.name}", "",
             "Per trained cell, from its run folder. Test: before → after (the kept step). Validation: accuracy / "
             "macro-F1 (%) at each validated step. Steps kept when the guard selects on accuracy (acc) or on "
             "macro-F1 (F1), with the validation accuracy / macro-F1 there. Heads: mean heads per prompt the "
             "induction filter passed at the first and last step (ABFT). A: the PID penalty after the last step "
             "(B: the run's award).", "",
             "| Dataset | Method | Seed | Test acc | Test macro-F1 | Validation curve | acc → step | F1 → step "
             "| Heads | A |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        curve = " ".join(f"{s}:{pct(a)}/{pct(f)}" for s, a, f in r["validation"])
        heads = "–" if r["method"].startswith("E2E") or not r["mean_heads"] else \
            f"{r['mean_heads'][0]:.1f} → {r['mean_heads'][1]:.1f}"
        a = "–" if r["method"].startswith("E2E") or r["final_penalty_A"] is None else f"{r['final_penalty_A']:.2f}"
        lines.append(
            f"| {display(r['dataset'])} | {r['method']} | {r['seed']} "
            f"| {pct(r['test_accuracy'][0])} → {pct(r['test_accuracy'][1])} "
            f"| {pct(r['test_macro_f1'][0])} → {pct(r['test_macro_f1'][1])} | {curve} "
            f"| {r['step_by_accuracy']} ({pct(r['val_by_accuracy'][0])}/{pct(r['val_by_accuracy'][1])}) "
            f"| {r['step_by_macro_f1']} ({pct(r['val_by_macro_f1'][0])}/{pct(r['val_by_macro_f1'][1])}) "
            f"| {heads} | {a} |")
    differ = [r for r in rows if r["step_by_accuracy"] != r["step_by_macro_f1"]]
    lines += ["", "## Selecting on accuracy or on macro-F1 (validation prompts only)", "",
              f"{len(differ)} of {len(rows)} cells keep a different step under the two metrics."]
    if differ:
        mean = lambda key, i: sum(r[key][i] for r in differ) / len(differ)  # noqa: E731
        lines += ["Where they differ, mean validation accuracy / macro-F1 of the kept step: "
                  f"selected on accuracy {pct(mean('val_by_accuracy', 0))} / {pct(mean('val_by_accuracy', 1))}, "
                  f"selected on macro-F1 {pct(mean('val_by_macro_f1', 0))} / {pct(mean('val_by_macro_f1', 1))}."]
    abft = [r for r in rows if not r["method"].startswith("E2E") and r["final_penalty_A"] is not None]
    if abft:
        above = sum(r["final_penalty_A"] > r["award_B"] for r in abft)
        lines += ["", "## The PID penalty", "",
                  f"{above} of {len(abft)} ABFT cells end with the penalty A above their award B "
                  f"(A from 0.5: mean {sum(r['final_penalty_A'] for r in abft) / len(abft):.2f} after the last step)."]
    lines += ["", "## Wall time per cell (s)", "", "| Method | cells | mean | min | max |", "|---|---|---|---|---|",
              *time_rows(study)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--output", type=Path, help="markdown file (default: print)")
    args = parser.parse_args()
    study = read_study(args.study)
    rows = [d for record in study["cells"].values() if (d := cell_diagnostics(args.study, record))]
    text = render(rows, args.study, study)
    if args.output:
        atomic_write_text(args.output, text)
        atomic_write_text(args.output.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
