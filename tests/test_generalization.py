"""Generalization: summaries, tables in the paper's layout (mean ± std over seeds), the ``table`` CLI and
``train --test_type`` / ``--generalization_test`` on the tiny model."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from abft_lens.cli import main
from abft_lens.evaluation.generalization import generalization_summary
from abft_lens.reporting.tables import BASE_METHOD, CC_METHOD, ResultTable, mean_std, table_from_runs



def cli(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def test_summary_in_domain_and_out_of_domain():
    accuracy = {"sst2": 0.9, "mr": 0.8, "fp": 0.5, "sst5": 0.3}
    summary = generalization_summary(accuracy, "sst2")
    assert summary["in_domain"] == 0.9
    assert summary["out_of_domain"] == pytest.approx((0.8 + 0.5 + 0.3) / 3)
    assert summary["average"] == pytest.approx(2.5 / 4)


def test_table_layout_and_averages():
    table = ResultTable()
    for seed, (a, b) in enumerate([(0.80, 0.60), (0.90, 0.70)]):
        table.add("ABFT", "mr", b, seed)
        table.add("ABFT", "sst2", a, seed)
    table.add("E2E", "sst2", 0.5, 0)
    assert table.columns == ["sst2", "mr"] and table.header() == ["sst2", "mr", "Avg."]
    assert table.cell("ABFT", "sst2") == pytest.approx((0.85, math.sqrt(0.005), 2))
    assert table.average("ABFT") == pytest.approx([0.70, 0.80])  # per seed, then mean ± std
    assert table.cell("ABFT", "Avg.") == pytest.approx((0.75, math.sqrt(0.005), 2))
    assert table.cell("E2E", "Avg.") is None  # E2E lacks MR: no average
    markdown = table.to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == "| Method | SST-2 | MR | Avg. |"
    assert lines[2] == "| ABFT | 85.00 ± 7.07 | 65.00 ± 7.07 | 75.00 ± 7.07 |"
    assert lines[3] == "| E2E | 50.00 | – | – |"
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert rows[0]["method"] == "ABFT" and rows[0]["runs"] == "2"
    assert float(rows[0]["Avg."]) == pytest.approx(75.0) and float(rows[0]["Avg._std"]) == pytest.approx(100 * math.sqrt(0.005), abs=1e-4)
    html = table.to_html()
    assert "<th>SST-2</th>" in html and "85.00 ± 7.07" in html and html.count("<tr>") == 3
    assert mean_std([1.0]) == (1.0, 0.0)


def _fake_run(path, method, seed, dataset, fore, post, general=None, calibrated=None):
    path.mkdir()
    if calibrated is not None:
        (path / "calibration.json").write_text(json.dumps({
            "k": 4, "n_test": 8, "fore": {task: {"accuracy": acc} for task, acc in calibrated.items()}}))
    (path / "config.json").write_text(json.dumps({
        "train": {"method": method, "seed": seed, "k": 4}, "model": {"name": "tiny"}, "task": {"name": dataset},
        "n_test": 8}))
    for name, acc in (("fore_test.json", fore), ("post_test.json", post)):
        (path / name).write_text(json.dumps({"task": dataset, "k": 4, "label_words": [" a", " b"],
                                             "metrics": {"accuracy": acc}, "per_prompt": []}))
    if general is not None:
        (path / "generalization.json").write_text(json.dumps(general))
    return path


def test_table_from_runs_main_layout(tmp_path):
    """Runs without generalization.json fill their dataset's column; the base row is counted once."""
    runs = [_fake_run(tmp_path / "a", "ABFT", 0, "sst2", 0.5, 0.7), _fake_run(tmp_path / "b", "ABFT", 1, "sst2", 0.5, 0.8),
            _fake_run(tmp_path / "c", "ABFT", 0, "mr", 0.4, 0.6)]
    table = table_from_runs(runs)
    assert table.rows() == [BASE_METHOD, "ABFT"]
    assert table.values[BASE_METHOD] == {"sst2": [0.5], "mr": [0.4]}
    assert table.cell("ABFT", "sst2") == pytest.approx((0.75, math.sqrt(0.005), 2))
    assert table.cell("ABFT", "Avg.") is None  # 2 seeds on SST-2, 1 on MR


