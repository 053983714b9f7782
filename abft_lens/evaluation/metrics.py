"""Classification metrics over label-word probabilities, computed as their textbook definitions.

Where StaICC's implementations differ (abft-method.md §4) these do not copy the difference:
- StaICC re-softmaxes every row when any row does not sum to exactly 1 in floating point, which turns
  probabilities into softmax(probabilities); here probabilities are used as given.
- StaICC's ECE drops predictions with confidence exactly 1.0 (its last bin is half-open); here the last bin
  is closed.
- StaICC's macro-F1 averages over every label of the label space, counting a label that is neither true nor
  predicted in any prompt as F1 = 0; here the average runs over labels that occur (as gold or prediction),
  as scikit-learn does. On full test sets every label occurs and the two agree.
Ties in argmax go to the lower label index in both.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor


def accuracy(gold: Int[Tensor, " n"], probs: Float[Tensor, "n label"]) -> float:
    return float((probs.argmax(-1) == gold).double().mean())


def mean_true_label_probability(gold: Int[Tensor, " n"], probs: Float[Tensor, "n label"]) -> float:
    return float(probs.gather(1, gold[:, None]).mean())


def macro_f1(gold: Int[Tensor, " n"], probs: Float[Tensor, "n label"]) -> float:
    predicted = probs.argmax(-1)
    scores = []
    for label in torch.unique(torch.cat([gold, predicted])).tolist():
        tp = int(((predicted == label) & (gold == label)).sum())
        fp = int(((predicted == label) & (gold != label)).sum())
        fn = int(((predicted != label) & (gold == label)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def expected_calibration_error(gold: Int[Tensor, " n"], probs: Float[Tensor, "n label"], bins: int = 10) -> float:
    """Σ_b |B_b|/n · |acc(B_b) − conf(B_b)| over ``bins`` equal-width confidence bins, the last one closed."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == gold).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += float(members.double().mean()) * abs(float(correct[members].mean() - confidence[members].mean()))
    return ece


def classification_metrics(gold: Int[Tensor, " n"], probs: Float[Tensor, "n label"]) -> dict[str, float]:
    """All four metrics of StaICC's "Normal" protocol, as a dict of floats in [0, 1]."""
    probs = probs.double()
    return {
        "accuracy": accuracy(gold, probs),
        "mean_true_label_probability": mean_true_label_probability(gold, probs),
        "macro_f1": macro_f1(gold, probs),
        "ece": expected_calibration_error(gold, probs),
    }


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar test: the discordant pairs ~ Binomial(gained + lost, 1/2); 1.0 with none."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
