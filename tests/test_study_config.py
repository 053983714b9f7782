"""``StudyConfig``: a study's settings checked when made, the same plan from Python and from the command line,
every committed study folder still resumes, and the library's messages name Python options where the CLI's
name flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abft_lens.cli import build_parser, main
from abft_lens.cli.common import cli_message
from abft_lens.cli.study_command import study_config_from_args
from abft_lens.errors import AbftLensError
from abft_lens.studies.study_config import StudyConfig, option_names
from abft_lens.studies.study_plan import StudyPlan
from abft_lens.training.options import train_config_from_options
from abft_lens.training.presets import preset

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(models="tiny", datasets="sst2", train_samples=4, pseudo_batch_size=2, n_test=4)


@pytest.mark.parametrize("values, problem", [
    (dict(k=0), "k=0 must be a positive integer."),
    (dict(n_test=2.5), "n_test=2.5 must be a positive integer or None."),
    (dict(lr="fast"), "lr='fast' must be a number or None."),
    (dict(restricted_gradient="yes"), "restricted_gradient='yes' must be True or False or None."),
    (dict(dtype="float16"), "dtype='float16' is unknown."),
    (dict(device="banana"), "device='banana' is not a device name."),
    (dict(seeds="-1"), "seed -1 is out of range."),
    (dict(methods=""), "methods names no method."),
    (dict(models=""), "models names no model."),
    (dict(methods="vanilla,fast=ABFT:--n-test 8"), "variant fast sets n_test, which is set for the whole study."),
    (dict(p_gain=0.1), "p_gain is used only with penalty_mode='P'; here it would be ignored."),
    (dict(preset="paper", lr=1e-3), "preset='paper' fixes train_samples=512, pseudo_batch_size=32, lr=2e-05, "
                                    "n_test=1024; also given: train_samples=4, pseudo_batch_size=2, lr=0.001, "
                                    "n_test=4."),
    (dict(train_samples=0), "train_samples=0 must be a positive integer or None."),
    (dict(pseudo_batch_size=8), "pseudo_batch_size=8 is larger than train_samples=4"),
    (dict(variants={"fast": 3}), "variants={'fast': 3} must map names to 'ABFT:OPTIONS' strings."),
])
def test_bad_values_are_one_message_naming_the_python_option(tmp_path, values, problem):
    with pytest.raises(AbftLensError) as caught:
        StudyConfig(out=tmp_path / "s", **{**SMALL, **values})
    assert str(caught.value).startswith(problem) and "\n  fix: " in str(caught.value)
    assert "--" not in caught.value.problem.replace("ABFT:--", "")  # Python names, not flags
    assert not (tmp_path / "s").exists()


def test_the_cli_names_the_flags_of_the_same_checks(tmp_path, capsys):
    base = ["study", "--out", str(tmp_path / "s"), "--models", "tiny", "--datasets", "sst2", "--train-samples", "4",
            "--pseudo-batch-size", "2", "--n-test", "4"]
    assert main(base + ["--p-gain", "0.1"]) == 2
    assert capsys.readouterr().err == ("abft-lens: error: --p-gain is used only with --penalty-mode P; here it would "
                                       "be ignored.\n  fix: drop --p-gain, or set --penalty-mode P.\n")
    assert main(base + ["--pseudo-batch-size", "8"]) == 2
    assert "fix: pass --pseudo-batch-size <= 4, or more --train-samples." in capsys.readouterr().err


def test_cli_message_rewrites_only_the_named_options():
    error = AbftLensError("k=10 and lr=0.5 in /tmp/k/out; the k of n_test.", "pass lr=2e-5.", names=("lr", "n_test"))
    assert cli_message(error) == "k=10 and --lr 0.5 in /tmp/k/out; the k of --n-test.\n  fix: pass --lr 2e-5."
    assert cli_message(AbftLensError("preset='paper' fixes it.", names=("preset",))) == "--preset paper fixes it."


def test_python_and_the_cli_make_the_same_plan(tmp_path):
    out = tmp_path / "s"
    argv = ["study", "--out", str(out), "--models", "tiny", "--datasets", "sst2,fp", "--methods",
            "vanilla,ABFT,fast=ABFT:--lr 1e-3 --no-restricted-gradient", "--seeds", "0,1", "--lr", "5e-4",
            "--restricted-gradient", "--train-samples", "8", "--pseudo-batch-size", "4", "--n-test", "8",
            "--validation-examples", "16", "--validate-every", "1", "--keep-best"]
    from_cli = study_config_from_args(build_parser().parse_args(argv))
    from_python = StudyConfig(out=out, models="tiny", datasets=["sst2", "fp"],
                              methods=["vanilla", "ABFT", "fast"],
                              variants={"fast": "ABFT:--lr 1e-3 --no-restricted-gradient"},
                              seeds=[0, 1], lr=5e-4, restricted_gradient=True, train_samples=8,
                              pseudo_batch_size=4, n_test=8, validation_examples=16, validate_every=1,
                              keep_best=True)
    assert from_cli.plan().to_dict() == from_python.plan().to_dict()
    for method in from_cli.plan().methods:
        if method.trained:
            assert from_cli.recipe_for(method) == from_python.recipe_for(method)


def test_python_runs_a_study_like_the_cli(tmp_path):
    from abft_lens.studies.study import run_study

    state = run_study(StudyConfig(out=tmp_path / "py", methods="vanilla", **SMALL), progress=False)
    assert state.counts()["done"] == 1
    assert main(["study", "--out", str(tmp_path / "py"), "--models", "tiny", "--datasets", "sst2", "--methods",
                 "vanilla", "--train-samples", "4", "--pseudo-batch-size", "2", "--n-test", "4"]) == 0  # resumes


def test_a_bfloat16_study_trains_under_autocast_over_float32_weights_as_train_does(tmp_path):
    """``dtype="bfloat16"`` in a study means what ``train --dtype bfloat16`` means: float32 weights (and Adam
    state), bfloat16 autocast in the training forward; the run's ``resolved`` block says so."""
    from abft_lens.studies.study import run_study

    state = run_study(StudyConfig(out=tmp_path / "bf16", methods="vanilla,ABFT", seeds="0", dtype="bfloat16",
                                  **SMALL), progress=False)
    assert state.counts()["done"] == 2
    (config_file,) = (tmp_path / "bf16").glob("*/*/ABFT/seed-0/config.json")
    compute = json.loads(config_file.read_text())["resolved"]["compute_dtype"]
    assert compute["value"] == "bfloat16" and "autocast over the model's float32 weights" in compute["reason"]