def test_table_from_runs_generalization_layout(tmp_path):
    general = lambda post: {"trained_dataset": "sst2", "fore": {"sst2": {"accuracy": 0.5}, "mr": {"accuracy": 0.4}},
                            "post": {"sst2": {"accuracy": post[0]}, "mr": {"accuracy": post[1]}}}
    runs = [_fake_run(tmp_path / "a", "ABFT", 0, "sst2", 0.5, 0.7, general((0.7, 0.6))),
            _fake_run(tmp_path / "b", "ABFT", 1, "sst2", 0.5, 0.9, general((0.9, 0.4)))]
    table = table_from_runs(runs)
    row = "ABFT (trained on SST-2)"
    assert table.rows() == [BASE_METHOD, row] and table.header() == ["sst2", "mr", "Avg.", "ID", "OOD"]
    assert table.cell(row, "ID") == pytest.approx((0.8, math.sqrt(0.02), 2))
    assert table.cell(row, "OOD") == pytest.approx((0.5, math.sqrt(0.02), 2))
    assert table.cell(BASE_METHOD, "Avg.") == pytest.approx((0.45, 0.0, 1))


def test_table_from_runs_cc_row(tmp_path):
    """calibration.json adds the base model's contextual-calibration row right after the base row, once per
    dataset (like the base row); runs without it leave that row's other cells empty."""
    runs = [_fake_run(tmp_path / "a", "E2E", 0, "sst2", 0.5, 0.9),
            _fake_run(tmp_path / "b", "ABFT", 0, "sst2", 0.5, 0.7, calibrated={"sst2": 0.6}),
            _fake_run(tmp_path / "c", "ABFT", 1, "sst2", 0.5, 0.8, calibrated={"sst2": 0.6}),
            _fake_run(tmp_path / "d", "ABFT", 0, "mr", 0.4, 0.6)]
    table = table_from_runs(runs)
    assert table.rows() == [BASE_METHOD, CC_METHOD, "E2E", "ABFT"]
    assert table.values[CC_METHOD] == {"sst2": [0.6]}  # counted once, not per seed
    lines = table.to_markdown().splitlines()
    assert lines[3] == "| ICL+CC (base) | 60.00 | – | – |"

    general = {"trained_dataset": "sst2", "fore": {"sst2": {"accuracy": 0.5}, "mr": {"accuracy": 0.4}},
               "post": {"sst2": {"accuracy": 0.7}, "mr": {"accuracy": 0.5}}}
    run = _fake_run(tmp_path / "g", "ABFT", 0, "sst2", 0.5, 0.7, general, calibrated={"sst2": 0.75, "mr": 0.55})
    table = table_from_runs([run])
    assert table.rows() == [BASE_METHOD, CC_METHOD, "ABFT (trained on SST-2)"]
    assert table.cell(CC_METHOD, "Avg.") == pytest.approx((0.65, 0.0, 1))


QUICK = ["train", "--model", "tiny", "--dataset", "sst2", "--train-samples", "4", "--pseudo-batch-size", "4",
         "--epochs", "1", "--n-test", "4", "--k", "2", "--batch-size", "16"]


