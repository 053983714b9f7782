"""TransformerLens 3.9 and 4.x beside each other: the set-up of each, the version read once in ``backends/tl.py``,
and the other version's environment answering (a missing one fails the test, naming the command that builds it)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import pytest

from abft_lens.backends import tl
from abft_lens.errors import AbftLensError
from conftest import run_in

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {name.lower(): version for name, version in (line.split("==") for line in lines)}


def test_the_version_is_read_once_at_import():
    assert tl.TL_VERSION == importlib.metadata.version("transformer-lens")
    assert tl.HAS_HOOKED == (int(tl.TL_VERSION.split(".")[0]) < 4)


@pytest.mark.skipif(tl.HAS_HOOKED, reason="the stand-ins exist only under 4.x; 3.9's own classes are checked "
                                          "by every other test")
def test_under_4x_hooked_transformer_is_a_stand_in_that_names_the_version_and_the_fix():
    import torch

    assert not isinstance(torch.nn.Linear(1, 1), tl.HookedTransformer)
    for cls in (tl.HookedTransformer, tl.HookedTransformerConfig):
        with pytest.raises(AbftLensError, match=rf"TransformerLens {re.escape(tl.TL_VERSION)} is installed") as info:
            cls(n_layers=1)
        assert "scripts/setup.sh" in str(info.value) and "TransformerBridge" in str(info.value)


def test_pyproject_declares_ranges_and_the_constraints_files_pin_each_set_up():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"transformer-lens>=3.9,<5"' in text and "==3.9.0" not in text
    old, new = _pins(ROOT / "constraints" / "tl3.9.txt"), _pins(ROOT / "constraints" / "tl4.txt")
    assert old["transformer-lens"] == "3.9.0" and new["transformer-lens"] == "4.3.0"
    for name in ("torch", "transformers", "einops", "jaxtyping", "peft", "bitsandbytes", "pytest"):
        assert old[name] == new[name], name  # the same libraries beside either TransformerLens
    assert old["torch"] == "2.13.0"
    installed = importlib.metadata.version("transformer-lens")
    assert installed in (old["transformer-lens"], new["transformer-lens"])


def test_setup_builds_one_environment_per_version_and_refuses_others():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "VENV=.venv; CONSTRAINTS=constraints/tl3.9.txt" in setup
    assert "VENV=.venv-tl4; CONSTRAINTS=constraints/tl4.txt" in setup
    assert setup.index('"torch==2.13.0"') < setup.index('-c "$CONSTRAINTS"')  # torch first, in its own command
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True,
                         env={**os.environ, "ABFT_LENS_TL": "7"})
    assert out.returncode == 2 and "ABFT_LENS_TL=7" in out.stderr and "ABFT_LENS_TL=4" in out.stderr
    test = (ROOT / "scripts" / "test.sh").read_text()
    assert "VENV=.venv-tl4" in test and '"$VENV/bin/python" -m pytest' in test
    # the README's test command alone sets up both environments: each suite's cross-version tests need the other
    assert "ABFT_LENS_TL=3 scripts/setup.sh" in test and "ABFT_LENS_TL=4 scripts/setup.sh" in test


def test_the_other_version_imports_abft_lens(other_tl_python):
    """The same checkout under the other TransformerLens: it reads its own version, and ``import abft_lens``
    (every submodule) works there."""
    out = run_in(other_tl_python, "import pkgutil, importlib, abft_lens\n"
                 "from abft_lens.backends import tl\n"
                 "for m in pkgutil.walk_packages(abft_lens.__path__, 'abft_lens.'): importlib.import_module(m.name)\n"
                 "print(tl.TL_VERSION, tl.HAS_HOOKED)")
    version, has_hooked = out.split()
    assert has_hooked == str(not tl.HAS_HOOKED) and version.split(".")[0] != tl.TL_VERSION.split(".")[0]


def test_a_model_of_neither_kind_is_refused_naming_the_version():
    import torch

    import abft_lens

    class Lookalike(torch.nn.Module):  # a module with a cfg is not enough
        cfg = object()

    for bad in (Lookalike(), torch.nn.Linear(2, 2), "tiny"):
        with pytest.raises(AbftLensError, match=rf"TransformerLens {re.escape(tl.TL_VERSION)} installed"):
            abft_lens.evaluate(bad, abft_lens.load_task("sst2"), n_test=2)


def test_a_run_folder_that_does_not_fit_the_model_exits_2_and_writes_nothing(tmp_path):
    """A run trained on one tiny shape, replayed on another: one message naming the fix, exit 2, nothing written."""
    from abft_lens.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--dataset", "sst2", "--train-samples", "2", "--pseudo-batch-size", "2",
                 "--n-test", "2", "--run-dir", str(run_dir)]) == 0
    before = sorted(p.name for p in run_dir.iterdir())
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny:n_heads=8,n_kv_heads=2", "--run", str(run_dir), "--n-test", "2",
                 "--output", str(out)]) == 2
    assert not out.exists() and sorted(p.name for p in run_dir.iterdir()) == before
