"""Bad study input is refused before the study folder exists: exit 2, one message (error + fix line), no
traceback, nothing written (issue 18's "study checked late or not at all" family)."""

from __future__ import annotations

import json

import pytest

from abft_lens.cli import main

BASE = ["study", "--models", "tiny", "--datasets", "sst2", "--methods", "vanilla,ABFT", "--train-samples", "4",
        "--pseudo-batch-size", "2", "--epochs", "1", "--n-test", "4"]


def cli(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def _spec(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return ["--spec", path]


CASES = [
    ("seed -1", lambda t: ["--seeds", "-1"], "seed -1 is out of range"),
    ("seed 2**32", lambda t: ["--seeds", "4294967296"], "seed 4294967296 is out of range"),
    ("n-test too large", lambda t: ["--n-test", "100000"], "n_test=100000 is out of range for sst2"),
    ("k too large", lambda t: ["--k", "10000"], "k=10000 is larger than the demonstration split"),
    ("validation too large", lambda t: ["--validation-examples", "5000", "--validate-every", "1"],
     "--validation-examples 5000 leaves fewer than"),
    ("generalization n-test", lambda t: ["--generalization-test", "--generalization-n-test", "5000"],
     "n_test=5000 is out of range"),
    ("empty models", lambda t: ["--models", ""], "--models names no model"),
    ("empty datasets", lambda t: ["--datasets", ""], "--datasets names no dataset"),
    ("empty methods", lambda t: ["--methods", ""], "--methods names no method"),
    ("empty seeds", lambda t: ["--seeds", ""], "seed '' is not an integer"),
    ("spec null", lambda t: _spec(t, "s.json", "null"), "holds a NoneType, not a table"),
    ("spec number", lambda t: _spec(t, "s.json", "3"), "holds a int, not a table"),
    ("spec list", lambda t: _spec(t, "s.json", "[1, 2]"), "holds a list, not a table"),
    ("spec float seed", lambda t: _spec(t, "s.toml", "seeds = 1.5\n"), "seed 1.5 is not an integer"),
    ("spec number methods", lambda t: _spec(t, "s.toml", "methods = [1, 2]\n"), "methods = [1, 2] is not a name"),
    ("tiny huge seed", lambda t: ["--models", "tiny:seed=99999999999999"], "out of range"),
]


@pytest.mark.parametrize("name, extra, words", CASES, ids=[c[0] for c in CASES])
def test_bad_study_input_is_refused_before_the_folder_exists(tmp_path, capsys, name, extra, words):
    out = tmp_path / "study"
    argv = BASE + ["--out", out] + extra(tmp_path)
    code = cli(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 2 and lines[0].startswith("abft-lens: error: ") and lines[1].startswith("  fix: "), err
    assert words in lines[0], err
    assert not out.exists()


def test_the_corrected_command_then_runs(tmp_path, capsys):
    """A refused command leaves nothing behind, so the corrected one is not refused as "another plan"."""
    out = tmp_path / "study"
    assert cli(BASE + ["--out", out, "--seeds", "-1"]) == 2
    assert cli(BASE + ["--out", out, "--seeds", "0", "--methods", "vanilla"]) == 0
    assert json.loads((out / "study.json").read_text())["plan"]["seeds"] == [0]
