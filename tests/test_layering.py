"""The package's architecture, enforced: layers in the order data flows, no cycles, no private names shared.

Layers, lowest first (a module may import from its own layer and the layers below, never above):
foundation (``arguments``, ``errors``, ``io``, ``resources``, ``run_files``, ``version``) → ``backends`` → ``data`` → ``interp`` → ``evaluation`` →
``training`` → ``reporting`` → ``studies`` → the entry points (``cli``, ``__main__``, the lazy ``__init__``).
Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "abft_lens"
FOUNDATION = ("arguments", "errors", "io", "resources", "run_files", "version")
LAYERS = ("backends", "data", "interp", "evaluation", "training", "reporting", "studies")
ENTRY = ("cli", "__main__", "__init__")
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: its lazy __init__
        return len(LAYERS) + 1
    top = parts[1]
    if top in FOUNDATION:
        return -1
    if top in LAYERS:
        return LAYERS.index(top)
    if top in ENTRY:
        return len(LAYERS) + 1
    raise AssertionError(f"{module}: not in any layer; add its folder to LAYERS or FOUNDATION")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every abft_lens import in ``path``, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "abft_lens":
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; import abft_lens.… absolutely")
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("abft_lens")]
    return found


def _graph() -> dict[str, list[tuple[str, list[str], int]]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = []
        for target, names, line in _imports(path):
            # ``from abft_lens.training import runs`` names a submodule, not an attribute
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            edges += [(sub, [], line) for sub in submodules] or [(target, names, line)]
        graph[name] = edges
    return graph


GRAPH = _graph()


def test_every_module_sits_in_a_layer():
    for module in GRAPH:
        _rank(module)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "abft_lens"))
def test_no_module_imports_a_higher_layer(module):
    upward = [f"line {line}: {target}" for target, _, line in GRAPH[module] if _rank(target) > _rank(module)]
    assert not upward, f"{module} (layer {_rank(module)}) imports from a higher layer: {upward}"


def test_no_private_name_is_imported_from_another_module():
    leaks = [f"{module} line {line}: {target}.{name}"
             for module, edges in GRAPH.items() for target, names, line in edges
             for name in names if name.startswith("_") and name != "__version__"]
    assert not leaks, f"private names used across modules: {leaks}"


def test_there_are_no_import_cycles():
    edges = {m: sorted({t for t, _, _ in e if t in GRAPH and t != m}) for m, e in GRAPH.items() if m != "abft_lens"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_a_violation(tmp_path):
    """The checker itself: an upward import and a private name are both found in a synthetic module."""
    fake = tmp_path / "abft_lens" / "backends" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from abft_lens.training.runs import _secret\n")
    (target, names, _), = _imports(fake)
    assert _rank(target) > _rank("abft_lens.backends.bad") and names == ["_secret"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    assert n_lines <= MAX_LINES, f"{path.name} has {n_lines} lines: split it by concept (limit {MAX_LINES})"
