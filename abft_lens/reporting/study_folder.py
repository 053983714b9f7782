"""A study folder on disk (``abft-lens study``): where each cell's files live, and reading them back checked.

The runner (:mod:`abft_lens.studies.study`) writes the folder; the tables (:mod:`abft_lens.reporting.study_tables`)
read it, so they can be regenerated from the folder alone:

- ``OUT/study.json``: the plan and every cell's state, metrics, seconds, error;
- ``OUT/study.lock``: the pid of the process running the study, while it runs (one study per folder);
- ``OUT/<model>/<dataset>/vanilla/k<k>-n<n>.json``: the untrained model's evaluation (an EvalResult), shared;
- ``OUT/<model>/<dataset>/cc/k<k>-n<n>.json``: the same with contextual calibration, shared;
- ``OUT/<model>/<dataset>/prior/seed-<s>/k<k>-n<n>.json``: the label-prior control of a seed (contextual
  calibration re-weighted by the label shares of that seed's training queries; no training);
- ``OUT/<model>/<dataset>/<method>/seed-<s>/``: one ordinary run folder per trained cell;
- ``OUT/table1.{md,csv,html}``, ``OUT/table2.{md,csv,html}``.

``<model>`` and ``<method>`` are :func:`slug` s of the model spec and method name; ``<dataset>`` is the task name.
:func:`read_study` and :func:`read_baseline` refuse a damaged file with one message naming it;
:func:`check_output` refuses an output path that is one of a run folder's or a study folder's own files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from abft_lens.errors import AbftLensError
from abft_lens.io import NUMBER, Maybe, Values, check_output_file, read_checked_json
from abft_lens.run_files import EVALUATION, check_not_run_file, is_finished

__all__ = ["STUDY_FILE", "STUDY_LOCK_FILE", "STATES", "BASELINE_KINDS", "SEEDED_BASELINE_KINDS", "TRAINED_KINDS",
           "slug", "dataset_name", "baseline_path", "baseline_files", "run_path", "is_study_dir", "read_study",
           "read_baseline", "cell_files_exist", "check_output"]

STUDY_FILE = "study.json"
STUDY_LOCK_FILE = "study.lock"
STATES = ("pending", "running", "done", "failed", "interrupted")
BASELINE_KINDS = ("vanilla", "cc")  # evaluated once per (model, dataset, k, n_test), never trained
SEEDED_BASELINE_KINDS = ("prior",)  # untrained, but one per training seed (it reads the seed's training prompts)
TRAINED_KINDS = ("ABFT", "E2E")
BASELINE_NAME = re.compile(r"k\d+-n(\d+|all)\.json")
STUDY_SHAPE = {
    "plan": {"models": [str], "datasets": [str], "methods": [{"name": str, "kind": str}], "seeds": [int],
             "settings?": dict},
    "cells": Values({"model": str, "dataset": str, "method": str, "kind": str, "seed": Maybe(int), "path": str,
                     "state": set(STATES), "attempts?": int, "seconds?": Maybe(NUMBER), "metrics?": Maybe(dict)}),
}
STUDY_FIX = "restore study.json from a copy, or start the study again in a new --out folder."
BASELINE_FIX = "delete the file and run the study again: the baseline is evaluated again."


def slug(text: str) -> str:
    """A folder name for a model spec or method name: runs of characters outside ``[A-Za-z0-9._+-]`` become
    ``-``; a path keeps only its last part (``/x/model.gguf`` -> ``model.gguf``, ``tiny:n_layers=3`` ->
    ``tiny-n_layers-3``)."""
    name = Path(text).name if "/" in text else text
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "model"


def dataset_name(spec: str) -> str:
    """The task name of a study's dataset spec: the StaICC name, or a CSV/JSONL file's stem (as load_task names it)."""
    return Path(spec).stem if Path(spec).suffix.lower() in (".csv", ".jsonl") else spec


def baseline_path(out: str | Path, model: str, dataset: str, kind: str, *, k: int, n_test: int | None,
                  seed: int | None = None) -> Path:
    """``OUT/<model>/<dataset>/<kind>/k<k>-n<n_test>.json`` (``n`` is ``all`` when n_test is None); a seeded
    baseline (``prior``) lives one folder down, in ``seed-<seed>/``."""
    folder = Path(out) / slug(model) / dataset / kind
    if seed is not None:
        folder = folder / f"seed-{seed}"
    return folder / f"k{k}-n{'all' if n_test is None else n_test}.json"


def baseline_files(out: str | Path) -> list[Path]:
    """Every baseline file of a study folder (of every model, dataset, kind, k and n)."""
    out = Path(out)
    found = [path for kind in BASELINE_KINDS for path in out.glob(f"*/*/{kind}/k*-n*.json")]
    found += [path for kind in SEEDED_BASELINE_KINDS for path in out.glob(f"*/*/{kind}/seed-*/k*-n*.json")]
    return sorted(path for path in found if _is_baseline(path.relative_to(out).parts))


def _is_baseline(parts: tuple[str, ...]) -> bool:
    """``parts`` (relative to a study folder) name a baseline file."""
    if not parts or not BASELINE_NAME.fullmatch(parts[-1]):
        return False
    return len(parts) == 4 and parts[2] in BASELINE_KINDS or \
        len(parts) == 5 and parts[2] in SEEDED_BASELINE_KINDS and parts[3].startswith("seed-")


def run_path(out: str | Path, model: str, dataset: str, method: str, seed: int) -> Path:
    """``OUT/<model>/<dataset>/<method>/seed-<seed>/``: an ordinary run folder."""
    return Path(out) / slug(model) / dataset / slug(method) / f"seed-{seed}"


def is_study_dir(path: str | Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


def read_study(path: str | Path) -> dict:
    """The content of ``path/study.json``: ``{"plan": ..., "cells": {key: record}, ...}``, checked."""
    path = Path(path)
    if not is_study_dir(path):
        raise AbftLensError(f"{path} is not a study folder (no {STUDY_FILE}).",
                            "point at the --out folder of abft-lens study.")
    return read_checked_json(path / STUDY_FILE, STUDY_FIX, STUDY_SHAPE)


def read_baseline(path: str | Path) -> dict:
    """A baseline file (an EvalResult's dict), checked."""
    return read_checked_json(path, BASELINE_FIX, EVALUATION)


def cell_files_exist(out: str | Path, record: dict) -> bool:
    """The files of a cell (its ``study.json`` record) are there: a trained cell's finished run folder, a
    baseline's file. A done cell without them is redone by the study and shown as missing by the tables."""
    path = Path(out) / record["path"]
    return is_finished(path) if record["kind"] in TRAINED_KINDS else path.is_file()


def check_output(path: str | Path, option: str = "--output") -> Path:
    """:func:`~abft_lens.io.check_output_file`, and refuse an output path that is one of a run folder's own
    files or a study folder's ``study.json``, ``study.lock`` or baseline files (the tables may be rewritten:
    the study rewrites them itself)."""
    path = check_output_file(path, option)
    check_not_run_file(path, option)
    real = Path(os.path.realpath(path.parent)) / path.name
    for folder in list(real.parents)[:5]:
        if is_study_dir(folder):
            parts = real.relative_to(folder).parts
            if parts in ((STUDY_FILE,), (STUDY_LOCK_FILE,)) or _is_baseline(parts):
                raise AbftLensError(f"{option} {path} is the study folder's own {'/'.join(parts)}; writing there "
                                    f"would damage the study in {folder}.",
                                    f"choose another file name or folder for {option}.")
            break
    return path
