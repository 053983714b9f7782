"""Weight-space mixing of an E2E run and an ABFT run (paper §6): accuracy of θ₀ + λ_E·Δ_E + λ_A·Δ_A.

Both runs must come from the same base model θ₀ and train the same tensors. A run's delta is, per trained
tensor, its *effective* trained value minus the base: the full W_Q/_W_K (full runs) or W + scale·B@A (LoRA
runs), i.e. exactly what the run's post test used; so a full E2E run mixes with a LoRA ABFT run as long as the
effective tensor names (``blocks.{l}.attn.W_Q`` ...) agree.

Efficiency and exactness: the base and both trained values of every mixed tensor are kept (model dtype); each
grid point writes ``θ₀ + λ_E (θ_E − θ₀) + λ_A (θ_A − θ₀)`` computed in float64 into the model's parameters in
place (no reload), then evaluates the same prebuilt test prompts. In float64 the point (1, 0) reproduces θ_E
bit-for-bit (and (0, 1) θ_A, (0, 0) θ₀), so those points equal the runs' post tests and the base exactly. The
base tensors are written back bit-identically when the sweep ends, also on an error or interrupt.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.errors import AbftLensError
from abft_lens.backends import qk
from abft_lens.backends.provenance import LoadedModel, model_info
from abft_lens.data.prompts import prompt_builder, test_prompts
from abft_lens.data.tasks import task_from_description
from abft_lens.evaluation.evaluator import evaluate_prompts
from abft_lens.io import atomic_write_text
from abft_lens.reporting.viz import PLOTLY_CONFIG, style_figure  # the shared figure look
from abft_lens.run_files import POST_TEST_FILE, TRAINED_FILE, read_run_json
from abft_lens.training.adapters import attach
from abft_lens.training.run_folder import non_finite, read_run_config, read_trained
from abft_lens.training.train import TrainConfig

METRIC = "accuracy"
GRID_FIX = "use λ values of moderate size (e.g. the default grid, grid_min=-0.5 grid_max=1.5)."
GRID_NAMES = ("grid_min", "grid_max", "grid_step")


# ------------------------------------------------------------------------------------------ run tensors


def run_meta(run_dir: str | Path) -> dict:
    """config.json of a run folder (AbftLensError when the folder is not a run with saved tensors, or when it or
    the post test is damaged)."""
    meta = read_run_config(run_dir, trained=True)
    read_run_json(run_dir, POST_TEST_FILE)
    return meta


def trained_tensors(run_dir: str | Path, model: LoadedModel) -> dict[str, Tensor]:
    """The effective trained tensors of a run (after merging LoRA) as CPU copies in the model's dtype.

    ``model`` must hold the base weights; it is left bit-identical (full runs: the touched tensors are
    copied back; LoRA runs: the adapters are removed again).
    """
    run_dir = Path(run_dir)
    meta = run_meta(run_dir)
    config = TrainConfig.from_dict(meta["train"])
    tensors = read_trained(run_dir)  # readable and finite, before the model is touched
    trainable = attach(model, config.trainable)
    names = [qk.effective_name(name) for name, _ in trainable.named_parameters()]
    full = config.trainable.kind == "full"
    # load_state_dict writes into a full run's own parameters: keep the base to put it back
    base = qk.snapshot(model, list(dict.fromkeys(names))) if full else {}
    try:
        try:
            trainable.load_state_dict(tensors)
        except ValueError as error:
            raise AbftLensError(f"the tensors in {run_dir / TRAINED_FILE} do not fit model {model_info(model).name}: {error}",
                                f"load the base model the run was trained on ({meta['model']['name']}).") from error
        return trainable.merged_state_dict()
    finally:
        if full:
            trainable.merge()
            qk.restore(model, base)
        else:
            trainable.remove()


def mixed_tensors(base: Mapping[str, Tensor], first: Mapping[str, Tensor], second: Mapping[str, Tensor],
                  lam_first: float, lam_second: float) -> dict[str, Tensor]:
    """``base + lam_first·(first − base) + lam_second·(second − base)`` per tensor, computed in float64 and
    returned in the base's dtype (so (1, 0) gives ``first`` exactly and (0, 0) ``base``)."""
    out = {}
    for name, b in base.items():
        b64 = b.double()
        value = b64
        if lam_first:
            value = value + lam_first * (first[name].double() - b64)
        if lam_second:
            value = value + lam_second * (second[name].double() - b64)
        out[name] = value.to(b.dtype)
    return out


# ----------------------------------------------------------------------------------------------- grid


