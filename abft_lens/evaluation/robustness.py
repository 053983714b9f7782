"""Robustness of ICL beyond accuracy: StaICC's sensitivity and bias diagnostics, the unseen-label test and
contextual calibration, all on the batched evaluator of :mod:`abft_lens.evaluation.evaluator`.

Prompt sets (each follows the StaICC experimentor named; the split, the queries and the demonstration
indices are StaICC's own seed-42 ones, so predictions can be fed to StaICC's metric code unchanged):

- **Template sensitivity** (``Template_sens``): the first ``n_queries`` (StaICC: 100) test queries, each with
  its fixed demonstrations (``test_demonstrations(k)[i]``), written with the 9 templates of the L9(3^4)
  orthogonal array over (instruction, input prefix, label prefix, label affix) from the dataset's
  ``alternate_template``. Consistency over the 9 variants.
- **Demonstration sensitivity** (``Demo_sens``): query ``i < n_queries`` (StaICC: 128) with the 8
  demonstration sets ``test_demonstrations(k)[i + t * stride]``, ``stride = 2 * len(test) // 8`` (= 128),
  exactly the prompts StaICC's experimentor writes after cutting the test split to 128 queries.
- **Unseen label** (``set_out_of_domain_mode``): the fixed test prompts with every demonstration set that
  contains the query's label redrawn from the continuing StaICC sampler until it does not.
- **Contextual bias** (``Contextual_bias``): the fixed demonstrations with an *empty* query text, i.e. the
  query segment is ``query_prefix + input_prefix + "" + input_affix + label_prefix`` (for SST-2:
  ``"sentence:  sentiment:"``, two spaces); bias = entropy (nats) of the mean label distribution.
- **Contextual calibration** (Zhao et al. 2021): label probabilities divided by those of content-free queries
  ``"N/A"``, ``""`` and ``"[MASK]"`` (probabilities averaged over the three, as in the paper), written with the
  *same demonstrations* as each test prompt, then renormalised to sum 1.

Label spacing. StaICC's ``Template_sens`` resets the prompt writer, which undoes ``replace_space_to_label()``:
its prompts end with ``"label: "`` (trailing space) and label words have no leading space. Here every
template keeps this project's convention instead: one trailing space of the alternate label prefix moves to
the label words (``"label:"`` + ``" positive"``), so each label is still scored by its single first token
`` positive``. Demonstrations read character for character as in StaICC; only the query's final space moves
into the predicted token. StaICC's prompt text is therefore ``ours + " "`` (checked in the tests).

StaICC quirks not copied (its metric code is called on the same predictions in the tests): its ``entropy``
re-softmaxes a mean distribution whose sum is not exactly 1.0 in floating point; its contextual calibration
(``prefabricate_inference.standard_calibration``) applies a softmax to ``p / p_cf`` instead of renormalising
(same argmax, different probabilities) and estimates ``p_cf`` once from 128 random calibration-split
demonstration sets with an empty query only, while here ``p_cf`` is per prompt, from its own demonstrations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from abft_lens.data.stable_random import LcgSampler
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import EvalResult, evaluate_prompts, label_probabilities
from abft_lens.evaluation.metrics import classification_metrics
from abft_lens.backends.provenance import LoadedModel, model_info
from abft_lens.data.prompts import ICLPrompt, PromptBuilder, pad_token_id, prompt_builder, test_prompts
from abft_lens.data.tasks import Example, ICLTask, Template

L9_TABLE: tuple[tuple[int, int, int, int], ...] = (
    (0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2),
    (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1),
    (2, 0, 2, 1), (2, 1, 0, 2), (2, 2, 1, 0),
)  # StaICC configs.STANDARD_SETTINGS["L9(3,4)_orthogonal_table"]; columns: instruction, input prefix, label prefix, label affix
TEMPLATE_QUERIES = 100
DEMO_QUERIES = 128
DEMO_SETS = 8
CONTENT_FREE = ("N/A", "", "[MASK]")
TEST_TYPES = ("Normal", "TempSensitivity", "DemoSensitivity")


# --------------------------------------------------------------------------------------------- consistency


def consistency(predictions: Int[Tensor, "variant query"]) -> float:
    """Mean over queries of (size of the largest group of equal predictions / number of variants), in [1/V, 1].

    ``predictions[v, q]`` is the predicted label index of query ``q`` under variant ``v`` (template or
    demonstration set); StaICC's ``functional.consistency`` on the same predictions gives the same number.
    """
    if predictions.ndim != 2 or predictions.numel() == 0:
        raise AbftLensError("consistency needs a non-empty [variant, query] prediction matrix.", "report this as a bug.")
    n_variants = predictions.shape[0]
    counts = torch.zeros(predictions.shape[1], int(predictions.max()) + 1, dtype=torch.long)
    counts.scatter_add_(1, predictions.T.long(), torch.ones_like(predictions.T, dtype=torch.long))
    return float((counts.max(-1).values.double() / n_variants).mean())


@dataclass
class SensitivityResult:
    """Consistency of predictions over prompt variants; ``predictions[v][q]`` label indices."""

    kind: str
    task: str
    k: int
    consistency: float
    predictions: list[list[int]]
    variants: list[dict]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "task": self.task, "k": self.k, "consistency": self.consistency,
                "n_variants": len(self.predictions), "n_queries": len(self.predictions[0]),
                "variants": self.variants, "predictions": self.predictions}


def _predict_variants(
    model, builders: Sequence[PromptBuilder], prompt_sets: Sequence[Sequence[ICLPrompt]], *, batch_size: int,
    progress: bool | str,
) -> Int[Tensor, "variant query"]:
    """Argmax label of every prompt of every variant, all variants sent through the evaluator in one pass."""
    flat = [prompt for prompts in prompt_sets for prompt in prompts]
    probs = label_probabilities(model, flat, builders[0].label_token_ids, pad_id=pad_token_id(builders[0].tokenizer),
                                batch_size=batch_size, progress=progress)
    return probs.argmax(-1).view(len(prompt_sets), -1)


# --------------------------------------------------------------------------------------------- templates


@lru_cache(maxsize=16)
def _staicc_alternates(index: int) -> tuple[tuple[str, ...], ...]:
    from StaICC.normal import ORIGINAL_DATA_LOADER_NORMAL

    alternate = ORIGINAL_DATA_LOADER_NORMAL[index]().get_alternate_template()
    return (tuple(alternate["instruction"]), tuple(p[0] for p in alternate["input_text_prefixes"]),
            tuple(alternate["label_prefix"]), tuple(alternate["label_affix"]))


def alternate_templates(task: ICLTask, alternates: dict | None = None) -> list[tuple[tuple[int, ...], Template]]:
    """The 9 L9 templates of ``task``: ``(L9 row, Template)`` pairs in StaICC's order.

    ``alternates`` maps ``instruction`` / ``input_prefix`` / ``label_prefix`` / ``label_affix`` to 3 options
    each (StaICC spelling: label prefixes with their trailing space); default: the StaICC dataset's own.
    A label prefix's single trailing space is moved onto the label words (see the module docstring).
    """
    if alternates is not None:
        options = tuple(tuple(alternates[key]) for key in ("instruction", "input_prefix", "label_prefix", "label_affix"))
    elif task.index is not None:
        options = _staicc_alternates(task.index)
    else:
        raise AbftLensError(f"{task.name} is not a StaICC dataset, so it has no alternate templates.",
                            "pass alternates={'instruction': [...], 'input_prefix': [...], 'label_prefix': "
                            "[...], 'label_affix': [...]} with 3 options each.")
    templates = []
    for row in L9_TABLE:
        instruction, input_prefix, label_prefix, label_affix = (options[c][i] for c, i in enumerate(row))
        templates.append((row, replace(task.template, instruction=instruction, input_prefix=input_prefix,
                                       label_prefix=label_prefix.removesuffix(" "), label_affix=label_affix)))
    return templates


def template_sensitivity_prompts(
    model: LoadedModel, task: ICLTask, *, k: int = 4, n_queries: int = TEMPLATE_QUERIES,
    alternates: dict | None = None,
) -> tuple[list[PromptBuilder], list[list[ICLPrompt]], list[dict]]:
    """Builders, prompts ``[template][query]`` and template descriptions of the template-sensitivity test."""
    _check_queries(task, n_queries, TEMPLATE_QUERIES if task.index is not None else len(task.test))
    demos = task.test_demonstrations(k)
    builders, prompt_sets, described = [], [], []
    for row, template in alternate_templates(task, alternates):
        builder = prompt_builder(model, replace(task, template=template))
        builders.append(builder)
        prompt_sets.append([builder.build([task.demonstration[i] for i in demos[q]], task.test[q])
                            for q in range(n_queries)])
        described.append({"l9_row": list(row), **template.to_dict()})
    return builders, prompt_sets, described


def template_sensitivity(
    model: LoadedModel, task: ICLTask, *, k: int = 4, n_queries: int = TEMPLATE_QUERIES,
    alternates: dict | None = None, batch_size: int = 8, progress: bool | str = False,
) -> SensitivityResult:
    """StaICC ``Template_sens``: consistency of predictions over the 9 L9 templates (``9 * n_queries`` prompts)."""
    builders, prompt_sets, described = template_sensitivity_prompts(model, task, k=k, n_queries=n_queries,
                                                                    alternates=alternates)
    predictions = _predict_variants(model, builders, prompt_sets, batch_size=batch_size,
                                    progress=_desc(progress, "template sensitivity"))
    return SensitivityResult("template", task.name, k, consistency(predictions), predictions.tolist(), described)


# --------------------------------------------------------------------------------------------- demonstrations


def demonstration_sets(task: ICLTask, *, k: int = 4, n_queries: int = DEMO_QUERIES, n_sets: int = DEMO_SETS
                       ) -> list[list[list[int]]]:
    """``[set][query]`` demonstration indices of StaICC's ``Demo_sens``: query ``q`` with set ``t`` uses
    ``test_demonstrations(k)[q + t * stride]``, ``stride = 2 * len(test) // n_sets`` (128 for 512 queries)."""
    demos = task.test_demonstrations(k)
    stride = len(demos) // n_sets
    _check_queries(task, n_queries, stride)
    return [[demos[q + t * stride] for q in range(n_queries)] for t in range(n_sets)]


