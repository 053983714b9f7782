"""A run folder on disk: reading its config and tensors safely, the folder checks, and one process per folder.

The file names, :func:`~abft_lens.run_files.is_run_folder`, :func:`~abft_lens.run_files.read_run_json` and the
completeness tests are :mod:`abft_lens.run_files`'s.

- :func:`read_run_config` reads and checks ``config.json``, :func:`read_trained` the trained tensors. A damaged
  file (empty, truncated, not JSON, not safetensors, NaN/inf tensors) is one :class:`AbftLensError` naming the
  file, never a ``JSONDecodeError`` or ``SafetensorError`` traceback.
- :func:`check_run_dir`: whether a ``--run-dir`` can take a new (or resumed) run, checked before any model
  loads; a folder holding anything but a run is refused, so nothing of the user's is overwritten, and so is a
  folder this process may not write. A run to be resumed must have readable files (:func:`read_checkpoint`).
  :func:`start_or_resume` writes config.json (or checks a resumed run's settings) under the lock;
  :func:`clear_folder` takes back a fresh run refused before its first step.
- config.json's ``resolved`` (:func:`resolved_block`): the micro-batch size and compute dtype a run used and
  why; a resumed run takes its micro-batch from there (:func:`saved_micro_batch`).
- :class:`RunLock`: ``run.lock`` holds the pid of the process training in the folder, under an exclusive
  ``flock`` (a study folder's ``study.lock`` is the same lock under another name). A second process is refused with one message; the kernel drops the lock when its owner exits
  or dies, so a lock file left behind by a killed process (a stale lock) is taken over by the next run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from abft_lens.errors import AbftLensError
from abft_lens.io import NUMBER, Maybe, atomic_write_text, check_folder, shape_problem, write_json
from abft_lens.run_files import (CHECKPOINT_FILE, CONFIG_FILE, DAMAGED_FIX, LOCK_FILE, TRAINED_FILE,
                                 check_run_files, has_trained, is_finished, is_run_folder, read_log, read_run_json)
from abft_lens.training.train import TrainConfig

log = logging.getLogger(__name__)


def read_run_config(run_dir: str | Path, *, trained: bool = False) -> dict:
    """``config.json`` of a run folder, checked: the training options load, the model and task are named.

    ``trained=True`` also requires ``trained.safetensors`` (runs with ``--dont_save_model`` have none).
    """
    run_dir = Path(run_dir)
    if not is_run_folder(run_dir):
        raise AbftLensError(f"{run_dir} is not an abft-lens run folder (no {CONFIG_FILE}).",
                            "point at a folder written by `abft-lens train` or `abft-lens demo`.")
    meta = read_run_json(run_dir, CONFIG_FILE, keys=("train", "model", "task"))
    if not all(isinstance(meta[key], dict) and (key == "train" or isinstance(meta[key].get("name"), str))
               for key in ("train", "model", "task")):
        raise AbftLensError(f"{run_dir / CONFIG_FILE} is damaged: its train/model/task sections are malformed.",
                            DAMAGED_FIX)
    try:
        TrainConfig.from_dict(meta["train"])
    except (AbftLensError, TypeError) as error:
        raise AbftLensError(f"{run_dir / CONFIG_FILE} holds training options this version cannot use: "
                            f"{str(error).splitlines()[0]}", DAMAGED_FIX) from None
    if trained and not has_trained(run_dir):
        raise AbftLensError(f"{run_dir} holds no {TRAINED_FILE} (trained without saving the model, or unfinished).",
                            "re-run training with save_model=True (without --dont-save-model).")
    return meta


def non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity, in order."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(tensor.isfinite().all())]


def check_finite(tensors: Mapping[str, Tensor], where: str) -> None:
    """Refuse tensors with NaN/inf values: a diverged run is never applied, mixed, reported or exported."""
    bad = non_finite(tensors)
    if bad:
        raise AbftLensError(f"{where} holds NaN or infinite values in {len(bad)} tensor(s) ({bad[0]}, ...): "
                            "the training diverged.", "train the run again with a lower --lr.")


def read_trained(run_dir: str | Path) -> dict[str, Tensor]:
    """The trained tensors of a run (``trained.safetensors``), checked readable and finite."""
    from safetensors.torch import load_file

    path = Path(run_dir) / TRAINED_FILE
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise AbftLensError(f"{path} is damaged: not a safetensors file ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]}).", DAMAGED_FIX) from None
    check_finite(tensors, str(path))
    return tensors


CHECKPOINT = {"trainer": {"completed_steps": NUMBER, "trainable": dict, "optimizer": dict, "controller": dict},
              "guard": Maybe(dict)}
CHECKPOINT_FIX = ("delete it and resume again: the training restarts from its first step (or restore the file "
                  "from a copy).")


def read_checkpoint(run_dir: str | Path, *, mmap: bool = False) -> dict | None:
    """The trainer and guard state of an interrupted run (``checkpoint.pt``), or None when it has none; a
    damaged file is one :class:`AbftLensError` naming it. ``mmap``: map the tensors instead of reading them
    (a cheap check before a model loads)."""
    import torch

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False, map_location="cpu", mmap=mmap)
    except Exception as error:  # pickle, zip and torch errors of a damaged file
        raise AbftLensError(f"{path} is damaged: not a checkpoint ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200] if str(error) else ''}).", CHECKPOINT_FIX) from None
    problem = shape_problem(state, CHECKPOINT)
    if problem:
        raise AbftLensError(f"{path} is damaged: {problem}.", CHECKPOINT_FIX)
    return state


def check_same_base(run_model: Mapping, model: Mapping, run_dir: str | Path) -> None:
    """The model a run was trained on (its config.json's ``model``) is the given one (``LoadedModel.describe()``):
    the same name (or the same folder) and the same shapes. A run applied to another model of the same shapes
    would load without a word and mean nothing."""
    for key in ("n_layers", "n_heads", "n_key_value_heads", "d_head"):
        if key in run_model and key in model and run_model[key] != model[key]:
            raise AbftLensError(f"{run_dir} was trained on a model with {key}={run_model[key]}; the loaded model "
                                f"has {key}={model[key]}.", f"load the run's base model ({run_model.get('name')}).")
    ours, theirs = run_model.get("name"), model.get("name")
    if ours is None or theirs is None or ours == theirs:
        return
    same_path = Path(ours).exists() and Path(theirs).exists() and Path(ours).resolve() == Path(theirs).resolve()
    if not same_path:
        raise AbftLensError(f"{run_dir} was trained on {ours!r}, but the loaded model is {theirs!r}.",
                            f"load the run's base model (--model {ours}).")


def check_run_dir(run_dir: str | Path, *, resume: bool) -> None:
    """Refuse a ``--run-dir`` that cannot take this run, before anything loads or is written: a file (or a
    path under one), a folder this process may not write, a folder holding a run when not resuming (or a
    complete run, or one with a damaged file, when resuming), a folder holding other files, and ``--resume`` on
    a folder that holds no run."""
    run_dir = Path(run_dir)
    check_folder(run_dir, "--run-dir")
    if is_run_folder(run_dir):
        if not resume:
            raise AbftLensError(f"{run_dir} already holds a run; abft-lens never overwrites one.",
                                "choose another run_dir, or pass resume to continue an interrupted run.",
                                names=("run_dir", "resume"))
        if is_finished(run_dir):
            raise AbftLensError(f"the run in {run_dir} is already complete.", "start a new run_dir.",
                                names=("run_dir",))
        check_run_files(run_dir)
        read_checkpoint(run_dir, mmap=True)
        return
    if resume:
        raise AbftLensError(f"resume: {run_dir} holds no run to continue "
                            f"({'it does not exist' if not run_dir.exists() else f'no {CONFIG_FILE}'}).",
                            "drop resume to start a new run, or pass the run_dir of the interrupted run.",
                            names=("resume", "run_dir"))
    if run_dir.is_dir():
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise AbftLensError(f"{run_dir} is not empty ({shown}) and is not an abft-lens run folder; abft-lens "
                                "never writes into a folder of other files.", "choose a new or empty --run-dir.")


def start_or_resume(run_dir: Path, meta: dict, *, resume: bool) -> bool:
    """Under the lock: check the folder again and write config.json (``meta``), or check that a resumed run
    has the same settings; True when an interrupted run is being resumed."""
    check_run_dir(run_dir, resume=resume)
    if not (run_dir / CONFIG_FILE).is_file():
        write_json(run_dir / CONFIG_FILE, meta)
        return False
    saved = read_run_config(run_dir)
    # n_test: the cached fore test must cover the same prompts as the post test; dtype: bit-identical weights
    if saved["train"] != meta["train"] or saved["model"]["name"] != meta["model"]["name"] \
            or saved["model"].get("dtype") != meta["model"]["dtype"] \
            or saved["model"].get("quantized", False) != meta["model"].get("quantized", False) \
            or saved["task"]["name"] != meta["task"]["name"] or saved.get("n_test") != meta["n_test"]:
        raise AbftLensError(f"{run_dir} holds a run with different settings; a resumed run must match.",
                            "resume with the settings in its config.json, or start a new --run-dir.")
    return True


def resolved_block(model, config, micro_batch: tuple[int, str], dtype_reason: str | None) -> dict:
    """config.json's ``resolved``: the micro-batch size and compute dtype of a run (``config``: its
    TrainConfig), each ``{"value", "reason"}``; ``dtype_reason``: the caller's choice (``--dtype auto``), if any."""
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    if config.compute_dtype == "bfloat16":
        dtype, reason = "bfloat16", f"compute_dtype='bfloat16': autocast over the model's {weights} weights"
    else:
        dtype, reason = weights, f"compute_dtype=None: the model's dtype ({weights})"
    return {"micro_batch_size": {"value": micro_batch[0], "reason": micro_batch[1]},
            "compute_dtype": {"value": dtype, "reason": f"{dtype_reason}; {reason}" if dtype_reason else reason}}


