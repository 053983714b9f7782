"""Does ABFT's change of attention explain its change of answers? Per test prompt, before and after training.

ABFT raises, from the query's last token, the attention of the heads that pass the induction filter to the
demonstration labels that match the query's label, and lowers it to the others. This script trains one ABFT run
(the study's settings, all 8 steps: no validation guard, so the full effect of training is measured), and for each
of the first ``--n-test`` test prompts measures, on the untrained and on the trained model:

- the label margin: over the heads that pass the filter on that prompt *before* training (the heads ABFT trains
  on it), the mean of correct-label attention minus wrong-label attention;
- the true-label probability (softmax over the label words) and whether the prompt is answered correctly.

It then correlates the per-prompt change of the margin with the per-prompt change of the true-label probability
and of correctness (Pearson), and gives the mean margin change of the prompts gained, lost and unchanged, and per
gold label (a shift of attention toward one label word, whatever the query, shows as a margin that rises for one
label's prompts and falls for the others'). The per-prompt values are kept in the JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/attention_vs_correctness.py --dataset sst2 \
        --output bench/results/attention_vs_correctness_sst2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.backends.forward import forward_residual
from abft_lens.backends.loading import load_model
from abft_lens.data.prompts import ICLPrompt, collate, length_sorted_batches, pad_token_id, prompt_builder, test_prompts
from abft_lens.data.tasks import load_task
from abft_lens.interp.capture import capture_attention_rows
from abft_lens.interp.heads import label_masses
from abft_lens.interp.induction_filter import induction_threshold
from abft_lens.io import write_json
from abft_lens.training.runs import run_training
from abft_lens.training.train import TrainConfig


def per_prompt_attention(model, prompts: list[ICLPrompt], label_ids: list[int]) -> dict[str, Tensor]:
    """One forward pass per length-sorted batch of 8: ``probs`` [prompt, label] (softmax over the label words),
    ``label_mass`` and ``correct_mass`` [prompt, layer, head] (attention of the last row to all / to the correct
    demonstration labels), ``threshold`` [prompt] (the ABFT filter's T)."""
    n, layers, heads = len(prompts), model.cfg.n_layers, model.cfg.n_heads
    out = {"probs": torch.empty(n, len(label_ids)), "label_mass": torch.empty(n, layers, heads),
           "correct_mass": torch.empty(n, layers, heads),
           "threshold": torch.tensor([induction_threshold(p.k, p.n_tokens) for p in prompts])}
    ids = torch.tensor(label_ids)
    pad = pad_token_id(model.tokenizer)
    with torch.inference_mode():
        for chunk in length_sorted_batches([p.n_tokens for p in prompts], 8):
            batch = collate([prompts[i] for i in chunk], pad)
            with capture_attention_rows(model, detach=True) as store:
                residual = forward_residual(model, batch.tokens, batch.attention_mask)
            final = model.ln_final(residual[:, -1:, :])[:, 0]
            out["probs"][chunk] = (final @ model.W_U[:, ids] + model.b_U[ids]).float().softmax(-1)
            rows = store.stacked().float()  # [batch, layer, head, key]
            out["label_mass"][chunk], out["correct_mass"][chunk] = label_masses(rows, batch)
    return out


def label_margin(measure: dict[str, Tensor], passing: Float[Tensor, "prompt layer head"]) -> Float[Tensor, " prompt"]:
    """Mean over the ``passing`` heads of (correct − wrong) label attention, per prompt (0 where none passes)."""
    margin = 2 * measure["correct_mass"] - measure["label_mass"]
    count = passing.sum((1, 2))
    return (margin * passing).sum((1, 2)) / count.clamp_min(1)


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denominator) if denominator > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=128)
    parser.add_argument("--pseudo-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    model, task = load_model(args.model), load_task(args.dataset)
    builder = prompt_builder(model, task)
    prompts = test_prompts(builder, 4, args.n_test)
    gold = torch.tensor([p.query_label for p in prompts])
    before = per_prompt_attention(model, prompts, builder.label_token_ids)
    config = TrainConfig(method="ABFT", train_samples=args.train_samples, pseudo_batch_size=args.pseudo_batch_size,
                         epochs=1, lr=args.lr, seed=args.seed, restricted_gradient=True)
    run = run_training(model, task, config, fore_test=False, post_test=False, save_model=False, progress=False)
    run.apply_to(model)
    after = per_prompt_attention(model, prompts, builder.label_token_ids)

    passing = (before["label_mass"] > before["threshold"][:, None, None]).float()
    margin_before, margin_after = label_margin(before, passing), label_margin(after, passing)
    d_margin = margin_after - margin_before
    p_true = [m["probs"].gather(1, gold[:, None])[:, 0] for m in (before, after)]
    right = [(m["probs"].argmax(-1) == gold).float() for m in (before, after)]
    d_right = right[1] - right[0]
    groups = {"gained": d_right > 0, "lost": d_right < 0, "unchanged": d_right == 0}
    result = {
        "model": args.model, "dataset": task.name, "n_test": len(prompts), "lr": args.lr, "seed": args.seed,
        "steps": len(run.steps), "mean_passing_heads": passing.sum((1, 2)).mean().item(),
        "accuracy": [right[0].mean().item(), right[1].mean().item()],
        "mean_label_margin": [margin_before.mean().item(), margin_after.mean().item()],
        "share_margin_up": (d_margin > 0).float().mean().item(),
        "mean_true_label_probability": [p_true[0].mean().item(), p_true[1].mean().item()],
        "pearson_margin_vs_true_probability": pearson(d_margin, p_true[1] - p_true[0]),
        "pearson_margin_vs_correctness": pearson(d_margin, d_right),
        "mean_margin_change": {name: (d_margin[mask].mean().item() if mask.any() else None)
                               for name, mask in groups.items()},
        "prompts": {name: int(mask.sum()) for name, mask in groups.items()},
        # a shift toward one label word raises the margin of one gold label's prompts and lowers the others'
        "by_gold_label": {
            word: {"prompts": int(mask.sum()), "accuracy": [right[0][mask].mean().item(), right[1][mask].mean().item()],
                   "mean_margin_change": d_margin[mask].mean().item(),
                   "gained": int((d_right[mask] > 0).sum()), "lost": int((d_right[mask] < 0).sum())}
            for label, word in enumerate(task.label_words) if (mask := gold == label).any()},
        "predicted_label_share": {
            word: [(m["probs"].argmax(-1) == label).float().mean().item() for m in (before, after)]
            for label, word in enumerate(task.label_words)},
        "per_prompt": {"gold": gold.tolist(), "margin": [margin_before.tolist(), margin_after.tolist()],
                       "true_label_probability": [p_true[0].tolist(), p_true[1].tolist()],
                       "right": [right[0].tolist(), right[1].tolist()]},
    }
    if args.output:
        write_json(args.output, result)
    print(json.dumps({key: value for key, value in result.items() if key != "per_prompt"}, indent=1))


if __name__ == "__main__":
    main()