def demonstration_sensitivity_prompts(builder: PromptBuilder, *, k: int = 4, n_queries: int = DEMO_QUERIES,
                                      n_sets: int = DEMO_SETS) -> list[list[ICLPrompt]]:
    """Prompts ``[set][query]`` of the demonstration-sensitivity test."""
    task = builder.task
    return [[builder.build([task.demonstration[i] for i in indices], task.test[q]) for q, indices in enumerate(row)]
            for row in demonstration_sets(task, k=k, n_queries=n_queries, n_sets=n_sets)]


def demonstration_sensitivity(
    model: LoadedModel, task: ICLTask, *, k: int = 4, n_queries: int = DEMO_QUERIES, n_sets: int = DEMO_SETS,
    batch_size: int = 8, progress: bool | str = False,
) -> SensitivityResult:
    """StaICC ``Demo_sens``: consistency of predictions over ``n_sets`` demonstration sets per query."""
    builder = prompt_builder(model, task)
    prompt_sets = demonstration_sensitivity_prompts(builder, k=k, n_queries=n_queries, n_sets=n_sets)
    predictions = _predict_variants(model, [builder], prompt_sets, batch_size=batch_size,
                                    progress=_desc(progress, "demonstration sensitivity"))
    return SensitivityResult("demonstration", task.name, k, consistency(predictions), predictions.tolist(),
                             [{"set": t} for t in range(n_sets)])


