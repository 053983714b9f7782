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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else CPU (torchrun ranks use cuda:LOCAL_RANK under NCCL)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per forward pass in evaluation")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise AbftLensError("--device cuda was asked for, but torch sees no CUDA device "
                            f"(torch {torch.__version__}).", "use --device cpu, or a CUDA build of torch on a GPU machine.")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


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
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device),
                        quantized=args.quantized)
    if args.run is not None:
        from .runs import load_run

        load_run(args.run, loaded)
    if args.test_type != "Normal":
        if args.calibrated:
            raise AbftLensError("--calibrated applies to the Normal evaluation, not to --test-type "
                                f"{args.test_type}.", "drop --calibrated, or drop --test-type.")
        report = cmd_eval_robustness(args, loaded, task)
        if args.output:
            print(f"wrote {write_json(args.output, report)}")
        return 0
    start = time.perf_counter()
    if args.calibrated:
        from .robustness import calibrated_evaluate

        result = calibrated_evaluate(loaded, task, k=args.k, n_test=args.n_test, batch_size=args.batch_size,
                                     progress="eval")
    else:
        result = evaluate(loaded, task, k=args.k, n_test=args.n_test, batch_size=args.batch_size, progress="eval")
    seconds = time.perf_counter() - start
    result.info.update(model=loaded.describe(), dataset=task.describe(), seed=task.seed, dtype=args.dtype,
                       run=str(args.run) if args.run else None,
                       seconds=round(seconds, 2), prompts_per_second=round(len(result.gold) / seconds, 3))
    print_table(result.summary_rows() + [("prompts", str(len(result.gold))), ("seconds", f"{seconds:.1f}")],
                title=f"{loaded.name} on {task.name}, k={args.k}" + (", contextual calibration" if args.calibrated else ""))
    if args.output:
        print(f"wrote {write_json(args.output, result.to_dict())}")
    return 0


# -------------------------------------------------------------------------------------------- train

