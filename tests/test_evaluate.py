"""Metrics (hand values, independent formulas, StaICC's own functions) and the batched evaluator (batched ==
unbatched == a plain full forward; result order; agreement with StaICC's own harness on the embedded model)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import random
import warnings

import pytest
import torch

from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import EvalResult, evaluate, evaluate_prompts, label_probabilities
from abft_lens.data.prompts import prompt_builder
from abft_lens.evaluation.metrics import (accuracy, classification_metrics, expected_calibration_error, macro_f1,
                               mean_true_label_probability)
from abft_lens.data.prompts import sample_prompts
from abft_lens.data.prompts import test_prompts as fixed_test_prompts  # not collected as a test
from abft_lens.data.tasks import load_task
from abft_lens.backends.provenance import model_info

# ---------------------------------------------------------------------------- independent formulas


def _argmax(row):
    return max(range(len(row)), key=lambda i: (row[i], -i))  # ties go to the lower index


def ref_accuracy(gold, probs):
    return sum(_argmax(row) == g for g, row in zip(gold, probs)) / len(gold)


def ref_true_prob(gold, probs):
    return sum(row[g] for g, row in zip(gold, probs)) / len(gold)


def ref_macro_f1(gold, probs):
    """Per-label precision/recall F1 (0 when undefined), averaged over labels occurring as gold or prediction."""
    predicted = [_argmax(row) for row in probs]
    scores = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        precision = tp / max(1, sum(p == label for p in predicted))
        recall = tp / max(1, sum(g == label for g in gold))
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)


def ref_ece(gold, probs, bins=10):
    """Bins [0, .1), [.1, .2), ..., [.9, 1.0] (the last one closed)."""
    buckets = [[] for _ in range(bins)]
    for g, row in zip(gold, probs):
        confidence = max(row)
        b = bins - 1 if confidence >= 1.0 else int(math.floor(confidence * bins))
        buckets[b].append((confidence, _argmax(row) == g))
    total = 0.0
    for bucket in buckets:
        if bucket:
            acc = sum(c for _, c in bucket) / len(bucket)
            conf = sum(x for x, _ in bucket) / len(bucket)
            total += len(bucket) / len(gold) * abs(acc - conf)
    return total


def _metrics(gold, probs):
    return classification_metrics(torch.tensor(gold), torch.tensor(probs, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_hand_computed():
    gold = [0, 1, 1, 2, 0]
    probs = [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.85, 0.05]]
    metrics = _metrics(gold, probs)
    assert set(metrics) == {"accuracy", "mean_true_label_probability", "macro_f1", "ece"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["accuracy"] == pytest.approx(3 / 5, abs=1e-12)
    assert metrics["mean_true_label_probability"] == pytest.approx(2.25 / 5, abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3, abs=1e-12)
    # bins: .5 {wrong} .1; .6 {right, right} .16; .7 {right} .06; .85 {wrong} .17
    assert metrics["ece"] == pytest.approx(0.49, abs=1e-12)


def test_ties_go_to_the_lower_label():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.25]], dtype=torch.float64)
    assert accuracy(torch.tensor([0, 0]), probs) == 1.0
    assert accuracy(torch.tensor([1, 1]), probs) == 0.0


def test_macro_f1_skips_labels_that_never_occur():
    gold = [0, 0, 1, 1]
    probs = [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]]  # label 2: never gold or predicted
    expected = (2 / 3 + 4 / 5) / 2
    assert macro_f1(torch.tensor(gold), torch.tensor(probs)) == pytest.approx(expected, abs=1e-7)
    assert ref_macro_f1(gold, probs) == pytest.approx(expected, abs=1e-12)
    # a label that is predicted but never gold counts (F1 = 0)
    gold, probs = [0, 0], [[0.9, 0.1], [0.2, 0.8]]
    assert macro_f1(torch.tensor(gold), torch.tensor(probs)) == pytest.approx((2 / 3 + 0) / 2)


def test_ece_includes_confidence_exactly_one():
    gold = [0, 1, 0]
    probs = [[1.0, 0.0], [1.0, 0.0], [0.25, 0.75]]
    expected = 2 / 3 * 0.5 + 1 / 3 * 0.75
    assert expected_calibration_error(torch.tensor(gold), torch.tensor(probs)) == pytest.approx(expected, abs=1e-12)
    assert ref_ece(gold, probs) == pytest.approx(expected, abs=1e-12)
    # StaICC's last bin is half-open, so it drops the two confident rows (abft-method.md §4); ours keeps them
    from StaICC.util.functional import expected_calibration_error_1

    gold, probs = gold * 4, probs * 4  # StaICC needs at least as many rows as bins
    assert expected_calibration_error(torch.tensor(gold), torch.tensor(probs)) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error_1(gold, probs) == pytest.approx(1 / 3 * 0.75, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_independent_formulas(seed):
    rng = random.Random(seed)
    n_labels, n = rng.choice([2, 3, 5]), rng.choice([7, 50, 200])
    gold, probs = [], []
    for _ in range(n):
        logits = [rng.gauss(0, 2) for _ in range(n_labels)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        probs.append([w / sum(weights) for w in weights])
        gold.append(rng.randrange(n_labels))
    probs.append([1.0] + [0.0] * (n_labels - 1))
    gold.append(0)
    metrics = _metrics(gold, probs)
    assert metrics["accuracy"] == pytest.approx(ref_accuracy(gold, probs), abs=1e-12)
    assert metrics["mean_true_label_probability"] == pytest.approx(ref_true_prob(gold, probs), abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx(ref_macro_f1(gold, probs), abs=1e-12)
    assert metrics["ece"] == pytest.approx(ref_ece(gold, probs), abs=1e-12)
    assert mean_true_label_probability(torch.tensor(gold), torch.tensor(probs)) == pytest.approx(
        ref_true_prob(gold, probs), abs=1e-6)


def test_metrics_equal_staicc_where_it_has_no_quirk():
    """Rows that sum to exactly 1 (dyadic values), every label occurring, no confidence 1.0: StaICC's own
    functions give the same four numbers."""
    from StaICC.util import functional

    rng = random.Random(3)
    gold, probs = [], []
    for i in range(60):
        a = rng.randrange(1, 40)
        b = rng.randrange(1, 64 - a)
        row = [a / 64, b / 64, (64 - a - b) / 64]
        assert sum(row) == 1.0
        probs.append(row)
        gold.append(i % 3)
    metrics = _metrics(gold, probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics["accuracy"] == pytest.approx(functional.accuracy(gold, probs), abs=1e-12)
        assert metrics["mean_true_label_probability"] == pytest.approx(
            functional.averaged_truelabel_likelihood(gold, probs), abs=1e-12)
        assert metrics["macro_f1"] == pytest.approx(functional.macro_F1(gold, probs), abs=1e-12)
        assert metrics["ece"] == pytest.approx(functional.expected_calibration_error_1(gold, probs), abs=1e-12)


# ---------------------------------------------------------------------------------------- evaluator


def _direct_probs(model, prompt, label_ids):
    """Reference: one unpadded full forward, softmax over the label tokens' logits at the last position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt.token_ids]))[0, -1]
    return logits[list(label_ids)].float().softmax(-1)


