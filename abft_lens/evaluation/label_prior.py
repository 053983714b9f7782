"""The label-prior control: what knowing the training prompts' label frequencies alone buys, with no training.

Contextual calibration (:func:`abft_lens.evaluation.robustness.calibrated_evaluate`) divides each prompt's label
distribution by the model's answer to content-free queries, which removes the model's own label bias: its
output is a likelihood under a uniform prior. Multiplying it by the label shares of the training prompts'
queries, and renormalizing, puts that training prior back in (Bayes' rule):

    p_prior(y | x) ∝ p_cc(y | x) · share(y)

A fine-tuned run that only learned to answer the frequent training labels more often moves its predictions
the same way, so a gain that this control matches is not a gain of the method. Ours, not the paper's.
"""

from __future__ import annotations

from typing import Sequence

import torch

from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import EvalResult
from abft_lens.evaluation.metrics import classification_metrics

__all__ = ["prior_reweighted", "label_distribution", "total_variation", "prior_shift", "PRIOR_SHIFT"]

PRIOR_SHIFT = 0.10  # total-variation distance of predicted labels from vanilla's that counts as a shift


def prior_reweighted(calibrated: EvalResult, shares: Sequence[float]) -> EvalResult:
    """``calibrated`` (a contextually calibrated evaluation) re-weighted by the label ``shares`` (one per label,
    non-negative, summing to 1): new probabilities, predictions and metrics on the same prompts."""
    weights = torch.tensor([float(s) for s in shares], dtype=torch.float64)
    probs = torch.tensor(calibrated.probs, dtype=torch.float64)
    if weights.ndim != 1 or len(weights) != probs.shape[-1] or bool((weights < 0).any()) \
            or not torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
        raise AbftLensError(f"label shares {list(shares)} do not fit {calibrated.task}'s "
                            f"{probs.shape[-1]} labels (non-negative, one per label, summing to 1).",
                            "pass the shares of the training queries' labels, in label order.")
    weighted = probs * weights
    weighted = weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-300)
    gold = torch.tensor(calibrated.gold)
    info = {**calibrated.info, "method": "label_prior", "label_shares": [float(s) for s in shares]}
    return EvalResult(task=calibrated.task, k=calibrated.k, metrics=classification_metrics(gold, weighted),
                      gold=calibrated.gold, predictions=weighted.argmax(-1).tolist(),
                      probs=weighted.float().tolist(), label_words=list(calibrated.label_words), info=info)


def label_distribution(predictions: Sequence[int], n_labels: int) -> list[float]:
    """The share of prompts given each label (label order; sums to 1)."""
    counts = [0] * n_labels
    for label in predictions:
        counts[label] += 1
    return [count / max(1, len(predictions)) for count in counts]


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """Half the L1 distance between two label distributions: the share of answers that would have to change
    label to turn one into the other (0 = the same, 1 = disjoint)."""
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def prior_shift(run: Sequence[float], vanilla: Sequence[float], shares: Sequence[float] | None,
                threshold: float = PRIOR_SHIFT) -> bool:
    """Did a run's predicted-label distribution move away from vanilla's (total variation >= ``threshold``)
    toward the training queries' label ``shares`` (closer to them than vanilla's is)? With ``shares`` unknown,
    the move alone counts (the cautious reading)."""
    if total_variation(run, vanilla) < threshold:
        return False
    return shares is None or total_variation(run, shares) < total_variation(vanilla, shares)
