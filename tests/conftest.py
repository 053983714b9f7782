"""Shared fixtures. Everything runs offline: the hub is switched off for the whole session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import pytest
import torch

from abft_lens.backends.loading import tiny_model
from abft_lens.backends.provenance import model_info

# One intra-op thread per test process: tiny models are fastest on one thread, and parallel workers
# (pytest -n 2) with two threads each oversubscribe two cores (measured 10x slower).
torch.set_num_threads(1)


@pytest.fixture
def tiny_gqa():
    """2 layers, 4 query heads sharing 2 key/value heads, float32."""
    return tiny_model(n_layers=2, n_heads=4, n_kv_heads=2, seed=0)


@pytest.fixture
def tiny_mha():
    """2 layers, 4 heads, plain multi-head attention, float32."""
    return tiny_model(n_layers=2, n_heads=4, n_kv_heads=None, seed=1)


@pytest.fixture
def tiny_gqa64():
    """The GQA tiny model in float64, for gradient checks against plain torch."""
    return tiny_model(n_layers=2, n_heads=4, n_kv_heads=2, seed=0, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_loaded():
    """``load_model("tiny")``: the GQA tiny model with the cached tiny BPE tokenizer, once per worker."""
    from abft_lens.backends.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def embedded():
    """``load_model("smollm2-135m")``: the embedded SmolLM2-135M, once per worker (converted into the cache on
    the very first use, ~25 s; ~4 s afterwards)."""
    from abft_lens.backends.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def embedded_hf(embedded):
    """The Hugging Face model read from the embedded model's converted folder, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_info(embedded).hf_dir, dtype=torch.float32).eval()


class NetworkAttempted(RuntimeError):
    """Raised by the ``no_network`` fixture when anything tries to open a connection."""


@pytest.fixture
def no_network(monkeypatch):
    """The hub switched off and every connection to a non-loopback address refused (raising
    ``NetworkAttempted``, recorded in ``.attempts``), so a test proves it needs no network. Loopback and
    Unix sockets stay allowed (local helper processes are not the network)."""
    import socket
    import types

    state = types.SimpleNamespace(error=NetworkAttempted, attempts=[])
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def outside(address) -> bool:
        if not isinstance(address, tuple):
            return False  # AF_UNIX path
        host = str(address[0])
        return not (host in ("localhost", "::1") or host.startswith("127."))

    def refuse(original):
        def guarded(self, address, *args, **kwargs):
            if outside(address):
                state.attempts.append(address)
                raise NetworkAttempted(f"network access attempted: {address}")
            return original(self, address, *args, **kwargs)
        return guarded

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse(connect_ex))
    return state


@pytest.fixture(scope="session")
def staicc_experimentor():
    """``get(index, k=4)``: StaICC's own ``single_experimentor`` for a dataset with its standard split and
    ``replace_space_to_label()`` applied, built once per worker (3-4 s each for the 4096-demonstration
    datasets). Shared: read it, never mutate it (build a fresh one for that)."""
    import contextlib
    import io
    import warnings

    from StaICC.normal import ORIGINAL_DATA_LOADER_NORMAL
    from StaICC.util import configs
    from StaICC.util.experimentor import single_experimentor

    built = {}

    def get(index: int, k: int = 4):
        if (index, k) not in built:
            original = ORIGINAL_DATA_LOADER_NORMAL[index]()
            split = {"financial_phrasebank": configs.STANDARD_SETTINGS["split_for_FP"],
                     "tweet_eval_emotion": configs.STANDARD_SETTINGS["split_for_TEE"]}.get(
                original.get_dataset_name(), configs.STANDARD_SETTINGS)
            dividing = [split["calibration_number"], split["demonstration_number"], split["test_number"]]
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exp = single_experimentor(original_dataset=original, k=k, dividing=dividing)
                exp.prompt_former.replace_space_to_label()
            built[(index, k)] = exp
        return built[(index, k)]

    return get


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """A tiny random Llama (GQA: 4 query heads, 2 kv heads, d_head 8) saved with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from abft_lens.backends.loading import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a larger init, so that attention patterns (and ABFT's gradients) are not flat
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("hf-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The two TransformerLens environments: .venv (3.9) and .venv-tl4 (4.x), built by scripts/setup.sh; each may be
# pointed elsewhere with ABFT_LENS_TL3_PYTHON / ABFT_LENS_TL4_PYTHON. A test that needs the other version's
# environment fails (never skips) when it is missing, naming the command that builds it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TL_ENVS = {"3": ("ABFT_LENS_TL3_PYTHON", ".venv", "scripts/setup.sh"),
           "4": ("ABFT_LENS_TL4_PYTHON", ".venv-tl4", "ABFT_LENS_TL=4 scripts/setup.sh")}


def hooked_only(why: str):
    """Mark a test that needs a ``HookedTransformer`` itself (a hooked-only detail, or a comparison with one), so
    3.9 only by nature, nothing to port: under 4.x it is reported as skipped with ``why``, which says what a bridge
    has instead (docs/tl4.md counts these tests)."""
    from abft_lens.backends.tl import HAS_HOOKED

    return pytest.mark.skipif(not HAS_HOOKED, reason=f"TransformerLens 3.9 only, needs a HookedTransformer: {why}")


def tl_python(major: str) -> str:
    """The python of TransformerLens ``major``'s environment ("3" or "4"); pytest.fail when it is missing."""
    variable, venv, command = TL_ENVS[major]
    python = os.environ.get(variable) or os.path.join(_ROOT, venv, "bin", "python")
    if not os.access(python, os.X_OK):
        pytest.fail(f"the TransformerLens {major}.x environment is missing ({python}): build it with `{command}` "
                    f"(or point {variable} at its python)", pytrace=False)
    return python


@pytest.fixture(scope="session")
def other_tl_python() -> str:
    """The python of the TransformerLens version this process does NOT run (3.9 <-> 4.x), with PYTHONPATH set
    by the caller to this checkout."""
    from abft_lens.backends.tl import HAS_HOOKED

    return tl_python("4" if HAS_HOOKED else "3")


def run_in(python: str, code: str, *args: str, timeout: float = 900) -> str:
    """Run ``code`` in another interpreter (this checkout on its path, hub off, one thread); its stdout.
    A failure raises with the other process's stderr."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": _ROOT, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{python} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout


def named_tensors(model) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter of ``model``; the Q/K tensors under their TransformerLens names and
    layout (``blocks.{l}.attn.W_Q`` ...) on a hooked model and on a bridge alike (:mod:`abft_lens.backends.qk`)."""
    from abft_lens.backends import qk

    leaves = {id(qk.leaf(model, name)[0]): name for name in qk.qk_names(model)}
    out = {}
    for name, p in model.named_parameters():
        key = leaves.get(id(p))
        out[key or name] = (qk.value(model, key) if key else p).detach().clone()
    return out
