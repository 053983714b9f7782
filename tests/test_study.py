"""``abft-lens study`` on the tiny model: the issue's "done when" grid, resumption (a rerun runs no cell; a run
killed mid-cell resumes bit-identically), the base weights restored between cells, shared baselines, failed
cells, bad input before any cell runs, variants and spec files, and the tables against recomputed values."""

from __future__ import annotations

import copy as copy_module
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abft_lens.cli import main
from abft_lens.errors import AbftLensError
from abft_lens.io import read_json
from abft_lens.evaluation.metrics import mcnemar_exact
from abft_lens.reporting.study_tables import collapse_threshold

REPO = Path(__file__).resolve().parent.parent
DONE_WHEN = ["--models", "tiny", "--datasets", "sst2,fp", "--methods", "vanilla,cc,ABFT,E2E", "--seeds", "0,1",
             "--train-samples", "8", "--pseudo-batch-size", "4", "--n-test", "8"]


def _study(out: Path, *extra: str) -> list[str]:
    return ["study", "--out", str(out), *DONE_WHEN, *extra]


def _digest(model) -> str:
    """sha256 over every attention W_Q/_W_K of the model."""
    from abft_lens.backends import qk

    h = hashlib.sha256()
    for layer in range(model.cfg.n_layers):  # TransformerLens names and layout on either version
        for name in ("W_Q", "_W_K"):
            h.update(qk.value(model, qk.tensor_name(layer, name)).detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def done_study(tmp_path_factory):
    """The issue's "done when" command, run once in this process; every call of run_training records the W_Q/W_K
    digest of the model it was handed (the base must be the same for every cell) and of the model it left."""
    from abft_lens.studies import study

    out = tmp_path_factory.mktemp("study") / "done"
    seen = []
    real = study.run_training

    def recording(loaded, task, config, **kwargs):
        before = _digest(loaded)
        result = real(loaded, task, config, **kwargs)
        given_back = _digest(loaded)
        trained = None
        if result.trained is not None:  # the weights this run trained, applied to a copy of the base
            copy = copy_module.deepcopy(loaded)
            result.apply_to(copy)
            trained = _digest(copy)
        seen.append((task.name, config.method, config.seed, before, (given_back, trained), kwargs))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "run_training", recording)
        status = main(_study(out))
    return out, status, seen


def test_done_when_command_finishes_with_tables(done_study):
    out, status, seen = done_study
    assert status == 0
    data = read_json(out / "study.json")
    assert [r["state"] for r in data["cells"].values()] == ["done"] * 12  # 2 datasets x (2 baselines + 2 x 2 runs)
    assert len(seen) == 8
    for name in ("table1.md", "table1.csv", "table1.html"):
        assert (out / name).is_file()
    assert not (out / "table2.md").exists()  # no --generalization-test
    markdown = (out / "table1.md").read_text()
    assert "| vanilla |" in markdown and "| ABFT |" in markdown and "improved / hurt" in markdown
    # ordinary run folders, readable by the other commands
    for dataset in ("sst2", "fp"):
        for method in ("ABFT", "E2E"):
            for seed in (0, 1):
                run = out / "tiny" / dataset / method / f"seed-{seed}"
                assert {"config.json", "fore_test.json", "post_test.json", "metrics.json", "trained.safetensors",
                        "log.jsonl"} <= {p.name for p in run.iterdir()}
                assert not (run / "checkpoint.pt").exists()


def test_a_cell_is_an_ordinary_run_folder(done_study, tmp_path):
    """``eval --run`` on a cell's folder reproduces its post test on a fresh base model."""
    out, _, _ = done_study
    run = out / "tiny" / "fp" / "E2E" / "seed-1"
    assert main(["eval", "--model", "tiny", "--dataset", "fp", "--k", "4", "--n-test", "8", "--run", str(run),
                 "--output", str(tmp_path / "again.json")]) == 0
    again, post = read_json(tmp_path / "again.json"), read_json(run / "post_test.json")
    assert again["metrics"] == post["metrics"] and again["per_prompt"] == post["per_prompt"]


def test_base_weights_restored_between_cells(done_study):
    """Every trained cell starts from the bit-identical base and gives it back; E2E really moved the weights."""
    _, _, seen = done_study
    starts = {before for *_, before, _, _ in seen}
    assert len(starts) == 1
    assert all(given_back == before for *_, before, (given_back, _), _ in seen)
    assert any(trained not in (None, before) for _, method, _, before, (_, trained), _ in seen if method == "E2E")