# --------------------------------------------------------------------------------------------- unseen label


def unseen_label_demonstrations(task: ICLTask, k: int = 4, repeats: int = 2) -> list[list[int]]:
    """StaICC's ``set_out_of_domain_mode`` sampler: the fixed test demonstrations, where every prompt whose
    demonstrations include the query's label gets, in prompt order, the next samples of the continuing seed-42
    sampler until one has no demonstration with that label. ``repeats * len(test)`` lists of ``k`` indices.

    The redraw is rejection sampling, as in StaICC: expected draws grow like (n_labels / (n_labels - 1))^k.
    """
    labels = [example.label for example in task.demonstration]
    for label in {example.label for example in task.test}:
        if sum(other != label for other in labels) < k:
            raise AbftLensError(f"{task.name} has fewer than k={k} demonstrations without label "
                                f"{task.label_words[label]!r}, so no unseen-label prompt exists.", "use a smaller k.")
    sampler = LcgSampler(task.seed)
    result = [sampler.sample(k, len(labels)) for _ in range(repeats * len(task.test))]
    for j, indices in enumerate(result):
        query_label = task.test[j % len(task.test)].label
        while any(labels[i] == query_label for i in indices):
            indices = sampler.sample(k, len(labels))
        result[j] = indices
    return result


def unseen_label_prompts(builder: PromptBuilder, k: int = 4, n: int | None = None) -> list[ICLPrompt]:
    """The first ``n`` unseen-label test prompts (queries in the order of :func:`test_prompts`)."""
    task = builder.task
    demos = _unseen_cached(task, k)
    n = len(demos) if n is None else n
    return [builder.build([task.demonstration[i] for i in demos[j]], task.test[j % len(task.test)]) for j in range(n)]


