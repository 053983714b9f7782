"""The same model under TransformerLens 3.9 and 4.x gives the same answers, and runs move between the versions.

Each test computes in this process and, through :func:`conftest.run_in`, in the other version's environment
(``.venv`` <-> ``.venv-tl4``; a missing one fails the test with the command that builds it): nothing is stored
from an earlier session. The model is the same on both sides: a random Llama saved as a Hugging Face folder
(``hf_llama_dir``), or the embedded SmolLM2 (``-m embedded``).
"""

from __future__ import annotations

import json

import pytest
import torch

import abft_lens
from abft_lens.backends import qk
from abft_lens.backends.bridge import is_bridge
from abft_lens.backends.tl import HAS_HOOKED, TL_VERSION
from conftest import run_in

EVAL = r'''
import json, sys, abft_lens
from abft_lens.backends.tl import TL_VERSION
model = abft_lens.load_model(sys.argv[1])
result = abft_lens.evaluate(model, abft_lens.load_task("sst2"), k=4, n_test=int(sys.argv[2]))
print(json.dumps({"version": TL_VERSION, "bridge": type(model).__name__ == "TransformerBridge",
                  "probs": [list(map(float, row)) for row in result.probs], "predictions": list(map(int, result.predictions))}))
'''


def _here_and_there(python: str, spec: str, n_test: int) -> tuple[dict, dict]:
    model = abft_lens.load_model(spec)
    result = abft_lens.evaluate(model, abft_lens.load_task("sst2"), k=4, n_test=n_test)
    here = {"version": TL_VERSION, "bridge": is_bridge(model), "probs": [list(map(float, r)) for r in result.probs],
            "predictions": list(map(int, result.predictions))}
    there = json.loads(run_in(python, EVAL, spec, str(n_test)).splitlines()[-1])
    return here, there


def _max_difference(a: dict, b: dict) -> float:
    return float((torch.tensor(a["probs"]) - torch.tensor(b["probs"])).abs().max())


def test_load_model_gives_this_versions_model(tiny_loaded):
    assert is_bridge(tiny_loaded) == (not HAS_HOOKED)
    assert type(tiny_loaded).__name__ == ("HookedTransformer" if HAS_HOOKED else "TransformerBridge")


def test_label_probabilities_equal_across_versions_on_a_local_folder(hf_llama_dir, other_tl_python):
    here, there = _here_and_there(other_tl_python, str(hf_llama_dir), 16)
    assert here["bridge"] != there["bridge"] and here["version"] != there["version"]
    assert _max_difference(here, there) < 1e-5
    assert here["predictions"] == there["predictions"]


@pytest.mark.embedded
def test_label_probabilities_equal_across_versions_on_smollm2(other_tl_python):
    here, there = _here_and_there(other_tl_python, "smollm2-135m", 8)
    assert _max_difference(here, there) < 1e-4  # measured 3.6e-6 on 16 prompts
    assert here["predictions"] == there["predictions"]


def test_qk_names_shapes_and_values_are_the_same_on_both_versions(hf_llama_dir, other_tl_python):
    """``qk.snapshot`` of the same folder: the same names, shapes and values (TransformerLens layout) whether
    the model is a HookedTransformer or a bridge."""
    here = qk.snapshot(abft_lens.load_model(str(hf_llama_dir)))
    code = ("import sys, json, abft_lens\nfrom abft_lens.backends import qk\n"
            "s = qk.snapshot(abft_lens.load_model(sys.argv[1]))\n"
            "print(json.dumps({k: v.tolist() for k, v in s.items()}))")
    there = json.loads(run_in(other_tl_python, code, str(hf_llama_dir)).splitlines()[-1])
    weights = {name for name in here if not qk.is_bias(qk.parse_name(name)[1])}
    assert weights == {name for name in there if not qk.is_bias(qk.parse_name(name)[1])}  # 3.9 adds zero biases
    assert {"blocks.0.attn.W_Q", "blocks.0.attn._W_K"} <= weights
    for name in weights:
        assert torch.equal(here[name], torch.tensor(there[name], dtype=here[name].dtype)), name


TRAIN = r'''
import sys, abft_lens
config = abft_lens.TrainConfig(lr=2e-2, train_samples=8, pseudo_batch_size=4, epochs=1, restricted_gradient=True,
                               threshold=0.03)
abft_lens.run_training(abft_lens.load_model(sys.argv[1]), abft_lens.load_task("sst2"), config, run_dir=sys.argv[2],
                       n_test=16)
'''

REPLAY = r'''
import sys, json, abft_lens
from abft_lens.training.runs import load_run
model = abft_lens.load_model(sys.argv[1])
load_run(sys.argv[2], model)
result = abft_lens.evaluate(model, abft_lens.load_task("sst2"), k=4, n_test=16)
print(json.dumps({"probs": [list(map(float, row)) for row in result.probs], "predictions": list(result.predictions)}))
'''


def _post_test(run_dir) -> dict:
    rows = json.loads((run_dir / "post_test.json").read_text())["per_prompt"]
    return {"probs": [r["label_probs"] for r in rows], "predictions": [r["prediction"] for r in rows]}


@pytest.mark.parametrize("trained_here", [True, False], ids=["this-version-trains", "other-version-trains"])
def test_a_run_folder_moves_between_versions(hf_llama_dir, other_tl_python, tmp_path, trained_here):
    """Trained under one version, the run folder loads under the other: the same tensor names and shapes, and
    the replayed test gives the run's own post test (label probabilities to 1e-5, the same predictions)."""
    run_dir = tmp_path / "run"
    if trained_here:
        config = abft_lens.TrainConfig(lr=2e-2, train_samples=8, pseudo_batch_size=4, epochs=1,
                                       restricted_gradient=True, threshold=0.03)
        abft_lens.run_training(abft_lens.load_model(str(hf_llama_dir)), abft_lens.load_task("sst2"), config,
                               run_dir=str(run_dir), n_test=16)
        replayed = json.loads(run_in(other_tl_python, REPLAY, str(hf_llama_dir), str(run_dir)).splitlines()[-1])
    else:
        run_in(other_tl_python, TRAIN, str(hf_llama_dir), str(run_dir))
        from abft_lens.training.runs import load_run

        model = abft_lens.load_model(str(hf_llama_dir))
        load_run(run_dir, model)
        result = abft_lens.evaluate(model, abft_lens.load_task("sst2"), k=4, n_test=16)
        replayed = {"probs": [list(map(float, r)) for r in result.probs], "predictions": list(result.predictions)}
    from safetensors.torch import load_file

    trained = load_file(run_dir / "trained.safetensors")
    assert set(trained) == {f"blocks.{l}.attn.{a}" for l in range(2) for a in ("W_Q", "_W_K")}
    assert trained["blocks.0.attn.W_Q"].shape == (4, 32, 8) and trained["blocks.0.attn._W_K"].shape == (2, 32, 8)
    base = qk.snapshot(abft_lens.load_model(str(hf_llama_dir)))
    assert not torch.equal(trained["blocks.1.attn.W_Q"], base["blocks.1.attn.W_Q"])  # training moved something
    post = _post_test(run_dir)
    assert _max_difference(replayed, post) < 1e-5 and replayed["predictions"] == post["predictions"]
