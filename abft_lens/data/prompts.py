"""ICL prompts with known label positions.

A prompt is written segment by segment from a task's template; the character span of every demonstration's
label word is recorded as it is written. The whole text is then tokenized once, exactly as a harness that
tokenizes the full string would (StaICC does), and each recorded span is mapped to its token through the
tokenizer's offsets. Labels are never located by searching the token sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from abft_lens.backends.provenance import LoadedModel, model_info
from abft_lens.errors import AbftLensError
from abft_lens.data.tasks import Example, ICLTask



@dataclass(frozen=True)
class ICLPrompt:
    """One ICL prompt. Positions are token indices into ``token_ids`` (BOS included when the model adds one).

    ``label_positions[i]`` is the first token of demonstration ``i``'s label word, ``demo_labels[i]`` its label
    index; the model predicts the query's label at ``prediction_position`` (the last token).
    """

    text: str
    token_ids: tuple[int, ...]
    label_positions: tuple[int, ...]
    demo_labels: tuple[int, ...]
    query_label: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def k(self) -> int:
        return len(self.label_positions)

    @property
    def prediction_position(self) -> int:
        return len(self.token_ids) - 1


class PromptBuilder:
    """Writes and tokenizes prompts for one task and one tokenizer.

    ``label_token_ids[c]`` is the first token of label word ``c`` (with its leading space): the token whose
    next-token logit scores label ``c``. Label words whose first tokens collide are an error.
    """

    def __init__(self, tokenizer, task: ICLTask, *, adds_bos: bool = False, max_tokens: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise AbftLensError("abft-lens needs a fast (Rust) tokenizer for character offsets.",
                                "load the model's tokenizer.json (transformers' fast tokenizer).")
        self.tokenizer = tokenizer
        self.task = task
        self.adds_bos = adds_bos
        self.max_tokens = max_tokens
        self.label_token_ids = self._label_token_ids()

    def _label_token_ids(self) -> tuple[int, ...]:
        firsts = []
        for word in self.task.label_words:
            ids = self.tokenizer(word, add_special_tokens=False).input_ids
            if not ids:
                raise AbftLensError(f"label word {word!r} of {self.task.name} tokenizes to nothing.",
                                    "use non-empty label words.")
            firsts.append(ids[0])
        if len(set(firsts)) != len(firsts):
            clashes = [w for w, t in zip(self.task.label_words, firsts) if firsts.count(t) > 1]
            raise AbftLensError(
                f"label words {clashes} of {self.task.name} start with the same token, so the model cannot "
                "tell them apart at the prediction position.",
                "choose label words whose first tokens differ (e.g. single-token words).",
            )
        return tuple(firsts)

    def build(self, demos: Sequence[Example], query: Example) -> ICLPrompt:
        """Write, tokenize and locate labels for ``demos`` followed by ``query``."""
        template = self.task.template
        text = template.instruction
        spans: list[tuple[int, int]] = []
        for demo in demos:
            text += template.input_prefix + demo.text + template.input_affix + template.label_prefix
            word = self.task.label_words[demo.label]
            spans.append((len(text), len(text) + len(word)))
            text += word + template.label_affix
        text += template.query_prefix + template.input_prefix + query.text + template.input_affix + template.label_prefix

        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded.input_ids)
        offsets = list(encoded.offset_mapping)
        if self.adds_bos:
            ids.insert(0, self.tokenizer.bos_token_id)
            offsets.insert(0, (0, 0))
        positions = tuple(self._token_at(offsets, ids, span, demo) for span, demo in zip(spans, demos))
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise AbftLensError(
                f"a {self.task.name} prompt with k={len(demos)} has {len(ids)} tokens, more than the model's "
                f"context of {self.max_tokens}; abft-lens never truncates silently.",
                "use a smaller k or a dataset with shorter texts.",
            )
        return ICLPrompt(text, tuple(ids), positions, tuple(d.label for d in demos), query.label)

    def _token_at(self, offsets, ids, span: tuple[int, int], demo: Example) -> int:
        """The index of the token that starts label ``span``, checked against the label's own first token."""
        start, end = span
        for position, (token_start, token_end) in enumerate(offsets):
            if token_end > start and token_start < end:
                if ids[position] != self.label_token_ids[demo.label]:
                    raise AbftLensError(
                        f"in a {self.task.name} prompt the label word {self.task.label_words[demo.label]!r} "
                        "merges with the text around it into another token.",
                        "change the template so that label words start a new token (e.g. end the label "
                        "prefix with ':' and give label words a leading space).",
                    )
                return position
        raise AbftLensError(f"label span {span} not found in the tokenized prompt.", "report this as a bug.")


# ------------------------------------------------------------------------------------------- samplers


def test_prompts(builder: PromptBuilder, k: int, n: int | None = None) -> list[ICLPrompt]:
    """The first ``n`` of the task's fixed test prompts (StaICC "Normal": every query twice, 1024 in all)."""
    task = builder.task
    task.check_test_prompts(k, n)
    demos = task.test_demonstrations(k)
    n = len(demos) if n is None else n
    return [
        builder.build([task.demonstration[i] for i in demos[j]], task.test[j % len(task.test)]) for j in range(n)
    ]


