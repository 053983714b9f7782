"""Result tables in the paper's layout, built from run folders.

- :class:`ResultTable` holds values per (method row, dataset column) over seeds and renders
  ``mean ± std`` (percent; std is the sample standard deviation, n - 1, 0 for one seed) as markdown, CSV or
  HTML, with an average column over the dataset columns (per seed, then mean ± std; blank unless the row has
  every dataset column).
- :func:`table_from_runs` builds a table from run folders: the base model's row from ``fore_test.json`` /
  ``generalization.json["fore"]`` (one entry per distinct model, k and n_test: it does not depend on the seed),
  the method's row from ``post_test.json`` / ``generalization.json["post"]``. Runs without
  ``generalization.json`` fill their trained dataset's column of the method's row (the paper's main table:
  one run per dataset); runs with it get a row "METHOD (trained on DATASET)" with in-domain / OOD columns.
  Runs with ``calibration.json`` (``train --calibration-test``) add the training-free baseline, the base model
  with contextual calibration, as the row "ICL+CC (base)" right after the base row (once per model, k, n_test
  and dataset, like the base row), on the trained dataset or, with ``--generalization_test``, on all eight.
"""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from abft_lens.data.tasks import STAICC_DATASETS
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.generalization import generalization_summary
from abft_lens.io import atomic_write_text
from abft_lens.run_files import CALIBRATION_FILE, FORE_TEST_FILE, GENERALIZATION_FILE, POST_TEST_FILE, read_run_json
from abft_lens.training.run_folder import read_run_config

__all__ = ["ResultTable", "table_from_runs", "mean_std", "BASE_METHOD", "CC_METHOD", "DISPLAY", "DATASET_ORDER"]

DATASET_ORDER = tuple(name for name, _ in STAICC_DATASETS)
DISPLAY = {"sst2": "SST-2", "mr": "MR", "fp": "FP", "sst5": "SST-5", "trec": "TREC", "agnews": "AGNews",
           "subj": "Subj", "tee": "TEE", "teh": "TEH", "hs18": "HS18"}
