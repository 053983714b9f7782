"""Docs that cannot rot, and a package that behaves as a library.

- Every ```python block of the README's "## Python API" section, of ``docs/*.md``, and every literal block
  (``::``) of a module docstring runs here, on the ``tiny`` model with the sizes shrunk (the docs keep showing
  the real model).
- Every shell command of a ```bash / ```sh / ```console block of README.md, ``docs/*.md`` and
  ``bench/README.md`` is checked by the rule in :data:`RULES` for its program: ``abft-lens`` commands run on
  the ``tiny`` model with small sizes, what cannot run cheaply (set-up, the whole suite, torchrun, benchmarks
  on the real models) is checked for existence, ``--help`` or its parsed arguments. A command no rule knows
  fails, so a renamed option or a moved module cannot break a documented command silently.
- Relative links between the docs point at files and headings that exist; docs/method.md names every module.
- ``python -m abft_lens --help`` works with the hub off (run the way ``-m`` runs it, in a fresh interpreter).
- No exported name is shadowed by a submodule of the same name, and importing abft_lens with every submodule
  changes no process-wide state (environment, warning filters, loggers, torch defaults).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from abft_lens.backends.tl import HAS_HOOKED

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "abft_lens"

# keyword sizes set on these calls (added when the call leaves them at their defaults), so that a documented
# example runs in seconds on the tiny model
SMALL_CALLS = {
    "evaluate": {"n_test": 4},
    "run_training": {"n_test": 4},
    "head_scores": {"n_prompts": 4, "n_seqs": 4, "seq_len": 12},
    "compare_run": {"n_prompts": 4, "n_seqs": 4, "seq_len": 12},
    "TrainConfig": {"train_samples": 4, "pseudo_batch_size": 2, "epochs": 1},
}
SMALL_VALIDATION = {"validation_examples": 8, "validation_prompts": 4, "validate_every": 1}
REAL_MODEL = "smollm2-135m"
REAL_MODELS = (REAL_MODEL, "gemma3-270m", "qwen2.5-coder-0.5b")  # the documented models, run as ``tiny``
# a model from the hub (``HookedTransformer.from_pretrained*(...)``) runs as a hand-built tiny HookedTransformer
HUB_LOADERS = ("from_pretrained", "from_pretrained_no_processing")
OWN_MODEL = "__own_tiny_model__"
DOCS = ROOT / "docs"


def python_api_blocks() -> list[str]:
    """The ```python blocks of the README's "## Python API" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def docstring_blocks() -> list[tuple[str, str]]:
    """``(module, code)`` for every literal block (a paragraph ending in ``::``) of a module docstring."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=True) or ""
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for match in re.finditer(r"::\n\n((?:(?: {4}.*)?\n)+)", doc + "\n"):
            found.append((module, textwrap.dedent(match.group(1))))
    return found


class _Shrink(ast.NodeTransformer):
    """The real models → ``tiny``, a hub model → a hand-built tiny one (:func:`own_tiny_model`), ``runs/...`` →
    under ``tmp``, and the sizes of :data:`SMALL_CALLS`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if node.value in REAL_MODELS:
            return ast.copy_location(ast.Constant("tiny"), node)
        if isinstance(node.value, str) and node.value.startswith("runs/"):
            return ast.copy_location(ast.Constant(str(self.tmp / node.value)), node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in HUB_LOADERS:
            return ast.copy_location(ast.Call(ast.Name(OWN_MODEL, ast.Load()), [], []), node)
        sizes = dict(SMALL_CALLS.get(name, {}))
        if name == "TrainConfig" and any(kw.arg == "validation_examples" for kw in node.keywords):
            sizes.update(SMALL_VALIDATION)
        node.keywords = [kw for kw in node.keywords if kw.arg not in sizes]
        node.keywords += [ast.keyword(arg, ast.Constant(value)) for arg, value in sizes.items()]
        return node


def shrunk(code: str, tmp: Path) -> str:
    """``code`` with the tiny model and small sizes (see :class:`_Shrink`)."""
    tree = ast.fix_missing_locations(_Shrink(tmp).visit(ast.parse(code)))
    return ast.unparse(tree)


def own_tiny_model():
    """What a TransformerLens user builds without abft-lens's loader: a config, then the model with a tokenizer."""
    import warnings

    from abft_lens.backends.tiny import tiny_tokenizer

    with warnings.catch_warnings():  # TransformerLens 3.9 announces its 4.x successor
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=512, act_fn="gelu",
                                      normalization_type="LN", d_vocab=1024, model_name="own-tiny", seed=3)
        return HookedTransformer(cfg, tokenizer=tiny_tokenizer()).eval()


def run_python(code: str, where: str, tmp: Path, namespace: dict) -> None:
    """Run a documented block, shrunk, in ``namespace`` (which later blocks of the same page share)."""
    namespace.setdefault(OWN_MODEL, own_tiny_model)
    exec(compile(shrunk(code, tmp), where, "exec"), namespace)  # noqa: S102


def test_the_shrinking_keeps_the_calls_and_changes_only_sizes(tmp_path):
    code = shrunk('m = load_model("smollm2-135m")\nc = TrainConfig(lr=5e-4, train_samples=128, validation_examples=256)'
                  '\nr = run_training(m, t, c, run_dir="runs/x", n_test=256)'
                  '\nh = HookedTransformer.from_pretrained_no_processing("gpt2")', tmp_path)
    assert 'load_model(\'tiny\')' in code and f"run_dir='{tmp_path / 'runs/x'}'" in code
    assert "lr=0.0005" in code and "train_samples=4" in code and "validation_examples=8" in code
    assert "n_test=4" in code and "n_test=256" not in code and "train_samples=128" not in code
    assert f"h = {OWN_MODEL}()" in code and "gpt2" not in code


def test_readme_python_api_runs_on_the_tiny_model(tmp_path, no_network):
    from abft_lens.backends.provenance import model_info

    blocks = python_api_blocks()
    assert len(blocks) == 2 and "from_pretrained_no_processing" in blocks[0] and REAL_MODEL in blocks[1]
    namespace: dict = {}
    if HAS_HOOKED:  # the first block builds a HookedTransformer by hand, which TransformerLens 4.x does not have
        run_python(blocks[0], "README.md: Python API, your own model", tmp_path, namespace)
        assert model_info(namespace["model"]).source == "user" and namespace["run"].post is not None
        assert (tmp_path / "runs" / "gpt2" / "trained.safetensors").is_file()
    run_python(blocks[1], "README.md: Python API", tmp_path, namespace)
    before, run, model = namespace["before"], namespace["run"], namespace["model"]
    assert 0.0 <= before.accuracy <= 1.0 and len(before.gold) == 4
    assert run.post is not None and (tmp_path / "runs" / "mine" / "config.json").is_file()
    assert (tmp_path / "runs" / "mine" / "report.html").stat().st_size > 10_000
    assert namespace["top"].heads and namespace["scores"]["induction"].scores.shape == (model.cfg.n_layers,
                                                                                       model.cfg.n_heads)


@pytest.mark.parametrize("module, code", docstring_blocks(), ids=[m for m, _ in docstring_blocks()])
def test_module_docstring_examples_run(module, code, tmp_path, no_network):
    if "HookedTransformer(" in code and not HAS_HOOKED:
        pytest.skip(f"{module}'s example builds a HookedTransformer by hand (TransformerLens 3.9 only)")
    namespace: dict = {}
    run_python(code, f"{module} docstring", tmp_path, namespace)
    assert len(namespace) > 2  # the example defined something


def test_the_package_docstring_example_is_collected():
    modules = [module for module, _ in docstring_blocks()]
    assert "abft_lens.__init__" in modules and "abft_lens.backends.provenance" in modules


def _offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the package must not need it set
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


# One fresh interpreter, hub off, WANDB_MODE unset. The third-party modules that abft_lens imports at module
# level are imported first: what they do on import is theirs (torch and numpy add warning filters, for
# instance); what changes after that is abft_lens's doing. Then ``python -m abft_lens --help`` the way ``-m``
# runs it (runpy), which spares a second interpreter loading torch and TransformerLens.
_PROBE = r'''
import ast, contextlib, hashlib, importlib, io, json, logging, os, pathlib, pkgutil, random, runpy, sys, warnings

package = pathlib.Path(sys.argv[1])
dependencies = set()


def module_level(statements):
    for node in statements:
        if isinstance(node, ast.Import):
            dependencies.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            dependencies.add(node.module)
        elif isinstance(node, (ast.With, ast.Try)):
            module_level(node.body)


for path in package.rglob("*.py"):
    module_level(ast.parse(path.read_text(encoding="utf-8")).body)
for name in sorted(dependencies):
    if name.split(".")[0] not in ("abft_lens", "__future__") and name.split(".")[0] not in sys.stdlib_module_names:
        try:
            importlib.import_module(name)
        except ImportError:  # optional extras (mauve-text)
            pass

import torch


def snapshot():
    loggers = {"": logging.getLogger()}
    loggers.update((n, l) for n, l in logging.Logger.manager.loggerDict.items() if isinstance(l, logging.Logger))
    return {
        "environ": dict(os.environ),
        "warning_filters": [repr(f) for f in warnings.filters],
        "showwarning": repr(warnings.showwarning),
        "loggers": {n: [l.level, l.propagate, l.disabled, [repr(f) for f in l.filters], [repr(h) for h in l.handlers]]
                    for n, l in loggers.items()},
        "torch": [str(torch.get_default_dtype()), torch.get_num_threads(),
                  hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()],
        "random": hashlib.sha256(repr(random.getstate()).encode()).hexdigest(),
    }


before = snapshot()
import abft_lens

exported = {name: getattr(abft_lens, name) for name in abft_lens.__all__}
submodules = [m.name for m in pkgutil.walk_packages(abft_lens.__path__, "abft_lens.")]
for name in submodules:
    importlib.import_module(name)
after = snapshot()
shadowed = sorted(name for name, value in exported.items()
                  if getattr(abft_lens, name) is not value or type(value).__name__ == "module")
changed = {key: [before[key], after[key]] for key in before if key != "loggers" and before[key] != after[key]}
changed_loggers = {n: [v, after["loggers"].get(n)] for n, v in before["loggers"].items() if after["loggers"].get(n) != v}
helps = {}
for argv in (["--help"], ["heads", "--help"]):
    sys.argv, stdout = ["abft_lens", *argv], io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            runpy.run_module("abft_lens", run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as exit:
            code = exit.code
    helps[" ".join(argv)] = [code, stdout.getvalue()]
print(json.dumps({"submodules": submodules, "exported": sorted(exported), "shadowed": shadowed,
                  "changed": changed, "changed_loggers": changed_loggers, "help": helps}, default=str))
'''


@pytest.fixture(scope="module")
def import_everything() -> dict:
    """Import abft_lens and every submodule in a fresh interpreter; report what changed."""
    out = subprocess.run([sys.executable, "-c", _PROBE, str(PACKAGE)], capture_output=True, text=True, cwd=ROOT,
                         env=_offline_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_python_m_abft_lens_help_works_offline(import_everything):
    code, text = import_everything["help"]["--help"]
    assert code == 0 and text.startswith("usage: abft-lens") and all(c in text for c in ("eval", "train", "heads"))
    code, text = import_everything["help"]["heads --help"]
    assert code == 0 and "--n-prompts" in text


def test_every_exported_name_survives_importing_every_submodule(import_everything):
    """No name is both a module and a function: ``abft_lens.evaluate`` stays the function after
    ``abft_lens.evaluation`` and every other submodule are imported."""
    assert "abft_lens.cli" in import_everything["submodules"] and "evaluate" in import_everything["exported"]
    assert import_everything["shadowed"] == []
    children = {name.split(".")[1] for name in import_everything["submodules"]}
    assert not children & set(import_everything["exported"])


def test_importing_abft_lens_changes_no_process_wide_state(import_everything):
    assert import_everything["changed"] == {}, import_everything["changed"]
    assert import_everything["changed_loggers"] == {}


# --- ```python blocks of docs/ ------------------------------------------------------------------------------


