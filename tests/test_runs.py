"""Run folders (abft_lens.training.runs): contents, interrupt and resume to bit-identical weights, the validation guard
with keep-best, and load_run reproducing the post test on a fresh base model."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

from abft_lens.backends import qk
from safetensors.torch import load_file

import abft_lens.training.callbacks as callbacks
import abft_lens.training.runs as runs
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import evaluate
from abft_lens.backends.loading import load_model
from abft_lens.run_files import TRAINED_FILE
from abft_lens.training.runs import load_run, run_training
from abft_lens.data.tasks import load_task
from abft_lens.training.train import TrainConfig
from abft_lens.training.adapters import attach
from abft_lens.training.trainable import TrainableConfig

N_TEST = 8



@pytest.fixture(scope="module")
def task():
    return load_task("sst2")


def config(**overrides) -> TrainConfig:
    """4 steps (2 epochs of 2 pseudo-batches), a threshold some heads of the random tiny model pass."""
    values = dict(train_samples=8, pseudo_batch_size=4, epochs=2, lr=1e-2, threshold=0.03,
                  pid_kp=0.3, pid_ki=0.1, pid_kd=0.1)
    values.update(overrides)
    return TrainConfig(**values)


def train(task, run_dir, cfg: TrainConfig, spec: str = "tiny", **kwargs):
    model = load_model(spec)
    kwargs = {"n_test": N_TEST, "progress": False, **kwargs}
    return run_training(model, task, cfg, run_dir=run_dir, **kwargs), model


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def without_timing(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / TRAINED_FILE)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def interrupt_after(step: int, how: str):
    def callback(trainer, result):
        if result.step == step:
            if how == "raise":
                raise KeyboardInterrupt
            trainer.stop_requested = True

    return callback


# ---------------------------------------------------------------------------------------- the folder


def test_run_folder_holds_config_log_tests_metrics_and_trained_tensors(task, tmp_path):
    cfg = config()
    result, model = train(task, tmp_path / "run", cfg)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["config.json", "log.jsonl", "fore_test.json", "post_test.json", "metrics.json", TRAINED_FILE])
    meta = json.loads((run_dir / "config.json").read_text())
    assert TrainConfig.from_dict(meta["train"]) == cfg
    assert meta["model"]["name"] == "tiny" and meta["task"]["name"] == "sst2" and meta["n_test"] == N_TEST

    log = read_log(run_dir)
    assert [line["step"] for line in log] == [1, 2, 3, 4] and {line["event"] for line in log} == {"step"}
    assert without_timing(log) == without_timing([{"event": "step", **s} for s in result.steps])
    assert log[-1]["epoch"] == 1 and all(len(line["head_counts"]) == 2 for line in log)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["fore"] == result.fore.metrics and metrics["post"] == result.post.metrics
    assert metrics["steps"] == 4 and metrics["best_validation_step"] is None
    assert json.loads((run_dir / "post_test.json").read_text())["n"] == N_TEST
    # the file (and result.trained) holds exactly the trained tensors; the model is given back as it came
    tensors = trained(run_dir)
    assert set(tensors) == {f"blocks.{l}.attn.{w}" for l in range(2) for w in ("W_Q", "_W_K")}
    assert_same_tensors(result.trained, tensors)
    base = load_model("tiny")
    assert not torch.equal(qk.value(base, "blocks.1.attn.W_Q"), tensors["blocks.1.attn.W_Q"])
    assert_same_tensors(dict(model.named_parameters()), dict(base.named_parameters()))


# ------------------------------------------------------------------------------------------- resume

RESUME_CASES = {
    "raise-after-1": (dict(), 1, "raise", 1),
    "stop-at-epoch-end-guard-keep-best": (
        dict(validation_examples=32, validation_prompts=8, validate_every=1, keep_best=True), 2, "stop", 1),
    "restricted-raise-after-3": (dict(restricted_gradient=True), 3, "raise", 1),
    "lora-e2e-stop-after-1": (dict(method="E2E", trainable=TrainableConfig(kind="lora", lora_r=4)), 1, "stop", 1),
    # checkpoint at step 2, log already at step 3: the resumed log drops step 3 and writes it once again
    "significance-guard-raise-after-2": (
        dict(validation_examples=32, validation_prompts=8, validate_every=1, keep_best=True, select_max_p=0.5),
        2, "raise", 1),
    "checkpoint-every-2-raise-after-3": (dict(validation_examples=32, validation_prompts=8, validate_every=1),
                                         3, "raise", 2),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_run_resumes_to_bit_identical_weights_and_log(task, tmp_path, case):
    overrides, stop_at, how, every = RESUME_CASES[case]
    cfg = config(**overrides)
    reference, _ = train(task, tmp_path / "ref", cfg, checkpoint_every=every)
    run_dir = tmp_path / "run"

    if how == "raise":
        with pytest.raises(KeyboardInterrupt):
            train(task, run_dir, cfg, checkpoint_every=every, callbacks=[interrupt_after(stop_at, how)])
    else:
        stopped, _ = train(task, run_dir, cfg, checkpoint_every=every, callbacks=[interrupt_after(stop_at, how)])
        assert stopped.post is None and len(stopped.steps) == stop_at
    assert (run_dir / "checkpoint.pt").is_file()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / TRAINED_FILE).exists()
    assert [line["step"] for line in read_log(run_dir) if line["event"] == "step"] == list(range(1, stop_at + 1))

    resumed, _ = train(task, run_dir, cfg, checkpoint_every=every, resume=True)
    assert [s["step"] for s in resumed.steps] == list(range(stop_at // every * every + 1, 5))
    assert_same_tensors(trained(run_dir), trained(tmp_path / "ref"))
    assert resumed.post.metrics == reference.post.metrics and resumed.post.probs == reference.post.probs
    # one line per step and per validation, equal to the uninterrupted run's log but for timings
    log, ref_log = read_log(run_dir), read_log(tmp_path / "ref")
    assert [line["step"] for line in log if line["event"] == "step"] == [1, 2, 3, 4]
    assert without_timing(log) == without_timing(ref_log)
    ref_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_validation_step"] == ref_metrics["best_validation_step"]
    assert metrics["fore"] == ref_metrics["fore"]
    assert not (run_dir / "checkpoint.pt").exists()
    # the training time counts the sessions before the resume: at least every logged step's own seconds
    step_seconds = sum(line["seconds"] for line in log if line["event"] == "step")
    assert metrics["train_seconds"] >= step_seconds - 0.006  # metrics round to 0.01 s


def test_crash_before_the_first_checkpoint_restarts_cleanly(task, tmp_path):
    cfg = config(epochs=1)
    train(task, tmp_path / "ref", cfg)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(task, run_dir, cfg, callbacks=[interrupt_after(1, "raise")])
    (run_dir / "checkpoint.pt").unlink()  # as if it died between the log line and the checkpoint
    train(task, run_dir, cfg, resume=True)
    assert [line["step"] for line in read_log(run_dir)] == [1, 2]
    assert_same_tensors(trained(run_dir), trained(tmp_path / "ref"))


def test_resume_refuses_other_settings_and_complete_runs(task, tmp_path):
    cfg = config(epochs=1)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(task, run_dir, cfg, callbacks=[interrupt_after(1, "raise")])
    with pytest.raises(AbftLensError, match="already holds a run"):
        train(task, run_dir, cfg)
    for other in (dataclasses.replace(cfg, lr=2e-2), dataclasses.replace(cfg, seed=1),
                  dataclasses.replace(cfg, restricted_gradient=True)):
        with pytest.raises(AbftLensError, match="different settings"):
            train(task, run_dir, other, resume=True)
    with pytest.raises(AbftLensError, match="different settings"):
        train(task, run_dir, cfg, spec="tiny-mha", resume=True)
    with pytest.raises(AbftLensError, match="different settings"):
        train(load_task("mr"), run_dir, cfg, resume=True)
    with pytest.raises(AbftLensError, match="different settings"):
        train(task, run_dir, cfg, resume=True, n_test=N_TEST + 4)
    with pytest.raises(AbftLensError, match="different settings"):
        run_training(load_model("tiny", dtype=torch.float64), task, cfg, run_dir=run_dir, n_test=N_TEST,
                     progress=False, resume=True)
    assert (run_dir / "checkpoint.pt").is_file()  # the refusals touched nothing

    train(task, run_dir, cfg, resume=True)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(AbftLensError, match="already holds a run"):
        train(task, run_dir, cfg)
    with pytest.raises(AbftLensError, match="already complete"):
        train(task, run_dir, cfg, resume=True)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


# --------------------------------------------------------------------------------- validation guard


class RecordingGuard(callbacks.ValidationGuard):
    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingGuard.instances.append(self)


@pytest.fixture
def recorded(monkeypatch):
    """Captures the ValidationGuard of a run and the trainable state after every step (0 = the base)."""
    RecordingGuard.instances = []
    monkeypatch.setattr(runs, "ValidationGuard", RecordingGuard)
    states: dict[int, dict] = {}

    def snapshot(trainer, result):
        states.setdefault(0, base)
        states[result.step] = trainer.trainable.state_dict()

    fresh = load_model("tiny")
    base = {f"blocks.{l}.attn.{w}": qk.value(fresh, f"blocks.{l}.attn.{w}").detach().clone()
            for l in range(2) for w in ("W_Q", "_W_K")}
    return types.SimpleNamespace(guards=RecordingGuard.instances, states=states, callback=snapshot, base=base)


def test_keep_best_restores_the_best_validation_step(task, tmp_path, recorded):
    cfg = config(validation_examples=32, validation_prompts=8, validate_every=3, keep_best=True)
    result, model = train(task, tmp_path / "run", cfg, callbacks=[recorded.callback])
    (guard,) = recorded.guards
    log = read_log(tmp_path / "run")
    validations = [line for line in log if line["event"] == "validation"]
    assert [line["step"] for line in validations] == [0, 3, 4]  # every 3 steps and the last one
    assert [line["step"] for line in log if line["event"] == "step"] == [1, 2, 3, 4]
    assert validations == guard.history == result.validation
    best = max(validations, key=lambda v: (v["accuracy"], v["mean_true_label_probability"], -v["step"]))
    assert result.best_step == guard.best["step"] == best["step"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_validation_step"] == best["step"] and metrics["kept_best"] is True
    assert_same_tensors(trained(tmp_path / "run"), guard.best_state)
    assert_same_tensors(guard.best_state, recorded.states[best["step"]])
    assert_same_tensors(result.trained, guard.best_state)  # the post test ran on the kept weights


SCRIPTS = {  # (accuracy = macro-F1, mean true-label probability) at validation steps 0, 1, 2, 3, 4 -> kept step
    "base-is-best": ([(0.9, 0.6), (0.5, 0.9), (0.9, 0.5), (0.6, 0.6), (0.1, 0.1)], 0),
    "tie-goes-to-earlier": ([(0.5, 0.5), (0.6, 0.5), (0.6, 0.7), (0.6, 0.7), (0.5, 0.9)], 2),
    "nan-is-never-best": ([(0.5, 0.5), (0.9, float("nan")), (0.6, 0.6), (0.5, 0.5), (0.5, 0.9)], 2),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_keep_best_with_scripted_validation(task, tmp_path, recorded, monkeypatch, script):
    scores, expected = SCRIPTS[script]
    calls = iter(scores)

    def fake_evaluate_prompts(model, builder, prompts, **kwargs):
        accuracy, probability = next(calls)
        return types.SimpleNamespace(metrics={"accuracy": accuracy, "mean_true_label_probability": probability,
                                              "macro_f1": accuracy, "ece": 0.0}, predictions=[0] * 8, gold=[0] * 8)

    monkeypatch.setattr(callbacks, "evaluate_prompts", fake_evaluate_prompts)
    cfg = config(validation_examples=32, validation_prompts=8, validate_every=1, keep_best=True)
    result, model = train(task, tmp_path / "run", cfg, callbacks=[recorded.callback])
    assert result.best_step == expected
    assert_same_tensors(trained(tmp_path / "run"), recorded.states[expected])
    if expected == 0:
        assert_same_tensors(trained(tmp_path / "run"), recorded.base)
        assert_same_tensors(result.trained, recorded.base)
    assert [v["step"] for v in read_log(tmp_path / "run") if v["event"] == "validation"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("metric, expected", [("accuracy", 1), ("macro_f1", 3)])
def test_select_metric_chooses_the_kept_step(task, tmp_path, recorded, monkeypatch, metric, expected):
    """Step 1 has the best accuracy (a collapse onto the majority label), step 3 the best macro-F1."""
    calls = iter([(0.5, 0.40), (0.7, 0.30), (0.6, 0.45), (0.6, 0.55), (0.4, 0.35)])  # (accuracy, macro-F1)

    def fake_evaluate_prompts(model, builder, prompts, **kwargs):
        accuracy, f1 = next(calls)
        return types.SimpleNamespace(metrics={"accuracy": accuracy, "mean_true_label_probability": 0.5,
                                              "macro_f1": f1, "ece": 0.0}, predictions=[0] * 8, gold=[0] * 8)

    monkeypatch.setattr(callbacks, "evaluate_prompts", fake_evaluate_prompts)
    cfg = config(validation_examples=32, validation_prompts=8, validate_every=1, keep_best=True, select_metric=metric)
    result, _ = train(task, tmp_path / "run", cfg, callbacks=[recorded.callback])
    assert result.best_step == expected
    assert_same_tensors(trained(tmp_path / "run"), recorded.states[expected])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["select_metric"] == metric
    with pytest.raises(AbftLensError, match="select_metric"):
        config(select_metric="ece")


# per validation prompt (8, all of gold label 0), right (1) or wrong (0) at steps 0..4, and the mean true-label
# probability. Step 2 has the best accuracy but 6 gained / 1 lost against step 0 (McNemar p = 0.125); step 4 ties
# it in accuracy with a lower probability and 5 gained / 0 lost (p = 0.0625).
SIGNIFICANCE_SCRIPT = [
    ([1, 1, 0, 0, 0, 0, 0, 0], 0.5),
    ([1, 1, 1, 1, 1, 0, 0, 0], 0.5),  # 3 / 0, p = 0.25
    ([1, 0, 1, 1, 1, 1, 1, 1], 0.7),  # 6 / 1, p = 0.125
    ([1, 1, 1, 1, 1, 1, 0, 0], 0.6),  # 4 / 0, p = 0.125
    ([1, 1, 1, 1, 1, 1, 1, 0], 0.6),  # 5 / 0, p = 0.0625
]


@pytest.mark.parametrize("max_p, expected", [(None, 2), (0.1, 4), (0.05, 0)])
def test_select_max_p_keeps_only_significant_gains_over_the_base(task, tmp_path, recorded, monkeypatch, max_p,
                                                                 expected):
    calls = iter(SIGNIFICANCE_SCRIPT)

    def fake_evaluate_prompts(model, builder, prompts, **kwargs):
        correct, probability = next(calls)
        accuracy = sum(correct) / len(correct)
        return types.SimpleNamespace(metrics={"accuracy": accuracy, "mean_true_label_probability": probability,
                                              "macro_f1": accuracy, "ece": 0.0},
                                     predictions=[1 - c for c in correct], gold=[0] * len(correct))

    monkeypatch.setattr(callbacks, "evaluate_prompts", fake_evaluate_prompts)
    cfg = config(validation_examples=32, validation_prompts=8, validate_every=1, keep_best=True, select_max_p=max_p)
    result, _ = train(task, tmp_path / "run", cfg, callbacks=[recorded.callback])
    assert result.best_step == expected
    assert_same_tensors(trained(tmp_path / "run"), recorded.states[expected])
    records = [line for line in read_log(tmp_path / "run") if line["event"] == "validation"]
    assert "p_vs_base" not in records[0]
    assert [(r["gained_vs_base"], r["lost_vs_base"]) for r in records[1:]] == [(3, 0), (6, 1), (4, 0), (5, 0)]
    assert [r["p_vs_base"] for r in records[1:]] == pytest.approx([0.25, 0.125, 0.125, 0.0625])


def test_select_max_p_is_checked():
    with pytest.raises(AbftLensError, match="select_max_p=0 must be a number in"):
        TrainConfig(validation_examples=32, validate_every=1, keep_best=True, select_max_p=0)
    with pytest.raises(AbftLensError, match="keep_best is off"):
        TrainConfig(validation_examples=32, validate_every=1, select_max_p=0.05)
    assert TrainConfig.from_dict(TrainConfig().to_dict()).select_max_p is None


def test_the_guard_selects_on_macro_f1_unless_told_and_old_run_folders_keep_accuracy():
    """macro-F1 is the default; a config.json written before the option existed was selected on accuracy."""
    assert TrainConfig().select_metric == "macro_f1"
    old = TrainConfig(lr=1e-4).to_dict()
    del old["select_metric"]
    assert TrainConfig.from_dict(old).select_metric == "accuracy"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).select_metric == "macro_f1"


def test_validation_without_keep_best_keeps_the_last_weights(task, tmp_path, recorded):
    cfg = config(validation_examples=32, validation_prompts=8, validate_every=2)
    result, _ = train(task, tmp_path / "run", cfg, callbacks=[recorded.callback])
    assert [v["step"] for v in result.validation] == [0, 2, 4] and result.best_step is not None
    assert_same_tensors(trained(tmp_path / "run"), recorded.states[4])


# ----------------------------------------------------------------------------------------- load_run


@pytest.mark.parametrize("trainable", [TrainableConfig(), TrainableConfig(kind="lora", lora_r=4)],
                         ids=["full", "lora"])
def test_load_run_reproduces_the_post_test_on_a_fresh_base(task, tmp_path, trainable):
    cfg = config(epochs=1, trainable=trainable)
    result, _ = train(task, tmp_path / "run", cfg)
    if trainable.kind == "lora":
        assert any(name.endswith("lora_B") for name in trained(tmp_path / "run"))
    fresh = load_model("tiny")
    base_qk = qk.layer_qk(fresh)  # effective W_Q/K per layer (adapters included), either version
    assert load_run(tmp_path / "run", fresh) == cfg
    assert not all(torch.equal(a, b) for pair, base_pair in zip(qk.layer_qk(fresh), base_qk)
                   for a, b in zip(pair, base_pair))
    again = evaluate(fresh, task, k=cfg.k, n_test=N_TEST)
    assert again.metrics == result.post.metrics
    assert again.probs == result.post.probs
    saved = json.loads((tmp_path / "run" / "post_test.json").read_text())
    assert saved["metrics"] == again.metrics
    assert [row["label_probs"] for row in saved["per_prompt"]] == [[round(x, 6) for x in r] for r in again.probs]
    attach(fresh).merge()  # load_run left no trainable attached


def test_load_run_errors(task, tmp_path):
    cfg = config(epochs=1)
    train(task, tmp_path / "nosave", cfg, save_model=False, fore_test=False, post_test=False)
    assert not (tmp_path / "nosave" / TRAINED_FILE).exists()
    assert not (tmp_path / "nosave" / "fore_test.json").exists()
    assert not (tmp_path / "nosave" / "post_test.json").exists()
    metrics = json.loads((tmp_path / "nosave" / "metrics.json").read_text())
    assert metrics["fore"] is None and metrics["post"] is None
    with pytest.raises(AbftLensError, match=TRAINED_FILE):
        load_run(tmp_path / "nosave", load_model("tiny"))
    with pytest.raises(AbftLensError, match="config.json"):
        load_run(tmp_path, load_model("tiny"))

    for trainable in (TrainableConfig(), TrainableConfig(kind="lora", lora_r=4)):
        run_dir = tmp_path / trainable.kind
        train(task, run_dir, dataclasses.replace(cfg, trainable=trainable), fore_test=False, post_test=False)
        other = load_model("tiny:n_layers=3")
        before = {n: p.detach().clone() for n, p in other.named_parameters()}
        with pytest.raises(AbftLensError, match="tiny"):
            load_run(run_dir, other)
        after = dict(other.named_parameters())
        assert before.keys() == after.keys()
        if trainable.kind == "lora":  # LoRA adapters are removed, the base is untouched
            assert all(torch.equal(before[n], after[n]) for n in before)
        attach(other).merge()  # and nothing stays attached


# ------------------------------------------------------------------ the model given back, one process per folder


@pytest.mark.parametrize("trainable", [TrainableConfig(), TrainableConfig(kind="lora", lora_r=4)],
                         ids=["full", "lora"])
def test_two_runs_on_one_model_both_start_from_the_base(task, tmp_path, trainable):
    """run_training gives the model back as it came, so the second run trains the base its folder names:
    load_run on a fresh base reproduces its post test exactly."""
    loaded = load_model("tiny")
    base = {name: p.detach().clone() for name, p in loaded.named_parameters()}
    kwargs = dict(n_test=N_TEST, progress=False)
    first = run_training(loaded, task, config(epochs=1, trainable=trainable), run_dir=tmp_path / "first", **kwargs)
    assert_same_tensors(dict(loaded.named_parameters()), base)
    second = run_training(loaded, task, config(epochs=1, seed=1, trainable=trainable),
                          run_dir=tmp_path / "second", **kwargs)
    assert second.fore.probs == first.fore.probs  # the second run started from the base, not from the first run
    assert_same_tensors(dict(loaded.named_parameters()), base)
    fresh = load_model("tiny")
    load_run(tmp_path / "second", fresh)
    assert evaluate(fresh, task, k=4, n_test=N_TEST).probs == second.post.probs
    again = load_model("tiny")
    second.apply_to(again)  # the same tensors, from the result instead of the folder
    assert_same_tensors(dict(again.named_parameters()), dict(fresh.named_parameters()))


def test_the_lock_holds_the_pid_while_training_and_refuses_a_second_owner(task, tmp_path):
    import os
    import subprocess
    import sys

    from abft_lens.run_files import LOCK_FILE
    from abft_lens.training.run_folder import RunLock

    run_dir = tmp_path / "run"
    seen = []
    train(task, run_dir, config(epochs=1), callbacks=[lambda *_: seen.append((run_dir / LOCK_FILE).read_text())])
    assert seen == [f"{os.getpid()}\n"] * 2 and not (run_dir / LOCK_FILE).exists()
    with RunLock(run_dir):
        with pytest.raises(AbftLensError, match=f"in use by another abft-lens process \\(pid {os.getpid()}"):
            RunLock(run_dir).__enter__()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / LOCK_FILE).write_text(dead.stdout)  # left by a process that has ended: taken over
    with RunLock(run_dir):
        assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not (run_dir / LOCK_FILE).exists()


def test_run_options_are_checked_and_interchangeable_with_keywords(task, tmp_path):
    from abft_lens.training.runs import RunOptions

    for bad in (dict(n_test=0), dict(batch_size=0), dict(checkpoint_every=-1), dict(resume=True)):
        with pytest.raises(AbftLensError):
            RunOptions(**bad)
    options = RunOptions(run_dir=tmp_path / "run", n_test=N_TEST, progress=False)
    result = run_training(load_model("tiny"), task, config(epochs=1), options)
    assert result.run_dir == tmp_path / "run" and (tmp_path / "run" / "metrics.json").is_file()
    with pytest.raises(TypeError):
        run_training(load_model("tiny"), task, config(epochs=1), options, n_test=4)
