"""Before/after comparison of a training run's heads on the same prompts.

A :class:`Comparison` is plain data (tensors ``[layer, head]`` or ``[layer]`` and lists), saved as JSON so a
report can be rebuilt without a model. ``compare_run`` (below) computes it from a run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor


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
