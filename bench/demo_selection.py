"""How the demo's settings were chosen: validation accuracy only, never the test prompts.

For each learning rate, ABFT trains the embedded model on SST-2 with the demo's shape (k=4, 128 training
prompts, 1 epoch = 8 steps of 16, PID) and the validation guard evaluates 64 prompts built only from the
last 256 calibration examples (held out from training) every 2 steps. No test prompt is evaluated.

    .venv/bin/python bench/demo_selection.py --lrs 1e-4 5e-4 1e-3 --output bench/results/demo_selection.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abft_lens.io import write_json
from abft_lens.backends.loading import load_model
from abft_lens.training.runs import run_training
from abft_lens.data.tasks import load_task
from abft_lens.training.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-samples", type=int, default=128)
    parser.add_argument("--pseudo-batch-size", type=int, default=16)
    parser.add_argument("--penalty-mode", choices=["None", "P", "PID"], default="PID")
    parser.add_argument("--restricted-gradient", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("bench/results/demo_selection.json"))
    args = parser.parse_args()
    task = load_task("sst2")
    results = []
    for seed in args.seeds:
        for lr in args.lrs:
            model = load_model("smollm2-135m")
            config = TrainConfig(train_samples=args.train_samples, pseudo_batch_size=args.pseudo_batch_size,
                                 epochs=1, lr=lr, seed=seed, penalty_mode=args.penalty_mode,
                                 restricted_gradient=args.restricted_gradient,
                                 validation_examples=256, validation_prompts=64, validate_every=2)
            start = time.perf_counter()
            run = run_training(model, task, config, fore_test=False, post_test=False, progress=False)
            results.append({"lr": lr, "seed": seed, "penalty_mode": args.penalty_mode,
                            "restricted_gradient": args.restricted_gradient, "seconds": round(time.perf_counter() - start, 1),
                            "validation": [(v["step"], v["accuracy"]) for v in run.validation],
                            "mean_heads": [s["mean_heads"] for s in run.steps],
                            "penalty": [s["next_penalty"] for s in run.steps]})
            print(results[-1], flush=True)
            write_json(args.output, results)


if __name__ == "__main__":
    main()