NOT_YET: dict[str, str] = {}  # option -> message, for options that are accepted but not built yet
QUANTIZED_LORA_R = 16  # the paper's LoRA rank on 4-bit bases


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Training options under this project's names, with the original prototype.py spellings as aliases."""
    a = parser.add_argument
    a("--method", choices=["ABFT", "E2E"], default="ABFT")
    a("--train-samples", "--train_sample_num", dest="train_samples", type=_positive_int, default=512)
    a("--epochs", "--epoch", dest="epochs", type=_positive_int, default=2)
    a("--pseudo-batch-size", "--pseudo_batch_size", dest="pseudo_batch_size", type=_positive_int, default=32)
    a("--lr", type=float, default=None, help="Adam learning rate (default 2e-5, or 1e-4 with LoRA)")
    a("--seed", "--random_seed", dest="seed", type=int, default=0)
    a("--award", "--correct_label_award", dest="award", type=float, default=1.0, help="B")
    a("--penalty", "--wrong_label_penalty", dest="penalty", type=float, default=0.5, help="A (initial)")
    a("--penalty-mode", "--self_adaption_loss", dest="penalty_mode", choices=["None", "P", "PID"], default="PID")
    a("--p-gain", "--loss_adaption_factor_for_P", dest="p_gain", type=float, default=0.03)
    a("--pid-kp", "--PID_param_P", dest="pid_kp", type=float, default=0.03)
    a("--pid-ki", "--PID_param_I", dest="pid_ki", type=float, default=0.005)
    a("--pid-kd", "--PID_param_D", dest="pid_kd", type=float, default=0.005)
    a("--threshold", type=float, default=None, help="induction filter T (default k / (k + ln n_tokens))")
    a("--restricted-gradient", "--restricted_gradient", dest="restricted_gradient", action="store_true")
    a("--lora-r", "--lora_r", dest="lora_r", type=int, default=0, help="LoRA rank on W_Q/W_K (0: full matrices)")
    a("--train-bias", dest="train_bias", action="store_true", help="also train b_Q/b_K")
    a("--validation-examples", dest="validation_examples", type=int, default=0,
      help="calibration examples held out for the validation guard (0: none)")
    a("--validation-prompts", dest="validation_prompts", type=_positive_int, default=64)
    a("--validate-every", dest="validate_every", type=int, default=0, help="steps between validations")
    a("--keep-best", dest="keep_best", action="store_true", help="end with the best validation step's weights")
    a("--n-test", dest="n_test", type=_positive_int, default=256, help="first N fixed test prompts for fore/post tests")
    a("--no-fore-test", "--no_fore_test", dest="no_fore_test", action="store_true")
    a("--no-post-test", "--no_post_test", dest="no_post_test", action="store_true")
    a("--test-type", "--test_type", dest="test_type", default="Normal",
      choices=["Normal", "TempSensitivity", "DemoSensitivity"],
      help="Normal; TempSensitivity / DemoSensitivity also write RUN_DIR/robustness.json before/after (StaICC "
           "consistency over 9 templates / 8 demonstration sets, unseen-label test, contextual bias)")
    a("--robustness-queries", dest="robustness_queries", type=_positive_int, default=None,
      help="queries of the sensitivity test (default StaICC's 100 templates / 128 demonstrations)")
    a("--dont-save-model", "--dont_save_model", dest="dont_save_model", action="store_true")
    a("--run-dir", dest="run_dir", type=Path, default=None, help="run folder (default runs/<method>-<dataset>-<time>)")
    a("--resume", action="store_true", help="continue the interrupted run in --run-dir")
    a("--checkpoint-every", dest="checkpoint_every", type=_positive_int, default=1)
    a("--quantized", action="store_true",
      help="4-bit NF4 base through TransformerBridge, trained with PEFT LoRA on W_Q/W_K (rank --lora-r, default 16)")
    a("--generalization-test", "--generalization_test", dest="generalization_test", action="store_true",
      help="also evaluate on the paper's 8 datasets before/after: RUN_DIR/generalization.json (in-domain, OOD)")
    a("--generalization-n-test", dest="generalization_n_test", type=_positive_int, default=None,
      help="test prompts per dataset for --generalization_test (default --n-test)")
    a("--calibration-test", "--calibration_test", dest="calibration_test", action="store_true",
      help="also evaluate the base model with contextual calibration (the training-free baseline) on the trained "
           "dataset, or on the 8 datasets with --generalization_test: RUN_DIR/calibration.json, the table's CC row")
    a("--MAUVE-test", "--MAUVE_test", dest="MAUVE_test", action="store_true",
      help="generation quality before/after (MAUVE, perplexity) -> RUN_DIR/generation.json; needs --MAUVE_prefix")
    a("--MAUVE-prefix", "--MAUVE_prefix", dest="MAUVE_prefix", type=Path, default=None,
      help="text file, one prefix per line (optionally prefix<TAB>true continuation)")
    a("--MAUVE-max-new-tokens", dest="MAUVE_max_new_tokens", type=_positive_int, default=32,
      help="tokens generated per prefix (greedy)")


def train_config_from_args(args: argparse.Namespace):
    from .train import TrainConfig
    from .trainable import TrainableConfig

    for name, message in NOT_YET.items():
        if getattr(args, name):
            raise AbftLensError(message + ".", "drop the option; see the README for what works today.")
    if args.lora_r < 0:
        raise AbftLensError(f"--lora_r {args.lora_r} must be >= 0.", "pass a LoRA rank (e.g. 16), or 0 for full W_Q/W_K.")
    if args.resume and args.run_dir is None:
        raise AbftLensError("--resume needs the --run-dir of the interrupted run.", "pass --run-dir RUN_DIR.")
    if args.quantized and args.train_bias:
        raise AbftLensError("--train-bias cannot be combined with --quantized (the 4-bit base trains LoRA adapters only).",
                            "drop --train-bias, or drop --quantized.")
    if args.quantized and args.lora_r == 0:
        args.lora_r = QUANTIZED_LORA_R
    lora = args.lora_r > 0
    try:
        trainable = TrainableConfig(kind="lora" if lora else "full", lora_r=args.lora_r if lora else 16,
                                    bias=args.train_bias)
    except ValueError as error:
        raise AbftLensError(str(error), "check --lora-r.") from error
    return TrainConfig(
        method=args.method, k=args.k, train_samples=args.train_samples, epochs=args.epochs,
        pseudo_batch_size=args.pseudo_batch_size, lr=args.lr if args.lr is not None else (1e-4 if lora else 2e-5),
        seed=args.seed, award=args.award, penalty=args.penalty, penalty_mode=args.penalty_mode,
        p_gain=args.p_gain, pid_kp=args.pid_kp, pid_ki=args.pid_ki, pid_kd=args.pid_kd, threshold=args.threshold,
        restricted_gradient=args.restricted_gradient, trainable=trainable,
        validation_examples=args.validation_examples, validation_prompts=args.validation_prompts,
        validate_every=args.validate_every, keep_best=args.keep_best,
    )