@pytest.fixture(scope="module")
def tiny_prompts(tiny_loaded):
    """Prompts of different lengths and k=3 on SST-5 (5 labels), tiny model."""
    task = load_task("sst5")
    builder = prompt_builder(tiny_loaded, task)
    prompts = sample_prompts(builder, task.calibration, k=3, n=13, seed=0)
    assert len({p.n_tokens for p in prompts}) > 5
    return builder, prompts


def test_batched_equals_unbatched_and_direct_forward_tiny(tiny_loaded, tiny_prompts):
    builder, prompts = tiny_prompts
    model, ids = tiny_loaded, builder.label_token_ids
    pad = builder.tokenizer.pad_token_id
    one = label_probabilities(model, prompts, ids, pad_id=pad, batch_size=1)
    eight = label_probabilities(model, prompts, ids, pad_id=pad, batch_size=8)
    everything = label_probabilities(model, prompts, ids, pad_id=pad, batch_size=64)
    assert one.shape == (13, 5) and one.dtype == torch.float32
    torch.testing.assert_close(eight, one, rtol=0, atol=1e-5)
    torch.testing.assert_close(everything, one, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.sum(-1), torch.ones(13))
    direct = torch.stack([_direct_probs(model, p, ids) for p in prompts])
    torch.testing.assert_close(one, direct, rtol=0, atol=1e-5)
    assert (one.max(-1).values - one.min(-1).values).max() > 1e-3  # not a uniform distribution


def test_batched_equals_unbatched_mha_with_a_non_pad_pad_id(tiny_prompts):
    """Padding is masked out: the pad id's value does not matter (here a real token, not the pad token)."""
    from abft_lens.backends.loading import load_model

    builder, prompts = tiny_prompts
    model = load_model("tiny-mha:seed=4")
    ids = builder.label_token_ids
    one = label_probabilities(model, prompts, ids, pad_id=builder.tokenizer.pad_token_id, batch_size=1)
    other_pad = label_probabilities(model, prompts, ids, pad_id=ids[0], batch_size=13)
    torch.testing.assert_close(other_pad, one, rtol=0, atol=1e-5)


def test_evaluate_prompts_metrics_and_predictions(tiny_loaded, tiny_prompts):
    builder, prompts = tiny_prompts
    result = evaluate_prompts(tiny_loaded, builder, prompts, batch_size=4)
    probs = torch.tensor(result.probs)
    gold = [p.query_label for p in prompts]
    assert result.gold == gold and result.k == 3 and result.task == "sst5"
    assert result.predictions == probs.argmax(-1).tolist()
    assert result.label_words == list(builder.task.label_words)
    assert result.metrics == classification_metrics(torch.tensor(gold), probs)
    assert result.accuracy == pytest.approx(ref_accuracy(gold, result.probs), abs=1e-12)
    assert result.metrics["ece"] == pytest.approx(ref_ece(gold, result.probs), abs=1e-6)