def docs_python_blocks() -> dict[str, list[str]]:
    """``{page: [code, ...]}`` for every page of docs/ with ```python blocks, in page order."""
    found = {}
    for path in sorted(DOCS.glob("*.md")):
        blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        if blocks:
            found[path.name] = blocks
    return found


@pytest.mark.parametrize("page", sorted(docs_python_blocks()))
def test_docs_python_blocks_run_on_the_tiny_model(page, tmp_path, no_network):
    namespace: dict = {}
    for number, block in enumerate(docs_python_blocks()[page], 1):
        run_python(block, f"docs/{page}: python block {number}", tmp_path, namespace)


# --- shell commands of README.md, docs/*.md and bench/README.md ---------------------------------------------

SHELL_PAGES = (ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md")
SEPARATORS = {";", "&&", "||", "|", "&"}


@dataclass
class DocCommand:
    """One simple command of a documented shell block: ``NAME=value`` prefixes in ``env``, the rest in ``argv``."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def shell_commands(path: Path) -> list[DocCommand]:
    """Every simple command of the page's ```bash / ```sh / ```console blocks (console: the ``$ `` lines).

    Backslash continuations are joined, comments dropped, ``;``/``&&``/``|`` split commands. A ``for VAR in
    A B ...; do ... done`` loop is read as its body, once, with VAR = A (``$VAR`` and ``${VAR}`` expanded).
    """
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(ROOT).as_posix()
    found = []
    for block in re.finditer(r"^```(bash|sh|console)\n(.*?)^```", text, flags=re.S | re.M):
        first = text.count("\n", 0, block.start(2)) + 1
        lines, pending, start = [], "", None
        for number, line in enumerate(block.group(2).splitlines(), first):
            if block.group(1) == "console" and not pending:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            start = number if start is None else start
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            lines.append((start, pending + line))
            pending, start = "", None
        variables: dict[str, str] = {}
        for number, line in lines:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token not in SEPARATORS:
                    words.append(token)
                    continue
                words = words[1:] if words[:1] == ["do"] else words
                if words and words[0] == "for":
                    assert len(words) >= 4 and words[2] == "in", f"{name}:{number}: a for loop I cannot read"
                    variables[words[1]] = words[3]
                elif words and words != ["done"]:
                    words = [re.sub(r"\$\{?(\w+)\}?", lambda m: _variable(variables, m.group(1), name, number), w)
                             for w in words]
                    env = {}
                    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                        key, value = words.pop(0).split("=", 1)
                        env[key] = value
                    found.append(DocCommand(f"{name}:{number}", words, env))
                words = []
    return found


def _variable(variables: dict[str, str], key: str, page: str, number: int) -> str:
    assert key in variables, f"{page}:{number}: ${key} is set by no for loop of its block"
    return variables[key]


class UnknownCommand(AssertionError):
    """A documented command that no rule of :data:`RULES` knows."""


@contextlib.contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _captured(function, *args):
    """``function(*args)`` with stdout and stderr captured: ``(exit code, output)``; SystemExit is an exit code."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = function(*args)
            code = code if isinstance(code, int) else 0  # main() returns its status; the others return values
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code
    return code, out.getvalue()


# --- abft-lens on the tiny model --------------------------------------------------------------------------

MODEL_OPTIONS = ("--model", "--ICL_model_name", "--models")
# every spelling of a size option -> the largest value run here (a documented value above it is lowered)
CLI_CAPS = {
    ("--n-test",): 4, ("--train-samples", "--train_sample_num"): 4,
    ("--pseudo-batch-size", "--pseudo_batch_size"): 2, ("--micro-batch-size",): 2, ("--epochs", "--epoch"): 1,
    ("--validation-examples",): 8, ("--validation-prompts",): 4, ("--validate-every",): 1, ("--n-prompts",): 4,
    ("--generalization-n-test",): 2, ("--robustness-queries",): 3,
}
# added at its cap when a command leaves it at its (larger) default, if the command has the option
CLI_ADDED = ("--n-test", "--train-samples", "--pseudo-batch-size", "--epochs", "--n-prompts")
CLI_VALUES = {"--datasets": {"paper": "sst2,fp"}}  # documented value -> the value run here
# added to a subcommand when it does not give the first option: mix's 3 × 3 λ grid instead of 9 × 9; the demo's
# validation guard (on by default) on 4 prompts
CLI_ADDED_VALUES = {"mix": ["--grid-step", "1"], "demo": ["--validation-prompts", "4"]}
CLI_ADDED_WITH = {"--validation-examples": "--validation-prompts"}  # the guard's prompts, at their cap
CLI_OUTPUTS = ("--output", "--out", "--run-dir", "--html")  # written under the page's scratch folder
# a command with --preset keeps the sizes the preset fixes (capping them would contradict it): it runs on one
# dataset and one seed instead
CLI_PRESET_VALUES = {"--datasets": "sst2", "--seeds": "0"}
CLI_PARSED_ONLY = {
    "export": "needs the base model's Hugging Face folder, which the tiny model lacks "
              "(tests/test_export.py runs export on a tiny Llama folder)",
}


def _subcommand_options(command: str) -> set[str]:
    from abft_lens.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if command not in commands.choices:
        raise UnknownCommand(f"abft-lens has no subcommand {command!r}")
    return set(commands.choices[command]._option_string_actions)


def _local_path(word: str) -> str:
    """A relative path that names a file of the repository (a committed study folder) and not one made on this
    page is read from the repository."""
    if word.startswith("-") or os.path.isabs(word) or os.path.exists(word) or not (ROOT / word).exists():
        return word
    return str(ROOT / word)


def tiny_cli_argv(argv: list[str]) -> list[str]:
    """A documented ``abft-lens`` argv as run here: the real models → ``tiny`` (also where the command names none
    and would load the default SmolLM2), sizes capped (:data:`CLI_CAPS`, :data:`CLI_ADDED`), :data:`CLI_VALUES`;
    outputs stay relative (under the scratch folder, parents made)."""
    caps = {spelling: cap for spellings, cap in CLI_CAPS.items() for spelling in spellings}
    values = dict(CLI_VALUES)
    if "--preset" in argv:
        from abft_lens.training.presets import preset

        fixed = {"--" + name.replace("_", "-") for name in preset(argv[argv.index("--preset") + 1]).fixed()}
        caps = {spelling: cap for spelling, cap in caps.items() if spelling not in fixed}
        values.update({option: {None: value} for option, value in CLI_PRESET_VALUES.items()})
    out, given, i = [], set(), 0
    while i < len(argv):
        word = argv[i]
        option, eq, inline = word.partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if word.startswith("--") and (option in caps or option in MODEL_OPTIONS or option in values
                                      or option in CLI_OUTPUTS) and value is not None:
            if option in caps:
                given.add(next(s[0] for s in CLI_CAPS if option in s))
                value = str(min(int(value), caps[option]))
            elif option in MODEL_OPTIONS:
                value = ",".join(dict.fromkeys("tiny" if m in REAL_MODELS else m for m in value.split(",")))
            elif option in values:
                value = values[option].get(value, values[option].get(None, value))
            else:
                Path(value).parent.mkdir(parents=True, exist_ok=True)
            out += [option, value]
            i += 1 if eq else 2
            continue
        out.append(_local_path(word) if i else word)
        i += 1
    known = _subcommand_options(argv[0])
    for option in ("--model", "--models"):  # the default model is SmolLM2
        if option in known and not set(MODEL_OPTIONS) & {w.partition("=")[0] for w in argv}:
            out += [option, "tiny"]
    for option in CLI_ADDED:
        if option not in given and option in known and option in caps:
            out += [option, str(CLI_CAPS[next(s for s in CLI_CAPS if option in s)])]
    for option, companion in CLI_ADDED_WITH.items():
        if option in given and companion not in given:
            out += [companion, str(caps[companion])]
    extra = CLI_ADDED_VALUES.get(argv[0], [])
    return out + (extra if extra and extra[0] not in out else [])


def run_abft_lens(argv: list[str]) -> str:
    """``abft-lens ARGV`` in this process, on the tiny model; parsed only for :data:`CLI_PARSED_ONLY`."""
    from abft_lens.cli import build_parser, main

    if not argv or argv[0].startswith("-"):
        code, output = _captured(main, argv)
        assert code == 0, output[-3000:]
        return "--help" if "--help" in argv else "ran"
    if argv[0] in CLI_PARSED_ONLY:
        _subcommand_options(argv[0])
        code, output = _captured(build_parser().parse_args, argv)
        assert code == 0, output[-3000:]
        return "parsed"
    small = tiny_cli_argv(argv)
    code, output = _captured(main, small)
    assert code == 0, f"abft-lens {shlex.join(small)} exited {code}:\n{output[-3000:]}"
    return "ran"


def check_cli(command: DocCommand, skip: int) -> str:
    """In this process, on the tiny model with small sizes (:func:`tiny_cli_argv`); ``--help`` as it is."""
    return run_abft_lens(command.argv[skip + 1:])


# --- the other programs -----------------------------------------------------------------------------------

BENCH_RUN = {  # benchmarks that read committed results and need no model: run for real, outputs under scratch
    "study_pairs.py", "study_diagnostics.py",
}


class _Parsed(Exception):
    pass


def check_bench(command: DocCommand, skip: int) -> str:
    """A benchmark script in this process: imported (so a moved module fails), its arguments parsed; run to
    the end only when in :data:`BENCH_RUN`."""
    script, args = ROOT / command.argv[skip], command.argv[skip + 1:]
    assert script.is_file() and script.parent == ROOT / "bench", f"{script} is not a benchmark script"
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self, *a, **kw):
        raise _Parsed(parse_args(self, *a, **kw))

    mapped, i = [], 0
    while i < len(args):
        if args[i] in CLI_OUTPUTS and i + 1 < len(args):  # an output stays under the scratch folder
            Path(args[i + 1]).parent.mkdir(parents=True, exist_ok=True)
            mapped += args[i:i + 2]
            i += 2
        else:
            mapped.append(_local_path(args[i]))
            i += 1
    args = mapped
    sys.path.insert(0, str(script.parent))
    try:
        with _argv([str(script), *args]), contextlib.ExitStack() as stack:
            if script.name not in BENCH_RUN:
                stack.enter_context(pytest.MonkeyPatch.context()).setattr(argparse.ArgumentParser, "parse_args",
                                                                          parse_only)
            try:
                code, output = _captured(runpy.run_path, str(script), None, "__main__")
            except _Parsed:
                return "parsed"
    finally:
        sys.path.remove(str(script.parent))
    assert script.name in BENCH_RUN, f"{script.name} ran without parsing arguments (only BENCH_RUN scripts run)"
    assert code == 0, output[-3000:]
    return "ran"


