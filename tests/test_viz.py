"""Figures of abft_lens.reporting.viz on a synthetic Comparison: shapes, data, hover text, colour settings."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from abft_lens.reporting import viz
from abft_lens.training.comparison import Comparison

SCORES = ["induction", "previous_token", "duplicate_token", "copying", "label_attention",
          "correct_label_attention", "label_correctness", "filter_pass_rate", "sink_attention"]


def synthetic_comparison(n_layers: int = 4, n_heads: int = 6, n_steps: int = 20, n_tokens: int = 12,
                         seed: int = 0, validate_every: int = 5, scores: list[str] = SCORES) -> Comparison:
    """A Comparison with every field filled: random scores (fixed seed), a fake log, one prompt example."""
    g = torch.Generator().manual_seed(seed)
    before = {name: torch.rand(n_layers, n_heads, generator=g) for name in scores}
    after = {name: (v + 0.1 * torch.randn(n_layers, n_heads, generator=g)).clamp(0, 1) for name, v in before.items()}
    trace = []
    for step in range(n_steps):
        trace.append(dict(event="step", step=step, loss=1.0 / (step + 1), award_term=-0.5 / (step + 1),
                          penalty_term=0.2 + 0.01 * step, e2e_loss=None, penalty=0.5 + 0.01 * step,
                          next_penalty=0.51 + 0.01 * step, mean_heads=3.0 + step % 3,
                          head_counts=[[step % 2] * n_heads for _ in range(n_layers)]))
        if validate_every and step % validate_every == validate_every - 1:
            trace.append(dict(event="validation", step=step, accuracy=0.6 + 0.01 * step, macro_f1=0.5))

    def patterns():
        x = torch.rand(2, n_tokens, n_tokens, generator=g).tril()
        return (x / x.sum(-1, keepdim=True)).tolist()

    tokens = [f" tok{i}" for i in range(n_tokens)]
    tokens[3], tokens[5] = " </script><b>", " <!--"  # hostile token strings: the page must stay intact
    return Comparison(
        before=before, after=after, weight_change=torch.rand(n_layers, 2, generator=g),
        accuracy={"fore": dict(accuracy=0.61, macro_f1=0.55, mean_true_label_probability=0.52, ece=0.1),
                  "post": dict(accuracy=0.7, macro_f1=0.66, mean_true_label_probability=0.6, ece=0.08)},
        trace=trace,
        run={"train": {"method": "ABFT", "lr": 5e-4, "k": 4},
             "model": {"name": "tiny", "n_layers": n_layers, "n_heads": n_heads}, "task": {"name": "sst2"}},
        prompt_example={"tokens": tokens, "heads": [[1, 2], [3, 0]],
                        "before": patterns(), "after": patterns()},
    )


@pytest.fixture
def comparison() -> Comparison:
    return synthetic_comparison()


def z_array(trace) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in trace.z], dtype=np.float64)


# ------------------------------------------------------------------------------------------- heatmaps


def test_head_heatmap_z_is_the_tensor_with_layer_on_y_and_head_on_x(comparison):
    scores = comparison.before["induction"]
    fig = viz.head_heatmap(scores, "induction", "Viridis")
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    heat = fig.data[0]
    assert heat.type == "heatmap"
    np.testing.assert_allclose(z_array(heat), scores.double().numpy(), rtol=0, atol=1e-12)
    assert list(heat.x) == list(range(6)) and list(heat.y) == list(range(4))
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 on top
    assert fig.layout.title.text == "induction"
    assert heat.customdata[2][5] == "L2H5"
    assert "%{customdata}" in heat.hovertemplate and "%{z" in heat.hovertemplate


def test_head_heatmap_accepts_numpy_and_lists_and_keeps_nan_as_gaps():
    grid = np.array([[0.1, math.nan], [0.3, 0.4]])
    fig = viz.head_heatmap(grid.tolist(), zmin=0, zmax=1)
    assert fig.data[0].z[0][1] is None
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 1
    fig.to_json()  # valid JSON despite the NaN
    with pytest.raises(ValueError, match="layer, head"):
        viz.head_heatmap(torch.zeros(2, 3, 4))


def test_difference_heatmap_is_after_minus_before_centred_at_zero(comparison):
    before, after = comparison.before["label_correctness"], comparison.after["label_correctness"]
    fig = viz.difference_heatmap(before, after, "Δ")
    heat = fig.data[0]
    np.testing.assert_allclose(z_array(heat), (after - before).double().numpy(), atol=1e-7)
    assert heat.zmid == 0
    assert heat.colorscale == go.Heatmap(colorscale="RdBu").colorscale
    assert heat.customdata[0][0] == "L0H0"
    with pytest.raises(ValueError, match="differ in shape"):
        viz.difference_heatmap(before, after[:2])


# ---------------------------------------------------------------------------------------------- curves


def test_layer_curves_are_per_layer_means_before_and_after(comparison):
    fig = viz.layer_curves(comparison)
    assert len(fig.data) == 3 * 2  # three scores x (before, after), means only
    names = ["label_attention", "correct_label_attention", "sink_attention"]
    for i, name in enumerate(names):
        for j, stage in enumerate(("before", "after")):
            trace = fig.data[2 * i + j]
            assert list(trace.x) == [0, 1, 2, 3]
            expected = getattr(comparison, stage)[name].double().mean(dim=1).numpy()
            np.testing.assert_allclose(np.array(trace.y, dtype=float), expected, atol=1e-9)
            assert trace.name.startswith(stage)
    assert [a.text for a in fig.layout.annotations][:3] == [viz.SCORE_LABELS[n] for n in names]


def test_layer_curves_with_max_and_missing_scores(comparison):
    fig = viz.layer_curves(comparison, include_max=True)
    assert len(fig.data) == 3 * 4
    peak = [t for t in fig.data if t.name == "after, max over heads"][0]
    np.testing.assert_allclose(np.array(peak.y, dtype=float),
                               comparison.after["label_attention"].double().amax(dim=1).numpy(), atol=1e-9)
    del comparison.before["sink_attention"]
    assert len(viz.layer_curves(comparison).data) == 2 * 2
    empty = Comparison(before={}, after={}, weight_change=torch.zeros(2, 2), accuracy={})
    assert len(viz.layer_curves(empty).data) == 0


def test_weight_change_plot_has_q_and_k_bars_per_layer(comparison):
    fig = viz.weight_change_plot(comparison.weight_change)
    assert [t.type for t in fig.data] == ["bar", "bar"]
    assert "W<sub>Q</sub>" in fig.data[0].name and "W<sub>K</sub>" in fig.data[1].name
    for column, trace in enumerate(fig.data):
        assert list(trace.x) == [0, 1, 2, 3]
        np.testing.assert_allclose(trace.y, comparison.weight_change[:, column].double().numpy(), atol=1e-9)
    assert fig.layout.barmode == "group"
    with pytest.raises(ValueError, match=r"\[layer, 2\]"):
        viz.weight_change_plot(torch.zeros(3, 3))


# ----------------------------------------------------------------------------------------------- trace


def test_training_trace_x_is_the_steps(comparison):
    fig = viz.training_trace(comparison.trace)
    by_name = {t.name: t for t in fig.data}
    steps = [e["step"] for e in comparison.trace if e["event"] == "step"]
    assert set(by_name) == {"loss", "award term", "penalty term", "A_t", "A_t+1", "mean heads",
                            "validation accuracy"}  # e2e_loss is None throughout: no curve
    for name in ("loss", "award term", "penalty term", "A_t", "A_t+1", "mean heads"):
        assert list(by_name[name].x) == steps
    np.testing.assert_allclose(by_name["loss"].y, [1 / (s + 1) for s in steps])
    np.testing.assert_allclose(by_name["A_t"].y, [0.5 + 0.01 * s for s in steps])
    validation = [e for e in comparison.trace if e["event"] == "validation"]
    assert list(by_name["validation accuracy"].x) == [e["step"] for e in validation] == [4, 9, 14, 19]
    np.testing.assert_allclose(by_name["validation accuracy"].y, [e["accuracy"] for e in validation])
    assert by_name["validation accuracy"].xaxis == "x4"  # bottom-right subplot
    assert by_name["mean heads"].xaxis == "x3"


def test_training_trace_without_validation_or_log():
    trace = synthetic_comparison(validate_every=0).trace
    fig = viz.training_trace(trace)
    assert "validation accuracy" not in {t.name for t in fig.data}
    assert any("no validation" in a.text for a in fig.layout.annotations)
    empty = viz.training_trace([])
    assert len(empty.data) == 0 and any("no training log" in a.text for a in empty.layout.annotations)


# --------------------------------------------------------------------------------------------- accuracy


def test_accuracy_table_before_after_and_delta(comparison):
    fig = viz.accuracy_table(comparison.accuracy)
    table = fig.data[0]
    assert table.type == "table"
    metric, before, after, delta = (list(column) for column in table.cells.values)
    assert metric[0] == "accuracy" and before[0] == "0.6100" and after[0] == "0.7000" and delta[0] == "+0.0900"
    assert metric[-1].startswith("ECE") and delta[-1] == "-0.0200"
    assert len(metric) == 4


def test_accuracy_table_when_a_test_was_skipped():
    fig = viz.accuracy_table({"fore": None, "post": {"accuracy": 0.5}})
    metric, before, after, delta = (list(column) for column in fig.data[0].cells.values)
    assert (metric, before, after, delta) == (["accuracy"], ["–"], ["0.5000"], ["–"])
    assert list(viz.accuracy_table({"fore": None, "post": None}).data[0].cells.values[0]) == ["no test metrics"]


# -------------------------------------------------------------------------------------------- circuitsvis


def test_attention_view_and_its_offline_html(comparison):
    example = comparison.prompt_example
    view = viz.attention_view(example["tokens"], example["before"], ["L1H2", "L3H0"])
    html = viz.circuitsvis_html(view)
    assert html == view.local_src
    assert "CircuitsVis.render(" in html and "AttentionHeads" in html
    assert "unpkg.com" not in html and 'from "http' not in html  # the CDN version imports from unpkg
    assert "L3H0" in html and "tok11" in html
    with pytest.raises(ValueError, match="patterns must be"):
        viz.attention_view(example["tokens"][:5], example["before"], ["L1H2", "L3H0"])
    with pytest.raises(ValueError, match="head names"):
        viz.attention_view(example["tokens"], example["before"], ["L1H2"])


def test_unchanged_heads_say_so():
    grid = torch.rand(2, 3)
    fig = viz.difference_heatmap(grid, grid.clone())
    assert [a.text for a in fig.layout.annotations] == ["no change"]
    assert not viz.difference_heatmap(grid, grid + 0.1).layout.annotations
    assert [a.text for a in viz.weight_change_plot(torch.zeros(3, 2)).layout.annotations] == ["W_Q and W_K did not change"]
    assert not viz.weight_change_plot(torch.ones(3, 2)).layout.annotations
