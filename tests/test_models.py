"""Model loading: tiny routes and options, HF folders, GGUF caching, offline errors, the embedded SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from abft_lens.backends import qk
from abft_lens.backends.tl import HAS_HOOKED

import abft_lens.backends.hf_cache as hf_cache
import abft_lens.backends.tiny as tiny_backend
from abft_lens.errors import AbftLensError
from abft_lens.backends.loading import load_model
from abft_lens.backends.provenance import describe_model, model_info


def _causes(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _tiny_llama_folder(folder, *, seed: int = 0):
    """A random Llama-architecture HF model with the tiny tokenizer saved beside it; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_backend.tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    hf_model = LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf_model


# ------------------------------------------------------------------------------------------ tiny routes


def test_tiny_default_is_gqa_with_tiny_tokenizer(tiny_loaded):
    cfg = tiny_loaded.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (2, 4, 2, 8)
    assert model_info(tiny_loaded).source == "tiny" and model_info(tiny_loaded).name == "tiny"
    assert model_info(tiny_loaded).hf_dir is None and model_info(tiny_loaded).adds_bos is False
    assert cfg.d_vocab == len(tiny_loaded.tokenizer) == 1024
    assert tiny_loaded.tokenizer.is_fast
    assert not tiny_loaded.training
    described = describe_model(tiny_loaded)
    assert described["n_key_value_heads"] == 2 and described["dtype"] == "float32"
    json.dumps(described)  # JSON-able
    tokens = torch.tensor([tiny_loaded.tokenizer("sentence: fine sentiment:").input_ids])
    assert tiny_loaded(tokens).shape == (1, tokens.shape[1], 1024)


def test_tiny_mha_and_options():
    model = load_model("tiny-mha:n_layers=3,n_heads=2,d_model=16,d_head=4,n_ctx=64,seed=5")
    cfg = model.cfg
    assert cfg.n_key_value_heads is None
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.n_ctx, cfg.seed) == (3, 2, 16, 4, 64, 5)
    assert model_info(model).name == "tiny-mha:n_layers=3,n_heads=2,d_model=16,d_head=4,n_ctx=64,seed=5"
    assert load_model("tiny:n_heads=6,n_kv_heads=3").cfg.n_key_value_heads == 3
    assert load_model("tiny-mha:n_kv_heads=2").cfg.n_key_value_heads == 2


def test_tiny_seed_and_dtype():
    a, b, c = load_model("tiny:seed=1"), load_model("tiny:seed=1"), load_model("tiny:seed=2")
    torch.testing.assert_close(a.W_Q, b.W_Q, rtol=0, atol=0)
    assert not torch.equal(a.W_Q, c.W_Q)
    double = load_model("tiny", dtype=torch.float64)
    assert double.cfg.dtype == torch.float64 and double.W_Q.dtype == torch.float64
    assert describe_model(double)["dtype"] == "float64"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("tiny:bogus=1", ["bogus", "n_layers"]),
        ("tiny:n_layers=x", ["n_layers", "integer"]),
        ("tiny:n_layers", ["n_layers", "integer"]),
        ("tiny:n_heads=3", ["n_heads=3", "n_kv_heads=2"]),
        ("tiny:n_heads=4,n_kv_heads=3", ["n_kv_heads=3"]),
    ],
)
def test_tiny_bad_options(spec, words):
    with pytest.raises(AbftLensError) as info:
        load_model(spec)
    for word in words:
        assert word in str(info.value)
    assert info.value.fix


# ------------------------------------------------------------------------------------ offline errors


def test_no_network_fixture_refuses_connections(no_network):
    import socket

    with pytest.raises(no_network.error):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never reached
    assert no_network.attempts == [("192.0.2.1", 80)]


