"""A run carries the data it was trained on: a custom file is recorded by path and sha256, and every command
that re-reads the run's data (report, compare, mix) uses that file or refuses, never a StaICC dataset that
happens to share the file's name (issue 18's "wrong results with exit 0" family)."""

from __future__ import annotations

import json

import pytest

from abft_lens.cli import main
from abft_lens.data.tasks import load_task, task_from_description
from abft_lens.errors import AbftLensError


def cli(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture()
def custom_run(tmp_path):
    data = tmp_path / "sst2.csv"  # named like a StaICC dataset on purpose
    rows = "".join(f"sentence number {i} is {'bad' if i % 2 else 'good'},{'neg' if i % 2 else 'pos'}\n"
                   for i in range(80))
    data.write_text("text,label\n" + rows)
    run = tmp_path / "run"
    assert cli(["train", "--model", "tiny", "--dataset", data, "--train-samples", "4", "--pseudo-batch-size", "2",
                "--epochs", "1", "--n-test", "4", "--run-dir", run]) == 0
    return data, run


def test_the_run_records_its_data_file_and_reads_it_back(custom_run):
    data, run = custom_run
    described = json.loads((run / "config.json").read_text())["task"]
    assert described["source"]["path"] == str(data.resolve()) and len(described["source"]["sha256"]) == 64
    task = task_from_description(described)
    assert task.label_words == (" neg", " pos") and len(task.test) == len(load_task(data).test)


def test_a_changed_moved_or_unrecorded_file_is_refused(custom_run, tmp_path, capsys):
    data, run = custom_run
    described = json.loads((run / "config.json").read_text())["task"]
    data.write_text(data.read_text() + "one more row,pos\n")
    with pytest.raises(AbftLensError, match="is not the data the run was trained on"):
        task_from_description(described)
    assert cli(["report", run, "--output", tmp_path / "r.html"]) == 2
    assert "is not the data the run was trained on" in capsys.readouterr().err
    data.unlink()
    with pytest.raises(AbftLensError, match="is not there any more"):
        task_from_description(described)
    old = {key: value for key, value in described.items() if key != "source"}  # a run folder from before
    with pytest.raises(AbftLensError, match="does not record"):
        task_from_description(old)


def test_a_staicc_run_still_loads_by_index():
    described = load_task("sst2").describe()
    assert "source" not in described and task_from_description(described).name == "sst2"
