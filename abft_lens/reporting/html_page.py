"""The report page container: figures, attention views and tables laid out as one self-contained, offline HTML
page (plotly.js inlined once, circuitsvis views inlined), with optional PNG export through a local Chromium."""


from __future__ import annotations

import functools
import html as html_lib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from abft_lens.reporting import viz
from abft_lens.errors import AbftLensError
from abft_lens.io import atomic_write_text

if TYPE_CHECKING:
    pass

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
