"""What each offline model costs on this machine: load time, peak memory, evaluation and training per prompt.

Each model runs in its own child process (so its peak RSS is its own), one torch thread, on the same prompts:
the first ``--n`` SST-2 test prompts (k=4, batch 8) for evaluation and one ABFT step over ``--train`` prompts
(restricted gradient, the paper's filter) for training. CPU seconds (``time.process_time``) are reported next
to wall seconds: on the shared 2-core machines CPU time is the steadier number. The load average is recorded.

    OMP_NUM_THREADS=1 .venv/bin/python bench/model_cost.py --models smollm2-135m qwen2.5-coder-0.5b \\
        --output bench/results/model_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(model: str, n: int, train: int) -> dict:
    import torch

    from abft_lens.backends.loading import load_model
    from abft_lens.backends.provenance import model_info
    from abft_lens.data.tasks import load_task
    from abft_lens.evaluation.evaluator import evaluate
    from abft_lens.training.runs import run_training
    from abft_lens.training.train import TrainConfig

    task = load_task("sst2")
    wall, cpu = time.perf_counter(), time.process_time()
    lm = load_model(model)
    load = {"load_wall_s": time.perf_counter() - wall, "load_cpu_s": time.process_time() - cpu,
            "converted_now": model_info(lm).converted, "rss_after_load_mib": _rss_mib()}
    evaluate(lm, task, k=4, n_test=8, batch_size=8)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate(lm, task, k=4, n_test=n, batch_size=8)
    evaluation = {"eval_prompts": n, "eval_wall_s_per_prompt": (time.perf_counter() - wall) / n,
                  "eval_cpu_s_per_prompt": (time.process_time() - cpu) / n, "accuracy": result.accuracy}
    config = TrainConfig(train_samples=train, pseudo_batch_size=train, epochs=1, lr=5e-4, restricted_gradient=True)
    wall, cpu = time.perf_counter(), time.process_time()
    run = run_training(lm, task, config, fore_test=False, post_test=False, progress=False)
    training = {"train_prompts": train, "train_wall_s_per_prompt": (time.perf_counter() - wall) / train,
                "train_cpu_s_per_prompt": (time.process_time() - cpu) / train,
                "heads_passing_filter": run.steps[0]["mean_heads"]}
    return {"model": model, "threads": torch.get_num_threads(), **load, **evaluation, **training,
            "peak_rss_mib": _rss_mib(), "load_average": os.getloadavg()}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--n", type=int, default=32, help="evaluation prompts")
    parser.add_argument("--train", type=int, default=4, help="training prompts (one step)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: measure one model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n, args.train)))
        return
    rows = []
    for model in args.models:
        child = subprocess.run([sys.executable, __file__, "--one", model, "--n", str(args.n), "--train",
                                str(args.train)], check=True, capture_output=True, text=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if args.output:
        from abft_lens.io import write_json

        write_json(args.output, {"rows": rows, "argv": sys.argv[1:]})


if __name__ == "__main__":
    main()