def saved_micro_batch(run_dir: Path, config, device) -> tuple[int, str] | None:
    """The micro-batch an interrupted run in ``run_dir`` trained with, when its ``config`` left it to the
    default (None otherwise), so that its resumed steps equal the first ones bit for bit: config.json's
    ``resolved`` value; a folder written before ``resolved`` existed trained with the old default (8 on CPU,
    the whole pseudo-batch on CUDA)."""
    if config.micro_batch_size is not None:
        return None
    saved = read_run_config(run_dir).get("resolved")
    if saved is not None:
        return saved["micro_batch_size"]["value"], "resumed: " + saved["micro_batch_size"]["reason"]
    cuda = str(device).startswith("cuda")
    return (config.pseudo_batch_size if cuda else 8), "resumed run written before 'resolved': its default then"


def truncate_log(path: Path, completed_steps: int) -> None:
    """Drop log lines written after the checkpoint being resumed from (and a last line cut short by a crash)."""
    if not path.is_file():
        return
    kept = [line for line in read_log(path.parent) if line.get("step", 0) <= completed_steps]
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in kept))


def clear_folder(run_dir: Path) -> None:
    """Remove everything in ``run_dir`` but the lock: a fresh run refused before its first step."""
    for path in run_dir.iterdir():
        if path.name != LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def remove_empty_folder(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


class RunLock:
    """An exclusive lock on ``RUN_DIR/run.lock`` (which holds the owner's pid) while one process trains there;
    ``name`` locks a folder under another file name (a study's ``study.lock``).

    Use as a context manager. ``flock`` is the truth: a second process (or a second lock in this one) is
    refused while the owner lives; a file left by an ended process is taken over. Where the file system has no
    ``flock``, the pid in the file decides (alive: refused; gone: taken over).
    """

    def __init__(self, run_dir: str | Path, name: str = LOCK_FILE):
        self.path = Path(run_dir) / name
        self._file = None

    def __enter__(self) -> RunLock:
        import fcntl

        while self._file is None:
            file = open(self.path, "a+", encoding="utf-8")
            file.seek(0)
            previous = file.read().strip()
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                self._refuse(previous)
            except OSError:  # no flock on this file system: the recorded pid decides
                if previous and previous != str(os.getpid()) and _alive(previous):
                    file.close()
                    self._refuse(previous)
            if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(file.fileno()).st_ino:
                file.close()  # the owner removed the file between our open and our lock: start again
                continue
            if previous:
                log.warning("taking over the stale lock of process %s in %s", previous, self.path.parent)
            file.seek(0)
            file.truncate()
            file.write(f"{os.getpid()}\n")
            file.flush()
            self._file = file
        return self

    def _refuse(self, owner: str) -> None:
        raise AbftLensError(f"{self.path.parent} is in use by another abft-lens process (pid {owner or 'unknown'}, "
                            f"{self.path}).", "wait for that process to finish or stop it, then run the command "
                            "again (a lock left by a process that has ended is taken over automatically).")

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # removed while still locked, so no one takes over a dying lock
            self._file.close()
            self._file = None


def _alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


__all__ = ["read_run_config", "read_trained", "read_checkpoint", "non_finite", "check_finite", "check_same_base", "check_run_dir",
           "start_or_resume", "truncate_log", "clear_folder", "remove_empty_folder", "RunLock"]
