"""bfloat16 training numerics against float32: one step on the same weights, and a demo-size run end to end.

Step 0 (the demo's setting): SmolLM2-135M, the demo's ABFT step (restricted gradient, threshold k / (k + ln n_t))
over ``--prompts`` SST-2 training prompts in micro-batches of ``--micro-batch``, once in float32 and once under
bfloat16 autocast (``compute_dtype="bfloat16"``). Reported: the step's loss and its relative error; per tensor
and overall, the relative error of the accumulated W_Q/W_K gradient (||g_bf16 - g_fp32|| / ||g_fp32||); the
filter's agreement per (prompt, layer, head) decision and per head count. Weights do not change (the optimizer
step is captured).

The run (:func:`abft_lens.training.dtype_check.compare_bf16`; skipped with ``--no-run``): the demo's training
(``--run-prompts`` prompts, 8 steps of 16 by default, lr 5e-4, restricted gradient; no validation guard, the last
step is compared) in float32 and in bfloat16 from the same base: per-step losses, filter decisions at step 0
and at the end, the trained tensors' relative difference (to the weights and to the float32 update), and test
predictions agreement and accuracies on ``--n-test`` test prompts (both evaluated in float32).

    .venv/bin/python bench/bf16_numerics.py --prompts 32 --output bench/results/bf16_numerics.json
    .venv/bin/python bench/bf16_numerics.py --model tiny --threshold 0.03 --prompts 4 --run-prompts 16 \
        --n-test 8 --output /tmp/bf16_tiny.json  # a check that it works, in seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from abft_lens.backends.cpu import native_bf16
from abft_lens.backends.loading import load_model
from abft_lens.data.prompts import prompt_builder
from abft_lens.data.tasks import load_task
from abft_lens.io import write_json
from abft_lens.training.dtype_check import compare_bf16
from abft_lens.training.train import TrainConfig, Trainer


def step_zero(model, builder, compute_dtype, args):
    """(gradients, StepResult, filter decisions [prompt, layer, head]) of one step without moving the weights."""
    config = TrainConfig(train_samples=args.prompts, pseudo_batch_size=args.prompts, epochs=1, lr=5e-4,
                         restricted_gradient=True, micro_batch_size=args.micro_batch, compute_dtype=compute_dtype,
                         seed=args.seed, threshold=args.threshold)
    trainer = Trainer(model, builder, config)
    grads = {}
    trainer.optimizer.step = lambda: grads.update(
        {name: p.grad.detach().clone() for name, p in trainer.trainable.named_parameters()})
    decisions = trainer.filter_decisions(trainer.prompts)
    result = trainer.step(trainer.prompts)
    trainer.trainable.merge()
    return grads, result, decisions


def step_report(model, builder, args) -> dict:
    g32, r32, m32 = step_zero(model, builder, None, args)
    g16, r16, m16 = step_zero(model, builder, "bfloat16", args)
    per_tensor = {n: float((g16[n] - g32[n]).norm() / g32[n].norm()) for n in g32 if g32[n].norm() > 0}
    overall = float(torch.cat([(g16[n] - g32[n]).flatten() for n in g32]).norm()
                    / torch.cat([g32[n].flatten() for n in g32]).norm())
    counts32, counts16 = torch.tensor(r32.head_counts), torch.tensor(r16.head_counts)
    return {
        "prompts": args.prompts, "micro_batch": args.micro_batch, "seed": args.seed,
        "loss": {"float32": r32.loss, "bfloat16": r16.loss, "relative_error": abs(r16.loss - r32.loss) / max(abs(r32.loss), 1e-12)},
        "mean_heads": {"float32": r32.mean_heads, "bfloat16": r16.mean_heads},
        "gradient_relative_error": {"overall": overall, "max_tensor": max(per_tensor.values()),
                                    "median_tensor": float(torch.tensor(list(per_tensor.values())).median())},
        "filter_decisions_agreeing": float((m16 == m32).float().mean()),
        "head_counts_equal": float((counts16 == counts32).float().mean()),
        "head_count_max_abs_difference": int((counts16 - counts32).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=None, help="filter T (default k / (k + ln n_t))")
    parser.add_argument("--no-run", action="store_true", help="only the step-0 comparison")
    parser.add_argument("--run-prompts", type=int, default=128, help="training prompts of the run (16 per step)")
    parser.add_argument("--n-test", type=int, default=256, help="test prompts of the run")
    parser.add_argument("--output", type=Path, default=Path("bench/results/bf16_numerics.json"))
    args = parser.parse_args()
    task = load_task("sst2")
    model = load_model(args.model)
    report = {"model": args.model, "native_bf16": native_bf16(), "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "step_0": step_report(model, prompt_builder(model, task), args)}
    print(json.dumps(report["step_0"], indent=1))
    if not args.no_run:
        config = TrainConfig(train_samples=args.run_prompts, pseudo_batch_size=16, epochs=1, lr=5e-4,
                             restricted_gradient=True, micro_batch_size=args.micro_batch, seed=args.seed,
                             threshold=args.threshold)
        report["run"] = {"config": config.to_dict(), "n_test": args.n_test,
                         **compare_bf16(lambda: load_model(args.model), task, config, n_test=args.n_test)}
        run = report["run"]
        print(f"run, {run['steps']} steps: loss within {run['loss']['max_relative_difference']:.2%}; filter "
              f"decisions agree {run['filter_decisions']['agree_step_0']:.4f} (step 0), "
              f"{run['filter_decisions']['agree_end']:.4f} (end); trained tensors apart "
              f"{run['trained']['relative_to_weights']:.2e} of the weights, "
              f"{run['trained']['relative_to_update']:.2%} of the float32 update; test predictions "
              f"{run['test']['predictions_agree']}/{run['test']['prompts']} equal, accuracy "
              + ", ".join(f"{k} {v:.4f}" for k, v in run["test"]["accuracy"].items()))
    write_json(args.output, report)


if __name__ == "__main__":
    main()
