"""One self-contained, offline HTML page comparing a run's heads before and after training.

``build_report(comparison)`` lays out the figures of :mod:`abft_lens.reporting.viz`; ``Report.html()`` is a single page
with plotly.js inlined once and the circuitsvis attention views inlined (their ``local_src``), so it opens from
disk with no network: no CDN, no web fonts, no external URL at all. ``report_from_run(run_dir)`` reuses
``RUN_DIR/comparison.json`` (or has :func:`abft_lens.training.comparison.compare_run` compute it) and writes
``RUN_DIR/report.html``. This module only renders: every forward pass is the training layer's.
"""

from __future__ import annotations

import html as html_lib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abft_lens.reporting import viz
from abft_lens.errors import AbftLensError
from abft_lens.io import check_folder, read_json, write_json
from abft_lens.training.comparison import Comparison, compare_run
from abft_lens.training.run_folder import read_run_config, read_trained
from abft_lens.reporting.html_page import AttentionItem, FigureItem, Report, Section
from abft_lens.reporting.study_folder import check_output
from abft_lens.run_files import COMPARISON_FILE, REPORT_FILE, check_run_files, has_trained

SCORE_ORDER = tuple(viz.SCORE_LABELS)


def _score_names(comparison: Comparison) -> list[str]:
    common = [name for name in comparison.before if name in comparison.after]
    return [n for n in SCORE_ORDER if n in common] + [n for n in common if n not in SCORE_ORDER]


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _run_rows(comparison: Comparison) -> list[tuple[str, str]]:
    run = comparison.run or {}
    train, model, task = run.get("train") or {}, run.get("model") or {}, run.get("task") or {}
    rows = []
    if model:
        shape = ", ".join(f"{model[k]} {label}" for k, label in (("n_layers", "layers"), ("n_heads", "heads"))
                          if k in model)
        rows.append(("model", f"{model.get('name', '?')}" + (f" ({shape})" if shape else "")))
    if task:
        rows.append(("task", str(task.get("name", "?"))))
    for key, label in (("method", "method"), ("k", "demonstrations k"), ("lr", "learning rate"),
                       ("train_samples", "training samples"), ("epochs", "epochs"),
                       ("penalty_mode", "penalty mode"), ("restricted_gradient", "restricted gradient"),
                       ("balance_query_labels", "balanced query labels")):
        if key in train:
            rows.append((label, str(train[key])))
    steps = [e for e in comparison.trace if e.get("event") == "step"]
    if steps:
        rows.append(("optimizer steps logged", str(len(steps))))
    rows.append(("layers × heads", "×".join(str(d) for d in _grid_shape(comparison))))
    return rows


def _grid_shape(comparison: Comparison) -> tuple[int, ...]:
    for grid in comparison.before.values():
        return tuple(int(d) for d in grid.shape)
    return (comparison.n_layers,)


def _summary_html(comparison: Comparison) -> str:
    esc = html_lib.escape
    parts = []
    fore, post = (comparison.accuracy or {}).get("fore") or {}, (comparison.accuracy or {}).get("post") or {}
    a, b = _float(fore.get("accuracy")), _float(post.get("accuracy"))
    if a is not None and b is not None:
        css = "up" if b > a else "down" if b < a else ""
        parts.append(f'<p class="headline">Test accuracy {a:.4f} → <b>{b:.4f}</b> '
                     f'(<span class="{css}">{b - a:+.4f}</span>)</p>')
    elif a is not None or b is not None:
        parts.append(f'<p class="headline">Test accuracy: before {viz.format_value(a)}, after {viz.format_value(b)}</p>')
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _run_rows(comparison))
    parts.append(f'<table class="meta">{rows}</table>')
    changed = _top_changes(comparison)
    if changed:
        cells = "".join(f"<tr><th>{esc(score)}</th><td>{esc(text)}</td></tr>" for score, text in changed)
        parts.append("<h3>Largest per-head changes</h3>"
                     f'<table class="meta">{cells}</table>')
    return "\n".join(parts)


def _top_changes(comparison: Comparison, n: int = 3) -> list[tuple[str, str]]:
    """For a few key scores, the heads whose score moved most (after − before)."""
    import torch

    rows = []
    for name in ("induction", "label_correctness", "correct_label_attention", "label_attention"):
        if name not in comparison.before or name not in comparison.after:
            continue
        diff = torch.nan_to_num(torch.as_tensor(comparison.difference(name), dtype=torch.float64))
        n_heads = diff.shape[-1]
        if not bool(diff.any()):
            rows.append((viz.SCORE_LABELS.get(name, name), "no change"))
            continue
        order = torch.argsort(diff.abs().flatten(), descending=True)[:n].tolist()
        text = ", ".join(f"L{i // n_heads}H{i % n_heads} {float(diff.flatten()[i]):+.3f}" for i in order)
        rows.append((viz.SCORE_LABELS.get(name, name), text))
    return rows


