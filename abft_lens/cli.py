"""``abft-lens``: a thin command line over the Python API.

Every subcommand turns :class:`~abft_lens.errors.AbftLensError` (bad input, missing resources) into one
message on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .errors import AbftLensError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (embedded default), tiny, a HF folder, a .gguf file or a TransformerLens name")
    parser.add_argument("--dataset", default="sst2", help="StaICC index 0-9 or name (sst2, mr, ...), or a .csv/.jsonl file")
    parser.add_argument("--k", type=_positive_int, default=4, help="demonstrations per prompt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per forward pass in evaluation")


def print_table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    width = max(len(name) for name, _ in rows)
    if title:
        print(title)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


# --------------------------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .io import write_json
    from .models import load_model
    from .tasks import load_task

    task = load_task(args.dataset)
    loaded = load_model(args.model, dtype=DTYPES[args.dtype])
    start = time.perf_counter()
    result = evaluate(loaded, task, k=args.k, n_test=args.n_test, batch_size=args.batch_size, progress="eval")
    seconds = time.perf_counter() - start
    result.info.update(model=loaded.describe(), dataset=task.describe(), seed=task.seed, dtype=args.dtype,
                       seconds=round(seconds, 2), prompts_per_second=round(len(result.gold) / seconds, 3))
    print_table(result.summary_rows() + [("prompts", str(len(result.gold))), ("seconds", f"{seconds:.1f}")],
                title=f"{loaded.name} on {task.name}, k={args.k}")
    if args.output:
        print(f"wrote {write_json(args.output, result.to_dict())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abft-lens", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="evaluate a model on a StaICC dataset (the Normal protocol)")
    add_model_arguments(evaluate)
    evaluate.add_argument("--n-test", type=_positive_int, default=None, help="first N fixed test prompts (default all 1024)")
    evaluate.add_argument("--output", type=Path, default=None, help="JSON file for metrics and per-prompt results")
    evaluate.set_defaults(func=cmd_eval)

    demo = commands.add_parser("demo", help="the main job: the embedded model on SST-2 (k=4)")
    add_model_arguments(demo)
    demo.add_argument("--n-test", type=_positive_int, default=128)
    demo.add_argument("--output", type=Path, default=Path("runs/demo-eval.json"))
    demo.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AbftLensError as error:
        print(f"abft-lens: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abft-lens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