def test_evaluate_keeps_prompt_order(tiny_loaded):
    task = load_task("sst2")
    n = 12
    result = evaluate(tiny_loaded, task, k=4, n_test=n, batch_size=5)
    builder = prompt_builder(tiny_loaded, task)
    prompts = fixed_test_prompts(builder, 4, n)
    lengths = [p.n_tokens for p in prompts]
    assert sorted(range(n), key=lambda i: lengths[i]) != list(range(n))  # length sorting does permute them
    assert result.gold == [task.test[j].label for j in range(n)]
    direct = torch.stack([_direct_probs(tiny_loaded, p, builder.label_token_ids) for p in prompts])
    torch.testing.assert_close(torch.tensor(result.probs), direct, rtol=0, atol=1e-5)
    assert result.info["model"] == "tiny" and result.info["protocol"] == "Normal"
    assert result.k == 4 and len(result.probs) == n


def test_evaluate_errors(tiny_loaded):
    from abft_lens.backends.loading import load_model

    task = load_task("sst2")
    with pytest.raises(AbftLensError, match="k=5000 is larger"):
        evaluate(tiny_loaded, task, k=5000, n_test=2)
    short = load_model("tiny:n_ctx=64")
    with pytest.raises(AbftLensError, match="context of 64"):
        evaluate(short, task, k=4, n_test=2)


def test_eval_result_round_trip():
    result = EvalResult(task="sst2", k=4, metrics={"accuracy": 0.5, "ece": 0.125}, gold=[0, 1],
                        predictions=[0, 0], probs=[[0.612345678, 0.387654322], [0.75, 0.25]],
                        label_words=[" negative", " positive"], info={"model": "tiny", "seed": 42})
    data = json.loads(json.dumps(result.to_dict()))
    assert data["n"] == 2 and data["model"] == "tiny" and data["seed"] == 42
    assert data["per_prompt"][0] == {"gold": 0, "prediction": 0, "label_probs": [0.612346, 0.387654]}
    back = EvalResult.from_dict(data)
    assert (back.task, back.k, back.metrics, back.gold, back.predictions, back.label_words, back.info) == (
        result.task, result.k, result.metrics, result.gold, result.predictions, result.label_words, result.info)
    for row, original in zip(back.probs, result.probs):
        assert row == pytest.approx(original, abs=1e-6)
    assert back.to_dict() == data
    assert back.accuracy == 0.5
    assert "accuracy" in result._repr_html_() and ("ece", "0.1250") in result.summary_rows()


# ------------------------------------------------------------------------------------ embedded model


@pytest.mark.embedded
def test_batched_equals_unbatched_embedded(embedded):
    task = load_task("sst2")
    builder = prompt_builder(embedded, task)
    prompts = fixed_test_prompts(builder, 4, 4)
    assert len({p.n_tokens for p in prompts}) > 1
    pad = builder.tokenizer.pad_token_id if builder.tokenizer.pad_token_id is not None else 0
    one = label_probabilities(embedded, prompts, builder.label_token_ids, pad_id=pad, batch_size=1)
    batched = label_probabilities(embedded, prompts, builder.label_token_ids, pad_id=pad, batch_size=4)
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-5)


@pytest.mark.embedded
def test_accuracy_equals_staicc_harness_with_hugging_face(embedded, embedded_hf):
    """Fully independent reference: StaICC's prompts, StaICC's reference kernel on the Hugging Face model,
    StaICC's metrics; against our prompts, our hooked model, our evaluator."""
    from StaICC.normal import ORIGINAL_DATA_LOADER_NORMAL
    from StaICC.prefabricate_inference.model_kernel import standard_ICL_inference_with_torch_Causal_LM
    from StaICC.util.experimentor import single_experimentor

    from transformers import AutoTokenizer

    n = 12
    hf_tokenizer = AutoTokenizer.from_pretrained(model_info(embedded).hf_dir)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = single_experimentor(original_dataset=ORIGINAL_DATA_LOADER_NORMAL[0](), k=4)
        exp.prompt_former.replace_space_to_label()
        exp.triplet_dataset.test.cut_by_index(n)
        exp.set_demonstration_sampler([exp.demonstration_sampler[j] for j in range(n)])
        kernel = functools.partial(standard_ICL_inference_with_torch_Causal_LM, model=embedded_hf,
                                   tokenizer=hf_tokenizer, cache_empty=None)
        metrics, success, outputs = exp(forward_inference=kernel, return_outputs=True)
    assert success and len(outputs["predicted"]) == n

    result = evaluate(embedded, load_task("sst2"), k=4, n_test=n, batch_size=4)
    assert result.gold == outputs["groundtruth"]
    assert result.predictions == outputs["predicted"]
    assert result.accuracy == metrics["accuracy"]
    torch.testing.assert_close(torch.tensor(result.probs), torch.tensor(outputs["prob."], dtype=torch.float32),
                               rtol=0, atol=1e-4)