def test_baselines_once_and_reused_as_fore_test(done_study):
    """One vanilla and one cc file per dataset; every run's fore_test.json is the shared vanilla evaluation, handed
    over instead of being evaluated again."""
    out, _, seen = done_study
    assert all(kwargs["fore_result"] is not None for *_, kwargs in seen)
    for dataset in ("sst2", "fp"):
        assert sorted(p.name for p in (out / "tiny" / dataset).iterdir()) == ["ABFT", "E2E", "cc", "vanilla"]
        vanilla = read_json(out / "tiny" / dataset / "vanilla" / "k4-n8.json")
        assert len(vanilla["per_prompt"]) == 8 and (out / "tiny" / dataset / "cc" / "k4-n8.json").is_file()
        for run in (out / "tiny" / dataset).glob("*/seed-*"):
            fore = read_json(run / "fore_test.json")
            assert fore["per_prompt"] == vanilla["per_prompt"] and fore["metrics"] == vanilla["metrics"]
            assert read_json(run / "metrics.json")["fore"] == vanilla["metrics"]


def test_rerun_runs_no_cell(done_study, monkeypatch):
    from abft_lens.studies import study

    out, _, _ = done_study
    before = (out / "study.json").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    for name in ("run_training", "evaluate", "calibrated_evaluate"):
        monkeypatch.setattr(study, name, forbidden)
    assert main(_study(out)) == 0
    after = read_json(out / "study.json")
    assert [r["attempts"] for r in after["cells"].values()] == [1] * 12
    assert after["cells"] == json.loads(before)["cells"]


def test_table_matches_a_recomputed_sign_test(done_study, capsys):
    """The CSV's query counts, sign-test p, Holm p and per-seed gained/lost equal a recomputation from the run
    folders (per query, the change summed over seeds; here every prompt is its own query: 8 of 512);
    ``abft-lens table STUDY_DIR`` prints the study's Table 1."""
    import csv
    import math

    out, _, _ = done_study
    rows = {(r["method"], r["dataset"]): r for r in csv.DictReader((out / "table1.csv").open())}
    for method in ("ABFT", "E2E"):
        raw = {}
        for dataset in ("sst2", "fp"):
            vanilla = read_json(out / "tiny" / dataset / "vanilla" / "k4-n8.json")["per_prompt"]
            right = [p["prediction"] == p["gold"] for p in vanilla]
            change, seeds, accuracies = [0] * 8, [], []
            for seed in (0, 1):
                post = read_json(out / "tiny" / dataset / method / f"seed-{seed}" / "post_test.json")
                after = [p["prediction"] == p["gold"] for p in post["per_prompt"]]
                change = [c + int(a) - int(b) for c, a, b in zip(change, after, right)]
                seeds.append(f"{sum(a and not b for a, b in zip(after, right))}/"
                             f"{sum(b and not a for a, b in zip(after, right))}")
                accuracies.append(sum(after) / len(after))
            better, worse = sum(c > 0 for c in change), sum(c < 0 for c in change)
            n = better + worse
            p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2 ** n)
            row = rows[(method, dataset)]
            assert (int(row["queries_better"]), int(row["queries_worse"])) == (better, worse)
            assert float(row["p_sign"]) == pytest.approx(p, rel=1e-5)
            assert row["seed_gained_lost"] == " ".join(seeds)
            assert float(row["accuracy"]) == pytest.approx(100 * sum(accuracies) / 2, abs=1e-3)
            raw[dataset] = p
        low, high = sorted(raw, key=raw.get)  # Holm over the two datasets, by hand
        assert float(rows[(method, low)]["p_holm"]) == pytest.approx(min(1.0, 2 * raw[low]), rel=1e-5)
        assert float(rows[(method, high)]["p_holm"]) == pytest.approx(max(min(1.0, 2 * raw[low]), raw[high]), rel=1e-5)
    for dataset in ("sst2", "fp"):
        vanilla = read_json(out / "tiny" / dataset / "vanilla" / "k4-n8.json")["per_prompt"]
        assert float(rows[("vanilla", dataset)]["majority_rate"]) == pytest.approx(
            100 * max(map([p["gold"] for p in vanilla].count, set(p["gold"] for p in vanilla))) / 8)
    assert main(["table", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"# Study {out.name}")


def test_mcnemar_exact_against_known_values():
    """Two-sided exact binomial test, values from the README's runs (18/8: 0.076; 28/8: 0.001)."""
    assert mcnemar_exact(18, 8) == pytest.approx(0.07552, abs=5e-5)
    assert mcnemar_exact(28, 8) == pytest.approx(2 * 40_999_516 / 2 ** 36)  # sum of C(36, 0..8), by hand
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 5) == mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert collapse_threshold(0.5) == pytest.approx(0.7) and collapse_threshold(0.8) == 0.9


