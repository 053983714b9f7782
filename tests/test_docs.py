"""Docs that cannot rot, and a package that behaves as a library.

- Every ```python block of the README's "## Python API" section, of ``docs/*.md``, and every literal block
  (``::``) of a module docstring runs here, on the ``tiny`` model with the sizes shrunk (the docs keep showing
  the real model).
- ``python -m abft_lens --help`` works with the hub off (run the way ``-m`` runs it, in a fresh interpreter).
- No exported name is shadowed by a submodule of the same name, and importing abft_lens with every submodule
  changes no process-wide state (environment, warning filters, loggers, torch defaults).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
