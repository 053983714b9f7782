"""``abft-lens train`` and ``abft-lens demo``: ABFT or E2E training with fore/post tests and a run folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abft_lens.cli.common import DTYPES, add_model_arguments, positive_int, print_table, resolve_device
from abft_lens.errors import AbftLensError

NOT_YET: dict[str, str] = {}  # option -> message, for options that are accepted but not built yet
QUANTIZED_LORA_R = 16  # the paper's LoRA rank on 4-bit bases


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Training options under this project's names, with the original prototype.py spellings as aliases."""
    a = parser.add_argument
    a("--method", choices=["ABFT", "E2E"], default="ABFT")
    a("--train-samples", "--train_sample_num", dest="train_samples", type=positive_int, default=512)
    a("--epochs", "--epoch", dest="epochs", type=positive_int, default=2)
    a("--pseudo-batch-size", "--pseudo_batch_size", dest="pseudo_batch_size", type=positive_int, default=32)
    a("--micro-batch-size", dest="micro_batch_size", type=positive_int, default=None,
      help="prompts per forward pass in training (default 8 on CPU, the whole pseudo-batch on CUDA; 1: one at a "
           "time). Results equal the per-sample loop's; --dtype bfloat16 trains with bfloat16 autocast and "
           "float32 weights and Adam state")
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
    a("--validation-prompts", dest="validation_prompts", type=positive_int, default=64)
    a("--validate-every", dest="validate_every", type=int, default=0, help="steps between validations")
    a("--keep-best", dest="keep_best", action="store_true", help="end with the best validation step's weights")
    a("--n-test", dest="n_test", type=positive_int, default=256, help="first N fixed test prompts for fore/post tests")
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
    a("--MAUVE-max-new-tokens", dest="MAUVE_max_new_tokens", type=positive_int, default=32,
      help="tokens generated per prefix (greedy)")


def train_config_from_args(args: argparse.Namespace):
    from abft_lens.training.train import TrainConfig
    from abft_lens.training.trainable import TrainableConfig

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
    if args.quantized and args.dtype == "bfloat16":
        raise AbftLensError("--dtype bfloat16 cannot be combined with --quantized.",
                            "drop --dtype with --quantized: the 4-bit base computes in float32 on CPU and "
                            "bfloat16 on CUDA already.")
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
        validate_every=args.validate_every, keep_best=args.keep_best, micro_batch_size=args.micro_batch_size,
        compute_dtype="bfloat16" if args.dtype == "bfloat16" else None,
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
    from abft_lens.studies.generation_report import MauveTest

    return MauveTest(args.MAUVE_prefix, max_new_tokens=args.MAUVE_max_new_tokens)


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
    from abft_lens.training.runs import run_training
    from abft_lens.data.tasks import load_task

    config = train_config_from_args(args)
    dist = init_from_env()  # under torchrun (WORLD_SIZE > 1): data parallel, gloo on CPU, NCCL on CUDA
    task = load_task(args.dataset)
    run_dir = args.run_dir or Path("runs") / f"{config.method.lower()}-{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    mauve_test = mauve_test_from_args(args)  # checks the prefix file before the model loads
    device = training_device(dist, default=resolve_device(args.device))
    # bfloat16 trains by autocast over float32 weights (float32 master weights, gradients and Adam state)
    dtype = DTYPES["float32"] if config.compute_dtype == "bfloat16" else DTYPES[args.dtype]
    loaded = load_model(args.model, dtype=dtype, device=device, quantized=args.quantized)
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


# Chosen by bench/demo_selection.py on validation prompts from held-out calibration examples (README);
# micro-batches of 8 prompts per forward (bench/train_step.py; the per-sample loop's result, README).
DEMO_DEFAULTS = dict(train_samples=128, pseudo_batch_size=16, epochs=1, lr=5e-4, restricted_gradient=True,
                     validation_examples=256, validation_prompts=64, validate_every=2, keep_best=True, n_test=256,
                     micro_batch_size=8)


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
    demo.set_defaults(func=cmd_train, **DEMO_DEFAULTS)
