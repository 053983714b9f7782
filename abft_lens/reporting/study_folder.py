"""A study folder on disk (``abft-lens study``): where each cell's files live, and reading ``study.json`` back.

The runner (:mod:`abft_lens.studies.study`) writes the folder; the tables (:mod:`abft_lens.reporting.study_tables`)
read it, so they can be regenerated from the folder alone:

- ``OUT/study.json``: the plan and every cell's state, metrics, seconds, error;
- ``OUT/<model>/<dataset>/vanilla/k<k>-n<n>.json``: the untrained model's evaluation (an EvalResult), shared;
- ``OUT/<model>/<dataset>/cc/k<k>-n<n>.json``: the same with contextual calibration, shared;
- ``OUT/<model>/<dataset>/prior/seed-<s>/k<k>-n<n>.json``: the label-prior control of a seed (contextual
  calibration re-weighted by the label shares of that seed's training queries; no training);
- ``OUT/<model>/<dataset>/<method>/seed-<s>/``: one ordinary run folder per trained cell;
- ``OUT/table1.{md,csv,html}``, ``OUT/table2.{md,csv,html}``.

``<model>`` and ``<method>`` are :func:`slug` s of the model spec and method name; ``<dataset>`` is the task name.
"""

from __future__ import annotations

import re
from pathlib import Path

from abft_lens.errors import AbftLensError
from abft_lens.io import read_json

__all__ = ["STUDY_FILE", "BASELINE_KINDS", "SEEDED_BASELINE_KINDS", "TRAINED_KINDS", "slug", "dataset_name",
           "baseline_path", "run_path", "is_study_dir", "read_study"]

STUDY_FILE = "study.json"
BASELINE_KINDS = ("vanilla", "cc")  # evaluated once per (model, dataset, k, n_test), never trained
SEEDED_BASELINE_KINDS = ("prior",)  # untrained, but one per training seed (it reads the seed's training prompts)
TRAINED_KINDS = ("ABFT", "E2E")


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


def run_path(out: str | Path, model: str, dataset: str, method: str, seed: int) -> Path:
    """``OUT/<model>/<dataset>/<method>/seed-<seed>/``: an ordinary run folder."""
    return Path(out) / slug(model) / dataset / slug(method) / f"seed-{seed}"


def is_study_dir(path: str | Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


def read_study(path: str | Path) -> dict:
    """The content of ``path/study.json``: ``{"plan": ..., "cells": {key: record}, ...}``."""
    path = Path(path)
    if not is_study_dir(path):
        raise AbftLensError(f"{path} is not a study folder (no {STUDY_FILE}).",
                            "point at the --out folder of abft-lens study.")
    data = read_json(path / STUDY_FILE)
    if not isinstance(data, dict) or "plan" not in data or "cells" not in data:
        raise AbftLensError(f"{path / STUDY_FILE} is not a study file written by abft-lens study.",
                            "point at the --out folder of abft-lens study.")
    return data