_UNSEEN_CACHE: dict = {}


def _unseen_cached(task: ICLTask, k: int) -> list[list[int]]:
    key = (task.name, task.index, task.seed, len(task.demonstration), len(task.test), k)
    if key not in _UNSEEN_CACHE:
        _UNSEEN_CACHE[key] = unseen_label_demonstrations(task, k)
    return _UNSEEN_CACHE[key]


def zero_shot_prompts(builder: PromptBuilder, n: int) -> list[ICLPrompt]:
    """0-shot prompts for the queries of the first ``n`` test prompts."""
    task = builder.task
    return [builder.build([], task.test[j % len(task.test)]) for j in range(n)]


def unseen_label_test(
    model: LoadedModel, task: ICLTask, *, k: int = 4, n_test: int | None = 256, batch_size: int = 8,
    progress: bool | str = False,
) -> dict[str, EvalResult]:
    """Accuracy etc. on the same queries with unseen-label demonstrations, the fixed (random) demonstrations
    and no demonstrations: ``{"unseen_label": ..., "random": ..., "zero_shot": ...}``."""
    builder = prompt_builder(model, task)
    n = n_test or 2 * len(task.test)
    sets = {"unseen_label": unseen_label_prompts(builder, k, n), "random": test_prompts(builder, k, n),
            "zero_shot": zero_shot_prompts(builder, n)}
    results = {}
    for name, prompts in sets.items():
        results[name] = evaluate_prompts(model, builder, prompts, batch_size=batch_size,
                                         progress=_desc(progress, name.replace("_", " ")))
        results[name].info.update(protocol=name)
    return results


# --------------------------------------------------------------------------------------------- contextual bias


def entropy(distribution: Float[Tensor, " label"]) -> float:
    """Shannon entropy in nats, 0 log 0 = 0."""
    p = distribution.double()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def content_free_prompts(builder: PromptBuilder, demo_sets: Sequence[Sequence[int]], text: str) -> list[ICLPrompt]:
    """One prompt per demonstration set with query text ``text`` (label index 0, unused)."""
    task = builder.task
    return [builder.build([task.demonstration[i] for i in indices], Example(text, 0)) for indices in demo_sets]


def contextual_bias(
    model: LoadedModel, task: ICLTask, *, k: int = 4, n_prompts: int | None = None, batch_size: int = 8,
    progress: bool | str = False,
) -> dict:
    """StaICC ``Contextual_bias``: the fixed test demonstrations with an empty query text.

    Returns ``entropy`` (nats) of the mean label distribution, ``max_entropy`` = ln(n_labels), the ratio
    ``normalized_entropy`` (1 = no bias) and the ``mean_distribution`` itself.
    """
    builder = prompt_builder(model, task)
    demos = task.test_demonstrations(k)
    prompts = content_free_prompts(builder, demos[: n_prompts or len(demos)], "")
    probs = label_probabilities(model, prompts, builder.label_token_ids, pad_id=pad_token_id(builder.tokenizer),
                                batch_size=batch_size, progress=_desc(progress, "contextual bias"))
    mean = probs.double().mean(0)
    value = entropy(mean)
    return {"entropy": value, "max_entropy": math.log(task.n_labels), "normalized_entropy": value / math.log(task.n_labels),
            "mean_distribution": mean.tolist(), "n_prompts": len(prompts), "query": ""}


# --------------------------------------------------------------------------------------------- calibration


def calibrate(probs: Float[Tensor, "prompt label"], content_free: Float[Tensor, "prompt label"]
              ) -> Float[Tensor, "prompt label"]:
    """Contextual calibration: ``q = (p / p_cf) / sum(p / p_cf)`` row by row (Zhao et al. 2021, W = diag(p_cf)^-1, b = 0)."""
    ratio = probs.double() / content_free.double().clamp_min(1e-12)
    return (ratio / ratio.sum(-1, keepdim=True)).to(probs.dtype)


