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
