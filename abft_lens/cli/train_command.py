"""``abft-lens train`` and ``abft-lens demo``: ABFT or E2E training with fore/post tests and a run folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abft_lens.cli.common import (DTYPES, add_model_arguments, positive_int, print_table, resolve_device,
                                  resolve_dtype)
from abft_lens.errors import AbftLensError
from abft_lens.training.presets import DEFAULT_N_TEST, PRESETS


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Training options under this project's names, with the original prototype.py spellings as aliases.

    Options that only some settings use default to None, so "was it given" is known (an option the other
    settings would ignore is refused, never silently dropped); the TrainConfig default applies otherwise.
    """
    a = parser.add_argument
    a("--preset", choices=sorted(PRESETS), default=None,
      help="a named regime: " + "; ".join(f"{p.name}: {p.about}" for p in PRESETS.values())
           + ". Options it fixes may not be given other values")
    a("--method", choices=["ABFT", "E2E"], default="ABFT")
    a("--train-samples", "--train_sample_num", dest="train_samples", type=positive_int, default=None,
      help="training prompts (default 512)")
    a("--epochs", "--epoch", dest="epochs", type=positive_int, default=None, help="(default 2)")
    a("--pseudo-batch-size", "--pseudo_batch_size", dest="pseudo_batch_size", type=positive_int, default=None,
      help="prompts per optimizer step (default 32)")
    a("--micro-batch-size", dest="micro_batch_size", type=positive_int, default=None,
      help="prompts per forward pass in training (1: one at a time; default: on CPU the most whose estimated peak "
           "memory stays within 1.3x a one-prompt step's, on CUDA the whole pseudo-batch; config.json's 'resolved' "
           "says which and why). Results equal the per-sample loop's; --dtype bfloat16 trains with bfloat16 "
           "autocast and float32 weights and Adam state; --dtype auto picks bfloat16 where it is native")
    a("--lr", type=float, default=None, help="Adam learning rate (default 2e-5, or 1e-4 with LoRA)")
    a("--seed", "--random_seed", dest="seed", type=int, default=0)
    _objective_arguments(parser)
    _guard_arguments(parser)
    _run_arguments(parser)


def _objective_arguments(parser: argparse.ArgumentParser) -> None:
    """The loss, the penalty controller, the induction filter and the trainable set."""
    a = parser.add_argument
    a("--award", "--correct_label_award", dest="award", type=float, default=None, help="B (default 1.0; ABFT only)")
    a("--penalty", "--wrong_label_penalty", dest="penalty", type=float, default=None,
      help="A, initial (default 0.5; ABFT only)")
    a("--penalty-mode", "--self_adaption_loss", dest="penalty_mode", choices=["None", "P", "PID"], default=None,
      help="self-adaptive penalty (default PID)")
    a("--p-gain", "--loss_adaption_factor_for_P", dest="p_gain", type=float, default=None,
      help="gain of --penalty-mode P (default 0.03)")
    a("--pid-kp", "--PID_param_P", dest="pid_kp", type=float, default=None, help="PID gain (default 0.03)")
    a("--pid-ki", "--PID_param_I", dest="pid_ki", type=float, default=None, help="PID gain (default 0.005)")
    a("--pid-kd", "--PID_param_D", dest="pid_kd", type=float, default=None, help="PID gain (default 0.005)")
    a("--threshold", type=float, default=None, help="induction filter T (default k / (k + ln n_tokens))")
    a("--restricted-gradient", "--restricted_gradient", dest="restricted_gradient", action="store_true",
      default=None)
    a("--lora-r", "--lora_r", dest="lora_r", type=int, default=None,
      help="LoRA rank on W_Q/W_K (0, the default: full matrices; 16 with --quantized)")
    a("--train-bias", dest="train_bias", action="store_true", help="also train b_Q/b_K")


