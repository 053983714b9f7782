"""The paper's Table 3 on our models: consistency over templates and demonstration sets, and the unseen-label
test, for the untrained model and for trained run folders of one dataset (e.g. the paper-preset study's SST-2
ABFT and E2E cells of seed 0, which keep their weights).

- template consistency: StaICC ``Template_sens``, 9 templates x ``--template-queries`` queries (paper: 100);
- demonstration consistency: StaICC ``Demo_sens``, 8 demonstration sets x ``--demo-queries`` queries (paper: 128);
  consistency = mean over queries of (largest agreeing prediction group / number of variants);
- unseen-label accuracy: the first ``--n-unseen`` test prompts with demonstrations whose labels all differ from
  the query's (the bias the paper calls "unseen label"), beside the same queries with the fixed demonstrations.

Each model state is measured once and kept in the output JSON, so an interrupted run resumes.

    .venv/bin/python bench/paper_consistency.py RUN_ABFT RUN_E2E --output bench/results/paper_consistency.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abft_lens.backends import qk
from abft_lens.backends.loading import load_model
from abft_lens.data.tasks import load_task
from abft_lens.io import atomic_write_text, read_json, write_json
from abft_lens.evaluation.robustness import demonstration_sensitivity, template_sensitivity, unseen_label_test
from abft_lens.training.runs import load_run


def measure(model, task, args) -> dict:
    start = time.perf_counter()
    templates = template_sensitivity(model, task, k=4, n_queries=args.template_queries, batch_size=args.batch_size)
    demos = demonstration_sensitivity(model, task, k=4, n_queries=args.demo_queries, batch_size=args.batch_size)
    unseen = unseen_label_test(model, task, k=4, n_test=args.n_unseen, batch_size=args.batch_size)
    return {"template_consistency": templates.consistency, "demonstration_consistency": demos.consistency,
            "unseen_label_accuracy": unseen["unseen_label"].accuracy,
            "unseen_label_macro_f1": unseen["unseen_label"].metrics["macro_f1"],
            "fixed_demonstrations_accuracy": unseen["random"].accuracy,
            "zero_shot_accuracy": unseen["zero_shot"].accuracy, "seconds": round(time.perf_counter() - start, 1)}


def markdown(data: dict) -> str:
    lines = [f"# Consistency and unseen-label test ({data['dataset']}, k=4)", "",
             f"{data['settings']['template_queries']} queries x 9 templates; {data['settings']['demo_queries']} "
             f"queries x 8 demonstration sets; {data['settings']['n_unseen']} unseen-label prompts.", "",
             "| model | template consistency | demonstration consistency | unseen-label acc. | fixed-demo acc. |",
             "|---|---|---|---|---|"]
    for name, row in data["states"].items():
        lines.append(f"| {name} | {100 * row['template_consistency']:.1f} | {100 * row['demonstration_consistency']:.1f}"
                     f" | {100 * row['unseen_label_accuracy']:.1f} | {100 * row['fixed_demonstrations_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--template-queries", type=int, default=100)
    parser.add_argument("--demo-queries", type=int, default=128)
    parser.add_argument("--n-unseen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("bench/results/paper_consistency.json"))
    args = parser.parse_args()
    metas = [read_json(run / "config.json") for run in args.run_dirs]
    names = {meta["task"]["name"] for meta in metas}
    if len(names) != 1:
        raise SystemExit(f"the run folders were trained on different datasets: {sorted(names)}")
    task = load_task(names.pop())
    settings = {key: getattr(args, key) for key in ("template_queries", "demo_queries", "n_unseen")}
    data = read_json(args.output) if args.output.is_file() else {}
    if data.get("settings") != settings:
        data = {"dataset": task.name, "model": metas[0]["model"]["name"], "settings": settings, "states": {}}
    model = load_model(metas[0]["model"]["name"])
    base = qk.snapshot(model)
    for name, run in [("vanilla", None)] + [(f"{meta['train']['method']} ({run.parent.name}/{run.name})", run)
                                            for meta, run in zip(metas, args.run_dirs)]:
        if name in data["states"]:
            continue
        if run is not None:
            load_run(run, model)
        data["states"][name] = measure(model, task, args)
        qk.restore(model, base)
        write_json(args.output, data)
    atomic_write_text(args.output.with_suffix(".md"), markdown(data))
    print(markdown(data), end="")


if __name__ == "__main__":
    main()
