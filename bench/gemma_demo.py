"""The demo on the second architecture: ABFT on Gemma-3-270m, SST-2, k=4, with the embedded demo's settings.

Runs ``abft-lens demo --model gemma3-270m --run-dir RUN_DIR`` (128 training prompts, 8 steps of 16, lr 5e-4,
restricted gradient, validation guard on 64 prompts from 256 held-out calibration examples every 2 steps,
keep-best, 256 test prompts) under ``/usr/bin/time -v`` for its wall time and peak RSS, then reads the run
folder: accuracy before/after, prompts gained/lost and an exact (binomial) McNemar p-value on the paired
predictions, the validation curve and head counts. Afterwards, in this process, the base model's 0-shot
accuracy on the same 256 queries (no demonstrations), for comparison with its k=4 accuracy.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/gemma_demo.py

``--reuse`` skips training and reads an existing run folder (wall time and RSS are then not measured).
``--last-step`` trains the same run without the keep-best guard (``abft-lens train`` with the demo's settings
spelled out, no ``--keep-best``): same seed, so the same trajectory, ending with the weights of step 8.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/gemma_demo.py --last-step --no-zero-shot \
        --run-dir runs/gemma-last-step --output bench/results/gemma_demo_last_step.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from abft_lens.io import write_json
from abft_lens.run_files import CONFIG_FILE, FORE_TEST_FILE, METRICS_FILE, POST_TEST_FILE, read_log, read_run_json
from abft_lens.evaluation.paired import correct
from abft_lens.evaluation.paired import paired as paired_change


def paired(run_dir: Path) -> dict:
    fore = read_run_json(run_dir, FORE_TEST_FILE)["per_prompt"]
    post = read_run_json(run_dir, POST_TEST_FILE)["per_prompt"]
    assert len(fore) == len(post) and all(a["gold"] == b["gold"] for a, b in zip(fore, post))
    change = paired_change(correct(fore), correct(post))
    return {"n": len(fore), "gained": change.gained, "lost": change.lost, "mcnemar_exact_p": change.p_value,
            "changed_predictions": sum(p["prediction"] != q["prediction"] for p, q in zip(fore, post))}


def time_v(stderr: str) -> dict:
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    user = re.search(r"User time \(seconds\): (\S+)", stderr)
    system = re.search(r"System time \(seconds\): (\S+)", stderr)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.group(1).split(":")))) if wall else None
    return {"wall_seconds": seconds, "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "cpu_seconds": round(float(user.group(1)) + float(system.group(1)), 1) if user and system else None}


def zero_shot(n_test: int, batch_size: int) -> dict:
    from abft_lens.evaluation.evaluator import evaluate_prompts
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.backends.loading import load_model
    from abft_lens.evaluation.robustness import zero_shot_prompts
    from abft_lens.data.tasks import load_task

    model = load_model("gemma3-270m")
    task = load_task("sst2")
    builder = prompt_builder(model, task)
    start = time.perf_counter()
    result = evaluate_prompts(model, builder, zero_shot_prompts(builder, n_test), batch_size=batch_size)
    return {"n": n_test, "metrics": result.metrics, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/gemma-demo"))
    parser.add_argument("--output", type=Path, default=Path("bench/results/gemma_demo.json"))
    parser.add_argument("--reuse", action="store_true", help="read an existing run folder instead of training")
    parser.add_argument("--no-zero-shot", action="store_true")
    parser.add_argument("--last-step", action="store_true", help="no keep-best: end with the last step's weights")
    args = parser.parse_args()

    cli = str(Path(sys.executable).with_name("abft-lens"))
    command = [cli, "demo", "--model", "gemma3-270m", "--run-dir", str(args.run_dir)]
    if args.last_step:  # DEMO_DEFAULTS of abft_lens/cli/train_command.py without keep_best
        command = [cli, "train", "--model", "gemma3-270m", "--dataset", "sst2", "--k", "4", "--train-samples", "128",
                   "--pseudo-batch-size", "16", "--epochs", "1", "--lr", "5e-4", "--restricted-gradient",
                   "--validation-examples", "256", "--validation-prompts", "64", "--validate-every", "2",
                   "--n-test", "256", "--run-dir", str(args.run_dir)]
    record: dict = {"command": " ".join(["abft-lens"] + command[1:]),
                    "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0),
                                    "cpus": os.cpu_count()}}
    if not args.reuse:
        load_before = os.getloadavg()
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        sys.stdout.write(done.stdout)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(done.returncode)
        record["process"] = time_v(done.stderr) | {"load_average_before": load_before,
                                                   "load_average_after": os.getloadavg()}
        record["stdout"] = done.stdout.splitlines()

    metrics = read_run_json(args.run_dir, METRICS_FILE)
    config = read_run_json(args.run_dir, CONFIG_FILE)
    log = read_log(args.run_dir)
    steps = [line for line in log if line.get("event") == "step"]
    record |= {
        "run_dir": str(args.run_dir),
        "config": config,
        "before": metrics["fore"], "after": metrics["post"],
        "paired": paired(args.run_dir),
        "train_seconds": metrics.get("train_seconds"),
        "best_validation_step": metrics.get("best_validation_step"), "kept_best": metrics.get("kept_best"),
        "validation_accuracy": {line["step"]: line["accuracy"] for line in log if line.get("event") == "validation"},
        "mean_heads_per_step": [round(line["mean_heads"], 3) for line in steps],
        "penalty_per_step": [round(line["penalty"], 4) for line in steps],
    }
    if not args.no_zero_shot:
        record["zero_shot_base"] = zero_shot(metrics.get("n_test") or record["paired"]["n"], batch_size=8)
    print(f"wrote {write_json(args.output, record)}")


if __name__ == "__main__":
    main()
