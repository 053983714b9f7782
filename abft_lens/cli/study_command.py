"""``abft-lens study``: models × datasets × methods × seeds in one resumable command (Table 1 of the paper).

Every option of ``train`` is accepted and applies to every trained cell; a variant ``NAME=ABFT:OPTIONS`` adds
its own options on top (a switch is turned off with ``--no-<switch>``, e.g. ``--no-restricted-gradient``).
Options that define the shared baselines or the grid (``--k``, ``--n-test``, ``--dtype``, ``--seed``,
``--method``, ``--run-dir``, ...) are set for the whole study and refused inside a variant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from abft_lens.cli.common import DTYPE_CHOICES, DTYPE_HELP, DTYPES, positive_int, resolve_device, resolve_dtype
from abft_lens.cli.train_command import (add_train_arguments, apply_preset, given_options, mauve_test_from_args,
                                         train_config_from_args)
from abft_lens.errors import AbftLensError
from abft_lens.io import check_folder
from abft_lens.training.presets import contradictions, preset

DEFAULT_METHODS = "vanilla,cc,prior,ABFT,E2E"
GRID = ("func", "command", "out", "models", "datasets", "methods", "seeds", "spec", "extend")
NOT_SETTINGS = GRID + ("device", "method", "seed", "run_dir", "resume",  # not part of a study's identity
                       "preset_filled", "default_preset", "dtype_reason")
FIXED = ("k", "n_test", "dtype", "device", "quantized", "method", "seed", "run_dir", "resume", "calibration_test",
         "preset")
OPTION_FIX = "use the options of abft-lens train (abft-lens study --help); turn a switch off with --no-<switch>."


class OptionParser(argparse.ArgumentParser):
    """The options of one variant or of a spec file: errors raise AbftLensError instead of exiting."""

    def error(self, message: str):
        raise AbftLensError(f"{self.prog}: {message}.", OPTION_FIX)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=positive_int, default=4, help="demonstrations per prompt")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass in evaluation")


def options_parser(prog: str) -> OptionParser:
    """The study's run and training options, plus ``--no-<switch>`` for every switch."""
    parser = OptionParser(prog=prog, add_help=False)
    add_run_arguments(parser)
    add_train_arguments(parser)
    for action in list(parser._actions):
        if action.nargs == 0 and action.const is True and action.default in (False, None):
            parser.add_argument("--no-" + action.option_strings[0].removeprefix("--"), dest=action.dest,
                                action="store_false", default=action.default)
    return parser


def variant_namespace(base: argparse.Namespace, name: str, args: list[str]) -> argparse.Namespace:
    """``base`` with a variant's options applied; options fixed for the whole study are refused."""
    parser = options_parser(f"variant {name}")
    parser.set_defaults(**vars(base))
    namespace = parser.parse_args(args)
    for dest in FIXED:
        if getattr(namespace, dest, None) != getattr(base, dest, None):
            raise AbftLensError(f"variant {name} sets --{dest.replace('_', '-')}, which is set for the whole study.",
                                f"pass --{dest.replace('_', '-')} to the study itself (or drop it from the variant).")
    if namespace.preset is not None and contradictions(preset(namespace.preset), given_options(namespace)):
        namespace.preset = None  # a variant that changes the study's preset (an ablation) names no preset
    return namespace


def recipe_for(args: argparse.Namespace, method):
    """The :class:`~abft_lens.studies.study_plan.TrainRecipe` of a trained method (its variant options applied)."""
    from abft_lens.studies.study_plan import TrainRecipe

    namespace = variant_namespace(args, method.name, list(method.args)) if method.args \
        else argparse.Namespace(**vars(args))
    namespace.method, namespace.seed, namespace.run_dir, namespace.resume = method.kind, 0, None, False
    config = train_config_from_args(namespace)
    mauve_test_from_args(namespace)  # reads and checks the prefix file
    return TrainRecipe(config=config, n_test=namespace.n_test, fore_test=not namespace.no_fore_test,
                       post_test=not namespace.no_post_test, save_model=not namespace.dont_save_model,
                       checkpoint_every=namespace.checkpoint_every, batch_size=namespace.batch_size,
                       test_type=namespace.test_type, generalization=namespace.generalization_test,
                       generalization_n_test=namespace.generalization_n_test,
                       robustness_queries=namespace.robustness_queries,
                       mauve_prefix=str(namespace.MAUVE_prefix) if namespace.MAUVE_test else None,
                       mauve_max_new_tokens=namespace.MAUVE_max_new_tokens,
                       dtype_reason=getattr(namespace, "dtype_reason", None))


def apply_spec_options(args: argparse.Namespace, options: dict) -> None:
    """A spec file's ``options`` table, where the command line left the default."""
    tokens: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            tokens.append(flag)
        elif value is False:
            tokens.append("--no-" + flag[2:])
        else:
            tokens += [flag] + [str(v) for v in (value if isinstance(value, list) else [value])]
    parser = options_parser("spec options")
    spec = parser.parse_args(tokens)
    for dest, value in vars(spec).items():
        default = parser.get_default(dest)
        if dest in ("method", "seed", "run_dir", "resume") and value != default:
            raise AbftLensError(f"spec options set {dest!r}, which a study sets through --methods / --seeds / --out.",
                                "drop it from the spec's options.")
        if value != default and getattr(args, dest) == default:
            setattr(args, dest, value)


