"""Choosing the study's training settings per model on validation prompts only (never test prompts).

For each (dataset, method, lr, restricted gradient) of a small grid, the model is trained with the study's
shape (k=4, 128 training prompts, 1 epoch = 8 steps of 16, PID for ABFT) and the validation guard evaluates 64
prompts built only from the last 256 calibration examples (held out from training) every 2 steps. No test
prompt is evaluated. Results are appended to the JSON file as each run finishes; a rerun skips finished runs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/hparam_selection.py --model smollm2-135m --datasets fp trec \
        --output bench/results/selection_smollm2.json

``--grid`` replaces the default grid (``ABFT:1e-4`` = restricted gradient, ``ABFT:1e-4:all`` = every head);
``--validation-*`` match the validation of the study the choice is for (Qwen's study: 128 / 32 / every 4):

    OMP_NUM_THREADS=1 .venv/bin/python bench/hparam_selection.py --model qwen2.5-coder-0.5b --datasets sst2 mr fp \
        --grid ABFT:1e-4 --validation-examples 128 --validation-prompts 32 --validate-every 4 \
        --output bench/results/selection_qwen.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from abft_lens.backends.loading import load_model
from abft_lens.data.tasks import load_task
from abft_lens.io import write_json
from abft_lens.training.runs import run_training
from abft_lens.training.train import TrainConfig

# (method, lr, restricted gradient), most informative first: a rerun with fewer minutes still answers the
# main question (which ABFT lr, and E2E's lr) before the unrestricted variants.
GRID = [("ABFT", 1e-4, True), ("ABFT", 5e-4, True), ("ABFT", 1e-3, True), ("E2E", 1e-4, False),
        ("ABFT", 5e-4, False), ("E2E", 5e-4, False), ("ABFT", 1e-4, False), ("ABFT", 1e-3, False)]


def grid_entry(text: str) -> tuple[str, float, bool]:
    """``ABFT:5e-4`` -> ("ABFT", 5e-4, True); ``:all`` trains every head; E2E never restricts."""
    method, lr, *rest = text.split(":")
    if method not in ("ABFT", "E2E") or rest not in ([], ["all"]):
        raise argparse.ArgumentTypeError(f"{text!r}: use METHOD:LR or METHOD:LR:all, METHOD ABFT or E2E")
    return method, float(lr), method == "ABFT" and not rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--datasets", nargs="+", default=["fp", "trec"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/selection_smollm2.json"))
    parser.add_argument("--grid", nargs="+", type=grid_entry, help="METHOD:LR[:all] entries (default: GRID)")
    parser.add_argument("--validation-examples", type=int, default=256)
    parser.add_argument("--validation-prompts", type=int, default=64)
    parser.add_argument("--validate-every", type=int, default=2)
    args = parser.parse_args()
    results = json.loads(args.output.read_text()) if args.output.is_file() else []
    done = {(r["dataset"], r["method"], r["lr"], r["restricted_gradient"]) for r in results}
    for dataset in args.datasets:
        task = load_task(dataset)
        for method, lr, restricted in args.grid or GRID:
            if (task.name, method, lr, restricted) in done:
                continue
            model = load_model(args.model)  # a fresh base for every run
            config = TrainConfig(method=method, train_samples=128, pseudo_batch_size=16, epochs=1, lr=lr,
                                 seed=args.seed, restricted_gradient=restricted,
                                 validation_examples=args.validation_examples,
                                 validation_prompts=args.validation_prompts, validate_every=args.validate_every)
            start = time.perf_counter()
            run = run_training(model, task, config, fore_test=False, post_test=False, progress=False)
            results.append({
                "model": args.model, "dataset": task.name, "method": method, "lr": lr,
                "restricted_gradient": restricted, "seed": args.seed, "seconds": round(time.perf_counter() - start, 1),
                "validation_setup": {"examples": args.validation_examples, "prompts": args.validation_prompts,
                                     "every": args.validate_every},
                "validation": [{k: v[k] for k in ("step", "accuracy", "macro_f1", "mean_true_label_probability")}
                               for v in run.validation],
                "mean_heads": [s["mean_heads"] for s in run.steps],
                "penalty": [s["next_penalty"] for s in run.steps]})
            write_json(args.output, results)


if __name__ == "__main__":
    main()