def check_torchrun(command: DocCommand, skip: int) -> str:
    """torchrun starts several processes (tests/test_distributed.py runs docs/scale.md's command with two on
    gloo). Here: the module is abft-lens's, the arguments after it parse, and ``python -m MODULE --help`` runs."""
    argv = command.argv[skip:]
    assert "-m" in argv, "torchrun without -m"
    module, rest = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2:]
    assert module in ("abft_lens", "abft_lens.cli"), f"torchrun runs {module}, not abft-lens"
    from abft_lens.cli import build_parser

    code, output = _captured(build_parser().parse_args, rest)
    assert code == 0, output[-3000:]
    with _argv([module, "--help"]):
        code, output = _captured(runpy.run_module, module, None, "__main__", True)
    assert code == 0 and output.startswith("usage: abft-lens"), output[-3000:]
    return "--help"


def check_script(command: DocCommand, skip: int) -> str:
    """Set-up, the whole suite, a multi-hour study: too long to run here; the script exists, is executable and
    is valid bash."""
    script = ROOT / command.argv[skip]
    assert script.is_file() and os.access(script, os.X_OK), f"{script} is missing or not executable"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return "script checked"


def check_demo_script(command: DocCommand, skip: int) -> str:
    """``scripts/demo.sh ARGS`` is set-up, then ``abft-lens demo ARGS``: the script is checked, and its last
    line run here as ``abft-lens demo ARGS`` on the tiny model."""
    check_script(command, skip)
    last = (ROOT / command.argv[skip]).read_text(encoding="utf-8").strip().splitlines()[-1]
    assert last == 'exec .venv/bin/abft-lens demo "$@"', f"scripts/demo.sh no longer ends in the demo: {last}"
    return run_abft_lens(["demo", *command.argv[skip + 1:]])