def lambda_grid(grid_min: float = -0.5, grid_max: float = 1.5, grid_step: float = 0.25) -> list[float]:
    """``grid_min, grid_min + grid_step, ... , grid_max`` (inclusive), rounded to 10 decimals (0 and 1 exact)."""
    minimum, maximum, step = grid_min, grid_max, grid_step
    if not (math.isfinite(minimum) and math.isfinite(maximum) and math.isfinite(step)) or step <= 0:
        raise AbftLensError(f"lambda grid [{minimum}, {maximum}] step {step} is invalid.",
                            "give finite bounds and a positive step (e.g. grid_step=0.25).", names=GRID_NAMES)
    if maximum < minimum:
        raise AbftLensError(f"grid_max={maximum} is below grid_min={minimum}.", "swap them.", names=GRID_NAMES)
    if not math.isfinite((maximum - minimum) / step):
        raise AbftLensError(f"lambda grid [{minimum:g}, {maximum:g}] step {step:g}: its span overflows a float.",
                            GRID_FIX, names=GRID_NAMES)
    n = int(math.floor((maximum - minimum) / step + 1e-9)) + 1
    if n > 201:
        raise AbftLensError(f"the lambda grid has {n} points per axis ({n * n} evaluations).",
                            "use a larger grid_step or a narrower range.", names=GRID_NAMES)
    return [round(minimum + i * step, 10) + 0.0 for i in range(n)]


@dataclass
class MixResult:
    """Metrics over the λ grid. ``grid[i][j]`` = accuracy at ``λ_E = lambdas_e2e[i]``, ``λ_A = lambdas_abft[j]``."""

    lambdas_e2e: list[float]
    lambdas_abft: list[float]
    grid: Tensor  # [n_lambda_e2e, n_lambda_abft] accuracy, float64
    metrics: dict[str, list[list[float]]]  # every metric of evaluate() on the same grid
    runs: dict[str, dict]  # "e2e"/"abft": run_dir, method, trainable kind, post-test accuracy in the run folder
    info: dict = field(default_factory=dict)

    def value(self, lam_e2e: float, lam_abft: float) -> float:
        return float(self.grid[self.lambdas_e2e.index(lam_e2e), self.lambdas_abft.index(lam_abft)])

    @property
    def best(self) -> dict:
        """The grid point of highest accuracy (the first one in row-major order on ties)."""
        flat = int(torch.argmax(self.grid))  # torch.argmax returns the first maximal index
        i, j = divmod(flat, len(self.lambdas_abft))
        return {"lambda_e2e": self.lambdas_e2e[i], "lambda_abft": self.lambdas_abft[j],
                METRIC: float(self.grid[i, j])}

    def to_dict(self) -> dict:
        return {"lambdas_e2e": self.lambdas_e2e, "lambdas_abft": self.lambdas_abft,
                "accuracy": self.grid.tolist(), "best": self.best, "metrics": self.metrics,
                "runs": self.runs, **self.info}

    @classmethod
    def from_dict(cls, data: dict) -> "MixResult":
        known = ("lambdas_e2e", "lambdas_abft", "accuracy", "best", "metrics", "runs")
        return cls(data["lambdas_e2e"], data["lambdas_abft"], torch.tensor(data["accuracy"], dtype=torch.float64),
                   data["metrics"], data["runs"], {k: v for k, v in data.items() if k not in known})

    def markdown(self) -> str:
        """Accuracy table: one row per λ_E, one column per λ_A; the best cell in bold."""
        best = self.best
        head = "| λ_E \\ λ_A | " + " | ".join(f"{a:g}" for a in self.lambdas_abft) + " |"
        rule = "|---|" + "---|" * len(self.lambdas_abft)
        rows = []
        for i, e in enumerate(self.lambdas_e2e):
            cells = []
            for j, a in enumerate(self.lambdas_abft):
                text = f"{float(self.grid[i, j]):.4f}"
                if (e, a) == (best["lambda_e2e"], best["lambda_abft"]):
                    text = f"**{text}**"
                cells.append(text)
            rows.append(f"| {e:g} | " + " | ".join(cells) + " |")
        return "\n".join([head, rule, *rows])

    def figure(self, title: str | None = None):
        """Plotly heatmap of accuracy over (λ_A, λ_E) with the base, E2E, ABFT and best points marked."""
        import plotly.graph_objects as go


        best = self.best
        fig = go.Figure(go.Heatmap(
            z=self.grid.tolist(), x=self.lambdas_abft, y=self.lambdas_e2e, colorscale="Viridis",
            colorbar=dict(title="accuracy"),
            hovertemplate="λ_A %{x}<br>λ_E %{y}<br>accuracy %{z:.4f}<extra></extra>"))
        marks = [("base θ₀", 0.0, 0.0, "circle"), ("E2E", 1.0, 0.0, "square"), ("ABFT", 0.0, 1.0, "diamond"),
                 (f"best {best[METRIC]:.4f}", best["lambda_e2e"], best["lambda_abft"], "star")]
        for name, e, a, symbol in marks:
            if e in self.lambdas_e2e and a in self.lambdas_abft:
                fig.add_trace(go.Scatter(x=[a], y=[e], mode="markers+text", text=[name], textposition="top center",
                                         marker=dict(symbol=symbol, size=12, color="white",
                                                     line=dict(color="black", width=1.5)),
                                         name=name, hoverinfo="name"))
        title = title or (f"θ₀ + λ_E·Δ_E + λ_A·Δ_A: {self.info.get('task', '')} accuracy "
                          f"(n={self.info.get('n_test', '?')}, k={self.info.get('k', '?')})")
        style_figure(fig, title=title, height=560, showlegend=False)
        fig.update_xaxes(title_text="λ_A (ABFT delta)")
        fig.update_yaxes(title_text="λ_E (E2E delta)")
        return fig

    def save_html(self, path: str | Path) -> Path:
        """The heatmap and the markdown table as one offline HTML page (plotly.js inlined), written atomically."""

        figure = self.figure().to_html(include_plotlyjs=True, full_html=False, config=PLOTLY_CONFIG)
        table = self._html_table()
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>abft-lens weight mixing</title></head>"
                f"<body style='font-family:system-ui,sans-serif'>{figure}<h3>accuracy</h3>{table}</body></html>")
        return atomic_write_text(path, page)

    def _html_table(self) -> str:
        head = "".join(f"<th>{a:g}</th>" for a in self.lambdas_abft)
        rows = "".join(
            f"<tr><th>{e:g}</th>" + "".join(f"<td>{float(self.grid[i, j]):.4f}</td>"
                                             for j in range(len(self.lambdas_abft))) + "</tr>"
            for i, e in enumerate(self.lambdas_e2e))
        corner = html.escape("λ_E \\ λ_A")
        return f"<table border='1' cellpadding='3'><tr><th>{corner}</th>{head}</tr>{rows}</table>"


