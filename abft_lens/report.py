"""One self-contained, offline HTML page comparing a run's heads before and after training.

``build_report(comparison)`` lays out the figures of :mod:`abft_lens.viz`; ``Report.html()`` is a single page
with plotly.js inlined once and the circuitsvis attention views inlined (their ``local_src``), so it opens from
disk with no network: no CDN, no web fonts, no external URL at all. ``report_from_run(run_dir)`` computes (or
reuses) ``RUN_DIR/comparison.json`` and writes ``RUN_DIR/report.html``.
"""

from __future__ import annotations

import functools
import html as html_lib
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from . import viz
from .errors import AbftLensError
from .io import atomic_write_text, read_json, write_json

if TYPE_CHECKING:
    from .compare import Comparison

COMPARISON_FILE = "comparison.json"
REPORT_FILE = "report.html"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 16px 24px 48px; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin: 0.3em 0 0.2em; } h2 { font-size: 1.25em; margin: 1.6em 0 0.4em;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 1.05em; margin: 1em 0 0.2em; }
p.note { color: #555; margin: 0.2em 0 0.6em; font-size: 0.92em; }
nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; font-size: 0.95em; }
table.meta { border-collapse: collapse; font-size: 0.92em; margin: 6px 0 10px; }
table.meta td, table.meta th { padding: 3px 12px 3px 0; text-align: left; vertical-align: top; }
table.meta th { color: #555; font-weight: 600; }
.headline { font-size: 1.1em; margin: 8px 0; } .up { color: #1a7f37; } .down { color: #b42318; }
.row { display: grid; gap: 10px; align-items: start; }
.cols-1 { grid-template-columns: minmax(0, 1fr); } .cols-2 { grid-template-columns: repeat(2, minmax(0, 1fr)); }
.cols-3 { grid-template-columns: repeat(3, minmax(0, 1fr)); }
.figure { min-width: 0; } .figure .caption { font-size: 0.85em; color: #555; margin: 2px 0 0 6px; }
.attention { border: 1px solid #e3e3e3; border-radius: 6px; padding: 4px 10px; margin: 8px 0 16px; min-width: 0;
              overflow: hidden; }
"""


@dataclass
class FigureItem:
    """One plotly figure on the page; ``key`` names its div (``fig-<key>``) and its PNG file."""

    key: str
    figure: go.Figure
    caption: str | None = None
    png_width: int = 900


@dataclass
class Section:
    id: str
    title: str
    items: list[FigureItem] = field(default_factory=list)
    intro_html: str = ""
    columns: int = 1
    rows: list[tuple[str, list[FigureItem]]] = field(default_factory=list)  # (row heading, figures) grids


@dataclass
class AttentionItem:
    """A circuitsvis view (``attention_heads``) and its heading."""

    title: str
    view: Any


@dataclass
class Report:
    """An offline HTML report: ``html()``, ``save(path)``, ``save_pngs(folder)``; displays itself in Jupyter."""

    title: str
    sections: list[Section]
    attention: list[AttentionItem] = field(default_factory=list)
    attention_note: str = ""

    @property
    def figure_items(self) -> list[FigureItem]:
        items = []
        for section in self.sections:
            items += section.items
            for _, row in section.rows:
                items += row
        return items

    @property
    def figures(self) -> dict[str, go.Figure]:
        """Every plotly figure, in page order, by key."""
        return {item.key: item.figure for item in self.figure_items}

    # ------------------------------------------------------------------------------------------ html

    def html(self) -> str:
        """The whole page as one string: plotly.js inlined once, circuitsvis views inlined, no external URL."""
        from plotly.offline import get_plotlyjs

        esc = html_lib.escape
        nav = " ".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in self.sections)
        if self.attention or self.attention_note:
            nav += ' <a href="#attention">Attention patterns</a>'
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)}</title>",
            f"<style>{_CSS}</style>",
            "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>",
            f"<script>{get_plotlyjs()}</script>",
            "</head>",
            "<body>",
            f"<h1>{esc(self.title)}</h1>",
            f"<nav>{nav}</nav>",
        ]
        for section in self.sections:
            parts.append(f'<section id="{esc(section.id)}"><h2>{esc(section.title)}</h2>')
            parts.append(section.intro_html)
            if section.items:
                parts.append(_figure_row(section.items, section.columns))
            for heading, row in section.rows:
                parts.append(f"<h3>{esc(heading)}</h3>")
                parts.append(_figure_row(row, section.columns))
            parts.append("</section>")
        if self.attention or self.attention_note:
            parts.append('<section id="attention"><h2>Attention patterns</h2>')
            if self.attention_note:
                parts.append(f'<p class="note">{esc(self.attention_note)}</p>')
            library_emitted, views = False, []
            for item in self.attention:
                source = viz.circuitsvis_html(item.view)
                library = _circuitsvis_library()
                if library and library in source:
                    # Each local_src inlines the same 1.3 MB bundle; loading it twice re-registers TensorFlow.js
                    # kernels (hundreds of console warnings). Emit it once as a classic script (a global
                    # CircuitsVis) and keep each view's own div and render call.
                    head, tail = source.split(library, 1)
                    if not library_emitted:
                        parts.append(f"<script>{library}</script>")
                        library_emitted = True
                    source = head + tail
                # circuitsvis writes its target as <div id=... .../>, which HTML does not close: close it, so the
                # views never nest inside each other.
                source = _SELF_CLOSING_DIV.sub(r"\1></div>", source, count=1)
                source = _escape_render_call(source)
                views.append(f'<div class="attention"><h3>{esc(item.title)}</h3>{source}</div>')
            if views:
                parts.append(f'<div class="row cols-{min(len(views), 2)}">{"".join(views)}</div>')
            parts.append("</section>")
        parts += ["</body>", "</html>", ""]
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        """The same page for Jupyter, inside an ``<iframe srcdoc>`` so that the notebook's require.js and CSS
        cannot interfere with plotly.js or circuitsvis. Offline: nothing is fetched."""
        return (f'<iframe srcdoc="{html_lib.escape(self.html(), quote=True)}" '
                'style="width: 100%; height: 900px; border: 1px solid #ddd;" '
                'sandbox="allow-scripts allow-downloads"></iframe>')

    # ----------------------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write the page atomically (complete or absent, never half-written); return the path."""
        return atomic_write_text(path, self.html())

    def save_pngs(self, folder: str | Path, *, scale: float = 1.0) -> list[Path]:
        """Export every figure as ``folder/<key>.png`` with kaleido and a local Chromium/Chrome (offline:
        plotly.js from the installed plotly package, MathJax off). Raises AbftLensError without one."""
        try:
            import kaleido
        except ImportError:
            raise AbftLensError("PNG export needs the kaleido package, which is not installed.",
                                "pip install 'kaleido==1.5.0' (it is in abft-lens[test]), or leave out --png.") from None
        browser = find_browser()
        if browser is None:
            raise AbftLensError(
                "PNG export needs a Chromium or Chrome browser, and none was found "
                f"(looked for {', '.join(BROWSER_NAMES)} on PATH and $BROWSER_PATH).",
                "apt-get install -y --no-install-recommends chromium (or set BROWSER_PATH), or leave out --png; "
                "the HTML report itself needs no browser.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        items = self.figure_items
        staging = Path(tempfile.mkdtemp(prefix=".png-", dir=folder))
        try:
            specs = [dict(fig=item.figure.to_dict(), path=staging / f"{item.key}.png",
                          opts=dict(format="png", width=item.png_width,
                                    height=int(item.figure.layout.height or 450), scale=scale))
                     for item in items]
            try:
                kaleido.write_fig_from_object_sync(specs, kopts=dict(mathjax=False, path=browser))
            except Exception as error:  # kaleido/choreographer raise many types; one message for the user
                raise AbftLensError(f"PNG export with kaleido and {browser} failed: {type(error).__name__}: {error}",
                                    "check that the browser starts headless (chromium --headless --no-sandbox), "
                                    "or leave out --png.") from error
            written = []
            for item in items:
                target = folder / f"{item.key}.png"
                os.replace(staging / f"{item.key}.png", target)
                written.append(target)
            return written
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def find_browser() -> str | None:
    """A Chromium/Chrome executable: ``$BROWSER_PATH`` if it exists, else the first of BROWSER_NAMES on PATH."""
    explicit = os.environ.get("BROWSER_PATH")
    if explicit and Path(explicit).is_file():
        return explicit
    for name in BROWSER_NAMES:
        if found := shutil.which(name):
            return found
    return None


_SELF_CLOSING_DIV = re.compile(r'^(\s*<div id="circuits-vis-[^"]*"[^>]*?)\s*/>')


def _escape_render_call(source: str) -> str:
    """Make the props of circuitsvis's render call safe inside <script>: a token such as ``</script>`` or
    ``<!--`` would otherwise end or break the script. ``<\\/`` and ``<\\!`` read the same inside JS strings."""
    start = source.rfind("CircuitsVis.render(")
    end = source.rfind("</script>")
    if start < 0 or end < start:
        return source
    call = source[start:end].replace("</", "<\\/").replace("<!--", "<\\!--")
    return source[:start] + call + source[end:]


@functools.lru_cache(maxsize=1)
def _circuitsvis_library() -> str | None:
    """circuitsvis's inline bundle exactly as ``local_src`` embeds it (None if this circuitsvis differs)."""
    try:
        import circuitsvis
    except ImportError:
        return None
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8").replace("</script>", "")
    return text if len(text) > 1000 else None


def _figure_row(items: list[FigureItem], columns: int) -> str:
    cells = []
    for item in items:
        div = item.figure.to_html(include_plotlyjs=False, full_html=False, div_id=f"fig-{item.key}",
                                  config=viz.PLOTLY_CONFIG)
        caption = f'<div class="caption">{html_lib.escape(item.caption)}</div>' if item.caption else ""
        cells.append(f'<div class="figure">{div}{caption}</div>')
    return f'<div class="row cols-{max(1, min(columns, 3))}">{"".join(cells)}</div>'


# ------------------------------------------------------------------------------------------------ build

SCORE_ORDER = tuple(viz.SCORE_LABELS)


def _score_names(comparison: "Comparison") -> list[str]:
    common = [name for name in comparison.before if name in comparison.after]
    return [n for n in SCORE_ORDER if n in common] + [n for n in common if n not in SCORE_ORDER]


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _run_rows(comparison: "Comparison") -> list[tuple[str, str]]:
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
                       ("penalty_mode", "penalty mode"), ("restricted_gradient", "restricted gradient")):
        if key in train:
            rows.append((label, str(train[key])))
    steps = [e for e in comparison.trace if e.get("event") == "step"]
    if steps:
        rows.append(("optimizer steps logged", str(len(steps))))
    rows.append(("layers × heads", "×".join(str(d) for d in _grid_shape(comparison))))
    return rows


def _grid_shape(comparison: "Comparison") -> tuple[int, ...]:
    for grid in comparison.before.values():
        return tuple(int(d) for d in grid.shape)
    return (comparison.n_layers,)


def _summary_html(comparison: "Comparison") -> str:
    esc = html_lib.escape
    parts = []
    fore, post = (comparison.accuracy or {}).get("fore") or {}, (comparison.accuracy or {}).get("post") or {}
    a, b = _float(fore.get("accuracy")), _float(post.get("accuracy"))
    if a is not None and b is not None:
        css = "up" if b > a else "down" if b < a else ""
        parts.append(f'<p class="headline">Test accuracy {a:.4f} → <b>{b:.4f}</b> '
                     f'(<span class="{css}">{b - a:+.4f}</span>)</p>')
    elif a is not None or b is not None:
        parts.append(f'<p class="headline">Test accuracy: before {viz._fmt(a)}, after {viz._fmt(b)}</p>')
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _run_rows(comparison))
    parts.append(f'<table class="meta">{rows}</table>')
    changed = _top_changes(comparison)
    if changed:
        cells = "".join(f"<tr><th>{esc(score)}</th><td>{esc(text)}</td></tr>" for score, text in changed)
        parts.append("<h3>Largest per-head changes</h3>"
                     f'<table class="meta">{cells}</table>')
    return "\n".join(parts)


def _top_changes(comparison: "Comparison", n: int = 3) -> list[tuple[str, str]]:
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


def build_report(comparison: "Comparison", *, title: str | None = None, scores: list[str] | None = None,
                 include_max: bool = True) -> Report:
    """Lay out a :class:`Comparison`: summary and accuracy, training trace, per-layer curves, before/after/
    difference heatmaps of every score, weight change, and circuitsvis attention views of the chosen heads."""
    import torch

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
    sections.append(heatmaps)
    sections.append(Section("weights", "Weight change", items=[FigureItem(
        "weight_change", viz.weight_change_plot(comparison.weight_change),
        "Frobenius norm of the change of W_Q and W_K per layer (all heads of the layer)", png_width=1000)]))

    attention, note = [], ""
    example = comparison.prompt_example or {}
    tokens, heads = example.get("tokens"), example.get("heads")
    if tokens and heads and example.get("before") is not None and example.get("after") is not None:
        names_shown = [f"L{int(layer)}H{int(head)}" for layer, head in heads]
        note = (f"One prompt ({len(tokens)} tokens), heads {', '.join(names_shown)}. "
                "Click a head to enlarge it; hover a cell to read the source and destination tokens.")
        for stage in ("before", "after"):
            attention.append(AttentionItem(f"{stage.capitalize()} training",
                                           viz.attention_view(tokens, example[stage], names_shown)))
    else:
        note = "This comparison holds no prompt example, so no attention patterns are shown."
    return Report(title=title, sections=sections, attention=attention, attention_note=note)


# --------------------------------------------------------------------------------------------- from run


@dataclass
class RunReport:
    """What :func:`report_from_run` wrote."""

    report: Report
    html_path: Path
    comparison_path: Path
    reused: bool
    png_paths: list[Path] = field(default_factory=list)


def load_comparison(path: str | Path) -> "Comparison":
    from .compare import Comparison

    try:
        return Comparison.from_dict(read_json(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AbftLensError(f"{path} could not be read as a comparison ({type(error).__name__}: {error}).",
                            "delete it to compute it again from the run.") from error


def report_from_run(run_dir: str | Path, *, output: str | Path | None = None, n_prompts: int = 64,
                    png: bool = False, title: str | None = None, **compare_kwargs) -> RunReport:
    """Write ``RUN_DIR/report.html`` (or ``output``) for a run folder.

    Reuses ``RUN_DIR/comparison.json`` when it exists (no model needed); otherwise computes it with
    :func:`abft_lens.compare.compare_run` (``n_prompts`` prompts; extra keyword arguments go to it) and saves
    it. With ``png=True`` also exports every figure into ``<output stem>_png/``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "config.json").is_file():
        raise AbftLensError(f"{run_dir} is not an abft-lens run folder (no config.json).",
                            "point at a folder written by `abft-lens train` or `abft-lens demo`.")
    comparison_path = run_dir / COMPARISON_FILE
    reused = comparison_path.is_file()
    if reused:
        comparison = load_comparison(comparison_path)
    else:
        from . import compare

        compare_run = getattr(compare, "compare_run", None)
        if compare_run is None:
            raise AbftLensError(f"{comparison_path} does not exist and this version cannot compute it "
                                "(abft_lens.compare.compare_run is missing).",
                                "update abft-lens, or provide comparison.json.")
        comparison = compare_run(run_dir, n_prompts=n_prompts, **compare_kwargs)
        write_json(comparison_path, comparison.to_dict())
    report = build_report(comparison, title=title)
    html_path = report.save(Path(output) if output is not None else run_dir / REPORT_FILE)
    pngs = report.save_pngs(html_path.with_name(f"{html_path.stem}_png")) if png else []
    return RunReport(report=report, html_path=html_path, comparison_path=comparison_path, reused=reused,
                     png_paths=pngs)