def build_report(comparison: Comparison, *, title: str | None = None, scores: list[str] | None = None,
                 include_max: bool = True) -> Report:
    """Lay out a :class:`Comparison`: summary and accuracy, training trace, per-layer curves, before/after/
    difference heatmaps of every score, weight change, and circuitsvis attention views of the chosen heads."""
    run = comparison.run or {}
    if title is None:
        method = (run.get("train") or {}).get("method", "ABFT")
        model = (run.get("model") or {}).get("name")
        task = (run.get("task") or {}).get("name")
        title = f"{method} report" + (f": {model}" if model else "") + (f" on {task}" if task else "")

    sections = [
        Section("summary", "Summary", intro_html=_summary_html(comparison),
                items=[FigureItem("accuracy", viz.accuracy_table(comparison.accuracy or {}),
                                  "fore test (base model) vs post test (trained model), same prompts",
                                  png_width=800)]),
        Section("trace", "Training trace", items=[FigureItem("training_trace", viz.training_trace(comparison.trace),
                                                             png_width=1200)]),
        Section("layers", "Per-layer attention",
                items=[FigureItem("layer_curves", viz.layer_curves(comparison, include_max=include_max),
                                  "solid: mean over heads; dotted: max over heads" if include_max else None,
                                  png_width=1200)]),
    ]
    names = scores if scores is not None else _score_names(comparison)
    heatmaps = _heatmaps(comparison, names)
    sections.append(heatmaps)
    sections.append(Section("weights", "Weight change", items=[FigureItem(
        "weight_change", viz.weight_change_plot(comparison.weight_change),
        "Frobenius norm of the change of W_Q and W_K per layer (all heads of the layer)", png_width=1000)]))

    attention, note = _attention(comparison.prompt_example or {})
    return Report(title=title, sections=sections, attention=attention, attention_note=note)


def _heatmaps(comparison: Comparison, names: list[str]) -> Section:
    """Before, after and difference heatmaps of each score; before and after share one colour range."""
    import torch

    heatmaps = Section("heatmaps", "Head scores: before, after, difference", columns=3,
                       intro_html='<p class="note">Layer on y (0 at the top), head on x. Before and after share '
                                  "one colour range; the difference is after − before (blue: up, red: down).</p>")
    for name in names:
        if name not in comparison.before or name not in comparison.after:
            raise AbftLensError(f"score {name!r} is not in the comparison.",
                                f"choose from {', '.join(_score_names(comparison))}.")
        before = torch.as_tensor(comparison.before[name], dtype=torch.float64)
        after = torch.as_tensor(comparison.after[name], dtype=torch.float64)
        both = torch.cat([before.flatten(), after.flatten()])
        both = both[torch.isfinite(both)]
        zrange = dict(zmin=float(both.min()), zmax=float(both.max())) if both.numel() else {}
        label = viz.SCORE_LABELS.get(name, name)
        heatmaps.rows.append((label, [
            FigureItem(f"{name}_before", viz.head_heatmap(before, f"{label}: before", **zrange), png_width=600),
            FigureItem(f"{name}_after", viz.head_heatmap(after, f"{label}: after", **zrange), png_width=600),
            FigureItem(f"{name}_difference", viz.difference_heatmap(before, after, f"{label}: after − before"),
                       png_width=600),
        ]))
    return heatmaps


def _attention(example: dict) -> tuple[list, str]:
    """circuitsvis views of the example prompt's chosen heads before and after, and the note above them."""
    tokens, heads = example.get("tokens"), example.get("heads")
    if not (tokens and heads and example.get("before") is not None and example.get("after") is not None):
        return [], "This comparison holds no prompt example, so no attention patterns are shown."
    names_shown = [f"L{int(layer)}H{int(head)}" for layer, head in heads]
    note = (f"One prompt ({len(tokens)} tokens), heads {', '.join(names_shown)}. "
            "Click a head to enlarge it; hover a cell to read the source and destination tokens.")
    return [AttentionItem(f"{stage.capitalize()} training", viz.attention_view(tokens, example[stage], names_shown))
            for stage in ("before", "after")], note


# --------------------------------------------------------------------------------------------- from run


@dataclass
class RunReport:
    """What :func:`report_from_run` wrote."""

    report: Report
    html_path: Path
    comparison_path: Path
    reused: bool
    png_paths: list[Path] = field(default_factory=list)


def load_comparison(path: str | Path) -> Comparison:
    try:
        return Comparison.from_dict(read_json(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AbftLensError(f"{path} could not be read as a comparison ({type(error).__name__}: {error}).",
                            "delete it to compute it again from the run.") from error


def report_from_run(run_dir: str | Path, *, output: str | Path | None = None, n_prompts: int = 64,
                    png: bool = False, title: str | None = None, **compare_kwargs) -> RunReport:
    """Write ``RUN_DIR/report.html`` (or ``output``) for a run folder.

    Reuses ``RUN_DIR/comparison.json`` when it exists (no model needed); otherwise computes it with
    :func:`abft_lens.training.comparison.compare_run` (``n_prompts`` prompts; extra keyword arguments go to it) and
    saves it. With ``png=True`` also exports every figure into ``<output stem>_png/``.
    """
    run_dir = Path(run_dir)
    read_run_config(run_dir)
    check_run_files(run_dir)  # every file readable, before anything is computed
    if output is not None:
        check_output(output)
    comparison_path = run_dir / COMPARISON_FILE
    reused = comparison_path.is_file()
    if output is None or not reused:  # comparison.json or report.html go into the run folder
        check_folder(run_dir, "RUN_DIR")
    if has_trained(run_dir):
        read_trained(run_dir)  # a diverged (NaN) run gets no report
    if reused:
        comparison = load_comparison(comparison_path)
    else:
        comparison = compare_run(run_dir, n_prompts=n_prompts, **compare_kwargs)
        write_json(comparison_path, comparison.to_dict())
    report = build_report(comparison, title=title)
    html_path = report.save(Path(output) if output is not None else run_dir / REPORT_FILE)
    pngs = report.save_pngs(html_path.with_name(f"{html_path.stem}_png")) if png else []
    return RunReport(report=report, html_path=html_path, comparison_path=comparison_path, reused=reused,
                     png_paths=pngs)