def calibrated_evaluate(
    model: LoadedModel, task: ICLTask, *, k: int = 4, n_test: int | None = None,
    content_free: Sequence[str] = CONTENT_FREE, batch_size: int = 8, progress: bool | str = False,
) -> EvalResult:
    """StaICC "Normal" evaluation with contextual calibration: the fixed test prompts, each calibrated by the
    mean label distribution of ``content_free`` queries written with its own demonstrations
    (``(1 + len(content_free)) * n_test`` forward passes)."""
    builder = prompt_builder(model, task)
    prompts = test_prompts(builder, k, n_test)
    demos = task.test_demonstrations(k)[: len(prompts)]
    flat = prompts + [p for text in content_free for p in content_free_prompts(builder, demos, text)]
    probs = label_probabilities(model, flat, builder.label_token_ids, pad_id=pad_token_id(builder.tokenizer),
                                batch_size=batch_size, progress=_desc(progress, "calibrated eval"))
    raw, cf = probs[: len(prompts)], probs[len(prompts):].view(len(content_free), len(prompts), -1).mean(0)
    calibrated = calibrate(raw, cf)
    gold = torch.tensor([p.query_label for p in prompts])
    return EvalResult(task=task.name, k=k, metrics=classification_metrics(gold, calibrated), gold=gold.tolist(),
                      predictions=calibrated.argmax(-1).tolist(), probs=calibrated.tolist(),
                      label_words=list(task.label_words),
                      info={"model": model_info(model).name, "protocol": "Normal", "method": "contextual_calibration",
                            "content_free": list(content_free)})


# --------------------------------------------------------------------------------------------- report


def robustness_report(
    model: LoadedModel, task: ICLTask, test_type: str, *, k: int = 4, n_queries: int | None = None,
    n_test: int | None = 256, batch_size: int = 8, progress: bool | str = False,
) -> dict:
    """JSON-able robustness numbers for ``test_type`` (TempSensitivity or DemoSensitivity): its consistency,
    plus the unseen-label test (``n_test`` prompts) and the contextual bias, each a small dict of metrics."""
    check_robustness_options(task, test_type, k=k, n_queries=n_queries, n_test=n_test)
    if test_type == "TempSensitivity":
        sens = template_sensitivity(model, task, k=k, n_queries=n_queries or TEMPLATE_QUERIES,
                                    batch_size=batch_size, progress=progress)
    else:
        sens = demonstration_sensitivity(model, task, k=k, n_queries=n_queries or DEMO_QUERIES,
                                         batch_size=batch_size, progress=progress)
    unseen = unseen_label_test(model, task, k=k, n_test=n_test, batch_size=batch_size, progress=progress)
    bias = contextual_bias(model, task, k=k, n_prompts=n_test, batch_size=batch_size, progress=progress)
    return {"test_type": test_type, "k": k, "consistency": sens.consistency, "sensitivity": sens.to_dict(),
            "unseen_label": {name: result.metrics for name, result in unseen.items()},
            "contextual_bias": bias}


def check_robustness_options(task: ICLTask, test_type: str, *, k: int = 4, n_queries: int | None = None,
                             n_test: int | None = 256) -> None:
    """What :func:`robustness_report` refuses, checked without a model (commands call it before loading one)."""
    if test_type not in TEST_TYPES[1:]:
        raise AbftLensError(f"unknown test type {test_type!r}.", f"use one of {', '.join(TEST_TYPES)}.")
    task.check_test_prompts(k, n_test)
    if test_type == "TempSensitivity":
        _check_queries(task, n_queries or TEMPLATE_QUERIES, TEMPLATE_QUERIES if task.index is not None else len(task.test))
    else:
        _check_queries(task, n_queries or DEMO_QUERIES, task.n_test_prompts // DEMO_SETS)


def _check_queries(task: ICLTask, n_queries: int, limit: int) -> None:
    if not 0 < n_queries <= (limit := min(limit, len(task.test))):
        raise AbftLensError(f"n_queries={n_queries} is out of range for {task.name}.", f"use 1-{limit}.")


def _desc(progress: bool | str, name: str) -> bool | str:
    return name if progress is True else progress


__all__ = [
    "consistency", "SensitivityResult", "alternate_templates", "template_sensitivity_prompts", "template_sensitivity",
    "demonstration_sets", "demonstration_sensitivity_prompts", "demonstration_sensitivity",
    "unseen_label_demonstrations", "unseen_label_prompts", "zero_shot_prompts", "unseen_label_test",
    "entropy", "content_free_prompts", "contextual_bias", "calibrate", "calibrated_evaluate", "robustness_report",
    "L9_TABLE", "CONTENT_FREE", "TEST_TYPES", "check_robustness_options"]
