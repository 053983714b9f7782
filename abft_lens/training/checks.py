"""What a run's options must satisfy, checked when they are made, before any model loads or file is written.

:func:`check_train_config` is :class:`~abft_lens.training.train.TrainConfig`'s own check (so the Python API and
the CLI refuse the same values); :func:`check_run_fits_task` checks that a task's splits can hold the prompts
a run asks for. Both raise :class:`~abft_lens.errors.AbftLensError` naming the option and the fix.

Bounds that are not the paper's own:

- ``train_samples`` and ``validation_prompts`` are at most :data:`MAX_PROMPTS` (100,000): every prompt is
  built (tokenized) before the first step, and 100,000 prompts already take days of training on a CPU (the
  paper uses 512). A larger value would fill memory before any step runs.
- ``threshold`` (the induction filter T) lies in [0, 1): a head passes when its attention mass on the k
  label positions, a number in [0, 1], exceeds T, so with T >= 1 no head can ever pass and ABFT's loss is 0.
- ``seed`` lies in [0, 2**32).
- ``epochs`` is at most :data:`MAX_EPOCHS` (1,000) and ``lr`` at most :data:`MAX_LR` (1.0): values beyond them
  run for months or only diverge.
"""

from __future__ import annotations

import math

from abft_lens.data.prompts import indices_by_label
from abft_lens.errors import AbftLensError
from abft_lens.training.presets import contradictions, preset
from abft_lens.training.trainable import TrainableConfig

MAX_PROMPTS = 100_000
MAX_SEED = 2**32
MAX_EPOCHS = 1_000  # 1,000 passes over the paper's 512 prompts are months of CPU; the paper uses 2
MAX_LR = 1.0  # Adam moves every weight by about lr per step: above 1 nothing trains, it only diverges

_INTS = {  # name -> (smallest, largest or None)
    "k": (1, None),
    "train_samples": (1, MAX_PROMPTS),
    "epochs": (1, MAX_EPOCHS),
    "pseudo_batch_size": (1, None),
    "seed": (0, MAX_SEED - 1),
    "validation_examples": (0, None),
    "validation_prompts": (1, MAX_PROMPTS),
    "validate_every": (0, None),
}
_NON_NEGATIVE = ("award", "penalty", "p_gain", "pid_kp", "pid_ki", "pid_kd")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_train_config(config) -> None:
    """Every value of a ``TrainConfig`` in range and finite, and no option that the others make meaningless."""
    if config.method not in ("ABFT", "E2E"):
        raise AbftLensError(f"method={config.method!r} is unknown.", "use method ABFT or E2E.", names=("method",))
    if config.penalty_mode not in ("None", "P", "PID"):
        raise AbftLensError(f"penalty_mode={config.penalty_mode!r} is unknown.", "use penalty_mode None, P or PID.",
                            names=("penalty_mode",))
    if config.select_metric not in ("accuracy", "macro_f1"):
        raise AbftLensError(f"select_metric={config.select_metric!r} is unknown.",
                            "use select_metric accuracy or macro_f1.", names=("select_metric",))
    if config.micro_batch_size is not None and (not _is_int(config.micro_batch_size) or config.micro_batch_size <= 0):
        raise AbftLensError(f"micro_batch_size={config.micro_batch_size!r} must be a positive integer.",
                            "pass e.g. micro_batch_size=8 (1: one prompt per forward).", names=("micro_batch_size",))
    if config.compute_dtype not in (None, "bfloat16"):
        raise AbftLensError(f"compute_dtype={config.compute_dtype!r} is unknown.",
                            "use bfloat16, or leave it unset for the model's own dtype.", names=("compute_dtype",))
    for name, (low, high) in _INTS.items():
        value = getattr(config, name)
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise AbftLensError(f"{name}={value!r} must be an integer {bound}.", f"pass {name} {bound}.",
                                names=(name,))
    if not _is_number(config.lr) or not math.isfinite(config.lr) or config.lr <= 0:
        raise AbftLensError(f"lr={config.lr!r} must be a finite number > 0.", "pass e.g. lr=2e-5.", names=("lr",))
    if config.lr > MAX_LR:
        raise AbftLensError(f"lr={config.lr!r} is above {MAX_LR}: Adam would move every weight by about that "
                            "much per step.", "pass a learning rate such as lr=2e-5 (the paper's) or 5e-4.",
                            names=("lr",))
    for name in _NON_NEGATIVE:
        value = getattr(config, name)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise AbftLensError(f"{name}={value!r} must be a finite number >= 0.", f"pass {name} >= 0.",
                                names=(name,))
    threshold = config.threshold
    if threshold is not None and not (_is_number(threshold) and 0 <= threshold < 1):
        raise AbftLensError(f"threshold={threshold!r} is outside [0, 1): a head passes the induction filter when "
                            "its attention mass on the labels (at most 1) exceeds it.",
                            "pass threshold in [0, 1), or leave it out for T = k / (k + ln n_tokens).",
                            names=("threshold",))
    for name in ("restricted_gradient", "keep_best"):
        if not isinstance(getattr(config, name), bool):
            raise AbftLensError(f"{name}={getattr(config, name)!r} must be True or False.", f"pass a bool {name}.",
                                names=(name,))
    if not isinstance(config.trainable, TrainableConfig):
        raise AbftLensError(f"trainable={config.trainable!r} is not a TrainableConfig.",
                            "pass abft_lens.TrainableConfig(...).")
    _check_combinations(config)
    _check_preset(config)


