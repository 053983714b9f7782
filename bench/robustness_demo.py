"""Issue-5 evaluations of one training run, before and after, on reduced sizes that fit 2 CPU cores.

Loads the run's base model, measures, applies the run's trained tensors (``load_run``), measures again:
8-dataset accuracy (first ``--n-test`` fixed test prompts each), template and demonstration consistency
(``--queries`` queries), the unseen-label test and the contextual bias (``--n-unseen`` prompts).

    .venv/bin/python bench/robustness_demo.py runs/demo-1 --output bench/results/robustness_demo.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abft_lens.evaluation.generalization import evaluate_datasets, generalization_summary
from abft_lens.io import read_json, write_json
from abft_lens.run_files import CONFIG_FILE, read_run_json
from abft_lens.backends.loading import load_model
from abft_lens.evaluation.robustness import contextual_bias, demonstration_sensitivity, template_sensitivity, unseen_label_test
from abft_lens.training.runs import load_run
from abft_lens.data.tasks import load_task


def measure(model, task, args) -> dict:
    datasets = evaluate_datasets(model, k=4, n_test=args.n_test, batch_size=args.batch_size)
    accuracy = {name: result.accuracy for name, result in datasets.items()}
    unseen = unseen_label_test(model, task, k=4, n_test=args.n_unseen, batch_size=args.batch_size)
    return {
        "accuracy": accuracy,
        "summary": generalization_summary(accuracy, task.name),
        "template_consistency": template_sensitivity(model, task, k=4, n_queries=args.queries,
                                                     batch_size=args.batch_size).consistency,
        "demonstration_consistency": demonstration_sensitivity(model, task, k=4, n_queries=args.queries,
                                                               batch_size=args.batch_size).consistency,
        "unseen_label": {name: result.accuracy for name, result in unseen.items()},
        "contextual_bias": contextual_bias(model, task, k=4, n_prompts=args.n_unseen, batch_size=args.batch_size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--n-unseen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("bench/results/robustness_demo.json"))
    args = parser.parse_args()
    meta = read_run_json(args.run_dir, CONFIG_FILE)
    task = load_task(meta["task"]["name"])
    model = load_model(meta["model"]["name"])
    start = time.perf_counter()
    before = measure(model, task, args)
    load_run(args.run_dir, model)
    after = measure(model, task, args)
    write_json(args.output, {"run": str(args.run_dir), "settings": vars(args) | {"run_dir": str(args.run_dir),
               "output": str(args.output)}, "before": before, "after": after,
               "seconds": round(time.perf_counter() - start, 1)})
    print(write_json(args.output, read_json(args.output)))


if __name__ == "__main__":
    main()
