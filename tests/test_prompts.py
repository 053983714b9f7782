"""Prompts: StaICC's exact text, one-call tokenization, label positions from offsets, samplers, collation."""

from __future__ import annotations

import contextlib
import io
import types
import warnings

import pytest
import torch

from abft_lens.errors import AbftLensError
from abft_lens.data.prompts import PromptBuilder, collate, pad_token_id, sample_prompts
from abft_lens.data.prompts import test_prompts as fixed_test_prompts  # not collected as a test
from abft_lens.data.tasks import Example, ICLTask, Template, load_task
from abft_lens.backends.provenance import model_info


@pytest.fixture(scope="module")
def tok():
    from abft_lens.backends.loading import tiny_tokenizer

    return tiny_tokenizer()


def _toy_task(label_words=(" negative", " positive"), template=None, n=30) -> ICLTask:
    examples = [Example(f"toy sentence number {i} is {'fine' if i % 2 else 'poor'} .", i % 2) for i in range(n)]
    return ICLTask(name="toy", label_words=tuple(label_words), template=template or Template(
        input_prefix="sentence: ", label_prefix="sentiment:"), calibration=examples[: n // 2],
        demonstration=examples[n // 2:], test=examples[:4])


def _check_labels(builder: PromptBuilder, prompt, demos=None, query=None):
    """Label positions decode to the label words' first tokens; tokens are the one-call tokenization."""
    tokenizer = builder.tokenizer
    ids = tokenizer(prompt.text, add_special_tokens=False).input_ids
    assert list(prompt.token_ids) == ([tokenizer.bos_token_id] if builder.adds_bos else []) + ids
    assert prompt.k == len(prompt.label_positions) == len(prompt.demo_labels)
    assert list(prompt.label_positions) == sorted(set(prompt.label_positions))
    assert all(0 <= p < prompt.prediction_position == prompt.n_tokens - 1 for p in prompt.label_positions)
    for position, label in zip(prompt.label_positions, prompt.demo_labels):
        token = prompt.token_ids[position]
        assert token == builder.label_token_ids[label]
        word = builder.task.label_words[label]
        assert token == tokenizer(word, add_special_tokens=False).input_ids[0]
        assert word.startswith(tokenizer.decode([token]))
    if demos is not None:
        assert prompt.demo_labels == tuple(d.label for d in demos)
        assert prompt.query_label == query.label
    # the prompt ends at the label prefix (no trailing space): the label is the next token
    assert prompt.text.endswith(builder.task.template.label_prefix)


# ------------------------------------------------------------------------------------ StaICC's own text


@pytest.mark.parametrize("index", [0, 2])
def test_prompt_text_equals_staicc(index, tok, staicc_experimentor):
    task = load_task(index)
    builder = PromptBuilder(tok, task)
    prompts = fixed_test_prompts(builder, 4, 1024)
    exp = staicc_experimentor(index)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in (0, 1, 7, 511, 512, 513, 1023):
            assert prompts[j].text == exp._get_prompts_for_test_sample(j % 512, j // 512), j
            assert prompts[j].query_label == exp.triplet_dataset.get_default_ground_truth_label_index(j % 512)
    assert prompts[0].text != prompts[512].text  # same query, other demonstrations
    assert prompts[0].query_label == prompts[512].query_label
    for j in (0, 512, 1023):
        _check_labels(builder, prompts[j])


@pytest.mark.parametrize("index", [4, 6, 8])
def test_prompt_assembly_equals_staicc_writer(index, tok):
    """Other templates (question/target, subjectiveness, 'hate speech:'): StaICC's prompt writer, given the
    same demonstration and query indices, writes the same text."""
    from StaICC.normal import ORIGINAL_DATA_LOADER_NORMAL
    from StaICC.util.dataset_interface import prompt_writter, triplet_dataset

    task = load_task(index)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        triplet = triplet_dataset(ORIGINAL_DATA_LOADER_NORMAL[index](), 1024, 4096, 512)
        writer = prompt_writter(triplet, False)
        writer.replace_space_to_label()
        builder = PromptBuilder(tok, task)
        for demos, query in (([3, 10, 200, 4000], 17), ([4095, 0], 511), ([], 5), ([7] * 3, 0)):
            prompt = builder.build([task.demonstration[i] for i in demos], task.test[query])
            assert prompt.text == writer.write_prompt(demos, query)
            _check_labels(builder, prompt)


def test_test_prompts_demonstrations_and_range(tok):
    task = load_task("sst2")
    builder = PromptBuilder(tok, task)
    prompts = fixed_test_prompts(builder, 4, 3)
    assert len(prompts) == 3
    for j, prompt in enumerate(prompts):
        demos = [task.demonstration[i] for i in task.test_demonstrations(4)[j]]
        assert prompt == builder.build(demos, task.test[j])
        _check_labels(builder, prompt, demos, task.test[j])
    for n in (0, 1025):
        with pytest.raises(AbftLensError, match=f"n_test={n} is out of range"):
            fixed_test_prompts(builder, 4, n)


# ------------------------------------------------------------------------------- tokens and positions


@pytest.mark.parametrize("index", range(10))
def test_label_positions_on_every_dataset(index, tok):
    """Tiny tokenizer: the StaICC label words of every dataset start with distinct tokens (some words take
    several tokens), and the label positions hold those first tokens."""
    task = load_task(index)
    builder = PromptBuilder(tok, task)
    assert len(set(builder.label_token_ids)) == task.n_labels
    for word, token in zip(task.label_words, builder.label_token_ids):
        assert tok(word, add_special_tokens=False).input_ids[0] == token
    prompts = sample_prompts(builder, task.calibration, k=4, n=6, seed=index)
    for prompt in prompts:
        _check_labels(builder, prompt)


def test_demo_and_query_labels_follow_examples(tok):
    task = load_task("sst5")
    builder = PromptBuilder(tok, task)
    demos = [next(e for e in task.demonstration if e.label == label) for label in (4, 0, 2, 2, 1, 3)]
    query = next(e for e in task.test if e.label == 3)
    prompt = builder.build(demos, query)
    assert prompt.demo_labels == (4, 0, 2, 2, 1, 3) and prompt.query_label == 3 and prompt.k == 6
    _check_labels(builder, prompt, demos, query)
    expected = "".join(f"sentence: {d.text} sentiment:{task.label_words[d.label]}\n" for d in demos)
    assert prompt.text == expected + f"sentence: {query.text} sentiment:"
    # zero-shot: no labels, just the query
    zero = builder.build([], query)
    assert zero.k == 0 and zero.text == f"sentence: {query.text} sentiment:"


def test_bos_is_prepended_and_positions_shift(tok):
    task = _toy_task()
    plain, with_bos = PromptBuilder(tok, task), PromptBuilder(tok, task, adds_bos=True)
    demos, query = task.demonstration[:3], task.test[0]
    a, b = plain.build(demos, query), with_bos.build(demos, query)
    assert b.token_ids == (tok.bos_token_id,) + a.token_ids
    assert b.label_positions == tuple(p + 1 for p in a.label_positions)
    _check_labels(with_bos, b, demos, query)


@pytest.mark.embedded
@pytest.mark.parametrize("index", [0, 4, 7])
def test_label_positions_with_smollm2_tokenizer(index, embedded):
    task = load_task(index)
    builder = PromptBuilder(embedded.tokenizer, task, adds_bos=model_info(embedded).adds_bos, max_tokens=embedded.cfg.n_ctx)
    assert len(set(builder.label_token_ids)) == task.n_labels
    for prompt in sample_prompts(builder, task.calibration, k=4, n=8, seed=1):
        _check_labels(builder, prompt)


# ------------------------------------------------------------------------------------------ errors


def test_colliding_label_words(tok):
    assert tok(" xq", add_special_tokens=False).input_ids[0] == tok(" xz", add_special_tokens=False).input_ids[0]
    with pytest.raises(AbftLensError, match=r"label words \[' xq', ' xz'\] of toy start with the same token"):
        PromptBuilder(tok, _toy_task(label_words=(" xq", " positive", " xz")))


def test_empty_label_word(tok):
    with pytest.raises(AbftLensError, match="tokenizes to nothing"):
        PromptBuilder(tok, _toy_task(label_words=("", " positive")))


def test_prompt_longer_than_context(tok):
    task = _toy_task()
    builder = PromptBuilder(tok, task, max_tokens=40)
    assert builder.build(task.demonstration[:1], task.test[0]).n_tokens <= 40
    with pytest.raises(AbftLensError) as info:
        builder.build(task.demonstration[:8], task.test[0])
    assert "k=8" in str(info.value) and "more than the model's context of 40" in str(info.value)
    assert "smaller k" in info.value.fix


def test_label_merging_into_neighbour_token(tok):
    template = Template(input_prefix="sentence: ", label_prefix="sentiment:", label_affix="ly\n")
    task = _toy_task(template=template)
    text = "sentiment: positively"
    assert tok(" positive", add_special_tokens=False).input_ids[0] not in tok(text, add_special_tokens=False).input_ids
    builder = PromptBuilder(tok, task)
    with pytest.raises(AbftLensError, match="merges with the text around it") as info:
        builder.build([task.demonstration[1]], task.test[0])
    assert "label words start a new token" in info.value.fix
    # with the template fixed, the same examples build
    _check_labels(PromptBuilder(tok, _toy_task()), PromptBuilder(tok, _toy_task()).build(
        [task.demonstration[1]], task.test[0]))


def test_slow_tokenizer_rejected():
    with pytest.raises(AbftLensError, match="fast"):
        PromptBuilder(types.SimpleNamespace(is_fast=False), _toy_task())


# ------------------------------------------------------------------------------------------ samplers


class _RecordingBuilder(PromptBuilder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def build(self, demos, query):
        self.calls.append((list(demos), query))
        return super().build(demos, query)


def test_sample_prompts_seeded_distinct_examples(tok):
    task = _toy_task(n=40)
    pool = task.calibration + task.demonstration
    builder = _RecordingBuilder(tok, task)
    first = sample_prompts(builder, pool, k=3, n=12, seed=5)
    calls = list(builder.calls)
    again = sample_prompts(builder, pool, k=3, n=12, seed=5)
    other = sample_prompts(builder, pool, k=3, n=12, seed=6)
    assert first == again
    assert [p.text for p in first] != [p.text for p in other]
    assert len(first) == 12
    texts = {e.text for e in pool}
    for (demos, query), prompt in zip(calls, first):
        chosen = [e.text for e in demos] + [query.text]
        assert len(chosen) == 4 and len(set(chosen)) == 4 and set(chosen) <= texts
        assert prompt.k == 3 and prompt.query_label == query.label
        _check_labels(builder, prompt, demos, query)
    # different prompts draw different examples
    assert len({tuple(e.text for e in demos) for demos, _ in calls}) > 1
    with pytest.raises(AbftLensError, match="k=40 needs 41 examples"):
        sample_prompts(builder, pool, k=40, n=1, seed=0)
    # k + 1 == len(pool) is allowed and uses every example once
    small = pool[:4]
    builder.calls.clear()
    sample_prompts(builder, small, k=3, n=2, seed=0)
    for demos, query in builder.calls:
        assert sorted(e.text for e in demos + [query]) == sorted(e.text for e in small)


def test_default_sampler_is_the_seeded_draw_of_k_plus_1_examples(tok):
    """The unbalanced sampler is exactly random.Random(seed).sample(range(len(pool)), k + 1) per prompt (the
    committed studies' training prompts depend on this draw)."""
    import random

    task = _toy_task(n=40)
    pool = task.calibration + task.demonstration
    builder = PromptBuilder(tok, task)
    rng = random.Random(11)
    expected = [[pool[i] for i in rng.sample(range(len(pool)), 4)] for _ in range(7)]
    got = sample_prompts(builder, pool, k=3, n=7, seed=11)
    assert got == [builder.build(chosen[:3], chosen[3]) for chosen in expected]


def _skewed_pool(n_per_label):
    """Examples with labels 0, 1, 2 in the given counts (a pool far from balanced)."""
    return [Example(f"item {label} {i} here .", label) for label, n in enumerate(n_per_label) for i in range(n)]


def test_balanced_query_labels_take_every_label_equally_often(tok):
    task = _toy_task(label_words=(" negative", " neutral", " positive"))
    pool = _skewed_pool([3, 40, 7])
    builder = _RecordingBuilder(tok, task)
    prompts = sample_prompts(builder, pool, k=4, n=31, seed=3, balance_query_labels=True)
    counts = [sum(p.query_label == c for p in prompts) for c in range(3)]
    assert sorted(counts) == [10, 10, 11]
    # the plain sampler follows the pool's label shares instead (80 % label 1 here)
    plain = sample_prompts(builder, pool, k=4, n=200, seed=3)
    assert sum(p.query_label == 1 for p in plain) > 120
    builder.calls.clear()
    again = sample_prompts(builder, pool, k=4, n=31, seed=3, balance_query_labels=True)
    assert again == prompts and sample_prompts(builder, pool, k=4, n=31, seed=4, balance_query_labels=True) != prompts
    for demos, query in builder.calls:  # k + 1 distinct examples; demonstrations keep the pool's shares
        assert len({e.text for e in demos + [query]}) == 5
    demo_labels = [e.label for demos, _ in builder.calls for e in demos]
    assert demo_labels.count(1) > demo_labels.count(0) + demo_labels.count(2)


def test_balanced_query_labels_need_every_label_in_the_pool(tok):
    task = _toy_task(label_words=(" negative", " neutral", " positive"))
    builder = PromptBuilder(tok, task)
    with pytest.raises(AbftLensError, match=r"\['positive'\] has none") as error:
        sample_prompts(builder, _skewed_pool([5, 5, 0]), k=2, n=4, seed=0, balance_query_labels=True)
    assert "--balance-query-labels" in error.value.fix


# ------------------------------------------------------------------------------------------ batching


def test_collate_left_pads_and_shifts_label_positions(tok):
    task = _toy_task(n=40)
    builder = PromptBuilder(tok, task)
    prompts = [builder.build(task.demonstration[i:i + 2], task.test[i % 4]) for i in (0, 3, 7)]
    prompts.append(builder.build([Example("a much longer demonstration text " * 4, 0), task.demonstration[5]],
                                 task.test[1]))
    assert len({p.n_tokens for p in prompts}) > 1
    pad = pad_token_id(tok)
    batch = collate(prompts, pad)
    width = max(p.n_tokens for p in prompts)
    assert batch.tokens.shape == batch.attention_mask.shape == (4, width)
    assert batch.n_tokens.tolist() == [p.n_tokens for p in prompts]
    assert batch.padding.tolist() == [width - p.n_tokens for p in prompts]
    assert batch.is_padded
    for row, prompt in enumerate(prompts):
        padding = width - prompt.n_tokens
        assert batch.tokens[row, padding:].tolist() == list(prompt.token_ids)
        assert (batch.tokens[row, :padding] == pad).all()
        assert batch.attention_mask[row].tolist() == [0] * padding + [1] * prompt.n_tokens
        assert batch.label_positions[row].tolist() == [p + padding for p in prompt.label_positions]
        at_positions = batch.tokens[row, batch.label_positions[row]]
        expected = torch.tensor([builder.label_token_ids[label] for label in prompt.demo_labels])
        assert torch.equal(at_positions, expected)
        assert batch.tokens[row, -1].item() == prompt.token_ids[-1]  # prediction position is the last column
    assert batch.demo_labels.tolist() == [list(p.demo_labels) for p in prompts]
    assert batch.query_labels.tolist() == [p.query_label for p in prompts]
    single = collate(prompts[:1], pad)
    assert not single.is_padded and single.tokens[0].tolist() == list(prompts[0].token_ids)


def test_collate_rejects_mixed_k(tok):
    task = _toy_task()
    builder = PromptBuilder(tok, task)
    with pytest.raises(AbftLensError, match="different k"):
        collate([builder.build(task.demonstration[:2], task.test[0]),
                 builder.build(task.demonstration[:3], task.test[0])], 0)


def test_pad_token_id_fallbacks(tok):
    assert pad_token_id(tok) == tok.pad_token_id
    assert pad_token_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
