"""What every command shares: model arguments, dtype and device choices, integer checks, the printed table, and
the one mapping from the library's option names to the command line's flags (:func:`cli_message`)."""

from __future__ import annotations

import argparse
import re

import torch

from abft_lens.arguments import resolve_device
from abft_lens.backends.cpu import auto_dtype
from abft_lens.errors import AbftLensError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_CHOICES = sorted(DTYPES) + ["auto"]
DTYPE_HELP = "auto: bfloat16 on CUDA or on a CPU with native bfloat16 matmuls (AVX512-BF16, AMX), else float32"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (embedded default), gemma3-270m, qwen2.5-coder-0.5b, tiny, a HF folder, "
                             "a .gguf file or a TransformerLens name")
    parser.add_argument("--dataset", default="sst2", help="StaICC index 0-9 or name (sst2, mr, ...), or a .csv/.jsonl file")
    parser.add_argument("--k", type=positive_int, default=4, help="demonstrations per prompt")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else CPU (torchrun ranks use cuda:LOCAL_RANK under NCCL)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass in evaluation")


def resolve_dtype(args: argparse.Namespace) -> str | None:
    """``--dtype auto`` -> the dtype :func:`abft_lens.backends.cpu.auto_dtype` picks for ``--device``, written
    back to ``args.dtype`` (so everything downstream sees a real dtype) with the reason in ``args.dtype_reason``;
    returns the reason (None when a dtype was given). ``--quantized`` keeps float32 (its base computes in its own
    dtype)."""
    if args.dtype != "auto":
        return getattr(args, "dtype_reason", None)
    if getattr(args, "quantized", False):
        args.dtype, args.dtype_reason = "float32", "--dtype auto with --quantized: float32 (the 4-bit base's own compute)"
    else:
        args.dtype, args.dtype_reason = auto_dtype(resolve_device(args.device))
    return args.dtype_reason


def print_table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    width = max(len(name) for name, _ in rows)
    if title:
        print(title)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def flag(name: str) -> str:
    """The command line's flag for the library's option ``name`` (``train_samples`` -> ``--train-samples``): every
    option's first spelling is its Python name with ``-`` for ``_``."""
    return "--" + name.replace("_", "-")


def cli_message(error: AbftLensError) -> str:
    """``error`` as the command line says it: every option it names (:attr:`AbftLensError.names`) written as the
    flag, ``name=value`` as ``--flag value`` (a quoted string value unquoted)."""
    def rewrite(text: str) -> str:
        for name in sorted(error.names, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(name)}=('([^']*)'|[^\s,;)]+)",
                          lambda m, n=name: _flag_value(n, m), text)
            text = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w(=/])", flag(name), text)
        return text

    problem = rewrite(error.problem)
    return problem if error.fix is None else f"{problem}\n  fix: {rewrite(error.fix)}"


def _flag_value(name: str, match: re.Match) -> str:
    value = match.group(2) if match.group(2) is not None else match.group(1)
    end = "." if value.endswith(".") and match.group(2) is None else ""
    return f"{flag(name)} {value[:-1] if end else value}{end}"