def check_gpu_tool(command: DocCommand, skip: int) -> str:
    """NVIDIA's own tool, present on GPU machines only: nothing of abft-lens to check."""
    return "not run"


@dataclass(frozen=True)
class Rule:
    """The first words of a command (a word ending in ``*`` matches by prefix), how it is checked, and why so."""

    words: tuple[str, ...]
    check: Callable[[DocCommand, int], str]
    why: str

    def matches(self, argv: list[str]) -> bool:
        return len(argv) >= len(self.words) and all(
            a.startswith(w[:-1]) if w.endswith("*") else a == w for w, a in zip(self.words, argv))


_CLI = "run in this process on the tiny model, sizes capped (tiny_cli_argv); export: arguments parsed only"
_BENCH = "imported and its arguments parsed; BENCH_RUN scripts (no model) run to the end, outputs in scratch"
_LONG = "too long for the suite (set-up, the whole suite, hours of study): exists, executable, `bash -n` clean"

# The rule table: every program the docs show, and how each is checked here. A command that matches no rule
# fails the test; add a rule when the docs show a new program.
RULES = (
    Rule(("abft-lens",), check_cli, _CLI),
    Rule((".venv/bin/abft-lens",), check_cli, _CLI),
    Rule((".venv-tl4/bin/abft-lens",), check_cli, _CLI),
    Rule(("python", "-m", "abft_lens"), lambda c, s: check_cli(c, s + 2), _CLI),
    Rule((".venv/bin/python", "-m", "abft_lens"), lambda c, s: check_cli(c, s + 2), _CLI),
    Rule(("python", "bench/*"), lambda c, s: check_bench(c, s + 1), _BENCH),
    Rule((".venv/bin/python", "bench/*"), lambda c, s: check_bench(c, s + 1), _BENCH),
    Rule(("torchrun",), check_torchrun, "several processes: the module is abft-lens's, the arguments parse, and "
                                        "`python -m abft_lens --help` runs"),
    Rule(("scripts/demo.sh",), check_demo_script, "set-up is not run; its last line, `abft-lens demo ARGS`, runs "
                                                  "on the tiny model"),
    Rule(("scripts/test.sh",), check_script, _LONG),
    Rule(("scripts/setup.sh",), check_script, _LONG),
    Rule((".ci/run",), check_script, _LONG),
    Rule(("bench/run_study_*",), check_script, _LONG),
    Rule(("/usr/bin/time", "-v"), lambda c, s: check_command(c, s + 2), "the command it times is checked"),
    Rule(("nvidia-smi",), check_gpu_tool, "NVIDIA's own tool, on GPU machines only: not run"),
)


