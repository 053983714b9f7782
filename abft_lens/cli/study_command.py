"""``abft-lens study``: models × datasets × methods × seeds in one resumable command (Table 1 of the paper).

Every option of ``train`` is accepted and applies to every trained cell; a variant ``NAME=ABFT:OPTIONS`` adds
its own options on top (a switch is turned off with ``--no-<switch>``, e.g. ``--no-restricted-gradient``).
Options that define the shared baselines or the grid (``--k``, ``--n-test``, ``--dtype``, ``--seed``,
``--method``, ``--run-dir``, ...) are set for the whole study and refused inside a variant. The flags become a
:class:`~abft_lens.studies.study_config.StudyConfig` (the spec file's values where a flag is not given), which
:func:`~abft_lens.studies.study.run_study` runs: the same as from Python.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from abft_lens.cli.common import DTYPE_CHOICES, DTYPE_HELP, positive_int
from abft_lens.cli.train_command import add_train_arguments
from abft_lens.errors import AbftLensError
from abft_lens.io import check_folder

# study_config.DEFAULT_METHODS, spelled here so that --help imports no model code (a test keeps them equal)
DEFAULT_METHODS = "vanilla,cc,prior,ABFT,E2E"
NOT_CONFIG = ("func", "command", "spec", "method", "seed", "run_dir", "resume", "quantized", "calibration_test")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=positive_int, default=4, help="demonstrations per prompt")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass in evaluation")


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


def study_config_from_args(args: argparse.Namespace):
    """The :class:`StudyConfig` of the command: every flag given (an empty ``--models ''`` is given, and refused),
    the spec file's values where a flag is left at its default."""
    from abft_lens.studies.study_config import StudyConfig, spec_values

    defaults = {f.name: f.default for f in fields(StudyConfig)}
    given = {name: value for name, value in vars(args).items()
             if name not in NOT_CONFIG and value is not None and value != defaults.get(name)}
    return StudyConfig(**{**(spec_values(args.spec) if args.spec else {}), **given, "out": args.out})


def cmd_study(args: argparse.Namespace) -> int:
    from abft_lens.studies.study import run_study

    check_study_args(args)
    check_folder(args.out, "--out")  # a file, a path under one, a link loop, a folder we may not write
    state = run_study(study_config_from_args(args))
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