def mix_runs(
    model: LoadedModel,
    run_e2e: str | Path,
    run_abft: str | Path,
    *,
    task=None,
    k: int | None = None,
    n_test: int | None = 64,
    lambdas_e2e: Sequence[float] | None = None,
    lambdas_abft: Sequence[float] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> MixResult:
    """Accuracy of ``θ₀ + λ_E·Δ_E + λ_A·Δ_A`` on the first ``n_test`` fixed test prompts, over a λ grid.

    ``model`` must hold the base model both runs were trained from (its name must match their config.json);
    it is left bit-identical. ``task`` defaults to the runs' dataset (the StaICC dataset or the custom file their
    config.json records, checked by its sha256: :func:`~abft_lens.data.tasks.task_from_description`), ``k`` to
    the runs' k. Grids default to :func:`lambda_grid`. Every λ must be a finite number, and no point is
    evaluated whose mixed weights (or label probabilities) are not finite: such a grid is refused with one
    message (checked at its corners before the sweep).
    """
    runs = {"e2e": Path(run_e2e), "abft": Path(run_abft)}
    metas = {key: run_meta(path) for key, path in runs.items()}
    k, task = _shared_settings(model, runs, metas, k, task)
    lambdas_e2e = _checked_lambdas(lambda_grid() if lambdas_e2e is None else lambdas_e2e, "λ_E")
    lambdas_abft = _checked_lambdas(lambda_grid() if lambdas_abft is None else lambdas_abft, "λ_A")
    runs_info = _runs_info(runs, metas)

    trained = {key: trained_tensors(path, model) for key, path in runs.items()}
    if set(trained["e2e"]) != set(trained["abft"]):
        only_e, only_a = sorted(set(trained["e2e"]) - set(trained["abft"])), sorted(set(trained["abft"]) - set(trained["e2e"]))
        raise AbftLensError(f"the runs train different tensors: only in {runs['e2e']}: {only_e[:4]}, only in "
                            f"{runs['abft']}: {only_a[:4]}.", "mix runs with the same trainable set (targets, bias).")
    builder = prompt_builder(model, task)
    prompts = test_prompts(builder, k, n_test)
    names_mixed = sorted(trained["e2e"])
    points = [(e, a) for e in lambdas_e2e for a in lambdas_abft]
    metrics: dict[str, list[list[float]]] = {}
    with qk.restored(model, names_mixed) as base:
        for e, a in _corners(lambdas_e2e, lambdas_abft):  # |weights| is largest at a corner of the grid
            _finite_mix(base, trained, e, a)
        with tqdm(total=len(points), desc="mixing", unit="point", disable=not progress) as bar:
            for index, (e, a) in enumerate(points):
                qk.restore(model, _finite_mix(base, trained, e, a))
                result = evaluate_prompts(model, builder, prompts, batch_size=batch_size)
                _check_probabilities(result.probs, e, a)
                i, j = divmod(index, len(lambdas_abft))
                for name, value in result.metrics.items():
                    metrics.setdefault(name, [[math.nan] * len(lambdas_abft) for _ in lambdas_e2e])[i][j] = value
                bar.update(1)
    info = {"model": model_info(model).name, "task": task.name, "k": k, "n_test": len(prompts),
            "tensors": len(names_mixed)}
    return MixResult(lambdas_e2e, lambdas_abft, torch.tensor(metrics[METRIC], dtype=torch.float64), metrics,
                     runs_info, info)


def _checked_lambdas(values: Sequence[float], axis: str) -> list[float]:
    values = list(values)
    if not values:
        raise AbftLensError("the lambda grid is empty.", "give at least one value per axis.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AbftLensError(f"{axis} {value!r} is not a finite number.", GRID_FIX, names=GRID_NAMES)
    return [float(value) for value in values]


def _corners(first: list[float], second: list[float]) -> list[tuple[float, float]]:
    return [(e, a) for e in (min(first), max(first)) for a in (min(second), max(second))]


def _finite_mix(base: Mapping[str, Tensor], trained: dict, lam_e2e: float, lam_abft: float) -> dict[str, Tensor]:
    """The mixed tensors of one grid point; refused when one holds an infinity or NaN (the weights overflow)."""
    mixed = mixed_tensors(base, trained["e2e"], trained["abft"], lam_e2e, lam_abft)
    bad = non_finite(mixed)
    if bad:
        raise AbftLensError(f"the mixed weights at λ_E={lam_e2e:g}, λ_A={lam_abft:g} are not finite ({bad[0]} "
                            f"overflows {mixed[bad[0]].dtype}); no accuracy is computed from them.", GRID_FIX,
                            names=GRID_NAMES)
    return mixed


def _check_probabilities(probs, lam_e2e: float, lam_abft: float) -> None:
    if not all(math.isfinite(p) for row in probs for p in row):
        raise AbftLensError(f"the mixed model at λ_E={lam_e2e:g}, λ_A={lam_abft:g} gives non-finite label "
                            "probabilities (its weights are too large); no accuracy is computed from them.", GRID_FIX,
                            names=GRID_NAMES)


def _shared_settings(model: LoadedModel, runs: dict[str, Path], metas: dict[str, dict], k: int | None, task):
    """``(k, task)`` of the mix: both runs' own (which must agree) unless given; the runs must come from the
    loaded model."""
    names = {key: meta["model"]["name"] for key, meta in metas.items()}
    if names["e2e"] != names["abft"]:
        raise AbftLensError(f"the runs come from different base models: {runs['e2e']} from {names['e2e']!r}, "
                            f"{runs['abft']} from {names['abft']!r}.", "mix two runs of the same base model.")
    name = model_info(model).name
    if name != names["e2e"]:
        raise AbftLensError(f"the runs were trained on {names['e2e']!r}, but the loaded model is {name!r}.",
                            f"load the base model {names['e2e']!r}.")
    if k is None:
        ks = {meta["train"]["k"] for meta in metas.values()}
        if len(ks) != 1:
            raise AbftLensError(f"the runs were trained with different k ({sorted(ks)}).", "pass k explicitly.",
                                names=("k",))
        k = ks.pop()
    if task is None:
        tasks = {json.dumps([meta["task"]["name"], meta["task"].get("source", {}).get("sha256")])
                 for meta in metas.values()}
        if len(tasks) != 1:
            raise AbftLensError(f"the runs were trained on different datasets ({sorted(tasks)}).",
                                "pass the dataset to evaluate on (task= in Python, --dataset on the command line).")
        task = task_from_description(next(iter(metas.values()))["task"])
    return k, task


def _runs_info(runs: dict[str, Path], metas: dict[str, dict]) -> dict[str, dict]:
    """What the result records of each run: its folder, method, trainable kind and post-test accuracy."""
    info = {}
    for key, path in runs.items():
        post = read_run_json(path, POST_TEST_FILE, keys=("metrics",))
        info[key] = {"run_dir": str(path), "method": metas[key]["train"]["method"],
                     "trainable": metas[key]["train"]["trainable"]["kind"],
                     "post_test_accuracy": post["metrics"].get(METRIC) if post is not None else None,
                     "post_test_n": metas[key].get("n_test")}
    return info


__all__ = ["MixResult", "mix_runs", "lambda_grid", "trained_tensors", "mixed_tensors"]