def _check_preset(config) -> None:
    """A config that names a preset holds the preset's values (a field changed afterwards is caught here)."""
    if config.preset is None:
        return
    chosen = preset(config.preset)
    clash = contradictions(chosen, {name: getattr(config, name) for name in chosen.train})
    if clash:
        raise AbftLensError(f"the config names preset {config.preset!r} but has "
                            + ", ".join(f"{f}={got!r} (the preset's {want!r})" for f, got, want in clash) + ".",
                            "make it with TrainConfig.from_preset(...), or set preset=None for a config of your own.",
                            names=tuple(f for f, _, _ in clash))


def _check_combinations(config) -> None:
    if config.pseudo_batch_size > config.train_samples:
        raise AbftLensError(f"pseudo_batch_size={config.pseudo_batch_size} is larger than train_samples="
                            f"{config.train_samples}: every step would see all samples.",
                            f"pass pseudo_batch_size <= {config.train_samples}, or more train_samples.",
                            names=("pseudo_batch_size", "train_samples"))
    if config.method == "ABFT" and config.penalty_mode == "None" and config.award == 0 and config.penalty == 0:
        raise AbftLensError("award and penalty are both 0 with a fixed penalty: the ABFT loss is 0 at every step "
                            "and nothing trains.", "pass award > 0 or penalty > 0.", names=("award", "penalty"))
    if config.validate_every and not config.validation_examples:
        raise AbftLensError(f"validate_every={config.validate_every} needs held-out validation examples.",
                            "add validation_examples (e.g. 256), or drop validate_every.",
                            names=("validation_examples", "validate_every"))
    if config.validation_examples and not config.validate_every:
        raise AbftLensError(f"validation_examples={config.validation_examples} would be held out of training "
                            "but never used (validate_every=0).",
                            "add validate_every (e.g. 2), or drop validation_examples.",
                            names=("validation_examples", "validate_every"))
    if config.keep_best and not (config.validate_every and config.validation_examples):
        raise AbftLensError("keep_best needs a validation set.",
                            "set validation_examples > k and validate_every >= 1.",
                            names=("keep_best", "validation_examples", "validate_every"))
    max_p = config.select_max_p
    if max_p is not None and not (_is_number(max_p) and 0 < max_p <= 1):
        raise AbftLensError(f"select_max_p={max_p!r} must be a number in (0, 1].",
                            "pass e.g. select_max_p=0.05, or leave it out to keep the plain best step.",
                            names=("select_max_p",))
    if max_p is not None and not config.keep_best:
        raise AbftLensError("select_max_p decides which validation step is kept, but keep_best is off.",
                            "add keep_best, or drop select_max_p.", names=("select_max_p", "keep_best"))
    if config.validation_examples and config.validation_examples <= config.k:
        raise AbftLensError(f"validation_examples={config.validation_examples} cannot fill a k={config.k} prompt.",
                            "hold out more than k+1 examples (e.g. 128) or 0 for no validation.",
                            names=("validation_examples",))


def check_run_fits_task(config, task, n_test: int | None, *, tests: bool = True) -> None:
    """The task's splits hold what the run needs: ``n_test`` test prompts with k demonstrations (when a fore or
    post test runs, ``tests``), k+1 training examples left after the validation hold-out, and the hold-out."""
    if tests:
        task.check_test_prompts(config.k, n_test)
    calibration = len(task.calibration)
    if calibration < config.k + 1:
        raise AbftLensError(f"{task.name}'s calibration split holds {calibration} examples, fewer than k+1="
                            f"{config.k + 1} for one training prompt.", "use a smaller k or a larger dataset.")
    if config.validation_examples > calibration - (config.k + 1):
        raise AbftLensError(f"validation_examples={config.validation_examples} leaves fewer than k+1="
                            f"{config.k + 1} of {task.name}'s {calibration} calibration examples for training.",
                            f"hold out at most {calibration - config.k - 1} examples.", names=("validation_examples",))
    if config.balance_query_labels:
        indices_by_label(task, task.calibration[: calibration - config.validation_examples])
