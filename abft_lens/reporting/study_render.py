"""How a study's tables are written: markdown, CSV (one line per model, method and dataset) and an offline HTML
page with the figures. What the numbers mean is in :mod:`abft_lens.reporting.study_tables`."""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path

from abft_lens.errors import AbftLensError
from abft_lens.io import atomic_write_text
from abft_lens.evaluation.label_prior import PRIOR_SHIFT
from abft_lens.reporting.study_figures import accuracy_figure, validation_figure
from abft_lens.reporting.study_generalization import generalization_grid_rows, generalization_rows, ood_tests
from abft_lens.reporting.study_tables import (AVERAGE, COLLAPSE_MARGIN, COLLAPSE_SHARE, MISSING, SIGNIFICANCE,
                                              ModelResults, StudyTables, cost_rows, display, head_to_head, study_tables)

__all__ = ["Grid", "render_table1", "render_table2", "write_study_tables"]

FORMATS = ("markdown", "csv", "html")
STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:80em} table{border-collapse:collapse;"
         "margin:0.5em 0 1.5em} td,th{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right} "
         "td:first-child,th:first-child{text-align:left} caption{text-align:left;font-size:0.9em;color:#444;"
         "padding-bottom:0.3em}")


def write_study_tables(study_dir: str | Path) -> list[Path]:
    """Write ``table1.{md,csv,html}`` (and ``table2.*`` when a run has a generalization test) atomically."""
    study_dir = Path(study_dir)
    tables = study_tables(study_dir)
    written = []
    for suffix, fmt in ((".md", "markdown"), (".csv", "csv"), (".html", "html")):
        written.append(atomic_write_text(study_dir / f"table1{suffix}", render_table1(tables, fmt)))
        second = render_table2(tables, fmt)
        if second is not None:
            written.append(atomic_write_text(study_dir / f"table2{suffix}", second))
    return written


