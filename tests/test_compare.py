"""compare_run on a tiny training run: before/after scores, weight changes, accuracy, trace, round trip."""

from __future__ import annotations

import json

import pytest
import torch

from abft_lens.backends import qk

from abft_lens.training.comparison import Comparison, compare_run
from abft_lens.interp.heads import head_scores
from abft_lens.backends.loading import load_model
from abft_lens.training.runs import load_run
from abft_lens.data.tasks import load_task

OPTIONS = dict(n_prompts=6, n_seqs=3, seq_len=6, batch_size=4)
TRAINED_HEAD = (1, 0)  # the only head whose W_Q/W_K slices may change


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from abft_lens.training.runs import run_training
    from abft_lens.training.train import TrainConfig
    from abft_lens.training.trainable import TrainableConfig

    run_dir = tmp_path_factory.mktemp("run")
    config = TrainConfig(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0,
                         trainable=TrainableConfig(heads=frozenset({TRAINED_HEAD})))
    run_training(load_model("tiny"), load_task("sst2"), config, run_dir=run_dir, n_test=8, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def comparison(tiny_run):
    return compare_run(tiny_run, **OPTIONS)


def _prompts(model):
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.data.prompts import test_prompts

    return test_prompts(prompt_builder(model, load_task("sst2")), 4, OPTIONS["n_prompts"])


def _scores(model):
    options = {key: value for key, value in OPTIONS.items() if key != "n_prompts"}
    return {name: value.scores for name, value in
            head_scores(model, load_task("sst2"), prompts=_prompts(model), **options).items()}


def test_before_and_after_match_fresh_models(tiny_run, comparison):
    fresh = load_model("tiny")
    expected_before = _scores(fresh)
    load_run(tiny_run, fresh)
    expected_after = _scores(fresh)
    assert set(comparison.before) == set(expected_before) == set(comparison.after)
    for name in expected_before:
        torch.testing.assert_close(comparison.before[name], expected_before[name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(comparison.after[name], expected_after[name], atol=1e-6, rtol=0, msg=name)
    # training moved the trained head's label attention, and never touches the OV circuit
    assert comparison.difference("label_attention").abs().max() > 0
    torch.testing.assert_close(comparison.before["copying"], comparison.after["copying"])


def test_weight_change_only_where_weights_changed(tiny_run, comparison):
    base, trained = load_model("tiny"), load_model("tiny")
    load_run(tiny_run, trained)
    change = comparison.weight_change
    assert change.shape == (2, 2) and comparison.n_layers == 2
    for layer in range(2):  # TransformerLens names and layout on either version
        a, b = (qk.snapshot(m, [qk.tensor_name(layer, "W_Q"), qk.tensor_name(layer, "_W_K")]) for m in (base, trained))
        expected = [torch.linalg.vector_norm(b[n] - a[n]).item() for n in a]
        assert change[layer].tolist() == pytest.approx(expected, abs=1e-6)
    assert change[0].tolist() == [0.0, 0.0]  # layer 0 is outside the trained head set
    assert (change[TRAINED_HEAD[0]] > 0).all()


def test_accuracy_trace_run_and_example(tiny_run, comparison):
    fore = json.loads((tiny_run / "fore_test.json").read_text())["metrics"]
    post = json.loads((tiny_run / "post_test.json").read_text())["metrics"]
    assert comparison.accuracy == {"fore": fore, "post": post}
    assert [line["step"] for line in comparison.trace if line.get("event") == "step"] == [1, 2]
    assert comparison.run["model"]["name"] == "tiny" and comparison.run["task"]["name"] == "sst2"
    example = comparison.prompt_example
    n = len(example["tokens"])
    top3 = [[layer, head] for layer, head, _ in
            sorted(((l, h, comparison.before["label_attention"][l, h].item()) for l in range(2) for h in range(4)),
                   key=lambda item: -item[2])[:3]]
    assert example["heads"] == top3
    for key in ("before", "after"):
        patterns = torch.tensor(example[key])
        assert patterns.shape == (3, n, n)
        torch.testing.assert_close(patterns.sum(-1), torch.ones(3, n), atol=2e-3, rtol=0)  # rounded to 1e-5
        assert torch.equal(patterns, patterns.tril())
    assert example["before"] != example["after"] or TRAINED_HEAD not in map(tuple, top3)


def test_round_trip(comparison):
    restored = Comparison.from_dict(json.loads(json.dumps(comparison.to_dict())))
    for name in comparison.before:
        torch.testing.assert_close(restored.before[name], comparison.before[name])
        torch.testing.assert_close(restored.after[name], comparison.after[name])
    torch.testing.assert_close(restored.weight_change, comparison.weight_change)
    assert restored.accuracy == comparison.accuracy and restored.trace == comparison.trace
    assert restored.run == comparison.run and restored.prompt_example == comparison.prompt_example


def test_loaded_model_is_trained_in_place_and_example_heads(tiny_run):
    loaded = load_model("tiny")
    before = qk.value(loaded, "blocks.1.attn.W_Q").detach().clone()
    result = compare_run(tiny_run, model=loaded, example_heads=[(1, 0)], **OPTIONS)
    assert not torch.equal(qk.value(loaded, "blocks.1.attn.W_Q"), before)  # documented: load_run mutates `loaded`
    assert result.prompt_example["heads"] == [[1, 0]]
    assert result.prompt_example["before"] != result.prompt_example["after"]


def test_not_a_run_folder(tmp_path):
    from abft_lens.errors import AbftLensError

    with pytest.raises(AbftLensError):
        compare_run(tmp_path)
