"""``abft-lens eval``: a complete JSON written atomically; bad input is one message and exit status 2."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import abft_lens.io
from abft_lens.cli import main
from abft_lens.evaluation.evaluator import evaluate
from abft_lens.data.tasks import load_task


def _eval(tmp_path, *extra):
    return main(["eval", "--model", "tiny", "--dataset", "sst2", "--k", "4", "--n-test", "6", *extra])


def test_eval_tiny_writes_complete_json(tmp_path, capsys, tiny_loaded, no_network):
    output = tmp_path / "results" / "nested" / "eval.json"
    assert _eval(tmp_path, "--batch-size", "4", "--output", str(output)) == 0
    out, err = capsys.readouterr()
    assert f"wrote {output}" in out and "tiny on sst2, k=4" in out and "accuracy" in out
    assert "Traceback" not in err

    data = json.loads(output.read_text())
    for key in ("model", "dataset", "k", "seed", "metrics", "per_prompt", "task", "n", "label_words", "dtype"):
        assert key in data, key
    assert data["model"]["name"] == "tiny" and data["model"]["source"] == "tiny"
    assert data["dataset"]["name"] == "sst2" and data["dataset"]["index"] == 0
    assert data["k"] == 4 and data["seed"] == 42 and data["n"] == 6 and data["dtype"] == "float32"
    assert data["label_words"] == [" negative", " positive"]
    assert set(data["metrics"]) == {"accuracy", "mean_true_label_probability", "macro_f1", "ece"}
    rows = data["per_prompt"]
    assert len(rows) == 6
    task = load_task("sst2")
    for j, row in enumerate(rows):
        assert row["gold"] == task.test[j].label
        assert len(row["label_probs"]) == 2 and sum(row["label_probs"]) == pytest.approx(1, abs=1e-5)
        assert row["prediction"] == max(range(2), key=lambda c: (row["label_probs"][c], -c))
    assert data["metrics"]["accuracy"] == pytest.approx(sum(r["gold"] == r["prediction"] for r in rows) / 6)

    # the same numbers as the Python API on the same model and prompts
    reference = evaluate(tiny_loaded, task, k=4, n_test=6)
    torch.testing.assert_close(torch.tensor([r["label_probs"] for r in rows]), torch.tensor(reference.probs),
                               rtol=0, atol=2e-6)
    assert data["metrics"]["accuracy"] == reference.accuracy
    # written atomically: nothing else was left in the folder
    assert [p.name for p in output.parent.iterdir()] == ["eval.json"]


def test_eval_output_is_atomic_when_writing_fails(tmp_path, capsys, monkeypatch):
    output = tmp_path / "eval.json"
    output.write_text('{"old": true}\n')

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(abft_lens.io.os, "fsync", fail)
    assert _eval(tmp_path, "--output", str(output)) == 2  # one message, no traceback (the CLI's OSError path)
    err = capsys.readouterr().err
    assert "disk full" in err and "Traceback" not in err
    assert json.loads(output.read_text()) == {"old": True}  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # and no partial temporary file remains


def test_eval_custom_csv_dataset(tmp_path, capsys):
    rows = [f"item {i} is {'great' if i % 2 else 'awful'},{'good' if i % 2 else 'bad'}" for i in range(24)]
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    output = tmp_path / "custom.json"
    assert main(["eval", "--model", "tiny-mha", "--dataset", str(path), "--k", "2", "--n-test", "5",
                 "--output", str(output)]) == 0
    data = json.loads(output.read_text())
    assert data["dataset"]["name"] == "reviews" and data["label_words"] == [" bad", " good"]
    assert data["model"]["n_key_value_heads"] is None
    assert len(data["per_prompt"]) == 5 and data["k"] == 2


def _write_missing_field_csv(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("text,label\nfine,good\n,bad\n")
    return str(path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "no-such-model-xyz"], "could not load model 'no-such-model-xyz'"),
        (["--model", "tiny", "--dataset", "12"], "dataset index 12 is out of range"),
        (["--model", "tiny", "--dataset", "imdb"], "unknown dataset 'imdb'"),
        (["--model", "tiny", "--k", "5000"], "k=5000 is larger than the demonstration split"),
        (["--model", "tiny", "--dataset", "CSV"], "line 3: missing field(s) text"),
        (["--model", "tiny:n_layers=two"], "needs an integer value"),
        (["--model", "missing-model.gguf"], "does not exist"),
        (["--model", "tiny:n_ctx=64", "--k", "4"], "context of 64"),
    ],
)
def test_eval_bad_input_is_one_message_and_exit_2(args, expected, tmp_path, capsys, no_network, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [_write_missing_field_csv(tmp_path) if a == "CSV" else a for a in args]
    output = tmp_path / "never.json"
    assert main(["eval", *args, "--n-test", "2", "--output", str(output)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("abft-lens: error: ") and err.count("abft-lens: error:") == 1
    assert expected in err and "\n  fix: " in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert not output.exists()
    assert no_network.attempts == []


@pytest.mark.parametrize("option, value", [("--n-test", "0"), ("--n-test", "-3"), ("--k", "0"), ("--k", "four"),
                                           ("--batch-size", "0")])
def test_argparse_rejects_non_positive_integers(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", "tiny", option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("positive integer" in err or "not an integer" in err)


def test_help_opens_with_the_usage_and_a_clean_description(capsys, monkeypatch):
    """``abft-lens --help``: the usage, a blank line, then the description without the docstring's reST markup."""
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps the usage line to the terminal's width
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == ["usage: abft-lens [-h] {eval,train,demo,heads,report,mix,export,table,study} ...", "",
                         "abft-lens: a thin command line over the Python API.", "", "positional arguments:"]


