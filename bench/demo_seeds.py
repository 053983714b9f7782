"""The demo over training seeds: how much of ABFT's gain on SmolLM2 survives a change of seed.

Runs ``abft-lens demo --seed S --run-dir RUNS/demo-seedS`` for each seed (skipped when the run folder is
complete; ``--reuse DIR`` adds an existing run, e.g. the README's seed-0 demo), then reads each run folder:
accuracy before/after on the same 256 test prompts, gained/lost prompts with an exact McNemar p, the kept
step and the validation curve; and the mean ± std of the after-accuracy over seeds (``abft-lens table``).

    OMP_NUM_THREADS=2 .venv/bin/python bench/demo_seeds.py --seeds 1 2 3 --reuse runs/demo-1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from gemma_demo import paired

from abft_lens.io import write_json
from abft_lens.run_files import CONFIG_FILE, METRICS_FILE, is_finished, read_log, read_run_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--reuse", type=Path, nargs="*", default=[], help="completed demo run folders to include")
    parser.add_argument("--output", type=Path, default=Path("bench/results/demo_seeds.json"))
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("abft-lens"))
    run_dirs = list(args.reuse)
    for seed in args.seeds:
        run_dir = args.runs / f"demo-seed{seed}"
        if not is_finished(run_dir):
            subprocess.run([cli, "demo", "--seed", str(seed), "--run-dir", str(run_dir)], check=True)
        run_dirs.append(run_dir)
    runs = []
    for run_dir in run_dirs:
        metrics, config = read_run_json(run_dir, METRICS_FILE), read_run_json(run_dir, CONFIG_FILE)
        log = read_log(run_dir)
        runs.append({"run_dir": str(run_dir), "seed": config["train"]["seed"],
                     "before": metrics["fore"]["accuracy"], "after": metrics["post"]["accuracy"],
                     "paired": paired(run_dir), "kept_step": metrics.get("best_validation_step"),
                     "validation_accuracy": [line["accuracy"] for line in log if line.get("event") == "validation"]})
        print(runs[-1]["seed"], runs[-1]["before"], "->", runs[-1]["after"], runs[-1]["paired"])
    after = [run["after"] for run in runs]
    table = subprocess.run([cli, "table", *map(str, run_dirs)], capture_output=True, text=True, check=True).stdout
    record = {"runs": runs, "after_mean": statistics.mean(after), "after_std": statistics.stdev(after),
              "n_seeds": len(runs), "table": table}
    print(table)
    print(f"wrote {write_json(args.output, record)}")


if __name__ == "__main__":
    main()
