"""Before/after comparison of a training run's heads on the same prompts: the computation behind a report.

A :class:`Comparison` is plain data (tensors ``[layer, head]`` or ``[layer]`` and lists), saved as JSON so a
report (:mod:`abft_lens.reporting.report`, which only renders) can be rebuilt without a model. ``compare_run``
(below) computes it from a run folder: it loads the base model, scores its heads, applies the run's trained
tensors and scores them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from abft_lens.backends.forward import forward_residual
from abft_lens.backends.loading import load_model_like
from abft_lens.interp.capture import pattern_hook_name
from abft_lens.data.prompts import prompt_builder, test_prompts
from abft_lens.data.tasks import task_from_description
from abft_lens.interp.heads import head_scores
from abft_lens.training.run_folder import read_run_config, read_trained
from abft_lens.training.runs import load_run
from abft_lens.backends import qk
from abft_lens.run_files import FORE_TEST_FILE, POST_TEST_FILE, read_log, read_run_json


@dataclass
class Comparison:
    """Head behaviour of the base model (``before``) and the trained model (``after``) on the same prompts.

    - ``before`` / ``after``: score name -> ``[n_layers, n_heads]`` float tensor. Names used:
      ``induction``, ``previous_token``, ``duplicate_token``, ``copying``, ``label_attention`` (mass on all
      demonstration labels from the prediction position), ``label_correctness`` (mass on correct minus wrong
      labels), ``correct_label_attention`` (mass on correct labels), ``filter_pass_rate`` (fraction of prompts
      where the head passes the ABFT filter), ``sink_attention`` (mass on the first token).
    - ``weight_change``: ``[n_layers, 2]``, Frobenius norm of ΔW_Q (column 0) and ΔW_K (column 1) per layer.
    - ``accuracy``: {"fore": metrics dict or None, "post": metrics dict or None}.
    - ``trace``: the run's log lines (step and validation events) as dicts.
    - ``run``: the run's config.json contents; ``prompt_example``: token strings of one prompt and the
      attention patterns (``[n_heads_shown, pos, pos]`` lists) of chosen heads before/after for circuitsvis.
    """

    before: dict[str, Float[Tensor, "layer head"]]
    after: dict[str, Float[Tensor, "layer head"]]
    weight_change: Float[Tensor, "layer 2"]
    accuracy: dict
    trace: list[dict] = field(default_factory=list)
    run: dict = field(default_factory=dict)
    prompt_example: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.weight_change.shape[0])

    def difference(self, name: str) -> Float[Tensor, "layer head"]:
        return self.after[name] - self.before[name]

    def to_dict(self) -> dict:
        return {
            "before": {k: v.tolist() for k, v in self.before.items()},
            "after": {k: v.tolist() for k, v in self.after.items()},
            "weight_change": self.weight_change.tolist(),
            "accuracy": self.accuracy, "trace": self.trace, "run": self.run, "prompt_example": self.prompt_example,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Comparison":
        return cls(
            before={k: torch.tensor(v) for k, v in data["before"].items()},
            after={k: torch.tensor(v) for k, v in data["after"].items()},
            weight_change=torch.tensor(data["weight_change"]),
            accuracy=data["accuracy"], trace=data.get("trace", []), run=data.get("run", {}),
            prompt_example=data.get("prompt_example", {}),
        )


# ------------------------------------------------------------------------------------------- compare_run


def _weight_change(before: list[tuple[Tensor, Tensor]], after: list[tuple[Tensor, Tensor]]) -> Float[Tensor, "layer 2"]:
    """Frobenius norms ``||ΔW_Q||`` (column 0) and ``||ΔW_K||`` (column 1) per layer."""
    return torch.tensor([[float(torch.linalg.vector_norm(qa - qb)), float(torch.linalg.vector_norm(ka - kb))]
                         for (qb, kb), (qa, ka) in zip(before, after)])


def example_patterns(model, prompt, heads: Sequence[tuple[int, int]]) -> list:
    """Full attention patterns of ``heads`` on one unpadded prompt: ``[n_heads_shown, pos, pos]`` nested lists.

    One forward pass; the hook of each needed layer keeps only the chosen heads' patterns (rounded to 5
    decimals, probabilities).
    """
    heads = [(int(layer), int(head)) for layer, head in heads]
    kept: dict[tuple[int, int], Tensor] = {}

    def make_hook(layer: int):
        wanted = [head for l, head in heads if l == layer]

        def hook_fn(pattern, *, hook) -> None:
            for head in wanted:
                kept[(layer, head)] = pattern[0, head].detach().float().cpu().clone()

        return hook_fn

    layers = sorted({layer for layer, _ in heads})
    if not layers:
        return []
    tokens = torch.tensor([prompt.token_ids], device=model.cfg.device)
    with torch.inference_mode(), model.hooks(fwd_hooks=[(pattern_hook_name(l), make_hook(l)) for l in layers]):
        forward_residual(model, tokens, stop_at_layer=max(layers) + 1)
    return [torch.round(kept[pair], decimals=5).tolist() for pair in heads]


def compare_run(run_dir: str | Path, *, model=None, task=None, n_prompts: int = 64, k: int | None = None,
                batch_size: int = 8, n_seqs: int = 32, seq_len: int = 40, progress: bool = False,
                example_heads: Sequence[tuple[int, int]] | None = None) -> Comparison:
    """Head scores of a run's base model and of its trained model on the same prompts.

    Args:
        run_dir: a run folder written by :func:`~abft_lens.training.runs.run_training`, with its trained tensors.
        model: the run's base model (a ``HookedTransformer`` or a bridge, e.g. one built by hand); default
            ``load_model_like(config["model"])`` (4-bit when the run was). **It is trained in place**
            (``load_run`` merges the run's tensors into it, or leaves a 4-bit base's adapters attached): a
            caller passing ``model`` gets it back trained.
        task: the run's task; default the one its config.json names (a custom file is found by its recorded
            path and checked against its sha256: pass the task when the file moved).
        n_prompts, k: the first ``n_prompts`` fixed test prompts, ``k`` demonstrations (default: the run's).
        batch_size, n_seqs, seq_len, progress: for :func:`~abft_lens.interp.heads.head_scores`.
        example_heads: heads whose full patterns on the first prompt go to ``prompt_example``; default the
            top 3 heads by ``label_attention`` before training.

    Returns:
        A :class:`Comparison`; ``weight_change`` ``[n_layers, 2]``: Frobenius norms of ΔW_Q, ΔW_K (ΔW_K over
        the stored kv heads); ``accuracy``: fore/post metrics (None: skipped); ``trace``: log.jsonl's lines.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir, trained=True)
    read_trained(run_dir)  # readable and finite, before a model loads
    model = model if model is not None else load_model_like(config["model"])
    task = task if task is not None else task_from_description(config["task"])
    k = int(config["train"].get("k", 4)) if k is None else k
    builder = prompt_builder(model, task)
    prompts = test_prompts(builder, k, n_prompts)
    options = dict(prompts=prompts, batch_size=batch_size, n_seqs=n_seqs, seq_len=seq_len, progress=progress)

    before = head_scores(model, task, **options)
    if example_heads is None:
        example_heads = [(layer, head) for layer, head, _ in before["label_attention"].top(3)]
    example_heads = [(int(layer), int(head)) for layer, head in example_heads]
    pattern_before = example_patterns(model, prompts[0], example_heads)
    weights_before = qk.layer_qk(model)

    load_run(run_dir, model)
    after = head_scores(model, task, **options)
    pattern_after = example_patterns(model, prompts[0], example_heads)
    weight_change = _weight_change(weights_before, qk.layer_qk(model))

    example = {"tokens": [model.tokenizer.decode([token]) for token in prompts[0].token_ids],
               "heads": [list(pair) for pair in example_heads], "before": pattern_before, "after": pattern_after,
               "label_positions": list(prompts[0].label_positions)}
    return Comparison(before={name: scores.scores for name, scores in before.items()},
                      after={name: scores.scores for name, scores in after.items()}, weight_change=weight_change,
                      accuracy=saved_accuracy(run_dir), trace=read_log(run_dir), run=config, prompt_example=example)


def saved_accuracy(run_dir: Path) -> dict:
    """The run's fore/post test metrics, ``{"fore": ..., "post": ...}`` (None for a test it skipped)."""
    accuracy = {}
    for key, name in (("fore", FORE_TEST_FILE), ("post", POST_TEST_FILE)):
        saved = read_run_json(run_dir, name, keys=("metrics",))
        accuracy[key] = saved["metrics"] if saved is not None else None
    return accuracy
