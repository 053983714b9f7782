"""The figures of a study's HTML page: per-dataset accuracy with one point per seed, and the validation curves
read from each run's ``log.jsonl`` (its ``event: validation`` lines)."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from abft_lens.reporting.study_tables import ModelResults, display
from abft_lens.run_files import read_log
from abft_lens.reporting.viz import style_figure

__all__ = ["accuracy_figure", "validation_figure", "validation_curve"]

COLORS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#fecb52")


def accuracy_figure(results: ModelResults) -> go.Figure | None:
    """Accuracy (%) per dataset, one marker per seed (baselines: one), methods side by side."""
    if not results.cells:
        return None
    fig = go.Figure()
    for index, method in enumerate(results.methods):
        x, y = [], []
        for dataset in results.datasets:
            cell = results.cells.get((method, dataset))
            for value in cell.accuracy if cell else []:
                x.append(display(dataset))
                y.append(round(100 * value, 2))
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=method, marker={"size": 9, "opacity": 0.8,
                                 "color": COLORS[index % len(COLORS)]}))
    fig.update_layout(scattermode="group", xaxis={"categoryorder": "array",
                      "categoryarray": [display(d) for d in results.datasets]}, yaxis_title="accuracy (%)")
    return style_figure(fig, title=f"{results.model}: accuracy per dataset, one point per seed", height=420)


def validation_curve(run_dir) -> list[dict]:
    """The validation lines of a run's ``log.jsonl`` (empty when it has none)."""
    return [record for record in read_log(run_dir) if record.get("event") == "validation"]


def validation_figure(results: ModelResults, metric: str = "accuracy") -> go.Figure | None:
    """Validation ``metric`` (%) against the optimizer step, one panel per dataset, one line per run."""
    curves = [(run, validation_curve(run["run_dir"])) for run in results.runs]
    curves = [(run, points) for run, points in curves if points]
    if not curves:
        return None
    datasets = [d for d in results.datasets if any(run["dataset"] == d for run, _ in curves)]
    columns = min(4, len(datasets))
    rows = math.ceil(len(datasets) / columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[display(d) for d in datasets])
    shown = set()
    for run, points in curves:
        index = datasets.index(run["dataset"])
        color = COLORS[results.methods.index(run["method"]) % len(COLORS)]
        fig.add_trace(go.Scatter(x=[p["step"] for p in points], y=[round(100 * p[metric], 2) for p in points],
                                 mode="lines+markers", name=run["method"], legendgroup=run["method"],
                                 showlegend=run["method"] not in shown, line={"color": color},
                                 hovertext=f"{run['method']} seed {run['seed']}"),
                      row=index // columns + 1, col=index % columns + 1)
        shown.add(run["method"])
    return style_figure(fig, title=f"{results.model}: validation {metric} (%) by step, one line per run",
                        height=280 * rows + 80)