def indices_by_label(task: ICLTask, pool: Sequence[Example]) -> list[list[int]]:
    """``[c]``: the indices into ``pool`` of label ``c``'s examples, for every label of ``task``; a label without
    examples is an error (balanced query labels need one of each)."""
    by_label: list[list[int]] = [[] for _ in task.label_words]
    for index, example in enumerate(pool):
        by_label[example.label].append(index)
    missing = [word.strip() for word, indices in zip(task.label_words, by_label) if not indices]
    if missing:
        raise AbftLensError(f"balanced query labels need every label in the training pool; {missing} has none "
                            f"among its {len(pool)} examples.", "drop --balance-query-labels, or hold out fewer "
                            "--validation-examples.")
    return by_label


def sample_prompts(builder: PromptBuilder, pool: Sequence[Example], k: int, n: int, seed: int, *,
                   balance_query_labels: bool = False) -> list[ICLPrompt]:
    """``n`` prompts of ``k + 1`` distinct seeded-random examples of ``pool``: the first ``k`` are the
    demonstrations, the last the query (the paper's training prompts, drawn from the calibration split).

    ``balance_query_labels`` (ours, not the paper's): the queries' labels cycle through every label in a seeded
    order, so each label is the query's label in ``n // n_labels`` or one more prompts, whatever the pool's label
    shares; each query is a random example of its label and the ``k`` demonstrations stay uniform over the rest of
    the pool. A loss summed over such prompts rewards no label word more than another.
    """
    if k + 1 > len(pool):
        raise AbftLensError(f"k={k} needs {k + 1} examples per prompt but the pool holds {len(pool)}.",
                            "use a smaller k.")
    rng = random.Random(seed)
    if not balance_query_labels:
        chosen = ([pool[i] for i in rng.sample(range(len(pool)), k + 1)] for _ in range(n))
        return [builder.build(examples[:k], examples[k]) for examples in chosen]

    by_label = indices_by_label(builder.task, pool)
    n_labels = len(by_label)
    query_labels = [j % n_labels for j in range(n)]
    rng.shuffle(query_labels)
    prompts = []
    for label in query_labels:
        query = rng.choice(by_label[label])
        demos = [i for i in rng.sample(range(len(pool)), k + 1) if i != query][:k]  # uniform over the rest
        prompts.append(builder.build([pool[i] for i in demos], pool[query]))
    return prompts


# ------------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: every prompt's prediction position is the last column.

    ``label_positions`` are shifted by each row's padding, so they index ``tokens`` directly.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    label_positions: Int[Tensor, "batch k"]
    demo_labels: Int[Tensor, "batch k"]
    query_labels: Int[Tensor, " batch"]
    n_tokens: Int[Tensor, " batch"]

    @property
    def padding(self) -> Int[Tensor, " batch"]:
        return self.tokens.shape[1] - self.n_tokens

    @property
    def is_padded(self) -> Bool[Tensor, ""]:
        return bool((self.padding > 0).any())


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices ``0..len(lengths)-1`` sorted by length (ties in index order), cut into batches of at most
    ``batch_size``: each batch holds sequences of similar length, so left padding wastes little compute."""
    if batch_size <= 0:
        raise AbftLensError(f"batch_size={batch_size} must be positive.", "pass e.g. batch_size=8.", names=("batch_size",))
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # a stable sort: equal lengths keep their order
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(tokens, attention_mask)`` of token-id lists left-padded to the longest: int64 ``[batch, pos]``,
    mask 1 on real tokens and 0 on padding."""
    width = max(len(ids) for ids in sequences)
    tokens = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            tokens[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, width - len(ids):] = 1
    return tokens.to(device), mask.to(device)


def collate(prompts: Sequence[ICLPrompt], pad_token_id: int) -> PromptBatch:
    """Left-pad ``prompts`` (all with the same k) into one batch."""
    if len({p.k for p in prompts}) != 1:
        raise AbftLensError("a batch mixes prompts with different k.", "batch prompts of one k together.")
    tokens, mask = left_pad([p.token_ids for p in prompts], pad_token_id)
    width = tokens.shape[1]
    positions = torch.tensor([[pos + width - p.n_tokens for pos in p.label_positions] for p in prompts],
                             dtype=torch.long).reshape(len(prompts), prompts[0].k)
    return PromptBatch(
        tokens=tokens,
        attention_mask=mask,
        label_positions=positions,
        demo_labels=torch.tensor([p.demo_labels for p in prompts], dtype=torch.long),
        query_labels=torch.tensor([p.query_label for p in prompts], dtype=torch.long),
        n_tokens=torch.tensor([p.n_tokens for p in prompts], dtype=torch.long),
    )


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, falling back to EOS (padding is masked out, so its value is irrelevant)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def prompt_builder(model: LoadedModel, task: ICLTask) -> PromptBuilder:
    """The prompt builder for ``task`` with the model's tokenizer, BOS convention and context length."""
    return PromptBuilder(model.tokenizer, task, adds_bos=model_info(model).adds_bos, max_tokens=model.cfg.n_ctx)
