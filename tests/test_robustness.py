"""Robustness: StaICC's consistency on identical predictions, L9 templates, unseen-label sampling, contextual
bias and contextual calibration against hand computations."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
import zlib

import pytest
import torch

from abft_lens.evaluation import robustness as rb
from abft_lens.evaluation.evaluator import label_probabilities
from abft_lens.data.prompts import prompt_builder
from abft_lens.data.prompts import pad_token_id
from abft_lens.data.prompts import test_prompts as fixed_test_prompts
from abft_lens.data.tasks import load_task


@pytest.fixture(scope="module")
def sst2():
    return load_task("sst2")


def _staicc_experimentor(factory, **kwargs):
    from StaICC.normal import ORIGINAL_DATA_LOADER_NORMAL

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return factory(original_dataset=ORIGINAL_DATA_LOADER_NORMAL[0](), k=4, **kwargs)


def _run_staicc(experimentor, forward):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result, ok = experimentor(forward_inference=forward, batched_inference=True)
    assert ok
    return result["sensitivity"]["consistency"]


def _fake_label(text: str, n_labels: int) -> int:
    """A deterministic stand-in for a model: a hash of the prompt text without its final space."""
    return zlib.crc32(text.rstrip(" ").encode()) % n_labels


def _one_hot(labels, n_labels):
    return [[1.0 if c == label else 0.0 for c in range(n_labels)] for label in labels]


def test_consistency_hand_values():
    predictions = torch.tensor([[0, 1, 2], [0, 1, 1], [1, 1, 0]])  # per query: 2/3, 3/3, 1/3
    assert rb.consistency(predictions) == pytest.approx((2 / 3 + 1 + 1 / 3) / 3)
    assert rb.consistency(torch.zeros(9, 4, dtype=torch.long)) == 1.0


def test_templates_follow_the_l9_table(tiny_loaded, sst2):
    builders, prompt_sets, described = rb.template_sensitivity_prompts(tiny_loaded, sst2, k=4, n_queries=3)
    options = rb._staicc_alternates(sst2.index)
    assert [tuple(d["l9_row"]) for d in described] == list(rb.L9_TABLE) and len(prompt_sets) == 9
    for row, prompts in zip(rb.L9_TABLE, prompt_sets):
        instruction, input_prefix, label_prefix, label_affix = (options[c][i] for c, i in enumerate(row))
        text = prompts[0].text
        assert text.startswith(instruction + input_prefix)
        assert text.endswith(label_prefix.rstrip(" ")) and not text.endswith(" ")
        assert text.count(label_prefix.rstrip(" ") + " ") == 4  # one per demonstration, label word after a space
        assert text.count(input_prefix) >= 5
        assert all(word + label_affix in text for word in [sst2.label_words[label] for label in prompts[0].demo_labels])
    # every pair of templates differs in at least 3 of the 4 factors (the orthogonal array's property)
    for a in rb.L9_TABLE:
        for b in rb.L9_TABLE:
            assert a == b or sum(x != y for x, y in zip(a, b)) == 3


def test_template_consistency_equals_staicc_on_the_tiny_model(tiny_loaded, sst2):
    """Real predictions of the tiny model on 5 queries x 9 templates, fed to StaICC's own Template_sens
    experimentor (its split with 5 test queries is the prefix of the 512) through its batched interface."""
    import functools

    from StaICC.util import experimentor, functional

    n = 5
    result = rb.template_sensitivity(tiny_loaded, sst2, k=4, n_queries=n, batch_size=16)
    _, prompt_sets, _ = rb.template_sensitivity_prompts(tiny_loaded, sst2, k=4, n_queries=n)
    staicc = _staicc_experimentor(experimentor.template_sensitivity_experimentor, dividing=[1024, 4096, n],
                                  metrics={"consistency": functools.partial(functional.consistency, loop_length=n)})
    calls = iter(range(9))

    def forward(prompt, label_space):
        t = next(calls)
        assert prompt == [p.text + " " for p in prompt_sets[t]]  # StaICC keeps the label prefix's trailing space
        return _one_hot(result.predictions[t], 2)

    assert _run_staicc(staicc, forward) == pytest.approx(result.consistency, abs=1e-12)


def test_demonstration_consistency_equals_staicc_on_its_full_structure(tiny_loaded, sst2):
    """StaICC's Demo_sens experimentor (8 sets x 128 queries) and ours see the same 1024 prompt texts; a
    text-hash stand-in for the model gives both the same predictions."""
    from StaICC.util import experimentor

    builder = prompt_builder(tiny_loaded, sst2)
    prompt_sets = rb.demonstration_sensitivity_prompts(builder, k=4)
    assert len(prompt_sets) == 8 and {len(row) for row in prompt_sets} == {128}
    ours = torch.tensor([[_fake_label(p.text, 2) for p in row] for row in prompt_sets])
    staicc = _staicc_experimentor(experimentor.demonstration_sensitivity_experimentor)

    def forward(prompt, label_space):
        assert prompt == [p.text + " " for row in prompt_sets for p in row]
        return _one_hot([_fake_label(text, 2) for text in prompt], 2)

    assert _run_staicc(staicc, forward) == pytest.approx(rb.consistency(ours), abs=1e-12)


def test_demonstration_sensitivity_runs_on_the_tiny_model(tiny_loaded, sst2):
    result = rb.demonstration_sensitivity(tiny_loaded, sst2, k=2, n_queries=3, n_sets=8, batch_size=24)
    predictions = torch.tensor(result.predictions)
    assert predictions.shape == (8, 3) and 1 / 8 <= result.consistency <= 1
    assert result.consistency == pytest.approx(rb.consistency(predictions))


def test_unseen_label_prompts_never_show_the_query_label(tiny_loaded, sst2):
    demos = rb.unseen_label_demonstrations(sst2, 4)
    fixed = sst2.test_demonstrations(4)
    assert len(demos) == 1024
    for j, indices in enumerate(demos):
        query_label = sst2.test[j % len(sst2.test)].label
        assert all(sst2.demonstration[i].label != query_label for i in indices)
        if all(sst2.demonstration[i].label != query_label for i in fixed[j]):
            assert indices == fixed[j]  # StaICC only redraws the prompts that show the label
    builder = prompt_builder(tiny_loaded, sst2)
    for prompt in rb.unseen_label_prompts(builder, 4, 16):
        assert prompt.query_label not in prompt.demo_labels


def test_unseen_label_test_compares_three_settings(tiny_loaded, sst2):
    results = rb.unseen_label_test(tiny_loaded, sst2, k=2, n_test=4, batch_size=4)
    assert set(results) == {"unseen_label", "random", "zero_shot"}
    assert all(len(r.gold) == 4 and r.gold == results["random"].gold for r in results.values())


def test_entropy_hand_values():
    assert rb.entropy(torch.tensor([0.5, 0.5])) == pytest.approx(math.log(2))
    assert rb.entropy(torch.tensor([1.0, 0.0])) == 0.0
    assert rb.entropy(torch.tensor([0.2, 0.3, 0.5])) == pytest.approx(
        -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)))


def test_contextual_bias_is_the_entropy_of_the_mean_empty_query_prediction(tiny_loaded, sst2):
    bias = rb.contextual_bias(tiny_loaded, sst2, k=2, n_prompts=6, batch_size=6)
    builder = prompt_builder(tiny_loaded, sst2)
    prompts = rb.content_free_prompts(builder, sst2.test_demonstrations(2)[:6], "")
    template = sst2.template
    assert all(p.text.endswith(template.input_prefix + template.input_affix + template.label_prefix) for p in prompts)
    probs = label_probabilities(tiny_loaded, prompts, builder.label_token_ids,
                                pad_id=pad_token_id(tiny_loaded.tokenizer)).double()
    p, q = probs.mean(0).tolist()
    assert bias["entropy"] == pytest.approx(-(p * math.log(p) + q * math.log(q)), abs=1e-9)
    assert bias["normalized_entropy"] == pytest.approx(bias["entropy"] / math.log(2))


def test_calibrate_hand_values():
    calibrated = rb.calibrate(torch.tensor([[0.6, 0.4], [0.1, 0.9]]), torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    assert calibrated[0].tolist() == pytest.approx([0.75 / 2.75, 2 / 2.75])
    assert calibrated[1].tolist() == pytest.approx([0.1, 0.9])


def test_calibrated_evaluate_against_a_hand_computation(tiny_loaded, sst2):
    result = rb.calibrated_evaluate(tiny_loaded, sst2, k=2, n_test=3, batch_size=4)
    builder = prompt_builder(tiny_loaded, sst2)
    pad = pad_token_id(tiny_loaded.tokenizer)
    demos = sst2.test_demonstrations(2)[:3]
    raw = label_probabilities(tiny_loaded, fixed_test_prompts(builder, 2, 3), builder.label_token_ids, pad_id=pad)
    for j in range(3):
        cf = [label_probabilities(tiny_loaded, rb.content_free_prompts(builder, [demos[j]], text),
                                  builder.label_token_ids, pad_id=pad)[0] for text in ("N/A", "", "[MASK]")]
        p_cf = [(cf[0][c] + cf[1][c] + cf[2][c]) / 3 for c in range(2)]
        ratio = [float(raw[j][c] / p_cf[c]) for c in range(2)]
        assert result.probs[j] == pytest.approx([r / sum(ratio) for r in ratio], abs=1e-5)
    assert result.info["method"] == "contextual_calibration"