def settings_from_args(args: argparse.Namespace) -> dict:
    """Every option that defines the study (``study.json`` plan.settings), JSON-able."""
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in sorted(vars(args).items()) if key not in NOT_SETTINGS}


def check_study_args(args: argparse.Namespace) -> None:
    """Options of ``train`` that a study sets otherwise, or does not support."""
    refused = {"method": ("--method", "list methods in --methods"), "seed": ("--seed", "list seeds in --seeds"),
               "run_dir": ("--run-dir", "the study folder is --out; each cell gets its own run folder"),
               "resume": ("--resume", "run the same command again: a study resumes by itself"),
               "quantized": ("--quantized", "studies of 4-bit bases are not supported yet; use abft-lens train"),
               "calibration_test": ("--calibration-test", "add cc to --methods (evaluated once per dataset)")}
    for dest, (flag, fix) in refused.items():
        if getattr(args, dest) not in (None, False):
            raise AbftLensError(f"{flag} does not apply to abft-lens study.", fix + ".")


def _first(*values):
    """The first value that was given (an empty ``--models ''`` was given: it is refused, not replaced)."""
    return next(value for value in values if value is not None)


def cmd_study(args: argparse.Namespace) -> int:
    from abft_lens.studies.study import run_study
    from abft_lens.studies.study_plan import (StudyPlan, check_model, parse_datasets, parse_methods, parse_models,
                                              parse_seeds, read_spec)

    check_study_args(args)
    check_folder(args.out, "--out")  # a file, a path under one, a link loop, a folder we may not write
    spec = read_spec(args.spec) if args.spec else {}
    apply_spec_options(args, spec.get("options") or {})
    apply_preset(args)  # the study's own options, resolved once: every variant starts from them
    resolve_dtype(args)  # --dtype auto: the study's settings record the dtype it picked
    variants = spec.get("variants") or {}
    methods = _first(args.methods, spec.get("methods"), DEFAULT_METHODS.split(",") + list(variants))
    methods = methods.split(",") if isinstance(methods, str) else methods if isinstance(methods, list) else [methods]
    methods = [f"{m.strip()}={variants[m.strip()]}" if isinstance(m, str) and m.strip() in variants else m
               for m in methods]
    plan = StudyPlan(models=parse_models(_first(args.models, spec.get("models"), "smollm2-135m")),
                     datasets=parse_datasets(_first(args.datasets, spec.get("datasets"), "paper")),
                     methods=parse_methods(methods), seeds=parse_seeds(_first(args.seeds, spec.get("seeds"), "0")),
                     settings=settings_from_args(args))
    for model in plan.models:
        check_model(model)
    for method in plan.methods:  # every variant parses, every option checks, before any cell runs
        if method.trained:
            recipe_for(args, method)
    state = run_study(plan, args.out, lambda method: recipe_for(args, method), dtype=DTYPES[args.dtype],
                      device=resolve_device(args.device), extend=args.extend)
    counts = state.counts()
    print(f"study {args.out}: " + ", ".join(f"{n} {name}" for name, n in counts.items() if n))
    for key, record in state.data["cells"].items():
        if record["state"] == "failed":
            print(f"  failed: {key}: {record['error']}")
    print(f"tables: {args.out / 'table1.md'} (.csv, .html)"
          + (f", {args.out / 'table2.md'}" if (args.out / "table2.md").is_file() else ""))
    return 1 if counts["failed"] else 0


def add_parsers(commands) -> None:
    study = commands.add_parser(
        "study", help="a resumable grid: models x datasets x methods x seeds, with shared baselines and tables",
        description="Runs every cell of the grid in one process (one model load per model) into --out: one run "
                    "folder per trained cell, vanilla/cc baselines once per dataset, study.json, table1/table2. "
                    "Run the same command again to resume; --extend adds cells. Set OMP_NUM_THREADS yourself.")
    study.add_argument("--out", type=Path, required=True, help="the study folder (created, or resumed)")
    study.add_argument("--models", default=None, help="comma list of models (default smollm2-135m)")
    study.add_argument("--datasets", default=None,
                       help="paper (StaICC 0,1,2,3,4,6,7,8; the default), or a comma list of names, indices, CSV/JSONL")
    study.add_argument("--methods", default=None,
                       help="comma list of vanilla, cc, ABFT, E2E and variants NAME=ABFT:OPTIONS "
                            f"(default {DEFAULT_METHODS})")
    study.add_argument("--seeds", default=None, help="comma list of training seeds (default 0)")
    study.add_argument("--spec", type=Path, default=None,
                       help="TOML/JSON file with models, datasets, methods, seeds, variants, options (the command "
                            "line wins where it sets a value)")
    study.add_argument("--extend", action="store_true",
                       help="add the command's models/datasets/methods/seeds to the study in --out (same options)")
    add_run_arguments(study)
    add_train_arguments(study)
    study.set_defaults(func=cmd_study, method=None, seed=None)
