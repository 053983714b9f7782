"""``abft-lens heads``: score every head (induction, copying, attention to the labels)."""

from __future__ import annotations

import argparse
from pathlib import Path

from abft_lens.cli.common import (DTYPES, add_model_arguments, positive_int, print_table, resolve_device,
                                  resolve_dtype)


def cmd_heads(args: argparse.Namespace) -> int:
    from abft_lens.interp.heads import head_scores
    from abft_lens.io import write_json
    from abft_lens.backends.loading import load_model
    from abft_lens.backends.provenance import describe_model, model_info
    from abft_lens.data.tasks import load_task
    from abft_lens.reporting.study_folder import check_output

    if args.output is not None:
        check_output(args.output)
    task = load_task(args.dataset)
    task.check_test_prompts(args.k, args.n_prompts)
    resolve_dtype(args)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device))
    scores = head_scores(model, task, k=args.k, n_prompts=args.n_prompts, batch_size=args.batch_size,
                         progress=True)
    for name, other in (("induction", "label_attention"), ("label_attention", "induction")):
        rows = [(f"L{layer}H{head}", f"{name} {score:.3f}   {other} {scores[other].scores[layer, head]:.3f}")
                for layer, head, score in scores[name].top(args.top)]
        print_table(rows, title=f"top {args.top} {name} heads of {model_info(model).name} ({task.name}, k={args.k})")
    if args.output:
        data = {"model": describe_model(model), "dataset": task.describe(), "k": args.k, "n_prompts": args.n_prompts,
                "scores": {name: value.to_dict() for name, value in scores.items()}}
        print(f"wrote {write_json(args.output, data)}")
    return 0


def add_parsers(commands) -> None:
    heads = commands.add_parser("heads", help="score every head: induction, copying, attention to the labels")
    add_model_arguments(heads)
    heads.add_argument("--n-prompts", type=positive_int, default=64, help="first N fixed test prompts")
    heads.add_argument("--top", type=positive_int, default=10, help="heads shown per score")
    heads.add_argument("--output", type=Path, default=None, help="JSON file for every score of every head")
    heads.set_defaults(func=cmd_heads)