def _guard_arguments(parser: argparse.ArgumentParser) -> None:
    """The validation guard and the training prompts' sampling."""
    a = parser.add_argument
    a("--validation-examples", dest="validation_examples", type=int, default=None,
      help="calibration examples held out for the validation guard (default 0: none)")
    a("--validation-prompts", dest="validation_prompts", type=positive_int, default=None,
      help="validation prompts built from them (default 64)")
    a("--validate-every", dest="validate_every", type=int, default=None, help="steps between validations")
    a("--keep-best", dest="keep_best", action="store_true", default=None,
      help="end with the best validation step's weights")
    a("--select-metric", dest="select_metric", choices=["accuracy", "macro_f1"], default=None,
      help="validation metric that picks the best step (default macro_f1: accuracy can pick a collapse onto the "
           "majority label)")
    a("--select-max-p", dest="select_max_p", type=float, default=None,
      help="keep a trained step only if it beats step 0 on the validation prompts by a paired exact McNemar test "
           "at p < P (ours, not the paper's; default: the plain best step)")
    a("--balance-query-labels", dest="balance_query_labels", action="store_true", default=None,
      help="training prompts whose queries take every label equally often (ours, not the paper's; default: the "
           "calibration split's label shares)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """Tests, the run folder, the 4-bit base and the extra evaluations."""
    a = parser.add_argument
    a("--n-test", dest="n_test", type=positive_int, default=None,
      help=f"first N fixed test prompts for fore/post tests (default {DEFAULT_N_TEST}; --preset paper: 1024)")
    a("--no-fore-test", "--no_fore_test", dest="no_fore_test", action="store_true")
    a("--no-post-test", "--no_post_test", dest="no_post_test", action="store_true")
    a("--test-type", "--test_type", dest="test_type", default="Normal",
      choices=["Normal", "TempSensitivity", "DemoSensitivity"],
      help="Normal; TempSensitivity / DemoSensitivity also write RUN_DIR/robustness.json before/after (StaICC "
           "consistency over 9 templates / 8 demonstration sets, unseen-label test, contextual bias)")
    a("--robustness-queries", dest="robustness_queries", type=positive_int, default=None,
      help="queries of the sensitivity test (default StaICC's 100 templates / 128 demonstrations)")
    a("--dont-save-model", "--dont_save_model", dest="dont_save_model", action="store_true")
    a("--run-dir", dest="run_dir", type=Path, default=None, help="run folder (default runs/<method>-<dataset>-<time>)")
    a("--resume", action="store_true", help="continue the interrupted run in --run-dir")
    a("--checkpoint-every", dest="checkpoint_every", type=positive_int, default=1)
    a("--quantized", action="store_true",
      help="4-bit NF4 base through TransformerBridge, trained with PEFT LoRA on W_Q/W_K (rank --lora-r, default 16)")
    a("--generalization-test", "--generalization_test", dest="generalization_test", action="store_true",
      help="also evaluate on the paper's 8 datasets before/after: RUN_DIR/generalization.json (in-domain, OOD)")
    a("--generalization-n-test", dest="generalization_n_test", type=positive_int, default=None,
      help="test prompts per dataset for --generalization_test (default --n-test)")
    a("--calibration-test", "--calibration_test", dest="calibration_test", action="store_true",
      help="also evaluate the base model with contextual calibration (the training-free baseline) on the trained "
           "dataset, or on the 8 datasets with --generalization_test: RUN_DIR/calibration.json, the table's CC row")
    a("--MAUVE-test", "--MAUVE_test", dest="MAUVE_test", action="store_true",
      help="generation quality before/after (MAUVE, perplexity) -> RUN_DIR/generation.json; needs --MAUVE_prefix")
    a("--MAUVE-prefix", "--MAUVE_prefix", dest="MAUVE_prefix", type=Path, default=None,
      help="text file, one prefix per line (optionally prefix<TAB>true continuation)")
    a("--MAUVE-max-new-tokens", dest="MAUVE_max_new_tokens", type=positive_int, default=None,
      help="tokens generated per prefix (greedy; default 32)")


def given_options(args: argparse.Namespace) -> dict:
    """The options that define a run's regime (TrainConfig fields, ``lr``, ``n_test``), where given."""
    from abft_lens.training import options

    return options.given_options(vars(args))


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options a preset fixes (``--preset``, or a command's own default preset, e.g. ``demo``):
    :func:`abft_lens.training.options.resolve_preset` on the parsed flags. Idempotent."""
    from abft_lens.training import options

    name = args.preset or getattr(args, "default_preset", None)
    resolved, args.preset, filled = options.resolve_preset(vars(args), name, strict=args.preset is not None)
    vars(args).update({key: resolved[key] for key in filled + ["n_test"]})
    args.preset_filled = sorted(set(getattr(args, "preset_filled", [])) | set(filled))
    args.default_preset = None


def train_config_from_args(args: argparse.Namespace):
    """The run's TrainConfig (:func:`abft_lens.training.options.train_config_from_options` on the flags)."""
    apply_preset(args)
    resolve_dtype(args)  # --dtype auto: bfloat16 where it is native (the demo's default stays float32)
    from abft_lens.training import options

    if args.resume and args.run_dir is None:
        raise AbftLensError("--resume needs the --run-dir of the interrupted run.", "pass --run-dir RUN_DIR.")
    return options.train_config_from_options(vars(args), filled=args.preset_filled)


def mauve_test_from_args(args: argparse.Namespace):
    """The --MAUVE_test set-up (reads and checks the prefix file before any model loads), or None."""
    from abft_lens.studies.generation_report import MauveTest
    from abft_lens.training import options

    options.check_mauve_options(vars(args))
    return MauveTest(args.MAUVE_prefix, max_new_tokens=args.MAUVE_max_new_tokens or 32) if args.MAUVE_test else None


def run_extras_from_args(args: argparse.Namespace, task, config, run_dir: Path):
    """The --test_type / --generalization_test / --calibration-test evaluations of a run, or None (see
    generalization.RunExtras)."""
    if args.test_type == "Normal" and not args.generalization_test and not args.calibration_test:
        return None
    from abft_lens.evaluation.generalization import RunExtras

    return RunExtras(task=task, run_dir=Path(run_dir), k=config.k, test_type=args.test_type,
                     generalization=args.generalization_test, calibration=args.calibration_test,
                     robustness_queries=args.robustness_queries,
                     robustness_n_test=args.n_test, generalization_n_test=args.generalization_n_test or args.n_test,
                     batch_size=args.batch_size, resume=args.resume)


def cmd_train(args: argparse.Namespace) -> int:
    from abft_lens.training.distributed import init_from_env, training_device
    from abft_lens.backends.loading import load_model
    from abft_lens.backends.provenance import model_info
    from abft_lens.training.runs import RunOptions, check_run, run_training
    from abft_lens.data.tasks import load_task

    # every check that needs no model runs first, once: nothing is loaded or written for a command that cannot run
    config = train_config_from_args(args)
    task = load_task(args.dataset)
    run_dir = args.run_dir or Path("runs") / f"{config.method.lower()}-{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = RunOptions(run_dir=run_dir, n_test=args.n_test, fore_test=not args.no_fore_test,
                         post_test=not args.no_post_test, save_model=not args.dont_save_model, resume=args.resume,
                         checkpoint_every=args.checkpoint_every, batch_size=args.batch_size,
                         dtype_reason=getattr(args, "dtype_reason", None), checked=True)
    check_run(task, config, options)  # run_training does not repeat it (checked=True)
    extras = run_extras_from_args(args, task, config, run_dir)
    if extras is not None:
        extras.check()
    mauve_test = mauve_test_from_args(args)  # reads and checks the prefix file
    dist = init_from_env()  # under torchrun (WORLD_SIZE > 1): data parallel, gloo on CPU, NCCL on CUDA
    device = training_device(dist, default=resolve_device(args.device))
    # bfloat16 trains by autocast over float32 weights (float32 master weights, gradients and Adam state)
    dtype = DTYPES["float32"] if config.compute_dtype == "bfloat16" else DTYPES[args.dtype]
    model = load_model(args.model, dtype=dtype, device=device, quantized=args.quantized)
    from abft_lens.studies.generation_report import MauveExtra

    options.dist = dist
    options.extras = [extra for extra in (extras, None if mauve_test is None else MauveExtra(mauve_test, run_dir))
                      if extra is not None]
    result = run_training(model, task, config, options)
    if dist is not None and not dist.is_main:
        return 0
    rows = result.summary_rows() + [("train seconds", f"{result.train_seconds:.0f}")] + result.extra_rows
    if result.best_step is not None:
        rows.append(("best validation step", f"{result.best_step}" + (" (kept)" if config.keep_best else "")))
    print_table(rows, title=f"{config.method} on {model_info(model).name}, {task.name}, k={config.k}, "
                            f"{config.total_steps} steps, n_test={args.n_test}")
    print(f"run folder: {run_dir}")
    return 0


def add_parsers(commands) -> None:
    train = commands.add_parser("train", help="fine-tune W_Q/W_K with ABFT (or the E2E baseline)")
    add_model_arguments(train)
    train.add_argument("--ICL_model_name", dest="model", help=argparse.SUPPRESS)
    train.add_argument("--ICL_dataset_index", dest="dataset", help=argparse.SUPPRESS)
    train.add_argument("--ICL_k", dest="k", type=positive_int, help=argparse.SUPPRESS)
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    demo = commands.add_parser("demo", help="the main job: ABFT on the embedded model, SST-2, k=4, before/after")
    add_model_arguments(demo)
    add_train_arguments(demo)
    demo.set_defaults(func=cmd_train, default_preset="demo")  # abft_lens.training.presets.DEMO