def test_kill_mid_cell_then_rerun_resumes_bit_identically(done_study, tmp_path):
    """A study process killed (SIGKILL) while a cell trains, then run again: it finishes every cell, resuming the
    interrupted one from its checkpoint, and every trained tensor equals the uninterrupted study's."""
    from safetensors.torch import load_file

    reference, _, _ = done_study
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "abft_lens", *_study(out)], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_in = None
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline and killed_in is None:
        checkpoints = list(out.glob("tiny/*/*/seed-*/checkpoint.pt"))
        if checkpoints:
            process.send_signal(signal.SIGKILL)
            killed_in = checkpoints[0].parent
        time.sleep(0.02)
    process.wait(timeout=60)
    assert killed_in is not None, "the study ended before any checkpoint was seen"
    state = read_json(out / "study.json")["cells"]
    key = "/".join(killed_in.relative_to(out).parts)
    assert state[key]["state"] == "running" and not (killed_in / "metrics.json").exists()

    assert main(_study(out)) == 0
    state = read_json(out / "study.json")["cells"]
    assert all(r["state"] == "done" for r in state.values())
    assert state[key]["attempts"] == 2
    for run in reference.glob("tiny/*/*/seed-*"):
        twin = out / run.relative_to(reference)
        expected, got = load_file(run / "trained.safetensors"), load_file(twin / "trained.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected), twin
        assert read_json(twin / "post_test.json")["per_prompt"] == read_json(run / "post_test.json")["per_prompt"]
    for path in out.rglob("*.json"):  # atomic writes: no result file was left half-written by the kill
        read_json(path)


def test_ctrl_c_marks_the_cell_interrupted_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    from abft_lens.studies import study

    out = tmp_path / "ctrl-c"
    real = study.run_training
    calls = []

    def interrupted(loaded, task, config, **kwargs):
        calls.append(task.name)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(loaded, task, config, **kwargs)

    monkeypatch.setattr(study, "run_training", interrupted)
    args = ["study", "--out", str(out), "--models", "tiny", "--datasets", "sst2", "--methods", "ABFT",
            "--train-samples", "4", "--pseudo-batch-size", "2", "--n-test", "4", "--validation-examples", "16",
            "--validation-prompts", "4", "--validate-every", "1", "--keep-best", "--select-metric", "macro_f1"]
    assert main(args) == 130
    assert read_json(out / "study.json")["cells"]["tiny/sst2/ABFT/seed-0"]["state"] == "interrupted"
    assert main(args) == 0
    record = read_json(out / "study.json")["cells"]["tiny/sst2/ABFT/seed-0"]
    assert record["state"] == "done" and record["attempts"] == 2
    # the study records which validation metric chose the kept step
    assert record["metrics"]["select_metric"] == "macro_f1" and record["metrics"]["best_validation_step"] in (0, 1, 2)
    assert "validation guard selects on: macro_f1" in (out / "table1.md").read_text()
    assert "**Validation guard**" in (out / "table1.md").read_text()
    page = (out / "table1.html").read_text()  # offline: plotly.js inlined once, two figures (accuracy, validation)
    assert page.count("plotly.js v") == 1 and page.count("Plotly.newPlot") == 2 and "validation accuracy" in page


def test_failed_cell_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    from abft_lens.studies import study

    real = study.run_training

    def failing(loaded, task, config, **kwargs):
        if task.name == "fp":
            raise AbftLensError("a prompt of fp is longer than the model's context.", "use a smaller k.")
        return real(loaded, task, config, **kwargs)

    monkeypatch.setattr(study, "run_training", failing)
    out = tmp_path / "failing"
    status = main(["study", "--out", str(out), "--models", "tiny", "--datasets", "fp,sst2", "--methods", "vanilla,ABFT",
                   "--train-samples", "4", "--pseudo-batch-size", "4", "--n-test", "4"])
    assert status == 1
    cells = read_json(out / "study.json")["cells"]
    assert cells["tiny/fp/ABFT/seed-0"]["state"] == "failed"
    assert "longer than the model's context" in cells["tiny/fp/ABFT/seed-0"]["error"]
    assert cells["tiny/sst2/ABFT/seed-0"]["state"] == "done" and cells["tiny/fp/vanilla"]["state"] == "done"
    assert "failed: tiny/fp/ABFT/seed-0" in capsys.readouterr().out
    table = (out / "table1.md").read_text()
    assert "## Missing cells" in table and "tiny/fp/ABFT/seed-0" in table


@pytest.mark.parametrize("args, words", [
    (["--models", "no-such-model"], "unknown model"),
    (["--datasets", "sst2,nope"], "unknown dataset"),
    (["--methods", "vanilla,ABFTX"], "unknown method"),
    (["--methods", "fast=ABFT:--lr"], "expected one argument"),
    (["--methods", "fast=ABFT:--frobnicate 3"], "unrecognized arguments"),
    (["--methods", "fast=ABFT:--n-test 16"], "set for the whole study"),
    (["--methods", "fast=cc:--lr 1e-3"], "not a trained method"),
    (["--methods", "fast=ABFT:--lr '1e-3"], "do not parse"),
    (["--seed", "3"], "--seed does not apply"),
    (["--calibration-test"], "--calibration-test does not apply"),
])
def test_bad_input_one_message_before_any_cell(tmp_path, capsys, args, words):
    out = tmp_path / "bad"
    assert main(["study", "--out", str(out), "--models", "tiny", "--datasets", "sst2", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "fix:" in err and "Traceback" not in err
    assert not out.exists()


def test_out_is_a_file_and_another_plan_are_refused(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["study", "--out", str(afile), "--models", "tiny", "--datasets", "sst2", "--methods", "vanilla"]) == 2
    assert "is a file" in capsys.readouterr().err
    out = tmp_path / "one"
    base = ["study", "--out", str(out), "--models", "tiny", "--datasets", "sst2", "--n-test", "4"]
    assert main(base + ["--methods", "vanilla"]) == 0
    saved = (out / "study.json").read_text()
    assert main(base + ["--methods", "vanilla,cc"]) == 2
    err = capsys.readouterr().err
    assert "another plan" in err and "--extend" in err
    assert (out / "study.json").read_text() == saved
    assert main(base[:-1] + ["8", "--methods", "vanilla", "--extend"]) == 2  # --extend keeps the options
    assert "options differ" in capsys.readouterr().err
    assert main(base + ["--methods", "cc", "--datasets", "fp", "--extend"]) == 0
    cells = read_json(out / "study.json")["cells"]
    assert sorted(cells) == ["tiny/fp/cc", "tiny/fp/vanilla", "tiny/sst2/cc", "tiny/sst2/vanilla"]
    assert cells["tiny/sst2/vanilla"]["attempts"] == 1  # kept, not run again
    assert read_json(out / "study.json")["plan"]["datasets"] == ["sst2", "fp"]
    assert (out / "tiny" / "fp" / "cc" / "k4-n4.json").is_file()


def test_a_flag_added_after_planning_resumes_only_while_off():
    """A study.json written before an option existed compares equal to today's settings with the option off
    (None or False), and different with it on; 0 is a value, not "off"."""
    from abft_lens.studies.study_plan import settings_differences

    saved = {"lr": 5e-4, "restricted_gradient": True}
    assert settings_differences(saved, {**saved, "balance_query_labels": False, "select_max_p": None}) == []
    assert settings_differences(saved, {**saved, "balance_query_labels": True}) == [
        "balance_query_labels None -> True"]
    assert settings_differences({**saved, "new_count": 3}, saved) == ["new_count 3 -> None"]
    assert settings_differences(saved, {**saved, "new_count": 0}) == ["new_count None -> 0"]
    assert settings_differences(saved, {**saved, "lr": 1e-4}) == ["lr 0.0005 -> 0.0001"]


def test_variants_and_spec_file(tmp_path):
    """A variant's options land on top of the study's; a spec file fills what the command line leaves out."""
    from abft_lens.cli import build_parser
    from abft_lens.cli.study_command import study_config_from_args
    from abft_lens.studies.study_plan import parse_methods, read_spec

    argv = ["study", "--out", str(tmp_path / "s"), "--lr", "5e-4", "--restricted-gradient", "--train-samples", "16",
            "--pseudo-batch-size", "8", "--models", "tiny", "--datasets", "sst2"]
    config = study_config_from_args(build_parser().parse_args(argv))
    recipe_for = config.recipe_for
    base, fast, e2e = parse_methods("ABFT,fast=ABFT:--lr 1e-3 --no-restricted-gradient --penalty-mode None "
                                    "--select-metric accuracy,slow=E2E:--epochs 3")
    assert (recipe_for(base).config.lr, recipe_for(base).config.restricted_gradient) == (5e-4, True)
    config = recipe_for(fast).config
    assert (config.lr, config.restricted_gradient, config.penalty_mode) == (1e-3, False, "None")
    assert config.train_samples == 16
    assert (config.select_metric, recipe_for(base).config.select_metric) == ("accuracy", "macro_f1")
    assert (recipe_for(e2e).config.method, recipe_for(e2e).config.epochs) == ("E2E", 3)
    (balanced,) = parse_methods("ABFT-balanced=ABFT:--balance-query-labels")
    assert recipe_for(balanced).config.balance_query_labels and not recipe_for(base).config.balance_query_labels

    spec = tmp_path / "spec.toml"
    spec.write_text('models = ["tiny"]\ndatasets = "sst2"\nmethods = ["vanilla", "fast"]\nseeds = [0, 2]\n'
                    '[variants]\nfast = "ABFT:--lr 1e-3"\n[options]\ntrain-samples = 32\nkeep-best = true\n'
                    'validation-examples = 64\nvalidate-every = 2\nlr = 9e-4\n')
    data = read_spec(spec)
    config = study_config_from_args(build_parser().parse_args(argv + ["--spec", str(spec)]))
    assert (config.train_samples, config.keep_best, config.validate_every) == (16, True, 2)  # the command line's 16 wins
    assert config.lr == 5e-4 and config.plan().seeds == [0, 2] and config.plan().models == ["tiny"]
    assert data["variants"] == {"fast": "ABFT:--lr 1e-3"} and data["seeds"] == [0, 2]
    bad = tmp_path / "bad.toml"
    bad.write_text("modles = ['tiny']\n")
    with pytest.raises(AbftLensError, match="unknown keys"):
        read_spec(bad)


def test_generalization_study_writes_table2(tmp_path):
    """--generalization-test: the base model's eight-dataset evaluation comes from shared vanilla files (one per
    dataset), the runs add their after-training evaluation, and table2 holds ID/OOD, parameters and time."""
    out = tmp_path / "general"
    assert main(["study", "--out", str(out), "--models", "tiny", "--datasets", "sst2", "--methods", "ABFT,E2E",
                 "--train-samples", "4", "--pseudo-batch-size", "4", "--n-test", "4", "--generalization-test"]) == 0
    run = out / "tiny" / "sst2" / "ABFT" / "seed-0"
    general = read_json(run / "generalization.json")
    assert set(general["fore"]) == {"sst2", "mr", "fp", "sst5", "trec", "subj", "tee", "teh"} and "post" in general
    for name, entry in general["fore"].items():
        vanilla = read_json(out / "tiny" / name / "vanilla" / "k4-n4.json")
        assert {key: value for key, value in entry.items() if key != "correct"} == vanilla["metrics"]
        assert entry["correct"] == "".join(str(int(r["prediction"] == r["gold"])) for r in vanilla["per_prompt"])
    table2 = (out / "table2.md").read_text()
    assert "| ABFT |" in table2 and "| E2E |" in table2 and "1.00×" in table2
    assert "| vanilla |" in table2

    # bench/ood_answers.py restores answers a run written before they were kept lacks, checked against the file
    import importlib.util

    spec = importlib.util.spec_from_file_location("ood_answers", Path(__file__).parents[1] / "bench" / "ood_answers.py")
    ood_answers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ood_answers)
    record = {"path": str(run.relative_to(out))}
    assert ood_answers.backfill(out, record, "tiny") == "has its answers"
    for phases in (("fore",), ("fore", "post")):  # fore only: a run resumed on newer code kept post's answers
        stripped = copy_module.deepcopy(general)
        for phase in phases:
            for entry in stripped[phase].values():
                del entry["correct"]
        (run / "generalization.json").write_text(json.dumps(stripped))
        assert ood_answers.backfill(out, record, "tiny") == "answers added"
        assert read_json(run / "generalization.json") == general
    first = next(iter(general["post"]))
    stripped["post"][first]["accuracy"] += 0.25  # a stored accuracy the run does not reproduce: left alone
    for entry in stripped["post"].values():
        entry.pop("correct", None)
    (run / "generalization.json").write_text(json.dumps(stripped))
    with pytest.raises(SystemExit, match="differs from the stored"):
        ood_answers.backfill(out, record, "tiny")
    assert json.loads((run / "generalization.json").read_text()) == stripped