def rule_for(command: DocCommand, skip: int = 0) -> Rule:
    argv = command.argv[skip:]
    for rule in RULES:
        if rule.matches(argv):
            return rule
    raise UnknownCommand(f"{command}: no rule in tests/test_docs.py RULES checks this command; add one")


def check_command(command: DocCommand, skip: int = 0) -> str:
    return rule_for(command, skip).check(command, skip)


def _repository_state() -> tuple[str, dict[str, int]] | None:
    """``git status`` and the modification time of every tracked file (a rewrite with equal content counts);
    None outside a git checkout."""
    git = ["git", "-C", str(ROOT)]
    try:
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        files = subprocess.run([*git, "ls-files", "-z"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return status, {f: (ROOT / f).stat().st_mtime_ns for f in files.split("\0") if f and (ROOT / f).is_file()}


def test_every_documented_command_has_a_rule():
    commands = [c for page in SHELL_PAGES for c in shell_commands(page)]
    assert len(commands) > 20 and any(c.argv[0] == "torchrun" for c in commands)
    for command in commands:
        rule = rule_for(command)
        if rule.words == ("/usr/bin/time", "-v"):
            rule_for(command, 2)


@pytest.mark.parametrize("page", [p for p in SHELL_PAGES if shell_commands(p)],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documented_shell_commands_run(page, tmp_path, monkeypatch, no_network):
    """The page's commands in order, in one scratch folder (a later command reads an earlier one's run)."""
    monkeypatch.chdir(tmp_path)
    before = _repository_state()
    failures, kinds = [], []
    for command in shell_commands(page):
        for key, value in command.env.items():
            if key != "OMP_NUM_THREADS":  # the suite's one thread stays
                monkeypatch.setenv(key, value)
        try:
            kinds.append(check_command(command))
        except Exception as error:  # noqa: BLE001 - every broken command of the page is listed at once
            failures.append(f"{command}\n  {type(error).__name__}: {str(error)[-1500:]}")
    assert not failures, "documented commands that fail:\n" + "\n".join(failures)
    assert _repository_state() == before, "a documented command wrote into the repository"
    assert kinds


def test_ci_runs_the_readme_test_command_for_both_versions():
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "scripts/test.sh || status=1" in lines and "ABFT_LENS_TL=4 scripts/test.sh || status=1" in lines


def test_the_rule_table_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["frobnicate", "--all"], ["python", "-m", "abft_lens.moved"], ["python", "scripts/x.py"]):
        with pytest.raises(UnknownCommand):
            rule_for(DocCommand("here", argv))
    with pytest.raises(UnknownCommand, match="no subcommand 'frobnicate'"):
        check_command(DocCommand("here", ["abft-lens", "frobnicate", "--model", "smollm2-135m"]))
    with pytest.raises(AssertionError, match="--no-such-option"):
        check_command(DocCommand("here", ["abft-lens", "eval", "--no-such-option", "1"]))
    with pytest.raises(AssertionError, match="not abft-lens"):
        check_command(DocCommand("here", ["torchrun", "--nproc_per_node", "2", "-m", "other.cli", "train"]))
    with pytest.raises(AssertionError, match="missing or not executable"):
        check_command(DocCommand("here", ["bench/run_study_nothing.sh"]))


def test_the_command_reader_and_the_tiny_mapping(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```bash\nOMP_NUM_THREADS=2 abft-lens study --out s --models smollm2-135m,qwen2.5-coder-0.5b \\\n"
                    "    --datasets paper --methods \"vanilla,fast=ABFT:--lr 1e-3\" --n-test 256   # a comment\n"
                    "for d in bfloat16 float32; do\n  /usr/bin/time -v abft-lens train --dtype $d --epoch 2\ndone\n```\n"
                    "```console\n$ abft-lens heads --model gemma3-270m\nsome output\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    study, train, heads = shell_commands(page)
    assert study.where == "page.md:2" and study.env == {"OMP_NUM_THREADS": "2"}
    assert study.argv[-1] == "256" and "vanilla,fast=ABFT:--lr 1e-3" in study.argv
    assert train.argv == ["/usr/bin/time", "-v", "abft-lens", "train", "--dtype", "bfloat16", "--epoch", "2"]
    assert heads.argv == ["abft-lens", "heads", "--model", "gemma3-270m"] and heads.where == "page.md:9"
    monkeypatch.chdir(tmp_path)
    small = tiny_cli_argv(study.argv[1:])
    assert small[small.index("--models") + 1] == "tiny" and small[small.index("--datasets") + 1] == "sst2,fp"
    assert small[small.index("--n-test") + 1] == "4" and small[small.index("--train-samples") + 1] == "4"
    small = tiny_cli_argv(train.argv[3:])
    assert small[small.index("--epoch") + 1] == "1" and "--epochs" not in small
    assert small[small.index("--model") + 1] == "tiny"  # named no model: would load SmolLM2


# --- links and the module table -----------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_relative_links_between_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md"]
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", file.read_text(encoding="utf-8"),
                                                            flags=re.S | re.M), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_method_page_names_every_module():
    table = (DOCS / "method.md").read_text(encoding="utf-8").split("## Method choices", 1)[0]
    named = set(re.findall(r"`(\w+\.py)`", table))
    modules = {p.name for p in PACKAGE.glob("*/*.py") if p.name != "__init__.py"}
    assert modules - named == set() and named - modules == set()
