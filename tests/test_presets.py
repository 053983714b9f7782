"""Named regimes (``TrainConfig.paper()``, ``TrainConfig.demo()``, ``--preset``) and the label-prior control.

The paper's settings are listed here from the method sheet (Cho et al. 2025, §3 "Defaults of the paper" and
the paper's example command), independently of :mod:`abft_lens.training.presets`.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from abft_lens.cli import main
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import EvalResult
from abft_lens.evaluation.label_prior import prior_reweighted
from abft_lens.training.presets import preset
from abft_lens.training.train import TrainConfig

PAPER_SHEET = {  # field -> the paper's value
    "method": "ABFT", "k": 4, "train_samples": 512, "pseudo_batch_size": 32, "epochs": 2, "lr": 2e-5,
    "award": 1.0, "penalty": 0.5, "penalty_mode": "PID", "pid_kp": 0.03, "pid_ki": 0.005, "pid_kd": 0.005,
    "threshold": None,  # T = k / (k + ln n_t)
    "restricted_gradient": False,  # the paper's example command leaves --restricted_gradient off
    "validation_examples": 0, "validate_every": 0, "keep_best": False,  # no guard: the last step is reported
    "select_max_p": None, "balance_query_labels": False,
}


def cli(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def test_paper_preset_equals_the_papers_settings_field_by_field():
    config = TrainConfig.paper()
    for name, value in PAPER_SHEET.items():
        assert getattr(config, name) == value, name
    assert config.total_steps == 32 and config.trainable.kind == "full" and config.trainable.targets == ("q", "k")
    assert config.preset == "paper"
    assert preset("paper").n_test == 1024  # 512 test queries x 2 demonstration samplings
    assert TrainConfig.from_dict(config.to_dict()) == config  # config.json names the preset


def test_demo_preset_is_the_demo_regime():
    config = TrainConfig.demo(seed=3)
    assert (config.train_samples, config.pseudo_batch_size, config.epochs, config.lr) == (128, 16, 1, 5e-4)
    assert config.restricted_gradient and config.keep_best and config.validate_every == 2
    assert config.seed == 3 and config.preset == "demo" and preset("demo").n_test == 256


def test_a_preset_refuses_a_contradicting_value_and_names_both():
    assert TrainConfig.paper(seed=5, micro_batch_size=4).seed == 5  # fields the preset leaves free
    with pytest.raises(AbftLensError, match=r"fixes lr=2e-05; asked for lr=0.0001"):
        TrainConfig.paper(lr=1e-4)
    assert TrainConfig.paper(lr=0.00002).lr == 2e-5  # the same number, spelled otherwise
    with pytest.raises(AbftLensError, match="unknown preset 'papre'"):
        TrainConfig.from_preset("papre")
    with pytest.raises(AbftLensError, match=r"names preset 'paper' but has lr=0.001"):
        replace(TrainConfig.paper(), lr=1e-3)  # changed after construction: re-checked


def test_cli_preset_contradiction_is_one_message_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli(["train", "--model", "tiny", "--preset", "paper", "--validate-every", "2", "--validation-examples",
                "64", "--run-dir", tmp_path / "run"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == ("abft-lens: error: --preset paper fixes --validation-examples 0, --validate-every 0; also "
                        "given: --validation-examples 64, --validate-every 2.")
    assert lines[1] == "  fix: drop --validation-examples, --validate-every (or --preset paper)."
    assert list(tmp_path.iterdir()) == []
    assert cli(["train", "--model", "tiny", "--preset", "nosuch"]) == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_cli_preset_paper_fills_the_run_and_the_demo_yields_to_given_options():
    from abft_lens.cli import build_parser
    from abft_lens.cli.train_command import train_config_from_args

    args = build_parser().parse_args(["train", "--model", "tiny", "--preset", "paper", "--method", "E2E",
                                      "--seed", "1"])
    config = train_config_from_args(args)
    assert config == TrainConfig.paper(method="E2E", seed=1) and args.n_test == 1024
    demo = build_parser().parse_args(["demo", "--lr", "3e-3"])  # the demo's own defaults yield to options
    config = train_config_from_args(demo)
    assert config.lr == 3e-3 and config.train_samples == 128 and config.preset is None


def test_a_study_planned_under_one_preset_refuses_another(tmp_path, capsys):
    from abft_lens.studies.study_plan import StudyPlan
    from abft_lens.studies.study_state import StudyState

    out = tmp_path / "study"
    common = ["study", "--out", out, "--models", "tiny", "--datasets", "sst2", "--methods", "vanilla"]
    assert cli(common + ["--preset", "paper"]) == 0
    capsys.readouterr()
    assert cli(common + ["--preset", "demo"]) == 2
    err = capsys.readouterr().err
    assert "--preset 'paper' -> 'demo'" in err and "--n-test 1024 -> 256" in err and "--lr 2e-05 -> 0.0005" in err
    saved = json.loads((out / "study.json").read_text())["plan"]
    assert saved["settings"]["preset"] == "paper" and saved["settings"]["n_test"] == 1024
    assert isinstance(StudyState.open(out, StudyPlan.from_dict(saved)), StudyState)


def _calibrated(probs, gold) -> EvalResult:
    from abft_lens.evaluation.metrics import classification_metrics
    import torch

    return EvalResult(task="t", k=4, metrics=classification_metrics(torch.tensor(gold), torch.tensor(probs)),
                      gold=gold, predictions=torch.tensor(probs).argmax(-1).tolist(), probs=probs,
                      label_words=["a", "b", "c"])


def test_label_prior_reweights_calibrated_probabilities_by_bayes_rule():
    probs = [[0.7, 0.2, 0.1], [0.2, 0.45, 0.35], [0.1, 0.1, 0.8]]
    calibrated = _calibrated(probs, [0, 2, 2])
    same = prior_reweighted(calibrated, [1 / 3, 1 / 3, 1 / 3])  # a uniform prior changes nothing
    assert same.predictions == calibrated.predictions
    shifted = prior_reweighted(calibrated, [0.2, 0.2, 0.6])
    row = [0.2 * 0.2, 0.45 * 0.2, 0.35 * 0.6]  # by hand: p_cc(y|x) * share(y), renormalized
    assert shifted.probs[1] == pytest.approx([v / sum(row) for v in row], abs=1e-6)
    assert shifted.predictions == [0, 2, 2] and shifted.metrics["accuracy"] == 1.0
    assert shifted.info["label_shares"] == [0.2, 0.2, 0.6]
    with pytest.raises(AbftLensError, match="do not fit"):
        prior_reweighted(calibrated, [0.5, 0.5])


def test_query_label_shares_count_the_trainers_own_prompts(tiny_loaded):
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.data.tasks import load_task
    from abft_lens.training.train import query_label_shares, training_prompts

    builder = prompt_builder(tiny_loaded, load_task("fp"))
    config = TrainConfig(train_samples=60, pseudo_batch_size=10, seed=4)
    labels = [p.query_label for p in training_prompts(builder, config)]
    assert query_label_shares(builder, config) == [labels.count(c) / 60 for c in range(3)]
    balanced = query_label_shares(builder, replace(config, balance_query_labels=True))
    assert balanced == [1 / 3, 1 / 3, 1 / 3]


def test_prior_shift_flags_a_move_toward_the_training_shares():
    from abft_lens.evaluation.label_prior import label_distribution, prior_shift, total_variation

    vanilla, shares = [0.5, 0.5, 0.0], [0.2, 0.7, 0.1]
    assert label_distribution([0, 1, 1, 2], 3) == [0.25, 0.5, 0.25]
    assert total_variation([1, 0], [0, 1]) == 1.0 and total_variation(vanilla, vanilla) == 0.0
    assert prior_shift([0.3, 0.7, 0.0], vanilla, shares)       # moved 0.2 toward the shares
    assert not prior_shift([0.7, 0.3, 0.0], vanilla, shares)   # moved 0.2 away from them
    assert not prior_shift([0.45, 0.55, 0.0], vanilla, shares)  # moved less than PRIOR_SHIFT
    assert prior_shift([0.7, 0.3, 0.0], vanilla, None)          # shares unknown: the move alone counts


def test_paper_study_on_tiny_writes_both_tables_with_the_new_tests(tmp_path):
    """The issue's "done when": --preset paper on tiny runs vanilla, cc, prior, ABFT, E2E and writes Table 1
    (sign test, Holm, prior control, head to head, cost) and Table 2 (per trained dataset)."""
    out = tmp_path / "paper"
    assert cli(["study", "--out", out, "--preset", "paper", "--models", "tiny", "--datasets", "sst2", "--seeds", "0",
                "--generalization-test", "--generalization-n-test", "4", "--dont-save-model"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [r["method"] for r in study["cells"].values()] == ["vanilla", "cc", "prior", "ABFT", "E2E"]
    assert all(r["state"] == "done" and r["metrics"]["peak_rss_mib"] > 0 for r in study["cells"].values())
    trained = study["cells"]["tiny/sst2/ABFT/seed-0"]["metrics"]
    assert trained["steps"] == 32 and trained["preset"] == "paper" and trained["prompts_per_second"] > 0
    run = out / "tiny" / "sst2" / "ABFT" / "seed-0"
    assert json.loads((run / "config.json").read_text())["train"]["preset"] == "paper"
    assert len(json.loads((run / "post_test.json").read_text())["per_prompt"]) == 1024
    prior = json.loads((out / "tiny" / "sst2" / "prior" / "seed-0" / "k4-n1024.json").read_text())
    assert prior["method"] == "label_prior" and sum(prior["label_shares"]) == pytest.approx(1)
    table1 = (out / "table1.md").read_text()
    for part in ("| prior |", "Holm", "**Tests against vanilla**", "**Head to head**", "| ABFT vs E2E |",
                 "**Cost per run**", "| step s |", "1024 test prompts"):
        assert part in table1, part
    from abft_lens.reporting.study_tables import cost_rows, study_tables
    from abft_lens.run_files import step_seconds

    costs = {row["method"]: row for row in cost_rows(study_tables(out).models[0])}
    for method in ("ABFT", "E2E"):  # prompts/s on the steps' own seconds of log.jsonl: 512 prompts x 2 epochs
        seconds = step_seconds(out / "tiny" / "sst2" / method / "seed-0")
        assert costs[method]["prompts_per_second"] == pytest.approx(1024 / seconds)
        assert costs[method]["step_seconds"] == pytest.approx(seconds)
    table2 = (out / "table2.md").read_text()
    assert "Table 2 per trained dataset" in table2 and "| ABFT | SST-2 | 1 |" in table2
    assert "**Table 2 tests: out of domain**" in table2 and "| vanilla vs ABFT | SST-2 |" in table2
    assert "| ABFT vs E2E | SST-2 |" in table2
    general = json.loads((run / "generalization.json").read_text())
    assert len(general["post"]["mr"]["correct"]) == 4 and set(general["fore"]["mr"]["correct"]) <= {"0", "1"}


def test_step_seconds_sum_every_logged_step_of_a_run(tmp_path):
    """The cost tables' training time (``run_files.step_seconds``): the step lines' seconds of ``log.jsonl``, each
    step once (validation lines and a half-written last line left out); None without a step line."""
    from abft_lens.run_files import LOG_FILE, step_seconds

    assert step_seconds(tmp_path) is None
    lines = [{"event": "step", "step": 1, "seconds": 2.5}, {"event": "validation", "step": 1, "accuracy": 0.5},
             {"event": "step", "step": 2, "seconds": 4.0}]
    (tmp_path / LOG_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"event": "st')
    assert step_seconds(tmp_path) == 6.5


def test_ood_tests_count_what_the_answers_say(tmp_path):
    """``ood_tests`` against a count written here from ``generalization.json``: per out-of-domain prompt (tiny's
    16 prompts a dataset are 16 distinct queries; one seed; E2E, which moves tiny's answers), right after training
    minus right before; the prompts better and worse summed over the 7 other datasets, and the exact two-sided
    sign test of those counts."""
    from math import comb

    from abft_lens.reporting.study_generalization import ood_tests
    from abft_lens.reporting.study_tables import study_tables

    out = tmp_path / "ood"
    assert cli(["study", "--out", out, "--models", "tiny", "--datasets", "sst2", "--seeds", "0", "--methods", "E2E",
                "--train-samples", "16", "--pseudo-batch-size", "8", "--epochs", "2", "--lr", "1e-2", "--n-test", "4",
                "--generalization-test", "--generalization-n-test", "16", "--dont-save-model"]) == 0
    general = json.loads((out / "tiny" / "sst2" / "E2E" / "seed-0" / "generalization.json").read_text())
    better = worse = 0
    for name in general["post"]:
        if name != "sst2":
            for before, after in zip(general["fore"][name]["correct"], general["post"][name]["correct"]):
                better, worse = better + (after > before), worse + (after < before)
    n = better + worse
    p = min(1.0, 2 * sum(comb(n, i) for i in range(min(better, worse) + 1)) / 2**n) if n else 1.0
    assert n > 0  # training moved some out-of-domain answers: the count is not trivially 0 / 0
    [row] = ood_tests(study_tables(out).models[0])
    assert (row["first"], row["second"], row["trained"]) == ("vanilla", "E2E", "sst2")
    assert (row["first_better"], row["second_better"]) == (worse, better)
    assert row["p"] == pytest.approx(p) and row["p_holm"] == pytest.approx(p)