def mauve_test_from_args(args: argparse.Namespace):
    """The --MAUVE_test set-up (reads and checks the prefix file before any model loads), or None."""
    if args.MAUVE_test and args.MAUVE_prefix is None:
        raise AbftLensError("--MAUVE_test needs --MAUVE_prefix FILE (one prefix per line).", "pass --MAUVE_prefix.")
    if args.MAUVE_test and args.quantized:
        raise AbftLensError("--MAUVE_test cannot run on a 4-bit (--quantized) base: generation needs the "
                            "HookedTransformer's KV cache.", "drop --MAUVE_test, or drop --quantized.")
    if args.MAUVE_prefix is not None and not args.MAUVE_test:
        raise AbftLensError("--MAUVE_prefix is used only with --MAUVE_test.", "add --MAUVE_test, or drop it.")
    if not args.MAUVE_test:
        return None
    from .generation import MauveTest

    return MauveTest(args.MAUVE_prefix, max_new_tokens=args.MAUVE_max_new_tokens)


def run_extras_from_args(args: argparse.Namespace, task, config, run_dir: Path):
    """The --test_type / --generalization_test / --calibration-test evaluations of a run, or None (see
    generalization.RunExtras)."""
    if args.test_type == "Normal" and not args.generalization_test and not args.calibration_test:
        return None
    from .generalization import RunExtras

    return RunExtras(task=task, run_dir=Path(run_dir), k=config.k, test_type=args.test_type,
                     generalization=args.generalization_test, calibration=args.calibration_test,
                     robustness_queries=args.robustness_queries,
                     robustness_n_test=args.n_test, generalization_n_test=args.generalization_n_test or args.n_test,
                     batch_size=args.batch_size, resume=args.resume)


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import init_from_env, training_device
    from .models import load_model
    from .runs import run_training
    from .tasks import load_task

    config = train_config_from_args(args)
    dist = init_from_env()  # under torchrun (WORLD_SIZE > 1): data parallel, gloo on CPU, NCCL on CUDA
    task = load_task(args.dataset)
    run_dir = args.run_dir or Path("runs") / f"{config.method.lower()}-{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    mauve_test = mauve_test_from_args(args)  # checks the prefix file before the model loads
    device = training_device(dist, default=resolve_device(args.device))
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=device, quantized=args.quantized)
    if mauve_test is not None:
        mauve_test.before(loaded)
    extras = run_extras_from_args(args, task, config, run_dir)
    if extras is not None:
        extras.before(loaded)
    result = run_training(
        loaded, task, config, run_dir=run_dir, n_test=args.n_test, fore_test=not args.no_fore_test,
        post_test=not args.no_post_test, save_model=not args.dont_save_model, resume=args.resume,
        checkpoint_every=args.checkpoint_every, batch_size=args.batch_size, dist=dist,
    )
    if dist is not None and not dist.is_main:
        return 0
    rows = result.summary_rows() + [("train seconds", f"{result.train_seconds:.0f}")]
    if extras is not None and (run_dir / "metrics.json").is_file():  # not after an interrupted run
        rows += extras.after(loaded)
    if mauve_test is not None and (run_dir / "metrics.json").is_file():  # not after an interrupted run
        rows += mauve_test.after(loaded, run_dir).summary_rows()
    if result.best_step is not None:
        rows.append(("best validation step", f"{result.best_step}" + (" (kept)" if config.keep_best else "")))
    print_table(rows, title=f"{config.method} on {loaded.name}, {task.name}, k={config.k}, "
                            f"{config.total_steps} steps, n_test={args.n_test}")
    print(f"run folder: {run_dir}")
    return 0


# ------------------------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report_from_run

    result = report_from_run(args.run_dir, output=args.output, n_prompts=args.n_prompts, png=args.png)
    print(f"wrote {result.html_path}")
    print(f"comparison: {result.comparison_path}" + (" (reused)" if result.reused else ""))
    if result.png_paths:
        print(f"wrote {len(result.png_paths)} PNG files to {result.png_paths[0].parent}")
    return 0


