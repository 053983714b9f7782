"""Batched ICL evaluation: label-word probabilities at the prediction position, and metrics.

Prediction follows StaICC's "Normal" protocol: the next-token logits of the label words' first tokens at
the last prompt position, softmaxed over the label words only, argmax. Only the last position is sent
through the final norm and only the label columns of the unembedding are computed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.backends.tl import HookedTransformer
from abft_lens.backends.forward import compute_autocast, forward_residual
from abft_lens.evaluation.metrics import classification_metrics
from abft_lens.arguments import check_count
from abft_lens.backends.provenance import LoadedModel, check_model, model_info
from abft_lens.data.prompts import prompt_builder, ICLPrompt, PromptBatch, PromptBuilder, collate, length_sorted_batches, pad_token_id, test_prompts
from abft_lens.data.tasks import ICLTask, check_task


def last_position_residual(model: HookedTransformer, batch: PromptBatch) -> Float[Tensor, "batch d_model"]:
    """The final residual stream at the prediction position (the last column of a left-padded batch)."""
    mask = batch.attention_mask if batch.is_padded else None
    residual = forward_residual(model, batch.tokens, mask)
    return model.ln_final(residual[:, -1:, :])[:, 0]


def label_logits(
    model: HookedTransformer, batch: PromptBatch, label_token_ids: Int[Tensor, " label"]
) -> Float[Tensor, "batch label"]:
    """Next-token logits of the label tokens at the prediction position."""
    final = last_position_residual(model, batch)
    return final @ model.W_U[:, label_token_ids] + model.b_U[label_token_ids]


def label_probabilities(
    model: HookedTransformer,
    prompts: Sequence[ICLPrompt],
    label_token_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool | str = False,
    compute_dtype: str | None = None,
) -> Float[Tensor, "prompt label"]:
    """Softmax over the label words for every prompt, float32, in the order of ``prompts``.

    Prompts are batched by length (left padding, attention mask) to waste little compute on padding.
    ``compute_dtype="bfloat16"`` runs the forward under bfloat16 autocast
    (:func:`abft_lens.backends.forward.compute_autocast`; the trainer's validation passes do, with a run's
    ``compute_dtype``); None computes in the model's dtype.
    """
    ids = torch.tensor(list(label_token_ids), device=model.cfg.device)
    probs = torch.empty(len(prompts), len(ids))
    bar = tqdm(total=len(prompts), desc=progress if isinstance(progress, str) else "evaluating",
               disable=not progress, unit="prompt")
    with torch.inference_mode(), compute_autocast(model, compute_dtype):
        for chunk in length_sorted_batches([p.n_tokens for p in prompts], batch_size):
            batch = collate([prompts[i] for i in chunk], pad_id)
            batch = PromptBatch(**{name: value.to(model.cfg.device) for name, value in batch.__dict__.items()})
            logits = label_logits(model, batch, ids).float()
            probs[chunk] = logits.softmax(-1).cpu()
            bar.update(len(chunk))
    bar.close()
    return probs


@dataclass
class EvalResult:
    """Metrics and per-prompt results of one evaluation. ``probs[i][c]`` is P(label c | prompt i)."""

    task: str
    k: int
    metrics: dict[str, float]
    gold: list[int]
    predictions: list[int]
    probs: list[list[float]]
    label_words: list[str]
    info: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    def to_dict(self) -> dict:
        return {
            "task": self.task, "k": self.k, "n": len(self.gold), "label_words": self.label_words,
            "metrics": self.metrics, **self.info,
            "per_prompt": [
                {"gold": g, "prediction": p, "label_probs": [round(x, 6) for x in row]}
                for g, p, row in zip(self.gold, self.predictions, self.probs)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        rows = data["per_prompt"]
        info = {key: value for key, value in data.items()
                if key not in ("task", "k", "n", "label_words", "metrics", "per_prompt")}
        return cls(task=data["task"], k=data["k"], metrics=data["metrics"], gold=[r["gold"] for r in rows],
                   predictions=[r["prediction"] for r in rows], probs=[r["label_probs"] for r in rows],
                   label_words=data["label_words"], info=info)

    def summary_rows(self) -> list[tuple[str, str]]:
        return [(name, f"{value:.4f}") for name, value in self.metrics.items()]

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{v}</td></tr>" for n, v in self.summary_rows())
        return (f"<b>{html.escape(self.task)}</b>, k={self.k}, n={len(self.gold)}"
                f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>")


def evaluate_prompts(
    model: HookedTransformer,
    builder: PromptBuilder,
    prompts: Sequence[ICLPrompt],
    *,
    batch_size: int = 8,
    progress: bool | str = False,
    compute_dtype: str | None = None,
) -> EvalResult:
    """Evaluate ``prompts`` of ``builder.task``: per-prompt label probabilities and the four metrics
    (``compute_dtype``: see :func:`label_probabilities`)."""
    pad = pad_token_id(builder.tokenizer)
    probs = label_probabilities(model, prompts, builder.label_token_ids, pad_id=pad, batch_size=batch_size,
                                progress=progress, compute_dtype=compute_dtype)
    gold = torch.tensor([p.query_label for p in prompts])
    return EvalResult(
        task=builder.task.name,
        k=prompts[0].k if prompts else 0,
        metrics=classification_metrics(gold, probs),
        gold=gold.tolist(),
        predictions=probs.argmax(-1).tolist(),
        probs=probs.tolist(),
        label_words=list(builder.task.label_words),
    )


def evaluate(
    model: LoadedModel,
    task: ICLTask,
    *,
    k: int = 4,
    n_test: int | None = None,
    batch_size: int = 8,
    progress: bool | str = False,
) -> EvalResult:
    """StaICC "Normal" evaluation of ``model`` on the first ``n_test`` fixed test prompts of ``task``."""
    check_model(model)
    check_task(task)
    check_count("k", k)
    check_count("n_test", n_test, optional=True)
    check_count("batch_size", batch_size)
    builder = prompt_builder(model, task)
    prompts = test_prompts(builder, k, n_test)
    result = evaluate_prompts(model, builder, prompts, batch_size=batch_size, progress=progress)
    result.info.update(model=model_info(model).name, protocol="Normal")
    return result
