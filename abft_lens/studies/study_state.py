"""``study.json``: a study's plan and the state of each of its cells, rewritten atomically after every change.

A cell's record holds ``model``, ``dataset``, ``method``, ``kind``, ``seed`` (None for baselines), ``path``
(relative to the study folder), ``state`` (pending, running, done, failed or interrupted), ``attempts``,
``seconds`` (summed over attempts), ``metrics`` (done cells) and ``error`` (failed cells: the message).

Opening a folder that already holds a study compares plans: the same plan resumes it; a different one is
refused unless ``extend`` (then the plans' models, datasets, methods and seeds are united; the options must be
equal). A folder that holds other files and no ``study.json``, or an ``--out`` that is a file, is refused, and
so is a study with a damaged file (:func:`check_study_files`), before anything is written. :func:`study_lock`
holds ``study.lock`` while a study runs: a second study in the same folder is refused.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from abft_lens.errors import AbftLensError
from abft_lens.io import check_folder, write_json
from abft_lens.reporting.study_folder import (STATES, STUDY_FILE, STUDY_LOCK_FILE, TRAINED_KINDS, baseline_files,
                                              is_study_dir, read_baseline, read_study)
from abft_lens.run_files import check_run_files, is_finished, is_run_folder
from abft_lens.studies.study_plan import Cell, StudyPlan, differing_settings
from abft_lens.training.run_folder import RunLock, read_checkpoint, remove_empty_folder
from abft_lens.version import __version__

__all__ = ["StudyState", "STATES", "study_lock", "check_study_files"]


@contextlib.contextmanager
def study_lock(out: str | Path):
    """Hold ``OUT/study.lock`` (:class:`~abft_lens.training.run_folder.RunLock`) while a study runs there;
    ``out`` is checked writable and made when missing (and removed again when the study leaves it empty)."""
    out = check_folder(out, "--out")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out, STUDY_LOCK_FILE):
            yield
    finally:
        if made:
            remove_empty_folder(out)


def check_study_files(out: Path, data: dict) -> None:
    """Read every baseline file and the files of every trained cell's run folder (with its checkpoint, when
    unfinished): a damaged one is refused with one message before the study writes anything."""
    for path in baseline_files(out):
        read_baseline(path)
    for record in data["cells"].values():
        run_dir = out / record["path"]
        if record["kind"] in TRAINED_KINDS and is_run_folder(run_dir):
            check_run_files(run_dir)
            if not is_finished(run_dir):
                read_checkpoint(run_dir, mmap=True)


class StudyState:
    """The plan and the cell records of one study folder; :meth:`update` writes ``study.json`` at once."""

    def __init__(self, out: Path, plan: StudyPlan, data: dict):
        self.out, self.plan, self.data = Path(out), plan, data
        self.path = self.out / STUDY_FILE

    @classmethod
    def open(cls, out: str | Path, plan: StudyPlan, *, extend: bool = False) -> "StudyState":
        """Create ``out`` with a new study, or reopen the study in it (see the module docstring); nothing is
        written when the plan is refused."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise AbftLensError(f"out {out} is a file.", "pass a folder for the study (new, or holding a study).",
                                names=("out",))
        data: dict = {"cells": {}}
        if is_study_dir(out):
            data = read_study(out)
            check_study_files(out, data)
            saved = StudyPlan.from_dict(data["plan"])
            differences = plan.differences(saved)
            if differences and not extend:
                raise AbftLensError(f"{out} holds a study with another plan ({'; '.join(differences)}).",
                                    "run the study's own command again to resume it, add extend to add models, "
                                    "datasets, methods or seeds to it, or choose another out.",
                                    names=("extend", "out", *differing_settings(saved.settings, plan.settings)))
            plan = saved.extended_by(plan) if differences else saved
        elif out.is_dir() and any(path.name != STUDY_LOCK_FILE for path in out.iterdir()):
            raise AbftLensError(f"out {out} holds files but no {STUDY_FILE}.",
                                "choose a new or empty folder for the study.", names=("out",))
        state = cls(out, plan, data)
        state.sync()
        return state

    def sync(self) -> None:
        """One record per cell of the plan, in the plan's order (records of earlier plans are kept); write."""
        cells = self.data.get("cells", {})
        ordered = {}
        for cell in self.plan.cells():
            ordered[cell.key] = cells.pop(cell.key, None) or {
                "model": cell.model, "dataset": cell.dataset, "method": cell.method.name, "kind": cell.method.kind,
                "seed": cell.seed, "path": str(cell.path(".", k=self.plan.k, n_test=self.plan.n_test)),
                "state": "pending", "attempts": 0, "seconds": 0.0, "metrics": None, "error": None}
        self.data["cells"] = {**ordered, **cells}
        self.data.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.write()

    def record(self, cell: Cell) -> dict:
        return self.data["cells"][cell.key]

    def update(self, cell: Cell, **fields) -> dict:
        """Change a cell's record and rewrite ``study.json`` atomically."""
        unknown = set(fields) - {"state", "attempts", "seconds", "metrics", "error"}
        if unknown or fields.get("state", "pending") not in STATES:
            raise ValueError(f"StudyState.update: bad fields {sorted(unknown)} / state {fields.get('state')!r}")
        record = self.record(cell)
        record.update(fields)
        self.write()
        return record

    def counts(self) -> dict[str, int]:
        """Cells of the current plan per state."""
        keys = {cell.key for cell in self.plan.cells()}
        counts = dict.fromkeys(STATES, 0)
        for key, record in self.data["cells"].items():
            if key in keys:
                counts[record["state"]] += 1
        return counts

    def write(self) -> Path:
        self.data.update(abft_lens_version=__version__, plan=self.plan.to_dict(),
                         updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        ordered = {key: self.data[key] for key in ("abft_lens_version", "created", "updated", "plan")}
        return write_json(self.path, {**ordered, **{k: v for k, v in self.data.items() if k not in ordered}})
