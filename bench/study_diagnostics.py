"""What a study's trained cells did on the way, read from their run folders (no model, no test prompt re-run).

Per trained cell: test accuracy and macro-F1 before/after, the validation curve, the step the guard would keep when
it selects on accuracy and when it selects on macro-F1 (the evidence for ``--select-metric``), the heads the
induction filter passed (mean per prompt, first and last step) and the PID penalty A against the award B.
Then, over all cells: how often the two selection metrics disagree, and what each choice costs the other metric
on the validation prompts (test prompts never enter a choice); and what the significance gate (``--select-max-p
0.05``, ours) would have kept: exactly where the log holds the per-step gained/lost counts against step 0, else
from the validation accuracies alone, which prove that the gate keeps the base when no step is right on enough
more prompts for any split of them to reach p < 0.05 (d more prompts at best d gained / 0 lost, p = 2^(1-d)).

    .venv/bin/python bench/study_diagnostics.py bench/results/study-smollm2 --output bench/results/diagnostics-smollm2.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from abft_lens.evaluation.metrics import mcnemar_exact
from abft_lens.io import atomic_write_text
from abft_lens.reporting.study_folder import read_study
from abft_lens.reporting.study_tables import display
from abft_lens.run_files import CONFIG_FILE, LOG_FILE, METRICS_FILE, read_log, read_run_json

def guard_choice(validation: list[dict], metric: str) -> dict:
    """The validation record the guard keeps when it selects on ``metric`` (ties: true-label probability, then the
    earlier step), as :class:`abft_lens.training.callbacks.ValidationGuard` does."""
    return max(validation, key=lambda v: (v[metric], v["mean_true_label_probability"], -v["step"]))


def gate_choice(validation: list[dict], n_prompts: int, metric: str, max_p: float = 0.05) -> int | None:
    """The step ``--select-max-p max_p`` keeps: 0 when no step can have gained significantly, the best eligible
    step when the log counts gained/lost, None when the accuracies alone cannot tell."""
    base = validation[0]
    eligible, unknown = [base], False
    for record in validation[1:]:
        if "gained_vs_base" in record:
            if record["gained_vs_base"] > record["lost_vs_base"] and record["p_vs_base"] < max_p:
                eligible.append(record)
            continue
        net = round((record["accuracy"] - base["accuracy"]) * n_prompts)
        unknown = unknown or (net >= 1 and mcnemar_exact(net, 0) < max_p)
    return None if unknown else guard_choice(eligible, metric)["step"]


def cell_diagnostics(study_dir: Path, record: dict) -> dict | None:
    run = study_dir / record["path"]
    if record["state"] != "done" or not (run / LOG_FILE).is_file():
        return None
    events = read_log(run)
    validation = [e for e in events if e["event"] == "validation"]
    steps = [e for e in events if e["event"] == "step"]
    metrics = read_run_json(run, METRICS_FILE)
    train = read_run_json(run, CONFIG_FILE)["train"]
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
        "final_penalty_A": steps[-1]["next_penalty"] if steps else None, "award_B": train["award"],
        "step_by_gate": gate_choice(validation, train["validation_prompts"], train.get("select_metric", "accuracy")),
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
             "(B: the run's award). Gate: the step `--select-max-p 0.05` keeps (? where the log cannot tell).", "",
             "| Dataset | Method | Seed | Test acc | Test macro-F1 | Validation curve | acc → step | F1 → step "
             "| Heads | A | Gate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
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
            f"| {heads} | {a} | {'?' if r['step_by_gate'] is None else r['step_by_gate']} |")
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
    lines += ["", "## The significance gate (`--select-max-p 0.05`, ours), from the validation prompts", "",
              *gate_summary(rows)]
    lines += ["", "## Wall time per cell (s)", "", "| Method | cells | mean | min | max |", "|---|---|---|---|---|",
              *time_rows(study)]
    return "\n".join(lines) + "\n"


def gate_summary(rows: list[dict]) -> list[str]:
    """Where the gate would have kept the base instead of a trained step: the test change it would undo."""
    undone = [r for r in rows if r["step_by_gate"] == 0 and r["kept_step"] not in (0, None)]
    unknown = sum(r["step_by_gate"] is None for r in rows)
    text = [f"Of {len(rows)} trained cells, the gate keeps the base on {sum(r['step_by_gate'] == 0 for r in rows)} "
            f"(the guard kept a trained step on {len(undone)} of them), a trained step on "
            f"{sum(r['step_by_gate'] not in (0, None) for r in rows)}, and on {unknown} the log cannot tell."]
    if undone:
        changes = [(r["test_accuracy"][0] - r["test_accuracy"][1], r["test_macro_f1"][0] - r["test_macro_f1"][1])
                   for r in undone]
        text += ["Where it keeps the base over a trained step, test accuracy / macro-F1 change by (gate − kept): "
                 + ", ".join(f"{display(r['dataset'])} {r['method']} s{r['seed']} {100 * a:+.1f} / {100 * f:+.1f}"
                             for r, (a, f) in zip(undone, changes))
                 + f"; mean {100 * sum(a for a, _ in changes) / len(changes):+.1f} / "
                   f"{100 * sum(f for _, f in changes) / len(changes):+.1f}."]
    return text


def write_outputs(output: Path | None, text: str, rows: list[dict]) -> None:
    """``text`` to ``output`` (markdown) and ``rows`` to the .json beside it, atomically; printed without one."""
    if output:
        atomic_write_text(output, text)
        atomic_write_text(output.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    else:
        print(text, end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--output", type=Path, help="markdown file (default: print)")
    args = parser.parse_args()
    study = read_study(args.study)
    rows = [d for record in study["cells"].values() if (d := cell_diagnostics(args.study, record))]
    write_outputs(args.output, render(rows, args.study, study), rows)


if __name__ == "__main__":
    main()
