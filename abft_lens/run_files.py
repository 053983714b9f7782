"""The files of a run folder: every file name, the small readers, and whether a run is finished.

This module is the one place that spells a run folder's file names; everything else imports them. A run folder
(:func:`abft_lens.training.runs.run_training` writes it, the extras and reports add to it):

- ``config.json``         the resolved training options, model and task descriptions (written first)
- ``log.jsonl``           one line per optimizer step (``event: step``) and per validation (``event: validation``)
- ``fore_test.json``, ``post_test.json``  full evaluation results (per-prompt probabilities)
- ``metrics.json``        before/after metrics, best validation step, timings (written last: the run is complete)
- ``trained.safetensors`` the trained tensors only (W_Q/W_K or LoRA adapters), unless the model is not saved
- ``checkpoint.pt``       trainer, optimizer, controller and guard state while the run is in progress
- ``run.lock``            the pid of the process training there, while it trains (one process per folder)
- ``robustness.json``, ``generalization.json``, ``calibration.json``  the extra evaluations (``fore``/``post``)
- ``generation.json``     the MAUVE test; ``comparison.json`` and ``report.html``: ``abft-lens report``

Every JSON file is read through :func:`read_run_json`, which checks its shape (:data:`SHAPES`): a damaged file
(truncated, empty, binary, wrongly shaped) is one :class:`AbftLensError` naming it. :func:`check_not_run_file`
refuses an output path that is one of a run folder's own files (:data:`OWN_FILES`).

Checked readers of the richer files (config.json, the trained tensors) need the training layer and live in
:mod:`abft_lens.training.run_folder`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from abft_lens.errors import AbftLensError
from abft_lens.io import NUMBER, Maybe, Values, read_checked_json

__all__ = ["CONFIG_FILE", "LOG_FILE", "FORE_TEST_FILE", "POST_TEST_FILE", "METRICS_FILE", "TRAINED_FILE",
           "CHECKPOINT_FILE", "LOCK_FILE", "ROBUSTNESS_FILE", "GENERALIZATION_FILE", "CALIBRATION_FILE",
           "GENERATION_FILE", "COMPARISON_FILE", "REPORT_FILE", "DAMAGED_FIX", "OWN_FILES", "SHAPES", "EVALUATION",
           "is_run_folder", "is_finished", "has_trained", "has_after", "read_run_json", "read_log", "check_run_files",
           "check_not_run_file", "trained_parameters", "step_seconds"]

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
FORE_TEST_FILE = "fore_test.json"
POST_TEST_FILE = "post_test.json"
METRICS_FILE = "metrics.json"
TRAINED_FILE = "trained.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "run.lock"
ROBUSTNESS_FILE = "robustness.json"
GENERALIZATION_FILE = "generalization.json"
CALIBRATION_FILE = "calibration.json"
GENERATION_FILE = "generation.json"
COMPARISON_FILE = "comparison.json"
REPORT_FILE = "report.html"
DAMAGED_FIX = "restore the file from a copy, or train the run again."
FIXES = {COMPARISON_FILE: "delete it: abft-lens report computes it again from the run."}
LOG_FIX = "delete the damaged line (the log feeds only the report's training trace), or train the run again."
# every file of a run folder but report.html, which `abft-lens report` itself rewrites
OWN_FILES = (CONFIG_FILE, LOG_FILE, FORE_TEST_FILE, POST_TEST_FILE, METRICS_FILE, TRAINED_FILE, CHECKPOINT_FILE,
             LOCK_FILE, ROBUSTNESS_FILE, GENERALIZATION_FILE, CALIBRATION_FILE, GENERATION_FILE, COMPARISON_FILE)

EVALUATION = {"task": str, "k": int, "label_words": [str], "metrics": Values(Maybe(NUMBER)),
              "per_prompt": [{"gold": int, "prediction": int, "label_probs": [NUMBER]}]}  # an EvalResult
_METRICS = Maybe(Values(Maybe(NUMBER)))
_PER_DATASET = Values({"accuracy": NUMBER})
_SUMMARY = {"in_domain": Maybe(NUMBER), "out_of_domain": Maybe(NUMBER)}
SHAPES = {  # what read_run_json checks each JSON file holds (at least)
    CONFIG_FILE: {"train": dict, "model": dict, "task": dict},
    FORE_TEST_FILE: EVALUATION, POST_TEST_FILE: EVALUATION,
    METRICS_FILE: {"fore?": _METRICS, "post?": _METRICS, "best_validation_step?": Maybe(int),
                   "train_seconds?": Maybe(NUMBER), "steps?": Maybe(int)},
    GENERALIZATION_FILE: {"fore?": _PER_DATASET, "post?": _PER_DATASET, "fore_summary?": _SUMMARY,
                          "post_summary?": _SUMMARY},
    CALIBRATION_FILE: {"fore?": _PER_DATASET}, ROBUSTNESS_FILE: {"fore?": dict, "post?": dict},
    GENERATION_FILE: dict, COMPARISON_FILE: dict,
}


def is_run_folder(path: str | Path) -> bool:
    """True for a folder holding a ``config.json`` (written first by every run, complete or not)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def is_finished(run_dir: str | Path) -> bool:
    """True when the training of the run completed: ``metrics.json`` is the last file a run writes."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def has_trained(run_dir: str | Path) -> bool:
    """True when the run saved its trained tensors (runs with ``--dont_save_model`` have none)."""
    return (Path(run_dir) / TRAINED_FILE).is_file()


def read_run_json(run_dir: str | Path, name: str, keys: tuple[str, ...] = ()):
    """The JSON file ``name`` of a run folder, or None when it does not exist; a file that is not readable, not of
    its shape (:data:`SHAPES`), or an object without ``keys``, is an :class:`AbftLensError`."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    data = read_checked_json(path, FIXES.get(name, DAMAGED_FIX), SHAPES.get(name))
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise AbftLensError(f"{path} is damaged: it lacks {', '.join(map(repr, missing))}.", DAMAGED_FIX)
    return data


