"""Weight-space mixing of an E2E and an ABFT run: exact corner points, bit-identical restore, mismatches, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from abft_lens.backends.bridge import is_bridge
from conftest import named_tensors

from abft_lens.cli import main
from abft_lens.errors import AbftLensError
from abft_lens.evaluation.evaluator import evaluate
from abft_lens.studies.mixing import MixResult, lambda_grid, mix_runs, mixed_tensors, trained_tensors
from abft_lens.backends.loading import load_model
from abft_lens.training.runs import run_training
from abft_lens.data.tasks import load_task
from abft_lens.training.train import TrainConfig
from abft_lens.training.trainable import TrainableConfig

N_TEST = 8
GRID = [-0.5, 0.0, 1.0]



def _train(run_dir, method, model="tiny", trainable=None):
    config = TrainConfig(method=method, train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0,
                         trainable=trainable or TrainableConfig())
    run_training(load_model(model), load_task("sst2"), config, run_dir=run_dir, n_test=N_TEST, fore_test=False,
                 progress=False)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    e2e = _train(root / "e2e", "E2E")  # full W_Q/_W_K
    abft = _train(root / "abft", "ABFT", trainable=TrainableConfig(kind="lora", lora_r=4))  # LoRA
    return e2e, abft, root


def _params(model):
    return named_tensors(model)  # the Q/K tensors by TransformerLens name and layout on either version


def test_grid_values():
    grid = lambda_grid()
    assert grid == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert lambda_grid(0, 1, 0.5) == [0.0, 0.5, 1.0]
    with pytest.raises(AbftLensError, match=r"grid_max=0 is below grid_min=1\."):
        lambda_grid(1, 0, 0.5)
    with pytest.raises(AbftLensError, match=r"grid_step=0.25"):
        lambda_grid(0, 1, 0)


def test_grid_messages_name_python_options_in_python_and_flags_on_the_command_line(capsys):
    from abft_lens.cli import main

    assert main(["mix", "a", "b", "--grid-min", "1", "--grid-max", "0"]) == 2
    err = capsys.readouterr().err
    assert "--grid-max 0.0 is below --grid-min 1.0" in err and "grid_max" not in err


def test_corners_equal_base_and_post_tests_and_weights_are_restored(runs):
    e2e, abft, _ = runs
    model = load_model("tiny")
    before = _params(model)
    base = evaluate(model, load_task("sst2"), k=4, n_test=N_TEST)
    result = mix_runs(model, e2e, abft, n_test=N_TEST, lambdas_e2e=GRID, lambdas_abft=GRID, progress=False)
    after = _params(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "θ₀ not restored bit-identically"
    assert result.grid.shape == (3, 3)
    post_e = json.loads((e2e / "post_test.json").read_text())["metrics"]
    post_a = json.loads((abft / "post_test.json").read_text())["metrics"]
    assert result.value(0.0, 0.0) == base.accuracy
    assert result.value(1.0, 0.0) == post_e["accuracy"]
    assert result.value(0.0, 1.0) == post_a["accuracy"]  # accuracy itself is exact
    # the LoRA run's post test on a bridge ran PEFT's x·W + x·A·B, mixing writes the merged W + B·A: float rounding
    for name in base.metrics:  # every metric, not only accuracy, is exact at the corners
        assert result.metrics[name][1][1] == base.metrics[name]
        assert result.metrics[name][2][1] == post_e[name]
        assert result.metrics[name][1][2] == (pytest.approx(post_a[name], abs=1e-6) if is_bridge(model) else post_a[name])
    assert result.runs["e2e"]["post_test_accuracy"] == post_e["accuracy"]
    best = result.best
    assert best["accuracy"] == float(result.grid.max())
    assert result.value(best["lambda_e2e"], best["lambda_abft"]) == best["accuracy"]
    table = result.markdown()
    assert table.count("\n") == 1 + 3 and "**" in table
    again = MixResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert torch.equal(again.grid, result.grid) and again.best == result.best


def test_trained_tensors_and_mixing_arithmetic(runs):
    e2e, abft, _ = runs
    model = load_model("tiny")
    before = _params(model)
    te, ta = trained_tensors(e2e, model), trained_tensors(abft, model)
    assert all(torch.equal(before[n], p) for n, p in _params(model).items())
    assert set(te) == set(ta) and all(n.endswith(("W_Q", "_W_K")) for n in te)
    base = {n: before[n] for n in te}
    assert any(not torch.equal(te[n], base[n]) for n in te) and any(not torch.equal(ta[n], base[n]) for n in ta)
    half = mixed_tensors(base, te, ta, 0.5, 0.5)
    for n in base:
        assert torch.equal(mixed_tensors(base, te, ta, 1.0, 0.0)[n], te[n])
        assert torch.equal(mixed_tensors(base, te, ta, 0.0, 1.0)[n], ta[n])
        torch.testing.assert_close(half[n], base[n] + 0.5 * (te[n] - base[n]) + 0.5 * (ta[n] - base[n]))


def test_mismatched_runs_raise(runs, tmp_path):
    e2e, abft, root = runs
    other = _train(tmp_path / "other-model", "ABFT", model="tiny:seed=1")
    q_only = _train(tmp_path / "q-only", "ABFT", trainable=TrainableConfig(targets=("q",)))
    loaded = load_model("tiny")
    with pytest.raises(AbftLensError, match="different base models"):
        mix_runs(loaded, e2e, other, n_test=N_TEST, lambdas_e2e=[0.0], lambdas_abft=[0.0], progress=False)
    with pytest.raises(AbftLensError, match="different tensors"):
        mix_runs(loaded, e2e, q_only, n_test=N_TEST, lambdas_e2e=[0.0], lambdas_abft=[0.0], progress=False)
    with pytest.raises(AbftLensError, match="loaded model"):
        mix_runs(load_model("tiny:seed=1"), e2e, abft, n_test=N_TEST, lambdas_e2e=[0.0], lambdas_abft=[0.0],
                 progress=False)
    with pytest.raises(AbftLensError, match="not an abft-lens run"):
        mix_runs(loaded, e2e, tmp_path, n_test=N_TEST, progress=False)


def test_cli_writes_json_and_html(runs, tmp_path, capsys):
    e2e, abft, _ = runs
    out, page = tmp_path / "mix.json", tmp_path / "mix.html"
    code = main(["mix", str(e2e), str(abft), "--model", "tiny", "--dataset", "sst2", "--n-test", str(N_TEST),
                 "--grid-min", "0", "--grid-max", "1", "--grid-step", "0.5", "--output", str(out),
                 "--html", str(page)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["lambdas_e2e"] == [0.0, 0.5, 1.0] and len(data["accuracy"]) == 3
    assert data["best"]["accuracy"] == max(max(row) for row in data["accuracy"])
    text = page.read_text()
    assert "Plotly.newPlot" in text and "<table" in text
    assert '<script src="' not in text and "<link" not in text  # plotly.js inlined: nothing fetched
    assert "| λ_E" in capsys.readouterr().out
    assert main(["mix", str(e2e), str(tmp_path), "--model", "tiny"]) == 2
