"""Plotly figures (and circuitsvis attention views) for a :class:`~abft_lens.training.comparison.Comparison`.

Every function returns a new figure and does nothing else: no files, no display, no network. Tensors may be
torch tensors, numpy arrays or nested lists; ``[layer, head]`` grids are drawn with layer 0 at the top.

Offline rule: circuitsvis's ``str(view)`` loads its JavaScript from a CDN and ``view._repr_html_()`` probes an
outside host, so HTML for a circuitsvis view comes only from :func:`circuitsvis_html` (the inline-JS
``local_src``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from abft_lens.reporting.formatting import format_value
from abft_lens.training.comparison import Comparison

# Plotly settings shared by every figure: no logo link to plotly.com, nothing fetched.
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}

SCORE_LABELS = {
    "induction": "induction",
    "previous_token": "previous token",
    "duplicate_token": "duplicate token",
    "copying": "copying",
    "label_attention": "label attention",
    "correct_label_attention": "correct-label attention",
    "label_correctness": "label correctness (correct − wrong)",
    "filter_pass_rate": "ABFT filter pass rate",
    "sink_attention": "sink attention (first token)",
}
BEFORE_COLOR, AFTER_COLOR = "#7f7f7f", "#d62728"
# A small white template (plotly's "plotly_white" look): setting the full named template costs ~80 ms per
# figure in validation and ~6 kB of JSON per figure on the page.
_AXIS = dict(gridcolor="#EBF0F8", linecolor="#EBF0F8", zerolinecolor="#EBF0F8", zerolinewidth=2, ticks="",
             automargin=True, title=dict(standoff=12))
_TEMPLATE = dict(layout=dict(
    paper_bgcolor="white", plot_bgcolor="white", xaxis=_AXIS, yaxis=_AXIS, hoverlabel=dict(align="left"),
    colorway=["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880", "#FF97FF",
              "#FECB52"],
    title=dict(font=dict(size=16, color="#2a3f5f")), font=dict(color="#2a3f5f")))
_FONT = dict(family="system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif", size=12)


def _array(values: Any) -> np.ndarray:
    """A float64 numpy array from a torch tensor, numpy array or nested list."""
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64)


def _grid(values: Any, what: str) -> np.ndarray:
    array = _array(values)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a [layer, head] grid, got shape {tuple(array.shape)}")
    return array


def _json_list(array: np.ndarray) -> list:
    """Nested lists with NaN/inf as None (plotly draws a gap; JSON stays valid)."""
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in array.tolist()]


def style_figure(fig: go.Figure, *, title: str | None, height: int, margin: dict | None = None, **extra) -> go.Figure:
    # The title sits 44 px below the top, under plotly's mode bar (which would otherwise cover it).
    title_spec = dict(text=title, x=0.01, xanchor="left", yref="container", y=1 - 44 / height, yanchor="middle")
    fig.update_layout(title=title_spec if title else None, height=height,
                      margin=margin or dict(l=60, r=20, t=72 if title else 30, b=50), font=_FONT,
                      template=_TEMPLATE, **extra)
    return fig


def _head_trace(grid: np.ndarray, colorscale: str, *, zmid: float | None = None, zmin: float | None = None,
                zmax: float | None = None, colorbar_title: str | None = None) -> go.Heatmap:
    n_layers, n_heads = grid.shape
    names = [[f"L{layer}H{head}" for head in range(n_heads)] for layer in range(n_layers)]
    return go.Heatmap(
        z=_json_list(grid), x=list(range(n_heads)), y=list(range(n_layers)), customdata=names,
        colorscale=colorscale, zmid=zmid, zmin=zmin, zmax=zmax, colorbar=dict(title=dict(text=colorbar_title) if colorbar_title else None,
                                                        thickness=12),
        hovertemplate="%{customdata}: %{z:.4f}<extra></extra>", hoverongaps=False,
    )


def _head_axes(fig: go.Figure, n_layers: int, n_heads: int) -> None:
    fig.update_xaxes(title_text="head", dtick=1 if n_heads <= 16 else None, showgrid=False)
    fig.update_yaxes(title_text="layer", autorange="reversed", dtick=1 if n_layers <= 16 else None, showgrid=False)


def head_heatmap(scores: Any, title: str | None = None, colorscale: str = "Viridis", *,
                 zmin: float | None = None, zmax: float | None = None, height: int = 360) -> go.Figure:
    """``[layer, head]`` scores as a heatmap: head on x, layer on y (layer 0 on top), hover ``L{l}H{h}: value``.

    ``zmin``/``zmax`` fix the colour range (e.g. one range for a before/after pair)."""
    grid = _grid(scores, "scores")
    fig = go.Figure(_head_trace(grid, colorscale, zmin=zmin, zmax=zmax))
    _head_axes(fig, *grid.shape)
    return style_figure(fig, title=title, height=height)


def difference_heatmap(before: Any, after: Any, title: str | None = None, *, height: int = 360) -> go.Figure:
    """``after − before`` per head, diverging RdBu colours centred at 0 (blue: up, red: down)."""
    before_grid, after_grid = _grid(before, "before"), _grid(after, "after")
    if before_grid.shape != after_grid.shape:
        raise ValueError(f"before {before_grid.shape} and after {after_grid.shape} differ in shape")
    difference = after_grid - before_grid
    fig = go.Figure(_head_trace(difference, "RdBu", zmid=0.0, colorbar_title="Δ"))
    _head_axes(fig, *before_grid.shape)
    if not np.any(np.nan_to_num(difference)):
        fig.add_annotation(text="no change", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font=dict(size=14, color="#555"))
    return style_figure(fig, title=title, height=height)


LAYER_CURVE_SCORES = ("label_attention", "correct_label_attention", "sink_attention")


def layer_curves(comparison: Comparison, *, scores: Sequence[str] = LAYER_CURVE_SCORES,
                 include_max: bool = False, height: int = 380) -> go.Figure:
    """Per-layer mean over heads (and optionally max over heads) of some scores, before and after training.

    One subplot per score present in both ``before`` and ``after``; x is the layer.
    """
    present = [name for name in scores if name in comparison.before and name in comparison.after]
    if not present:
        fig = go.Figure()
        fig.add_annotation(text="no per-layer scores in this comparison", showarrow=False)
        return style_figure(fig, title="Per-layer attention", height=200)
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=[SCORE_LABELS.get(n, n) for n in present],
                        horizontal_spacing=0.07)
    for col, name in enumerate(present, start=1):
        for stage, color in (("before", BEFORE_COLOR), ("after", AFTER_COLOR)):
            grid = _grid(getattr(comparison, stage)[name], f"{stage}[{name!r}]")
            layers = list(range(grid.shape[0]))
            with np.errstate(all="ignore"):
                mean, peak = np.nanmean(grid, axis=1), np.nanmax(grid, axis=1)
            fig.add_trace(go.Scatter(x=layers, y=[_finite(v) for v in mean], mode="lines+markers",
                                     name=f"{stage}, mean over heads", legendgroup=f"{stage}-mean",
                                     showlegend=col == 1, line=dict(color=color),
                                     hovertemplate=f"{stage} L%{{x}} mean: %{{y:.4f}}<extra></extra>"),
                          row=1, col=col)
            if include_max:
                fig.add_trace(go.Scatter(x=layers, y=[_finite(v) for v in peak], mode="lines",
                                         name=f"{stage}, max over heads", legendgroup=f"{stage}-max",
                                         showlegend=col == 1, line=dict(color=color, dash="dot"),
                                         hovertemplate=f"{stage} L%{{x}} max: %{{y:.4f}}<extra></extra>"),
                              row=1, col=col)
        fig.update_xaxes(title_text="layer", dtick=1 if len(layers) <= 32 else None, row=1, col=col)
    fig.update_yaxes(title_text="attention mass", row=1, col=1)
    return style_figure(fig, title="Per-layer attention (mean over heads)" + (" and max" if include_max else ""),
                   height=height, legend=dict(orientation="h", y=-0.22))


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def weight_change_plot(weight_change: Any, *, title: str = "Weight change per layer",
                       height: int = 340) -> go.Figure:
    """Grouped bars per layer: Frobenius norms of ΔW_Q (column 0) and ΔW_K (column 1)."""
    array = _array(weight_change)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"weight_change must be [layer, 2] (ΔW_Q, ΔW_K), got shape {tuple(array.shape)}")
    layers = list(range(array.shape[0]))
    fig = go.Figure([
        go.Bar(x=layers, y=[_finite(v) for v in array[:, 0]], name="‖ΔW<sub>Q</sub>‖<sub>F</sub>", marker_color="#1f77b4",
               hovertemplate="L%{x} ‖ΔW_Q‖: %{y:.4g}<extra></extra>"),
        go.Bar(x=layers, y=[_finite(v) for v in array[:, 1]], name="‖ΔW<sub>K</sub>‖<sub>F</sub>", marker_color="#ff7f0e",
               hovertemplate="L%{x} ‖ΔW_K‖: %{y:.4g}<extra></extra>"),
    ])
    fig.update_xaxes(title_text="layer", dtick=1 if len(layers) <= 32 else None)
    fig.update_yaxes(title_text="Frobenius norm")
    if not np.any(np.nan_to_num(array)):
        fig.add_annotation(text="W_Q and W_K did not change", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font=dict(size=14, color="#555"))
    return style_figure(fig, title=title, height=height, barmode="group", legend=dict(orientation="h", y=1.08))


TRACE_LOSS_KEYS = (("loss", "loss"), ("award_term", "award term"), ("penalty_term", "penalty term"),
                   ("e2e_loss", "E2E loss"))


def training_trace(trace: Sequence[dict], *, height: int = 520) -> go.Figure:
    """The run's log as 2×2 subplots against the optimizer step: loss terms; penalty A_t (and the next one);
    mean number of heads passing the filter; validation accuracy (when the run validated)."""
    steps = [event for event in trace if event.get("event") == "step" and "step" in event]
    validations = [event for event in trace if event.get("event") == "validation" and "step" in event]
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.16, horizontal_spacing=0.08, subplot_titles=(
        "loss terms", "penalty A_t", "mean heads passing the filter", "validation accuracy"))
    if not steps and not validations:
        fig.add_annotation(text="no training log in this comparison", showarrow=False, xref="paper",
                           yref="paper", x=0.5, y=0.5)
    x = [event["step"] for event in steps]

    def series(key: str) -> list | None:
        values = [event.get(key) for event in steps]
        if all(value is None for value in values):
            return None
        return [None if value is None or not math.isfinite(float(value)) else float(value) for value in values]

    for key, label in TRACE_LOSS_KEYS:
        if (y := series(key)) is not None:
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=label, legendgroup="loss"), row=1, col=1)
    if (y := series("penalty")) is not None:
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="A_t", line=dict(color="#9467bd")), row=1, col=2)
    if (y := series("next_penalty")) is not None:
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="A_t+1", line=dict(color="#9467bd", dash="dot")),
                      row=1, col=2)
    if (y := series("mean_heads")) is not None:
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="mean heads", line=dict(color="#2ca02c")),
                      row=2, col=1)
    accuracies = [(event["step"], event.get("accuracy")) for event in validations if event.get("accuracy") is not None]
    if accuracies:
        fig.add_trace(go.Scatter(x=[s for s, _ in accuracies], y=[float(a) for _, a in accuracies],
                                 mode="lines+markers", name="validation accuracy", line=dict(color="#d62728")),
                      row=2, col=2)
    else:
        # paper coordinates: plotly.js does not draw the axes of a subplot without traces, so "x4 domain"
        # would not resolve
        fig.add_annotation(text="no validation in this run", showarrow=False, xref="paper", yref="paper",
                           x=sum(fig.layout.xaxis4.domain) / 2, y=sum(fig.layout.yaxis4.domain) / 2)
    few_steps = len({event["step"] for event in steps + validations}) <= 12
    for row in (1, 2):
        for col in (1, 2):
            fig.update_xaxes(title_text="step" if row == 2 else None, dtick=1 if few_steps else None,
                             row=row, col=col)
    return style_figure(fig, title="Training trace", height=height, legend=dict(orientation="h", y=-0.14))


ACCURACY_KEYS = (("accuracy", "accuracy"), ("macro_f1", "macro F1"),
                 ("mean_true_label_probability", "mean P(true label)"), ("ece", "ECE (lower is better)"))


def accuracy_rows(accuracy: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, Δ) rows from ``{"fore": metrics or None, "post": metrics or None}``."""
    fore, post = accuracy.get("fore") or {}, accuracy.get("post") or {}
    keys = [(key, label) for key, label in ACCURACY_KEYS if key in fore or key in post]
    keys += [(key, key) for key in {**fore, **post} if key not in dict(ACCURACY_KEYS)
             and isinstance((fore.get(key) if key in fore else post.get(key)), (int, float))]
    rows = []
    for key, label in keys:
        a, b = fore.get(key), post.get(key)
        delta = (float(b) - float(a)) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append((label, format_value(a), format_value(b), "–" if delta is None else f"{delta:+.4f}"))
    return rows