def check_run_files(run_dir: str | Path) -> None:
    """Read every JSON file and the log of a run folder: a damaged one is refused (before a run resumes in it)."""
    for name in SHAPES:
        read_run_json(run_dir, name)
    read_log(run_dir)


def check_not_run_file(path: str | Path, option: str = "--output") -> None:
    """Refuse an output path that is one of a run folder's own files (it would destroy the run)."""
    path = Path(path)
    folder = Path(os.path.realpath(path.parent))
    if path.name in OWN_FILES and is_run_folder(folder):
        raise AbftLensError(f"{option} {path} is the run folder's own {path.name}; writing there would destroy the "
                            f"run in {folder}.", f"choose another file name or folder for {option}.")


def has_after(run_dir: str | Path, name: str) -> bool:
    """True when the extra evaluation file ``name`` holds its ``post`` half (the trained model's)."""
    data = read_run_json(run_dir, name)
    return isinstance(data, dict) and "post" in data


def read_log(run_dir: str | Path) -> list[dict]:
    """The lines of the run's ``log.jsonl`` as dicts (empty when the run has no log).

    A last line without its newline that does not parse was cut short by a crash while it was appended: it is
    dropped (a resumed run rewrites the log without it). Any other line that is not a JSON object is an
    :class:`AbftLensError` naming the file and the line.
    """
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as error:
            if number == len(lines):  # the last line, without its newline: cut short
                break
            raise AbftLensError(f"{path} is damaged: line {number} is not JSON ({type(error).__name__}).",
                                LOG_FIX) from None
        if not isinstance(record, dict):
            raise AbftLensError(f"{path} is damaged: line {number} is not a JSON object.", LOG_FIX)
        records.append(record)
    return records


def step_seconds(run_dir: str | Path) -> float | None:
    """The seconds of a run's optimizer steps (forward, backward and optimizer; no validation or checkpoint), summed
    over the step lines of its ``log.jsonl``: every session of a resumed run counts, each step once. None when the
    log has no step line."""
    seconds = [record["seconds"] for record in read_log(run_dir)
               if record.get("event") == "step" and isinstance(record.get("seconds"), (int, float))]
    return float(sum(seconds)) if seconds else None


def trained_parameters(run_dir: str | Path) -> int | None:
    """Number of trained scalars in a run's ``trained.safetensors`` (read from its header; no tensor loaded),
    None when the run saved none."""
    if not has_trained(run_dir):
        return None
    path = Path(run_dir) / TRAINED_FILE
    try:
        with open(path, "rb") as file:
            header = json.loads(file.read(min(int.from_bytes(file.read(8), "little"), 100_000_000)))
        return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise AbftLensError(f"{path} is damaged: not a safetensors file ({type(error).__name__}).",
                            DAMAGED_FIX) from None
