"""Training objectives: the ABFT attention loss with its induction filter, the self-adaptive penalty that
sets its weight A, and the end-to-end (E2E) cross-entropy baseline.

Units: attention weights α are probabilities in [0, 1]; the ABFT loss is in "attention mass × weight" (award
B and penalty A are dimensionless); head counts are absolute numbers of heads; the E2E loss is in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["ABFTLoss", "PenaltyController", "abft_loss", "e2e_loss"]


@dataclass(frozen=True)
class ABFTLoss:
    """The ABFT loss of one sample, split into its parts.

    ``loss = award_term + penalty_term`` (scalar, with graph); ``award_term`` = B · Σ_heads Σ_{I⁺}(1 − α),
    ``penalty_term`` = A · Σ_heads Σ_{I⁻} α, both summed over participating heads only.
    ``participating`` is the ``[layer, head]`` induction filter (computed without grad).
    """

    loss: Tensor
    award_term: Tensor
    penalty_term: Tensor
    participating: Bool[Tensor, "layer head"]
    n_participating: int


def _check_abft_inputs(
    last_row: Tensor, label_positions: Tensor, demo_labels: Tensor, award: float, penalty: float
) -> None:
    if last_row.ndim != 3:
        raise ValueError(
            f"last_row must be [layer, head, key_pos], got shape {tuple(last_row.shape)}; "
            "for a captured batch pass store.stacked()[i] for sample i"
        )
    for name, tensor in (("label_positions", label_positions), ("demo_labels", demo_labels)):
        if tensor.ndim != 1 or tensor.dtype.is_floating_point or tensor.is_complex():
            raise ValueError(
                f"{name} must be a 1-D integer tensor [k], got dtype {tensor.dtype} "
                f"and shape {tuple(tensor.shape)}"
            )
    if label_positions.shape != demo_labels.shape:
        raise ValueError(
            f"label_positions has {label_positions.numel()} entries but demo_labels has {demo_labels.numel()}: "
            "pass one label index per demonstration label position"
        )
    if label_positions.numel() == 0:
        raise ValueError("label_positions is empty: ABFT needs at least one demonstration label position")
    n_keys = last_row.shape[-1]
    if bool(((label_positions < 0) | (label_positions >= n_keys)).any()):
        raise ValueError(
            f"label_positions {label_positions.tolist()} out of range for a row of {n_keys} key positions: "
            f"use non-negative positions < {n_keys}"
        )
    if torch.unique(label_positions).numel() != label_positions.numel():
        raise ValueError(f"label_positions {label_positions.tolist()} repeats a position: list each label once")
    if not (math.isfinite(award) and award >= 0 and math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"award={award} and penalty={penalty} must be finite and >= 0")


def abft_loss(
    last_row: Float[Tensor, "layer head key"],
    label_positions: Int[Tensor, "k"],
    demo_labels: Int[Tensor, "k"],
    query_label: int,
    *,
    award: float,
    penalty: float,
    threshold: float,
) -> ABFTLoss:
    """The ABFT loss of one prompt from the last attention row α of every captured head.

    Args:
        last_row: ``[layer, head, key_pos]`` attention probabilities of the last prompt token (with graph).
        label_positions: ``[k]`` token positions of the k demonstration label tokens.
        demo_labels: ``[k]`` label index of each demonstration (same order as ``label_positions``).
        query_label: the gold label index of the query. I⁺ = positions whose label equals it (may be
            empty: then only the penalty term acts), I⁻ = the rest.
        award: B, weight of Σ_{I⁺}(1 − α).
        penalty: A, weight of Σ_{I⁻} α.
        threshold: T; a head takes part iff S = Σ_{j∈I} α_j > T (see :func:`induction_threshold`).

    Per head: L = A · Σ_{I⁻} α + B · Σ_{I⁺}(1 − α). The sample loss is the SUM over participating heads
    (**open** choice, sum vs mean: the sum keeps a head's gradient independent of how many other heads pass;
    with Adam a constant scale hardly matters). With no participating head the loss is a zero that is still
    attached to the graph (requires grad whenever ``last_row`` does), so callers can call ``backward()``
    uniformly; its gradient is exactly zero.
    """
    _check_abft_inputs(last_row, label_positions, demo_labels, award, penalty)
    positions = label_positions.to(last_row.device)
    alpha = last_row[:, :, positions]  # [layer, head, k]
    correct = (demo_labels.to(last_row.device) == query_label).to(alpha.dtype)  # [k], 1 on I⁺
    with torch.no_grad():
        participating = alpha.sum(dim=-1) > threshold  # [layer, head]
    weight = participating.to(alpha.dtype)
    award_per_head = ((1 - alpha) * correct).sum(dim=-1)  # [layer, head]
    penalty_per_head = (alpha * (1 - correct)).sum(dim=-1)
    award_term = award * (award_per_head * weight).sum()
    penalty_term = penalty * (penalty_per_head * weight).sum()
    return ABFTLoss(
        loss=award_term + penalty_term,
        award_term=award_term,
        penalty_term=penalty_term,
        participating=participating,
        n_participating=int(participating.sum().item()),
    )


def e2e_loss(last_logits: Float[Tensor, "vocab"], gold_token: int) -> Tensor:
    """Cross-entropy (nats) of ``gold_token`` under the last position's logits over the full vocabulary.

    Half-precision logits are upcast to float32 first; float32/float64 are used as they are.
    """
    if last_logits.ndim != 1:
        raise ValueError(
            f"last_logits must be [vocab] (one position of one prompt), got shape {tuple(last_logits.shape)}; "
            "pass logits[i, -1] for prompt i"
        )
    vocab = last_logits.shape[0]
    if not 0 <= gold_token < vocab:
        raise ValueError(f"gold_token={gold_token} out of range: the vocabulary has {vocab} tokens")
    logits = last_logits if last_logits.dtype in (torch.float32, torch.float64) else last_logits.float()
    return F.cross_entropy(logits, torch.tensor(gold_token, device=logits.device))


PenaltyMode = Literal["None", "P", "PID"]
_MODES = ("None", "P", "PID")
_CONFIG_FIELDS = ("mode", "initial_penalty", "kp", "ki", "kd", "p_gain")


@dataclass
class PenaltyController:
    """The self-adaptive wrong-label penalty A (the award B stays fixed).

    Call :meth:`update` after optimizer step t = 1, 2, … with n̄_t, the number of participating heads
    averaged over that step's pseudo-batch; it returns A_t, the penalty for the next step.

    - ``"PID"``: for t > 2,
      A_t = A_{t−1} + kp(n̄_t − n̄_{t−1}) + ki(n̄_t − n̄_1) + kd(n̄_t − 2n̄_{t−1} + n̄_{t−2});
      A stays at ``initial_penalty`` for t ≤ 2.
    - ``"P"``: for t ≥ 2, A_t = A_{t−1} + p_gain(n̄_t − n̄_{t−1}) (original flag
      ``--loss_adaption_factor_for_P``).
    - ``"None"``: A fixed at ``initial_penalty``.

    A is clamped at 0 after every update (the paper requires A ≥ 0 without clamping); the recursion continues
    from the clamped value. Gains are per head (absolute head counts). ``history`` holds (A_t, n̄_t) per step.
    """

    mode: PenaltyMode = "PID"
    initial_penalty: float = 0.5
    kp: float = 0.03
    ki: float = 0.005
    kd: float = 0.005
    p_gain: float = 0.03
    penalty: float = field(init=False)
    history: list[tuple[float, float]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r} unknown: use one of {list(_MODES)}")
        gains = {name: getattr(self, name) for name in ("kp", "ki", "kd", "p_gain")}
        if not all(math.isfinite(value) for value in gains.values()):
            raise ValueError(f"gains {gains} must be finite numbers")
        if not (math.isfinite(self.initial_penalty) and self.initial_penalty >= 0):
            raise ValueError(f"initial_penalty={self.initial_penalty} must be a finite number >= 0")
        self.penalty = float(self.initial_penalty)

    @property
    def step(self) -> int:
        """How many updates (optimizer steps) have been recorded."""
        return len(self.history)

    @property
    def mean_heads(self) -> list[float]:
        """n̄_1, n̄_2, … recorded so far."""
        return [heads for _, heads in self.history]

    def update(self, mean_heads: float) -> float:
        """Record n̄_t of the step just taken and return the new penalty A_t."""
        if not (math.isfinite(mean_heads) and mean_heads >= 0):
            raise ValueError(f"mean_heads={mean_heads} must be a finite head count >= 0")
        heads = [*self.mean_heads, float(mean_heads)]
        t = len(heads)
        change = 0.0
        if self.mode == "PID" and t > 2:
            n_t, n_prev, n_prev2, n_first = heads[-1], heads[-2], heads[-3], heads[0]
            change = (
                self.kp * (n_t - n_prev)
                + self.ki * (n_t - n_first)
                + self.kd * (n_t - 2 * n_prev + n_prev2)
            )
        elif self.mode == "P" and t >= 2:
            change = self.p_gain * (heads[-1] - heads[-2])
        self.penalty = max(0.0, self.penalty + change)
        self.history.append((self.penalty, float(mean_heads)))
        return self.penalty

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot: configuration, current penalty and history."""
        state: dict[str, Any] = {name: getattr(self, name) for name in _CONFIG_FIELDS}
        state["penalty"] = self.penalty
        state["history"] = [[penalty, heads] for penalty, heads in self.history]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. The configuration must match this controller's."""
        missing = [key for key in (*_CONFIG_FIELDS, "penalty", "history") if key not in state]
        if missing:
            raise ValueError(
                f"penalty state is missing {missing}: pass a dict made by PenaltyController.state_dict()"
            )
        differing = [name for name in _CONFIG_FIELDS if state[name] != getattr(self, name)]
        if differing:
            raise ValueError(
                f"penalty state was saved with different {differing}: build the controller with the saved "
                "configuration, e.g. PenaltyController.from_state_dict(state)"
            )
        self.penalty = float(state["penalty"])
        self.history = [(float(penalty), float(heads)) for penalty, heads in state["history"]]

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PenaltyController:
        """A controller with the saved configuration and state."""
        missing = [key for key in _CONFIG_FIELDS if key not in state]
        if missing:
            raise ValueError(
                f"penalty state is missing {missing}: pass a dict made by PenaltyController.state_dict()"
            )
        controller = cls(**{name: state[name] for name in _CONFIG_FIELDS})
        controller.load_state_dict(state)
        return controller