def test_python_m_abft_lens_cli_is_the_command_line(capsys, monkeypatch):
    """``python -m abft_lens.cli`` (the README's torchrun line) runs the same ``main`` as ``abft-lens``."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["abft_lens.cli", "heads", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("abft_lens.cli", run_name="__main__", alter_sys=True)
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: abft-lens heads ")


def test_eval_requires_a_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


@pytest.mark.parametrize("test_type, variants", [("TempSensitivity", 9), ("DemoSensitivity", 8)])
def test_eval_test_type_writes_the_robustness_report(test_type, variants, tmp_path, capsys, tiny_loaded, no_network):
    """``eval --test-type``: the consistency over the 9 templates / 8 demonstration sets, the unseen-label test and
    the contextual bias, printed and written as JSON, equal to ``robustness_report`` on the same model."""
    from abft_lens.evaluation.robustness import consistency, robustness_report

    output = tmp_path / "robustness.json"
    assert main(["eval", "--model", "tiny", "--dataset", "sst2", "--k", "2", "--n-test", "4", "--test-type", test_type,
                 "--robustness-queries", "3", "--output", str(output)]) == 0
    out, err = capsys.readouterr()
    assert f"tiny on sst2, k=2, {test_type}" in out and f"wrote {output}" in out and "Traceback" not in err
    for words in ("consistency", "accuracy, unseen label demos", "accuracy, random demos", "accuracy, zero shot demos",
                  "contextual bias entropy"):
        assert words in out, words

    data = json.loads(output.read_text())
    assert data["test_type"] == test_type and data["k"] == 2
    predictions = data["sensitivity"]["predictions"]
    assert len(predictions) == variants and all(len(row) == 3 for row in predictions)  # [variant][query]
    assert data["consistency"] == pytest.approx(consistency(torch.tensor(predictions)))
    assert 1 / variants <= data["consistency"] <= 1
    assert set(data["unseen_label"]) == {"unseen_label", "random", "zero_shot"}
    assert data["contextual_bias"]["n_prompts"] == 4
    assert 0 <= data["contextual_bias"]["entropy"] <= data["contextual_bias"]["max_entropy"] + 1e-9

    # the same numbers as the Python API on the same model and prompts
    reference = robustness_report(tiny_loaded, load_task("sst2"), test_type, k=2, n_queries=3, n_test=4)
    assert data["sensitivity"]["predictions"] == reference["sensitivity"]["predictions"]
    assert data["consistency"] == reference["consistency"]
    for name, metrics in reference["unseen_label"].items():
        assert data["unseen_label"][name] == pytest.approx(metrics)
    assert data["contextual_bias"]["entropy"] == pytest.approx(reference["contextual_bias"]["entropy"])
    assert no_network.attempts == []


def test_eval_test_type_rejects_unknown_types_and_bad_query_counts(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", "tiny", "--test-type", "Loud"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    output = tmp_path / "never.json"
    assert main(["eval", "--model", "tiny", "--dataset", "sst2", "--k", "2", "--n-test", "2", "--test-type",
                 "TempSensitivity", "--robustness-queries", "5000", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("abft-lens: error: ") and "n_queries=5000 is out of range" in err and "Traceback" not in err
    assert not output.exists()


def test_eval_calibrated_equals_the_python_api(tmp_path, capsys, tiny_loaded, no_network):
    from abft_lens.evaluation.robustness import calibrated_evaluate

    output = tmp_path / "cc.json"
    assert _eval(tmp_path, "--calibrated", "--output", str(output)) == 0
    assert "contextual calibration" in capsys.readouterr().out
    data = json.loads(output.read_text())
    reference = calibrated_evaluate(tiny_loaded, load_task("sst2"), k=4, n_test=6)
    assert data["method"] == "contextual_calibration" and data["metrics"] == reference.metrics
    assert _eval(tmp_path, "--calibrated", "--test-type", "TempSensitivity") == 2
    assert "--calibrated applies to the Normal evaluation" in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _eval(tmp_path, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "--device cuda was asked for" in err and "Traceback" not in err and err.count("error:") == 1
    assert _eval(tmp_path, "--device", "auto") == 0  # auto falls back to the CPU