@pytest.mark.parametrize("path", sorted(REPO.glob("bench/results/study-*/study.json")),
                         ids=lambda p: p.parent.name)
def test_every_committed_study_resumes_under_study_config(path):
    """Each committed study's plan, rebuilt as a StudyConfig from its own options (the values its preset filled
    left out, as on its command line), is the same study: no "settings differ", the same recipes."""
    data = json.loads(path.read_text())
    saved = StudyPlan.from_dict(data["plan"])
    settings = {key: value for key, value in saved.settings.items() if key in option_names()}
    if settings.get("preset"):
        fixed = preset(settings["preset"]).fixed()
        settings = {key: value for key, value in settings.items() if not (key in fixed and fixed[key] == value)}
    config = StudyConfig(out="unused", models="tiny", datasets=saved.datasets, seeds=saved.seeds,
                         methods=[m.name for m in saved.methods],
                         variants={m.name: f"{m.kind}:" + " ".join(m.args) for m in saved.methods if m.args},
                         **settings)
    plan = config.plan()
    plan.models = saved.models
    assert plan.differences(saved) == []
    for method in saved.methods:
        if method.trained:
            recipe, old = config.recipe_for(method).to_dict(), data["recipes"][method.name]
            assert {k: v for k, v in recipe.items() if k in old and k != "config"} == \
                   {k: v for k, v in old.items() if k != "config"}
            assert {k: v for k, v in recipe["config"].items() if k in old["config"]} == old["config"]


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("abft_lens").TrainConfig(train_samples=0),
     "train_samples=0 must be an integer in 1..100000.\n  fix: pass train_samples in 1..100000."),
    (lambda: __import__("abft_lens").TrainConfig(validate_every=2),
     "validate_every=2 needs held-out validation examples.\n  fix: add validation_examples (e.g. 256), or drop "
     "validate_every."),
    (lambda: __import__("abft_lens").TrainConfig.paper(lr=1e-4), "preset 'paper' fixes lr=2e-05; asked for lr=0.0001."),
    (lambda: train_config_from_options({"method": "E2E", "award": 1.0}),
     "award is used only with method='ABFT' (E2E trains cross-entropy); here it would be ignored.\n"
     "  fix: drop award, or set method='ABFT' (E2E trains cross-entropy)."),
])
def test_config_layer_messages_name_python_options(make, message):
    """TrainConfig, the presets and the option mapping speak Python from Python; only the CLI says flags."""
    with pytest.raises(AbftLensError) as caught:
        make()
    assert str(caught.value).startswith(message) and "--" not in str(caught.value)


def test_the_cli_says_the_same_train_check_with_flags(tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--validate-every", "2",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("abft-lens: error: --validate-every 2 needs held-out validation examples.\n"
                                       "  fix: add --validation-examples (e.g. 256), or drop --validate-every.\n")


def test_the_cli_help_names_the_default_methods():
    from abft_lens.cli import study_command
    from abft_lens.studies.study_config import DEFAULT_METHODS

    assert study_command.DEFAULT_METHODS == ",".join(DEFAULT_METHODS)
