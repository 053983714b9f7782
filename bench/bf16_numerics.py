"""bfloat16 training numerics against float32 on the same prompts and weights (step 0 of the demo's setting).

SmolLM2-135M, the demo's ABFT step (restricted gradient, threshold k / (k + ln n_t)) over ``--prompts`` SST-2
training prompts in micro-batches of ``--micro-batch``, once in float32 and once under bfloat16 autocast
(``compute_dtype="bfloat16"``). Reported: the step's loss and its relative error; per tensor and overall, the
relative error of the accumulated W_Q/W_K gradient (||g_bf16 - g_fp32|| / ||g_fp32||); the filter's agreement
per (prompt, layer, head) decision and per head count. Weights do not change (the optimizer step is captured).

    .venv/bin/python bench/bf16_numerics.py --prompts 32 --output bench/results/bf16_numerics.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from abft_lens.backends.loading import load_model
from abft_lens.data.prompts import prompt_builder
from abft_lens.data.tasks import load_task
from abft_lens.io import write_json
from abft_lens.training.train import TrainConfig, Trainer


def step_zero(model, builder, compute_dtype, args):
    """(gradients, StepResult, per-prompt participating masks) of one step without moving the weights."""
    config = TrainConfig(train_samples=args.prompts, pseudo_batch_size=args.prompts, epochs=1, lr=5e-4,
                         restricted_gradient=True, micro_batch_size=args.micro_batch, compute_dtype=compute_dtype,
                         seed=args.seed)
    trainer = Trainer(model, builder, config)
    grads, masks = {}, []
    trainer.optimizer.step = lambda: grads.update(
        {name: p.grad.detach().clone() for name, p in trainer.trainable.named_parameters()})
    original = trainer._micro_batch_loss

    def recording(prompts, penalty):
        samples, participating = original(prompts, penalty)
        masks.extend(zip((p.token_ids for p in prompts), participating))
        return samples, participating

    trainer._micro_batch_loss = recording
    result = trainer.step(trainer.prompts)
    trainer.trainable.merge()
    return grads, result, dict(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/bf16_numerics.json"))
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    builder = prompt_builder(model, load_task("sst2"))
    g32, r32, m32 = step_zero(model, builder, None, args)
    g16, r16, m16 = step_zero(model, builder, "bfloat16", args)
    per_tensor = {n: float((g16[n] - g32[n]).norm() / g32[n].norm()) for n in g32 if g32[n].norm() > 0}
    overall = float(torch.cat([(g16[n] - g32[n]).flatten() for n in g32]).norm()
                    / torch.cat([g32[n].flatten() for n in g32]).norm())
    decisions = torch.stack([m16[key] == m32[key] for key in m32]).float().mean()
    counts32, counts16 = torch.tensor(r32.head_counts), torch.tensor(r16.head_counts)
    report = {
        "prompts": args.prompts, "micro_batch": args.micro_batch, "seed": args.seed,
        "loss": {"float32": r32.loss, "bfloat16": r16.loss, "relative_error": abs(r16.loss - r32.loss) / abs(r32.loss)},
        "mean_heads": {"float32": r32.mean_heads, "bfloat16": r16.mean_heads},
        "gradient_relative_error": {"overall": overall, "max_tensor": max(per_tensor.values()),
                                    "median_tensor": float(torch.tensor(list(per_tensor.values())).median())},
        "filter_decisions_agreeing": float(decisions),
        "head_counts_equal": float((counts16 == counts32).float().mean()),
        "head_count_max_abs_difference": int((counts16 - counts32).abs().max()),
    }
    print(report)
    write_json(args.output, report)


if __name__ == "__main__":
    main()