def test_train_extras_and_table_cli(tmp_path, capsys):
    """A TempSensitivity + generalization run and a second seed, then ``abft-lens table`` over both."""
    first, second = tmp_path / "seed0", tmp_path / "seed1"
    assert cli(QUICK + ["--run-dir", first, "--seed", "0", "--test_type", "TempSensitivity",
                        "--robustness-queries", "2", "--generalization_test", "--generalization-n-test", "2",
                        "--calibration-test"]) == 0
    robustness = json.loads((first / "robustness.json").read_text())
    assert robustness["test_type"] == "TempSensitivity"
    for phase in ("fore", "post"):
        assert len(robustness[phase]["sensitivity"]["predictions"]) == 9
        assert set(robustness[phase]["unseen_label"]) == {"unseen_label", "random", "zero_shot"}
        assert 0 <= robustness[phase]["contextual_bias"]["entropy"] <= math.log(2) + 1e-9
    general = json.loads((first / "generalization.json").read_text())
    assert list(general["post"]) == ["sst2", "mr", "fp", "sst5", "trec", "subj", "tee", "teh"]
    assert general["post_summary"]["in_domain"] == general["post"]["sst2"]["accuracy"]
    calibration = json.loads((first / "calibration.json").read_text())
    assert list(calibration["fore"]) == list(general["fore"]) and "post" not in calibration
    assert calibration["n_test"] == 2 and calibration["method"] == "contextual_calibration"
    out = capsys.readouterr().out
    assert "consistency" in out and "contextual calibration (base) average" in out

    assert cli(QUICK + ["--run-dir", second, "--seed", "1", "--generalization_test",
                        "--generalization-n-test", "2"]) == 0
    output = tmp_path / "table.md"
    assert cli(["table", first, second, "--output", output]) == 0
    lines = output.read_text().splitlines()
    assert lines[0].startswith("| Method | SST-2 | MR | FP | SST-5 | TREC | Subj | TEE | TEH | Avg. | ID | OOD |")
    assert lines[2].startswith("| ICL (base) |") and lines[3].startswith("| ICL+CC (base) |")
    cc = [c.strip() for c in lines[3].split("|")[2:-1]]
    assert cc[:8] == [f"{100 * m['accuracy']:.2f}" for m in calibration["fore"].values()]
    row = next(line for line in lines if line.startswith("| ABFT (trained on SST-2)"))
    values = [json.loads((d / "generalization.json").read_text())["post"]["mr"]["accuracy"] for d in (first, second)]
    mean, std = mean_std(values)
    assert row.split(" | ")[2] == f"{100 * mean:.2f} ± {100 * std:.2f}"
    capsys.readouterr()
    assert cli(["table", first, second, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("method,runs,sst2,sst2_std")


def test_calibration_test_main_layout_is_the_base_models_calibrated_evaluation(tmp_path, capsys):
    """``train --calibration-test`` without --generalization_test: calibration.json holds the base model's
    calibrated SST-2 evaluation on the run's n_test prompts (equal to calibrated_evaluate on a fresh base), and
    ``abft-lens table`` shows it as the CC row next to the base and ABFT rows."""
    from abft_lens.backends.loading import load_model
    from abft_lens.evaluation.robustness import calibrated_evaluate
    from abft_lens.data.tasks import load_task

    run = tmp_path / "run"
    assert cli(QUICK + ["--run-dir", run, "--lr", "1e-2", "--threshold", "0", "--calibration-test"]) == 0
    out = capsys.readouterr().out
    calibration = json.loads((run / "calibration.json").read_text())
    assert set(calibration["fore"]) == {"sst2"} and calibration["n_test"] == 4 and calibration["k"] == 2
    expected = calibrated_evaluate(load_model("tiny"), load_task("sst2"), k=2, n_test=4)
    assert calibration["fore"]["sst2"] == pytest.approx(expected.metrics)
    assert any("contextual calibration (base) accuracy" in line and line.split()[-1] == f"{expected.accuracy:.4f}"
               for line in out.splitlines())
    assert not (run / "robustness.json").exists() and not (run / "generalization.json").exists()
    table = table_from_runs([run])
    assert table.rows() == [BASE_METHOD, CC_METHOD, "ABFT"]
    assert table.values[CC_METHOD] == {"sst2": [expected.accuracy]}
