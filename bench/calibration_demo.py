"""The training-free baseline next to a run: the run's base model with and without contextual calibration
(Zhao et al. 2021; :func:`abft_lens.evaluation.robustness.calibrated_evaluate`) on the paper's 8 datasets, first
``--n-test`` fixed test prompts each (the same prompts as ``bench/robustness_demo.py``), with the run's own
before/after accuracies from that benchmark's results when given.

    .venv/bin/python bench/calibration_demo.py runs/demo-1 --robustness bench/results/robustness_demo.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from abft_lens.evaluation.generalization import evaluate_datasets, generalization_summary
from abft_lens.io import read_json, write_json
from abft_lens.run_files import CONFIG_FILE, read_run_json
from abft_lens.backends.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--robustness", type=Path, default=None, help="bench/robustness_demo.py results of the run")
    parser.add_argument("--output", type=Path, default=Path("bench/results/calibration_demo.json"))
    args = parser.parse_args()
    meta = read_run_json(args.run_dir, CONFIG_FILE)
    trained = meta["task"]["name"]
    model = load_model(meta["model"]["name"])
    rows, seconds = {}, {}
    for name, calibrated in (("base", False), ("base_cc", True)):
        wall, cpu = time.perf_counter(), time.process_time()
        results = evaluate_datasets(model, k=meta["train"]["k"], n_test=args.n_test, calibrated=calibrated,
                                    batch_size=args.batch_size, progress=True)
        seconds[name] = {"wall": round(time.perf_counter() - wall, 1), "cpu": round(time.process_time() - cpu, 1)}
        rows[name] = {task: result.accuracy for task, result in results.items()}
    if args.robustness is not None:
        other = read_json(args.robustness)
        rows["run_before"], rows["run_after"] = other["before"]["accuracy"], other["after"]["accuracy"]
    summaries = {name: generalization_summary(accuracy, trained) for name, accuracy in rows.items()}
    write_json(args.output, {"run": str(args.run_dir), "k": meta["train"]["k"], "n_test": args.n_test,
                             "trained_dataset": trained, "accuracy": rows, "summary": summaries, "seconds": seconds,
                             "load_average_end": os.getloadavg()})
    print(f"{'':<12}" + "".join(f"{task:>7}" for task in rows["base"]) + "    avg    OOD")
    for name, accuracy in rows.items():
        print(f"{name:<12}" + "".join(f"{100 * accuracy[task]:7.1f}" for task in rows["base"])
              + f"{100 * summaries[name]['average']:7.1f}{100 * summaries[name]['out_of_domain']:7.1f}")
    print(args.output)


if __name__ == "__main__":
    main()
