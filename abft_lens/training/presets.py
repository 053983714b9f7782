"""Named training regimes: the paper's, and this project's demo. The one home of both (config layer).

A preset fixes the values that define a regime: a subset of :class:`~abft_lens.training.train.TrainConfig`'s
fields and the number of test prompts. Everything it does not name stays free (seed, micro-batch size, dtype,
run folder, extra evaluations). Asking for a preset and a different value of a field it fixes is a
contradiction, refused with both named (:func:`contradictions`), so a run that says "paper" is the paper's.

- ``paper``: Cho et al. 2025 as published and as its example command runs it: k = 4, 512 training prompts,
  pseudo-batch 32, 2 epochs (32 Adam steps), lr 2e-5, B = 1, A0 = 0.5, PID (0.03 / 0.005 / 0.005), full W_Q/W_K,
  no restricted gradient (the paper's command leaves ``--restricted_gradient`` off), no validation guard, the
  last step reported, and the full StaICC test set (512 queries x 2 demonstration samplings = 1024 prompts).
- ``demo``: this project's demo regime (``abft-lens demo``), chosen on validation prompts
  (``bench/demo_selection.py``): 128 prompts, 8 steps of 16, lr 5e-4, restricted gradient, a validation guard
  on 64 prompts built from 256 held-out calibration examples every 2 steps that keeps the best step by
  macro-F1; 256 test prompts.

    from abft_lens.training.presets import preset

    paper = preset("paper")
    paper.train["lr"], paper.n_test    # (2e-05, 1024)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from abft_lens.errors import AbftLensError

__all__ = ["Preset", "PRESETS", "preset", "contradictions", "LORA_LR", "FULL_LR", "DEFAULT_N_TEST"]

FULL_LR = 2e-5  # the paper's Adam lr on full W_Q/W_K
LORA_LR = 1e-4  # the paper's lr for LoRA adapters (4-bit bases)
DEFAULT_N_TEST = 256  # test prompts of a run that names no preset


@dataclass(frozen=True)
class Preset:
    """``train``: the TrainConfig fields the regime fixes; ``n_test``: its test prompts (None: all of them)."""

    name: str
    train: dict = field(default_factory=dict)
    n_test: int | None = DEFAULT_N_TEST
    about: str = ""

    def fixed(self) -> dict:
        """Every value the preset fixes, the test size included (``n_test``)."""
        return {**self.train, "n_test": self.n_test}


PAPER = Preset(
    "paper",
    train=dict(k=4, train_samples=512, pseudo_batch_size=32, epochs=2, lr=FULL_LR, award=1.0, penalty=0.5,
               penalty_mode="PID", pid_kp=0.03, pid_ki=0.005, pid_kd=0.005, threshold=None,
               restricted_gradient=False, validation_examples=0, validate_every=0, keep_best=False,
               select_max_p=None, balance_query_labels=False),
    n_test=1024,
    about="Cho et al. 2025: 512 prompts x 2 epochs, pseudo-batch 32, Adam lr 2e-5, PID, last step, 1024 test prompts")

DEMO = Preset(
    "demo",
    train=dict(k=4, train_samples=128, pseudo_batch_size=16, epochs=1, lr=5e-4, restricted_gradient=True,
               validation_examples=256, validation_prompts=64, validate_every=2, keep_best=True,
               select_metric="macro_f1"),
    n_test=256,
    about="abft-lens demo: 128 prompts, 8 steps of 16, lr 5e-4, restricted gradient, validation guard, 256 test prompts")

PRESETS = {p.name: p for p in (PAPER, DEMO)}


def preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is refused with the known ones."""
    if not isinstance(name, str) or name not in PRESETS:
        raise AbftLensError(f"unknown preset {name!r}.", f"use one of {', '.join(PRESETS)} (or no preset).")
    return PRESETS[name]


def contradictions(chosen: Preset, given: dict) -> list[tuple[str, object, object]]:
    """``(field, given value, preset value)`` for every value of ``given`` that the preset fixes otherwise.

    Values compare as numbers where both are numbers (``2e-5 == 0.00002``); None in ``given`` means "not given"
    except for fields whose preset value is not None.
    """
    fixed = chosen.fixed()
    found = []
    for name, value in given.items():
        if name not in fixed or value is None:
            continue
        want = fixed[name]
        if _numbers(value, want) and float(value) == float(want):
            continue
        if value != want:
            found.append((name, value, want))
    return found


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
