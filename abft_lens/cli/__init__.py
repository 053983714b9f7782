"""``abft-lens``: a thin command line over the Python API.

Every subcommand turns :class:`~abft_lens.errors.AbftLensError` (bad input, missing resources) into one
message on stderr and exit status 2, without a traceback; so is an ``OSError`` that no check foresaw (a full
disk, a folder made read-only while the command ran: :func:`~abft_lens.io.file_system_error`). Any other
exception is a bug and keeps its traceback. Each command lives in its own module, which adds its
parser (``add_parsers``) and runs it (``cmd_*``).
"""

from __future__ import annotations

import argparse
import re
import sys

from abft_lens.cli import eval_command, heads_command, run_commands, study_command, train_command
from abft_lens.cli.common import cli_message
from abft_lens.errors import AbftLensError
from abft_lens.io import file_system_error

COMMAND_MODULES = (eval_command, train_command, heads_command, run_commands, study_command)
# the docstring's first line without its reST markup: "abft-lens: a thin command line over the Python API."
DESCRIPTION = __doc__.splitlines()[0].replace("``", "")


# argparse reads "-1e-5" as an option (its own pattern knows only "-1" and "-0.5"); every number is a value
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abft-lens", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(commands)
    for each in [parser, *commands.choices.values()]:
        each._negative_number_matcher = NEGATIVE_NUMBER
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AbftLensError as error:
        print(f"abft-lens: error: {cli_message(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"abft-lens: error: {file_system_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abft-lens: interrupted", file=sys.stderr)
        return 130