AVERAGE, IN_DOMAIN, OUT_OF_DOMAIN = "Avg.", "ID", "OOD"
BASE_METHOD = "ICL (base)"
CC_METHOD = "ICL+CC (base)"  # the base model with contextual calibration (Zhao et al. 2021)

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class ResultTable:
    """``values[row][column]`` = one value per seed (accuracy in [0, 1]); ``seeds[row]`` the seeds seen.

    ``columns`` are dataset names (DATASET_ORDER order); rows keep insertion order.
    """

    columns: list[str] = field(default_factory=list)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seeds: dict[str, list] = field(default_factory=dict)
    metric: str = "accuracy"

    def add(self, row: str, column: str, value: float, seed=None) -> None:
        self.values.setdefault(row, {}).setdefault(column, []).append(float(value))
        if column not in self.columns and column not in (IN_DOMAIN, OUT_OF_DOMAIN):
            self.columns.append(column)
            self.columns.sort(key=lambda c: (DATASET_ORDER.index(c) if c in DATASET_ORDER else len(DATASET_ORDER), c))
        if seed is not None and seed not in self.seeds.setdefault(row, []):
            self.seeds[row].append(seed)

    def header(self) -> list[str]:
        extra = [c for c in (IN_DOMAIN, OUT_OF_DOMAIN) if any(c in cells for cells in self.values.values())]
        return self.columns + [AVERAGE] + extra

    def average(self, row: str) -> list[float] | None:
        """Per-seed mean over the dataset columns; None unless every column has the same number of values."""
        cells = self.values[row]
        counts = {len(cells.get(c, [])) for c in self.columns}
        if len(counts) != 1 or 0 in counts:
            return None
        n = counts.pop()
        return [sum(cells[c][i] for c in self.columns) / len(self.columns) for i in range(n)]

    def cell(self, row: str, column: str) -> tuple[float, float, int] | None:
        """(mean, std, n) of a cell, in the table's units (accuracy in [0, 1]); None when empty."""
        values = self.average(row) if column == AVERAGE else self.values[row].get(column)
        if not values:
            return None
        return (*mean_std(values), len(values))

    def rows(self) -> list[str]:
        return list(self.values)

    def to_markdown(self, digits: int = 2) -> str:
        header = ["Method"] + [DISPLAY.get(c, c) for c in self.header()]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows():
            lines.append("| " + " | ".join([row] + [self._text(row, c, digits) for c in self.header()]) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """One line per row: method, runs, then ``<column>`` (mean, percent) and ``<column>_std`` pairs."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["method", "runs"] + [f"{c}{suffix}" for c in self.header() for suffix in ("", "_std")])
        for row in self.rows():
            cells = []
            for column in self.header():
                cell = self.cell(row, column)
                cells += ["", ""] if cell is None else [f"{100 * cell[0]:.4f}", f"{100 * cell[1]:.4f}"]
            writer.writerow([row, self._runs(row)] + cells)
        return buffer.getvalue()

    def to_html(self, digits: int = 2) -> str:
        head = "".join(f"<th>{html.escape(DISPLAY.get(c, c))}</th>" for c in ["Method"] + self.header())
        body = "".join(
            "<tr><td>" + html.escape(row) + "</td>"
            + "".join(f"<td>{html.escape(self._text(row, c, digits))}</td>" for c in self.header()) + "</tr>"
            for row in self.rows())
        return (f"<table class=\"abft-lens-table\">\n<caption>{html.escape(self.metric)} (%), mean ± std over seeds"
                f"</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>\n")

    def render(self, fmt: str) -> str:
        if fmt not in ("markdown", "csv", "html"):
            raise AbftLensError(f"unknown table format {fmt!r}.", "use markdown, csv or html.")
        return {"markdown": self.to_markdown, "csv": self.to_csv, "html": self.to_html}[fmt]()

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write atomically; the format defaults from the suffix (.md, .csv, .html)."""
        path = Path(path)
        fmt = fmt or {".csv": "csv", ".html": "html", ".htm": "html"}.get(path.suffix.lower(), "markdown")
        return atomic_write_text(path, self.render(fmt))

    def _text(self, row: str, column: str, digits: int) -> str:
        cell = self.cell(row, column)
        if cell is None:
            return "–"
        mean, std, n = cell
        return f"{100 * mean:.{digits}f}" + (f" ± {100 * std:.{digits}f}" if n > 1 else "")

    def _runs(self, row: str) -> int:
        return max((len(v) for v in self.values[row].values()), default=0)


def table_from_runs(run_dirs: Iterable[str | Path], metric: str = "accuracy") -> ResultTable:
    """Aggregate run folders into a :class:`ResultTable` (see the module docstring for the layout)."""
    table = ResultTable(metric=metric)
    base_seen: set = set()
    for run_dir in map(Path, run_dirs):
        meta, fore, post, general, calibration = _read_run(run_dir)
        method, seed, trained = meta["train"]["method"], meta["train"].get("seed"), meta["task"]["name"]
        base_key = (meta["model"]["name"], meta["train"]["k"], meta.get("n_test"))
        if calibration is not None and "fore" in calibration:
            cc_key = (meta["model"]["name"], calibration.get("k", meta["train"]["k"]), calibration.get("n_test"))
            for task, metrics in calibration["fore"].items():
                if (cc_key, "cc", task) not in base_seen:
                    base_seen.add((cc_key, "cc", task))
                    table.add(CC_METHOD, task, metrics[metric])
        if general is not None:
            row = f"{method} (trained on {DISPLAY.get(trained, trained)})"
            for phase, name in (("post", row), ("fore", BASE_METHOD)):
                if phase not in general or (phase == "fore" and (base_key, "all") in base_seen):
                    continue
                accuracy = {task: metrics[metric] for task, metrics in general[phase].items()}
                for task, value in accuracy.items():
                    table.add(name, task, value, seed)
                if phase == "post":
                    summary = generalization_summary(accuracy, trained)
                    table.add(row, IN_DOMAIN, summary["in_domain"], seed)
                    table.add(row, OUT_OF_DOMAIN, summary["out_of_domain"], seed)
                else:
                    base_seen.add((base_key, "all"))
            continue
        if post is not None:
            table.add(method, post["task"], post["metrics"][metric], seed)
        if fore is not None and (base_key, fore["task"]) not in base_seen and (base_key, "all") not in base_seen:
            base_seen.add((base_key, fore["task"]))
            table.add(BASE_METHOD, fore["task"], fore["metrics"][metric])
    if not table.values:
        raise AbftLensError("none of the run folders holds test results.", "point at finished runs (with post_test.json).")
    first = [name for name in (BASE_METHOD, CC_METHOD) if name in table.values]
    table.values = {**{name: table.values.pop(name) for name in first}, **table.values}  # baselines first
    return table


def _read_run(run_dir: Path) -> tuple[dict, dict | None, dict | None, dict | None, dict | None]:
    parts = [read_run_json(run_dir, name, keys=keys) for name, keys in (
        (FORE_TEST_FILE, ("task", "metrics")), (POST_TEST_FILE, ("task", "metrics")), (GENERALIZATION_FILE, ()),
        (CALIBRATION_FILE, ()))]
    return (read_run_config(run_dir), *parts)