# ------------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    result = export_run(args.run_dir, args.output, peft=args.peft)
    print(f"wrote {result.output} (base {result.base_hf_dir}, {len(result.changed)} q_proj/k_proj tensors)")
    if result.adapter_dir is not None:
        print(f"PEFT adapter: {result.adapter_dir}")
    return 0


# -------------------------------------------------------------------------------------------- heads


def cmd_heads(args: argparse.Namespace) -> int:
    from .heads import head_scores
    from .io import write_json
    from .models import load_model
    from .tasks import load_task

    task = load_task(args.dataset)
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device))
    scores = head_scores(loaded, task, k=args.k, n_prompts=args.n_prompts, batch_size=args.batch_size,
                         progress=True)
    for name, other in (("induction", "label_attention"), ("label_attention", "induction")):
        rows = [(f"L{layer}H{head}", f"{name} {score:.3f}   {other} {scores[other].scores[layer, head]:.3f}")
                for layer, head, score in scores[name].top(args.top)]
        print_table(rows, title=f"top {args.top} {name} heads of {loaded.name} ({task.name}, k={args.k})")
    if args.output:
        data = {"model": loaded.describe(), "dataset": task.describe(), "k": args.k, "n_prompts": args.n_prompts,
                "scores": {name: value.to_dict() for name, value in scores.items()}}
        print(f"wrote {write_json(args.output, data)}")
    return 0


# ---------------------------------------------------------------------------------------------- mix


def cmd_mix(args: argparse.Namespace) -> int:
    from .io import read_json, write_json
    from .mixing import lambda_grid, mix_runs, run_meta
    from .models import load_model
    from .tasks import load_task

    grid = lambda_grid(args.grid_min, args.grid_max, args.grid_step)
    model = args.model or run_meta(args.run_e2e)["model"]["name"]
    run_meta(args.run_abft)
    dtype = args.dtype or read_json(args.run_e2e / "config.json")["model"].get("dtype") or "float32"
    loaded = load_model(model, dtype=DTYPES[dtype])
    task = load_task(args.dataset) if args.dataset is not None else None
    result = mix_runs(loaded, args.run_e2e, args.run_abft, task=task, k=args.k, n_test=args.n_test,
                      lambdas_e2e=grid, lambdas_abft=grid, batch_size=args.batch_size)
    best = result.best
    print(f"accuracy of θ0 + λ_E·Δ_E + λ_A·Δ_A ({result.info['task']}, n={result.info['n_test']}, "
          f"k={result.info['k']})")
    print(result.markdown())
    print(f"best: λ_E={best['lambda_e2e']:g} λ_A={best['lambda_abft']:g} accuracy {best['accuracy']:.4f}")
    if args.output:
        print(f"wrote {write_json(args.output, result.to_dict())}")
    if args.html:
        print(f"wrote {result.save_html(args.html)}")
    return 0


# -------------------------------------------------------------------------------------------- table


def cmd_table(args: argparse.Namespace) -> int:
    from .generalization import table_from_runs

    table = table_from_runs(args.run_dirs, metric=args.metric)
    text = table.render(args.format)
    if args.output:
        print(f"wrote {table.save(args.output, args.format)}")
    else:
        print(text, end="")
    return 0