def accuracy_table(accuracy: dict, *, height: int | None = None) -> go.Figure:
    """A plotly Table: metric, before (fore test), after (post test), Δ."""
    rows = accuracy_rows(accuracy) or [("no test metrics", "–", "–", "–")]
    columns = [list(column) for column in zip(*rows)]
    fig = go.Figure(go.Table(
        header=dict(values=["metric", "before", "after", "Δ (after − before)"], fill_color="#e8eef7",
                    align="left", height=28, font=dict(size=13)),
        cells=dict(values=columns, align="left", height=28, font=dict(size=13),
                   fill_color=[["#ffffff", "#f7f7f7"] * len(rows)]),
        columnwidth=[2.2, 1, 1, 1.4],
    ))
    return style_figure(fig, title=None, height=height or 24 + 30 * (len(rows) + 1),
                   margin=dict(l=10, r=10, t=8, b=8))


def attention_view(tokens: Sequence[str], patterns: Any, head_names: Sequence[str] | None = None, **kwargs):
    """circuitsvis ``attention_heads`` view of ``patterns`` ``[n_heads, pos, pos]`` over ``tokens``.

    Get its HTML with :func:`circuitsvis_html` (inline JavaScript); never ``str()`` or ``_repr_html_()`` it.
    """
    import circuitsvis as cv

    array = _array(patterns)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != array.shape[2] or array.shape[1] != len(tokens):
        raise ValueError(f"patterns must be [n_heads, {len(tokens)}, {len(tokens)}] for {len(tokens)} tokens, "
                         f"got shape {tuple(array.shape)}")
    if head_names is not None and len(head_names) != array.shape[0]:
        raise ValueError(f"{len(head_names)} head names for {array.shape[0]} patterns")
    kwargs.setdefault("mask_upper_tri", True)
    return cv.attention.attention_heads(attention=np.nan_to_num(array).tolist(), tokens=[str(t) for t in tokens],
                                        attention_head_names=list(head_names) if head_names is not None else None,
                                        **kwargs)


def circuitsvis_html(view) -> str:
    """The view's self-contained HTML (circuitsvis's JavaScript inlined, ~1.3 MB): never the CDN version."""
    return view.local_src