@pytest.mark.parametrize("name", ["no-such-model-xyz", "gpt2"])
def test_unknown_or_hub_name_offline_says_what_was_tried(name, no_network):
    with pytest.raises(AbftLensError) as info:
        load_model(name)
    message = str(info.value)
    assert repr(name) in message
    for tried in ("Tried:", "smollm2-135m", "'tiny'", ".gguf", "official names"):
        assert tried in message
    assert "fix:" in message
    assert no_network.attempts == []
    assert not any(isinstance(error, no_network.error) for error in _causes(info.value))


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(AbftLensError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_with_config_but_no_weights_is_an_error(tmp_path, no_network):
    folder = tmp_path / "hf"
    _tiny_llama_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(AbftLensError, match="could not read the Hugging Face model folder"):
        load_model(str(folder))


@pytest.mark.parametrize("spec", ["missing-model.gguf", "./no/such/folder", "/no/such/model.gguf"])
def test_nonexistent_paths_are_errors(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AbftLensError, match="does not exist"):
        load_model(spec)


# ------------------------------------------------------------------------------------- HF folder route


def test_hf_folder_round_trip_logits_equal_hf(tmp_path, no_network):
    folder = tmp_path / "tiny-llama"
    hf_model = _tiny_llama_folder(folder)
    loaded = load_model(str(folder))
    assert model_info(loaded).source == "hf-folder" and model_info(loaded).hf_dir == folder and model_info(loaded).adds_bos is False
    assert loaded.cfg.n_key_value_heads == 2 and loaded.cfg.n_layers == 2
    tokens = torch.tensor([loaded.tokenizer("sentence: a fine film sentiment: positive\nsentence: dull").input_ids])
    with torch.no_grad():
        ours = loaded(tokens)
        reference = hf_model(tokens).logits
    assert reference.abs().max() > 1.0  # logits large enough for the comparison to mean something
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    q_proj = hf_model.model.layers[1].self_attn.q_proj.weight
    for head in range(4):
        torch.testing.assert_close(loaded.W_Q[1, head], q_proj[head * 8:(head + 1) * 8].T, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- GGUF caching


def test_gguf_file_converted_once_into_cache(tmp_path, monkeypatch, no_network):
    """The .gguf route converts into ``$ABFT_LENS_CACHE`` once; the second load reuses the folder."""
    monkeypatch.setenv("ABFT_LENS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF not really")
    calls = []

    def fake_convert(path, out):
        calls.append(path)
        _tiny_llama_folder(out)

    monkeypatch.setattr(hf_cache, "_convert_gguf", fake_convert)
    first = load_model(str(gguf))
    assert model_info(first).converted is True and model_info(first).source == "gguf" and len(calls) == 1
    assert model_info(first).hf_dir.parent == tmp_path / "cache"
    assert (model_info(first).hf_dir / "abft-lens-source.json").is_file()
    assert not [p for p in model_info(first).hf_dir.parent.iterdir() if p.name.startswith(".fake") and p.is_dir()]

    def refuse(path, out):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(hf_cache, "_convert_gguf", refuse)
    second = load_model(str(gguf))
    assert model_info(second).converted is False and model_info(second).hf_dir == model_info(first).hf_dir
    torch.testing.assert_close(second.W_Q, first.W_Q, rtol=0, atol=0)

    gguf.write_bytes(b"GGUF changed size!")  # a different file (size) is converted again
    monkeypatch.setattr(hf_cache, "_convert_gguf", fake_convert)
    assert model_info(load_model(str(gguf))).converted is True and len(calls) == 2


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ABFT_LENS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(AbftLensError, match="could not read the GGUF file"):
        load_model(str(gguf))
    leftovers = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert leftovers == []


# ------------------------------------------------------------------------------------ embedded SmolLM2


@pytest.mark.embedded
def test_embedded_logits_equal_hugging_face(embedded, embedded_hf):
    assert model_info(embedded).source == "embedded" and model_info(embedded).name == "smollm2-135m"
    text = "sentence: a gorgeous, witty film sentiment: positive\nsentence: a tedious mess sentiment:"
    tokens = torch.tensor([embedded.tokenizer(text).input_ids])
    with torch.no_grad():
        ours = embedded(tokens)
        reference = embedded_hf(tokens).logits
    assert ours.shape == reference.shape == (1, tokens.shape[1], 49152)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


@pytest.mark.embedded
def test_embedded_config_bos_and_unprocessed_weights(embedded, embedded_hf):
    cfg = embedded.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 9, 3, 64)
    assert model_info(embedded).adds_bos is False and cfg.default_prepend_bos is False
    assert embedded.tokenizer("a").input_ids == embedded.tokenizer("a", add_special_tokens=False).input_ids
    layer = embedded_hf.model.layers[0]
    q_proj, k_proj = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
    block = embedded.blocks[0]
    w_q, w_k = (qk.value(embedded, f"blocks.0.attn.{a}") for a in ("W_Q", "_W_K"))  # either version
    for head in range(cfg.n_heads):
        torch.testing.assert_close(w_q[head], q_proj[head * 64:(head + 1) * 64].T, rtol=0, atol=0)
    for group in range(cfg.n_key_value_heads):
        torch.testing.assert_close(w_k[group], k_proj[group * 64:(group + 1) * 64].T, rtol=0, atol=0)
    # no fold_ln: the RMSNorm weights are still there, as in the checkpoint
    torch.testing.assert_close(block.ln1.w, layer.input_layernorm.weight, rtol=0, atol=0)


@pytest.mark.embedded
def test_embedded_second_load_does_not_convert(embedded, monkeypatch, no_network):
    def refuse(*args, **kwargs):
        raise AssertionError("_convert_gguf called on a second load")

    monkeypatch.setattr(hf_cache, "_convert_gguf", refuse)
    second = load_model("smollm2-135m")
    assert model_info(second).converted is False
    assert model_info(second).hf_dir == model_info(embedded).hf_dir and model_info(second).hf_dir.parent == hf_cache.cache_dir()
    torch.testing.assert_close(second.W_K, embedded.W_K, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_HOOKED, reason="3.9's HookedTransformer forward only; a bridge keeps Hugging Face's "
                                              "own weights and layout")
def test_relayout_is_bit_identical_and_turns_tl_weight_copies_into_views(tiny_gqa):
    """Models are loaded with their weights stored in the layout TL's forward reads (relayout_for_forward):
    the rearranges and ``.T.contiguous()`` calls of the forward become views, and every output is unchanged."""
    import copy

    import einops

    standard = copy.deepcopy(tiny_gqa)
    with torch.no_grad():
        for p in standard.parameters():
            p.data = p.data.contiguous()  # the stock TransformerLens layout
    attn, mlp = tiny_gqa.blocks[0].attn, tiny_gqa.blocks[0].mlp
    assert not attn.W_Q.is_contiguous() and standard.blocks[0].attn.W_Q.is_contiguous()
    view = einops.rearrange(attn.W_Q, "h m d -> (h d) m")
    assert view.data_ptr() == attn.W_Q.data_ptr() and view.is_contiguous()  # no copy
    assert mlp.W_gate.T.is_contiguous() and einops.rearrange(attn.W_O, "h d m -> m (h d)").is_contiguous()
    tokens = torch.arange(8).remainder(tiny_gqa.cfg.d_vocab).reshape(1, 8)
    assert torch.equal(tiny_gqa(tokens), standard(tokens))
    for model in (tiny_gqa, standard):  # gradients reach W_Q in the same values whatever its strides
        model.blocks[1].attn.W_Q.requires_grad_(True)
        model(tokens).logsumexp(-1).sum().backward()
    torch.testing.assert_close(tiny_gqa.blocks[1].attn.W_Q.grad, standard.blocks[1].attn.W_Q.grad, rtol=1e-6, atol=0)