def cmd_eval_robustness(args: argparse.Namespace, loaded, task) -> dict:
    """``eval --test-type TempSensitivity|DemoSensitivity``: the robustness report instead of the Normal metrics."""
    from .robustness import robustness_report

    report = robustness_report(loaded, task, args.test_type, k=args.k, n_queries=args.robustness_queries,
                               n_test=args.n_test or 256, batch_size=args.batch_size, progress=True)
    print_table([("consistency", f"{report['consistency']:.4f}")]
                + [(f"accuracy, {name.replace('_', ' ')} demos", f"{metrics['accuracy']:.4f}")
                   for name, metrics in report["unseen_label"].items()]
                + [("contextual bias entropy", f"{report['contextual_bias']['entropy']:.4f} nats")],
                title=f"{loaded.name} on {task.name}, k={args.k}, {args.test_type}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abft-lens", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="evaluate a model on a StaICC dataset (the Normal protocol)")
    add_model_arguments(evaluate)
    evaluate.add_argument("--n-test", type=_positive_int, default=None, help="first N fixed test prompts (default all 1024)")
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
    evaluate.add_argument("--robustness-queries", dest="robustness_queries", type=_positive_int, default=None,
                          help="queries of the sensitivity test (default 100 templates / 128 demonstrations)")
    evaluate.set_defaults(func=cmd_eval)

    train = commands.add_parser("train", help="fine-tune W_Q/W_K with ABFT (or the E2E baseline)")
    add_model_arguments(train)
    train.add_argument("--ICL_model_name", dest="model", help=argparse.SUPPRESS)
    train.add_argument("--ICL_dataset_index", dest="dataset", help=argparse.SUPPRESS)
    train.add_argument("--ICL_k", dest="k", type=_positive_int, help=argparse.SUPPRESS)
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    demo = commands.add_parser("demo", help="the main job: ABFT on the embedded model, SST-2, k=4, before/after")
    add_model_arguments(demo)
    add_train_arguments(demo)
    demo.set_defaults(func=cmd_train, **DEMO_DEFAULTS)

    heads = commands.add_parser("heads", help="score every head: induction, copying, attention to the labels")
    add_model_arguments(heads)
    heads.add_argument("--n-prompts", type=_positive_int, default=64, help="first N fixed test prompts")
    heads.add_argument("--top", type=_positive_int, default=10, help="heads shown per score")
    heads.add_argument("--output", type=Path, default=None, help="JSON file for every score of every head")
    heads.set_defaults(func=cmd_heads)

    report = commands.add_parser("report", help="one offline HTML page comparing a run's heads before/after training")
    report.add_argument("run_dir", type=Path, help="a run folder (from train or demo)")
    report.add_argument("--output", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    report.add_argument("--n-prompts", dest="n_prompts", type=_positive_int, default=64,
                        help="prompts for the head scores (ignored when RUN_DIR/comparison.json exists)")
    report.add_argument("--png", action="store_true", help="also export every figure as PNG (needs Chromium)")
    report.set_defaults(func=cmd_report)

    mix = commands.add_parser("mix", help="accuracy of base + λ_E·Δ_E2E + λ_A·Δ_ABFT over a λ grid (weight mixing)")
    mix.add_argument("run_e2e", type=Path, help="run folder of the E2E run")
    mix.add_argument("run_abft", type=Path, help="run folder of the ABFT run (same base model)")
    mix.add_argument("--model", default=None, help="base model (default: the one in the runs' config.json)")
    mix.add_argument("--dataset", default=None, help="dataset to evaluate on (default: the runs' dataset)")
    mix.add_argument("--k", type=_positive_int, default=None, help="demonstrations per prompt (default: the runs' k)")
    mix.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the runs' dtype")
    mix.add_argument("--batch-size", type=_positive_int, default=8)
    mix.add_argument("--n-test", type=_positive_int, default=64, help="first N fixed test prompts per grid point")
    mix.add_argument("--grid-min", type=float, default=-0.5)
    mix.add_argument("--grid-max", type=float, default=1.5)
    mix.add_argument("--grid-step", type=float, default=0.25)
    mix.add_argument("--output", type=Path, default=None, help="JSON file: grid, best point, every metric")
    mix.add_argument("--html", type=Path, default=None, help="offline HTML page: heatmap and table")
    mix.set_defaults(func=cmd_mix)

    export = commands.add_parser("export", help="write a run's tuned model as a Hugging Face folder (+ PEFT adapter)")
    export.add_argument("run_dir", type=Path, help="a run folder (from train or demo)")
    export.add_argument("--output", type=Path, required=True, help="new folder for the model (must not hold files)")
    export.add_argument("--peft", action="store_true", help="LoRA runs: also write a PEFT adapter in OUTPUT/adapter")
    export.set_defaults(func=cmd_export)
    table = commands.add_parser("table", help="aggregate run folders into a table: mean ± std over seeds")
    table.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (from train or demo)")
    table.add_argument("--format", choices=["markdown", "csv", "html"], default="markdown")
    table.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1", "mean_true_label_probability", "ece"])
    table.add_argument("--output", type=Path, default=None, help="file to write (atomically) instead of stdout")
    table.set_defaults(func=cmd_table)
    return parser


# Chosen by bench/demo_selection.py on validation prompts from held-out calibration examples (README).
DEMO_DEFAULTS = dict(train_samples=128, pseudo_batch_size=16, epochs=1, lr=5e-4, restricted_gradient=True,
                     validation_examples=256, validation_prompts=64, validate_every=2, keep_best=True, n_test=256)


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