@dataclass
class Grid:
    """A titled table of strings: ``header`` and ``rows`` (first column = row names)."""

    title: str
    note: str
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", self.note, "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return (f"<h3>{html.escape(self.title)}</h3>\n<table><caption>{html.escape(self.note)}</caption>"
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n")


def _percent(value: float | None, std: float | None = None, n: int = 1, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.{digits}f}" + (f" ± {100 * std:.{digits}f}" if std is not None and n > 1 else "")


def _p_text(p: float | None) -> str:
    return "" if p is None else (" (p<0.001)" if p < 0.001 else f" (p={p:.3f})")


def _mark(cell) -> str:
    """↑/↓ (Holm-adjusted significance against vanilla), ⇢ (a gain that a prior shift may explain), ⚠ (collapse)."""
    mark = {1: " ↑", -1: " ↓", 0: ""}[cell.sign]
    if cell.significant > 0 and cell.sign == 0:
        mark = " ⇢"
    elif cell.shifted:
        mark += " ⇢"
    return mark + _p_text(cell.p_value) + (" ⚠" if cell.collapsed else "")


def table1_grids(results: ModelResults) -> list[Grid]:
    """Accuracy (with Holm-adjusted p, marks, improved/hurt counts), macro-F1, the tests, head to head, label
    balance, kept steps, cost."""
    datasets = results.datasets
    header = ["Method"] + [display(d) for d in datasets] + [AVERAGE]
    grids = []
    for metric, title in (("accuracy", "Accuracy (%)"), ("macro_f1", "Macro-F1 (%)")):
        table = results.table(metric)
        rows = []
        for method in results.methods:
            row = [method]
            for dataset in datasets + [AVERAGE]:
                cell = results.cells.get((method, dataset))
                stats = table.cell(method, dataset) if method in table.values else None
                text = _percent(*stats) if stats else "–"
                if cell is not None and stats and metric == "accuracy" and method != "vanilla":
                    text += _mark(cell)
                row.append(text)
            if metric == "accuracy":
                signs = [results.cells[(method, d)].sign for d in datasets if (method, d) in results.cells]
                row.append("" if method == "vanilla" else f"{signs.count(1)} / {signs.count(-1)}")
            rows.append(row)
        note = (f"mean ± std over seeds. p: exact sign test against vanilla over the test queries (per query, the "
                f"change in correct answers summed over its prompts and the seeds), Holm-adjusted over the "
                f"datasets of the row; ↑/↓: adjusted p < {SIGNIFICANCE}; ⇢: a trained run's predicted labels moved "
                f"toward its training queries' label shares (total variation >= {PRIOR_SHIFT:.2f} from vanilla's), "
                "counted as improved only if it also beats the prior control; ⚠: collapsed onto one label."
                if metric == "accuracy" else
                "mean ± std over seeds (macro-F1 over the labels that occur as gold or prediction).")
        grids.append(Grid(title, note, header + (["improved / hurt"] if metric == "accuracy" else []), rows))
    grids.append(_tests_grid(results))
    pairs = _pairs_grid(results)
    if pairs is not None:
        grids.append(pairs)
    grids.append(_balance_grid(results))
    steps = _steps_grid(results)
    if steps is not None:
        grids.append(steps)
    cost = _cost_grid(results)
    if cost is not None:
        grids.append(cost)
    return grids


def _balance_grid(results: ModelResults) -> Grid:
    datasets = results.datasets
    balance = [["gold majority-label rate"] + [_percent(results.majority.get(d), digits=1) for d in datasets]]
    for method in results.methods:
        row = [method]
        for dataset in datasets:
            cell = results.cells.get((method, dataset))
            if cell is None or not cell.shares:
                row.append("–")
                continue
            row.append(_percent(sum(cell.shares) / len(cell.shares), digits=1)
                       + (f" ⚠ {cell.collapsed}/{len(cell.shares)}" if cell.collapsed else ""))
        balance.append(row)
    return Grid("Label balance (%)", "share of prompts given the most frequent predicted label, mean over "
                f"seeds; ⚠ n/N: runs flagged as collapsed (share above {100 * COLLAPSE_SHARE:.0f} %, or more "
                f"than {100 * COLLAPSE_MARGIN:.0f} points above the gold majority-label rate, and above "
                "vanilla's own share by a point).", ["Method"] + [display(d) for d in datasets], balance)


def _steps_grid(results: ModelResults) -> Grid | None:
    steps = []
    for method in results.methods:
        kept = [results.cells.get((method, d)) for d in results.datasets]
        if any(cell is not None and any(s is not None for s in cell.kept_steps) for cell in kept):
            steps.append([method] + ["–" if cell is None else ", ".join("–" if s is None else str(s)
                                                                       for s in cell.kept_steps) for cell in kept])
    if not steps:
        return None
    return Grid("Validation guard", "the step each seed's run kept (0: the untrained model).",
                ["Method"] + [display(d) for d in results.datasets], steps)


def _tests_grid(results: ModelResults) -> Grid:
    rows = []
    for method in results.methods:
        if method == "vanilla":
            continue
        row = [method]
        for dataset in results.datasets:
            cell = results.cells.get((method, dataset))
            if cell is None or cell.test is None:
                row.append("–")
                continue
            seeds = ", ".join(f"{p.gained}/{p.lost}" + _p_text(p.p_value).replace(" (", " ").rstrip(")")
                              for p in cell.per_seed)
            text = f"{cell.test.better}/{cell.test.worse} q, p={cell.test.p_value:.3g}, Holm {cell.adjusted_p:.3g}"
            text += f"; per seed {seeds}"
            if cell.prior_test is not None:
                text += (f"; vs prior {cell.prior_test.better}/{cell.prior_test.worse} q, "
                         f"Holm {cell.prior_adjusted_p:.3g}")
            row.append(text + (f"; ⇢ {cell.shifted}/{len(cell.seeds)}" if cell.shifted else ""))
        rows.append(row)
    return Grid("Tests against vanilla", "queries better/worse than vanilla (q), the sign test's p and its Holm "
                "adjustment over the datasets of the row; per seed: prompts gained/lost and the exact McNemar p; "
                "vs prior: the same test against the label-prior control (shared seeds); ⇢ n/N: runs flagged as "
                "a prior shift.", ["Method"] + [display(d) for d in results.datasets], rows)


def _pair_rows(rows: list[dict], where: str) -> list[list[str]]:
    """Table cells of paired-test rows (:func:`head_to_head`, :func:`ood_tests`): pair, ``row[where]``, counts, p,
    Holm p and the verdict (the better method where Holm p < SIGNIFICANCE)."""
    body = []
    for row in rows:
        winner = row["second"] if row["second_better"] > row["first_better"] else row["first"]
        verdict = f"{winner} better" if row["p_holm"] < SIGNIFICANCE else "no difference"
        body.append([f"{row['first']} vs {row['second']}", display(row[where]),
                     f"{row['first_better']} / {row['second_better']}", str(row["seeds"]), f"{row['p']:.3g}",
                     f"{row['p_holm']:.3g}", verdict])
    return body


def _pairs_grid(results: ModelResults) -> Grid | None:
    rows = head_to_head(results)
    if not rows:
        return None
    body = _pair_rows(rows, "dataset")
    return Grid("Head to head", "queries where the first / the second method answers more prompts right (summed "
                "over the seeds both have), exact sign test, Holm over the datasets of the pair; a verdict needs "
                f"Holm p < {SIGNIFICANCE}.", ["Pair", "Dataset", "first / second better", "seeds", "p", "p Holm",
                                               "verdict"], body)


def _cost_grid(results: ModelResults) -> Grid | None:
    rows = cost_rows(results)
    if not rows:
        return None

    def number(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    body = [[row["method"], str(row["runs"]), number(row["train_seconds"], ".0f"), number(row["step_seconds"], ".0f"),
             number(row["steps"], ".0f"),
             number(row["prompts_per_second"], ".2f"), number(row["peak_rss_mib"], ",.0f"),
             "–" if row["relative_time"] is None else f"{row['relative_time']:.2f}×"] for row in rows]
    return Grid("Cost per run", "means over the runs: training wall seconds as the run recorded them, the "
                "optimizer steps' own seconds from log.jsonl (every session of a resumed run; no validation), "
                "optimizer steps, training prompts (forward + backward) per second of the steps' seconds, the "
                "cell's peak RSS; time relative to ABFT, on the steps' seconds.",
                ["Method", "runs", "train s", "step s", "steps", "prompts/s", "peak RSS MiB", "time vs ABFT"], body)


def table2_grids(results: ModelResults) -> list[Grid]:
    rows = generalization_rows(results)
    if not rows:
        return []
    body = [[row["method"], *(_percent(*row[part]) if row[part] else "–" for part in ("id", "ood")),
             "–" if row["parameters"] is None else f"{row['parameters']:,}",
             "–" if row["relative_time"] is None else f"{row['relative_time']:.2f}×"] for row in rows]
    grids = [Grid("Table 2: in-domain vs out-of-domain accuracy (%)",
                  "ID: accuracy on the trained dataset; OOD: mean over the other paper datasets; each averaged over "
                  "the study's datasets per seed, then mean ± std over seeds. Training time relative to ABFT (the "
                  "optimizer steps' seconds).",
                  ["Method", "ID", "OOD", "trained parameters", "training time"], body)]
    evaluated, per_dataset = generalization_grid_rows(results)
    if per_dataset:
        cells = [[row["method"], display(row["trained"]), str(row["seeds"])]
                 + [f"{100 * row['post'][d]:.1f} ({100 * row['fore'][d]:.1f})" if d in row["post"] else "–"
                    for d in evaluated]
                 + ["–" if row["ood_post"] is None else f"{100 * row['ood_post']:.1f} ({100 * row['ood_fore']:.1f})"]
                 for row in per_dataset]
        grids.append(Grid("Table 2 per trained dataset: accuracy (%) after training (vanilla's in brackets)",
                          "mean over the seeds of each (method, trained dataset); the same prompts before and after; "
                          "OOD: mean over the datasets other than the trained one.",
                          ["Method", "trained on", "seeds"] + [display(d) for d in evaluated] + ["OOD"], cells))
    tests = ood_tests(results)
    if tests:
        grids.append(Grid("Table 2 tests: out of domain", "the datasets other than the trained one, the same prompts on "
                          "both sides: per dataset, queries where the first / the second answers more prompts right "
                          "(summed over the seeds both have), summed over the datasets; exact sign test, Holm over "
                          f"the trained datasets of the pair; a verdict needs Holm p < {SIGNIFICANCE}.",
                          ["Pair", "trained on", "first / second better", "seeds", "p", "p Holm", "verdict"],
                          _pair_rows(tests, "trained")))
    return grids


def _heading(tables: StudyTables) -> tuple[str, str]:
    settings = tables.plan.get("settings", {})
    select = ", ".join(tables.select_metrics) or "no validation guard"
    line = (f"k={settings.get('k', 4)}, {settings.get('n_test')} test prompts per dataset, seeds "
            f"{', '.join(map(str, tables.plan['seeds']))}; validation guard selects on: {select}.")
    state = "; ".join(f"{n} cells {name}" for name, n in tables.unfinished.items())
    return f"Study {tables.study_dir.name}", line + (f" Not finished: {state}." if state else "")


def render_table1(tables: StudyTables, fmt: str) -> str:
    if fmt not in FORMATS:
        raise AbftLensError(f"unknown table format {fmt!r}.", "use markdown, csv or html.")
    if fmt == "csv":
        return table1_csv(tables)
    title, line = _heading(tables)
    failed = [f"failed: {text}" for text in tables.failed] + [f"{key}: {MISSING}" for key in tables.missing]
    if fmt == "markdown":
        parts = [f"# {title}\n", line + "\n"]
        for results in tables.models:
            parts.append(f"## Table 1: {results.model}\n")
            parts += [grid.markdown() for grid in table1_grids(results)]
        parts += ["## Missing cells\n", "\n".join(f"- {text}" for text in failed) + "\n"] if failed else []
        return "\n".join(parts)
    parts, first = [f"<h1>{html.escape(title)}</h1><p>{html.escape(line)}</p>"], True
    for results in tables.models:
        parts.append(f"<h2>Table 1: {html.escape(results.model)}</h2>")
        parts += [grid.html() for grid in table1_grids(results)]
        for figure in (accuracy_figure(results), validation_figure(results)):
            if figure is not None:
                parts.append(figure.to_html(include_plotlyjs=first, full_html=False))
                first = False
    parts += ["<h2>Missing cells</h2><ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in failed) + "</ul>"] \
        if failed else []
    return _page(title, parts)


def render_table2(tables: StudyTables, fmt: str) -> str | None:
    grids = [(results.model, "\n".join(grid.markdown() for grid in found), "".join(grid.html() for grid in found))
             for results in tables.models if (found := table2_grids(results))]
    if not grids:
        return None
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["model", "method", "id", "id_std", "ood", "ood_std", "trained_parameters", "relative_time"])
        for results in tables.models:
            for row in generalization_rows(results):
                writer.writerow([results.model, row["method"]] + [
                    "" if row[p] is None else f"{100 * row[p][i]:.4f}" for p in ("id", "ood") for i in (0, 1)]
                    + [row["parameters"], "" if row["relative_time"] is None else f"{row['relative_time']:.4f}"])
        return buffer.getvalue()
    title, line = _heading(tables)
    if fmt == "markdown":
        return "\n".join([f"# {title}\n", line + "\n"] + [f"## {model}\n\n" + text for model, text, _ in grids])
    return _page(title, [f"<h1>{html.escape(title)}</h1><p>{html.escape(line)}</p>"]
                 + [f"<h2>{html.escape(model)}</h2>" + page for model, _, page in grids])


def table1_csv(tables: StudyTables) -> str:
    """One line per (model, method, dataset) and per (model, method) average: means and stds in percent, the
    tests against vanilla (sign test over queries, Holm) and against the prior control, flags."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "method", "dataset", "runs", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std",
                     "queries_better", "queries_worse", "p_sign", "p_holm", "seed_gained_lost", "p_prior_holm",
                     "prior_shifted_runs", "counted", "majority_rate", "top_prediction_share", "collapsed_runs"])
    for results in tables.models:
        accuracy, f1 = results.table("accuracy"), results.table("macro_f1")
        for method in results.methods:
            for dataset in results.datasets + [AVERAGE]:
                a = accuracy.cell(method, dataset) if method in accuracy.values else None
                f = f1.cell(method, dataset) if method in f1.values else None
                if a is None:
                    continue
                cell = results.cells.get((method, dataset))
                test = cell.test if cell else None
                share = sum(cell.shares) / len(cell.shares) if cell and cell.shares else None
                writer.writerow([
                    results.model, method, dataset, a[2], f"{100 * a[0]:.4f}", f"{100 * a[1]:.4f}",
                    "" if f is None else f"{100 * f[0]:.4f}", "" if f is None else f"{100 * f[1]:.4f}",
                    *(("", "", "", "") if test is None else
                      (test.better, test.worse, f"{test.p_value:.6g}", f"{cell.adjusted_p:.6g}")),
                    "" if not cell else " ".join(f"{p.gained}/{p.lost}" for p in cell.per_seed),
                    "" if not cell or cell.prior_adjusted_p is None else f"{cell.prior_adjusted_p:.6g}",
                    cell.shifted if cell else "", cell.sign if cell and test is not None else "",
                    "" if dataset not in results.majority else f"{100 * results.majority[dataset]:.4f}",
                    "" if share is None else f"{100 * share:.4f}", cell.collapsed if cell else ""])
    return buffer.getvalue()


def _page(title: str, parts: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")
