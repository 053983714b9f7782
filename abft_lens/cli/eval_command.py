"""``abft-lens eval``: the StaICC Normal evaluation (or robustness tests, or contextual calibration)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abft_lens.cli.common import (DTYPES, add_model_arguments, positive_int, print_table, resolve_device,
                                  resolve_dtype)
from abft_lens.errors import AbftLensError


def check_eval_args(args: argparse.Namespace):
    """Every check that needs no model (options, output path, the task's sizes, the --run folder); the task."""
    from abft_lens.data.tasks import load_task
    from abft_lens.evaluation.robustness import check_robustness_options
    from abft_lens.reporting.study_folder import check_output

    if args.output is not None:
        check_output(args.output)
    if args.test_type != "Normal" and args.calibrated:
        raise AbftLensError("--calibrated applies to the Normal evaluation, not to --test-type "
                            f"{args.test_type}.", "drop --calibrated, or drop --test-type.")
    if args.test_type == "Normal" and args.robustness_queries is not None:
        raise AbftLensError("--robustness-queries is used only with --test-type TempSensitivity or "
                            "DemoSensitivity; here it would be ignored.", "drop it, or add --test-type.")
    task = load_task(args.dataset)
    if args.test_type != "Normal":
        check_robustness_options(task, args.test_type, k=args.k, n_queries=args.robustness_queries,
                                 n_test=args.n_test or 256)
    else:
        task.check_test_prompts(args.k, args.n_test)
    if args.run is not None:
        from abft_lens.training.run_folder import read_run_config, read_trained

        read_run_config(args.run, trained=True)
        read_trained(args.run)  # readable and finite
    return task


def cmd_eval(args: argparse.Namespace) -> int:
    from abft_lens.evaluation.evaluator import evaluate
    from abft_lens.io import write_json
    from abft_lens.backends.loading import load_model
    from abft_lens.backends.provenance import describe_model, model_info

    task = check_eval_args(args)
    dtype_reason = resolve_dtype(args)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device),
                       quantized=args.quantized)
    if args.run is not None:
        from abft_lens.training.runs import load_run

        load_run(args.run, model)
    if args.test_type != "Normal":
        report = cmd_eval_robustness(args, model, task)
        if args.output:
            print(f"wrote {write_json(args.output, report)}")
        return 0
    start = time.perf_counter()
    if args.calibrated:
        from abft_lens.evaluation.robustness import calibrated_evaluate

        result = calibrated_evaluate(model, task, k=args.k, n_test=args.n_test, batch_size=args.batch_size,
                                     progress="eval")
    else:
        result = evaluate(model, task, k=args.k, n_test=args.n_test, batch_size=args.batch_size, progress="eval")
    seconds = time.perf_counter() - start
    result.info.update(model=describe_model(model), dataset=task.describe(), seed=task.seed, dtype=args.dtype,
                       **({"dtype_reason": dtype_reason} if dtype_reason else {}),
                       run=str(args.run) if args.run else None,
                       seconds=round(seconds, 2), prompts_per_second=round(len(result.gold) / seconds, 3))
    print_table(result.summary_rows() + [("prompts", str(len(result.gold))), ("seconds", f"{seconds:.1f}")],
                title=f"{model_info(model).name} on {task.name}, k={args.k}" + (", contextual calibration" if args.calibrated else ""))
    if args.output:
        print(f"wrote {write_json(args.output, result.to_dict())}")
    return 0


def cmd_eval_robustness(args: argparse.Namespace, model, task) -> dict:
    """``eval --test-type TempSensitivity|DemoSensitivity``: the robustness report instead of the Normal metrics."""
    from abft_lens.backends.provenance import model_info
    from abft_lens.evaluation.robustness import robustness_report

    report = robustness_report(model, task, args.test_type, k=args.k, n_queries=args.robustness_queries,
                               n_test=args.n_test or 256, batch_size=args.batch_size, progress=True)
    print_table([("consistency", f"{report['consistency']:.4f}")]
                + [(f"accuracy, {name.replace('_', ' ')} demos", f"{metrics['accuracy']:.4f}")
                   for name, metrics in report["unseen_label"].items()]
                + [("contextual bias entropy", f"{report['contextual_bias']['entropy']:.4f} nats")],
                title=f"{model_info(model).name} on {task.name}, k={args.k}, {args.test_type}")
    return report


def add_parsers(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a model on a StaICC dataset (the Normal protocol)")
    add_model_arguments(evaluate)
    evaluate.add_argument("--n-test", type=positive_int, default=None, help="first N fixed test prompts (default all 1024)")
    evaluate.add_argument("--run", type=Path, default=None, help="apply a training run's tensors to the model first")
    evaluate.add_argument("--calibrated", action="store_true",
                          help="contextual calibration (Zhao et al. 2021): divide by a content-free query's label "
                               "probabilities, renormalise (the paper's training-free baseline)")
    evaluate.add_argument("--quantized", action="store_true",
                          help="load the base in 4-bit NF4 (TransformerBridge); a --run trained on a 4-bit base also "
                               "applies to the full-precision base")
    evaluate.add_argument("--output", type=Path, default=None, help="JSON file for metrics and per-prompt results")
    evaluate.add_argument("--test-type", "--test_type", dest="test_type", default="Normal",
                          choices=["Normal", "TempSensitivity", "DemoSensitivity"],
                          help="Normal metrics, or StaICC consistency + unseen-label test + contextual bias")
    evaluate.add_argument("--robustness-queries", dest="robustness_queries", type=positive_int, default=None,
                          help="queries of the sensitivity test (default 100 templates / 128 demonstrations)")
    evaluate.set_defaults(func=cmd_eval)
