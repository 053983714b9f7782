"""bfloat16 training held to account (abft_lens.training.dtype_check) on ``tiny``: a short run in float32 and under
bfloat16 autocast from the same base, compared on what a run produces. The bounds are loose (bfloat16 keeps 8
bits of mantissa) but each would catch a broken bfloat16 path: a lost gradient, a wrong upcast, a filter that
reads rounded rows differently. Measured on an AMX CPU (the test does not depend on it): loss within 2.6 %,
trained tensors 1.2 % of the weights and 7.6 % of the float32 update apart, 256/256 filter decisions at step 0,
255/256 at the end, 64/64 test predictions equal."""

from __future__ import annotations

import pytest
import torch

from abft_lens.backends.loading import load_model
from abft_lens.data.prompts import prompt_builder
from abft_lens.data.tasks import load_task
from abft_lens.training.dtype_check import compare_bf16, relative_difference
from abft_lens.training.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def task():
    return load_task("sst2")


@pytest.mark.parametrize("spec", ["tiny", "tiny-mha"])
def test_bfloat16_run_agrees_with_float32(task, spec):
    """4 steps of 8 prompts, lr 1e-2 (the tiny model's accuracy moves), restricted gradient, 64 test prompts."""
    config = TrainConfig(train_samples=32, pseudo_batch_size=8, epochs=1, lr=1e-2, threshold=0.03,
                         restricted_gradient=True)
    report = compare_bf16(lambda: load_model(spec), task, config, n_test=64)
    assert report["steps"] == 4 and report["filter_decisions"]["decisions"] == 32 * 2 * 4
    assert report["loss"]["max_relative_difference"] < 0.1
    assert report["filter_decisions"]["agree_step_0"] >= 0.98
    assert report["filter_decisions"]["agree_end"] >= 0.95
    assert 0 < report["filter_decisions"]["pass_rate_end"]["float32"] < 1  # some heads open, some closed
    assert report["trained"]["relative_to_weights"] < 0.05
    assert 0 < report["trained"]["relative_to_update"] < 0.25  # the same update, to within a quarter of it
    test = report["test"]
    assert test["prompts"] == 64 and test["agreement"] >= 0.9
    assert abs(test["accuracy"]["bfloat16"] - test["accuracy"]["float32"]) <= 0.05


def test_filter_decisions_are_the_steps_head_counts(task):
    model = load_model("tiny")
    trainer = Trainer(model, prompt_builder(model, task), TrainConfig(train_samples=8, pseudo_batch_size=8, epochs=1,
                                                                      threshold=0.03, micro_batch_size=4))
    decisions = trainer.filter_decisions(trainer.prompts)
    assert decisions.shape == (8, 2, 4) and decisions.dtype == torch.bool
    assert trainer.step(trainer.prompts).head_counts == decisions.long().sum(0).tolist()


def test_relative_difference():
    a, b = {"x": torch.tensor([3.0, 4.0])}, {"x": torch.tensor([3.0, 3.0])}
    assert relative_difference(a, b, a) == pytest.approx(0.2)
    assert relative_difference(a, a, {"x": torch.zeros(2)}) == 0.0
    assert relative_difference(a, b, {"x": torch.zeros(2)}) == float("inf")
