"""A TransformerLens model built by hand (no abft-lens loader) goes through the whole pipeline:
evaluate → head_scores → run_training → compare_run / report, with its provenance derived from the model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import abft_lens
from abft_lens.backends.provenance import describe_model, model_info
from abft_lens.backends.tiny import tiny_tokenizer
from abft_lens.errors import AbftLensError
from abft_lens.reporting.report import report_from_run

from abft_lens.backends import qk
from abft_lens.backends.tl import HAS_HOOKED, HookedTransformer, HookedTransformerConfig

N_TEST = 8


def hand_built(tokenizer=None) -> HookedTransformer:
    """What a TransformerLens user writes: a config, then the model with a tokenizer loaded from disk. Under 4.x:
    a random Hugging Face model of their own, booted into a TransformerBridge."""
    if not HAS_HOOKED:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformer_lens.model_bridge import TransformerBridge

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            hf = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                              head_dim=8, max_position_embeddings=512, initializer_range=0.15))
        return TransformerBridge.boot_transformers("hand-built", hf_model=hf,
                                                   tokenizer=tiny_tokenizer() if tokenizer is None else tokenizer)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=512, act_fn="gelu",
                                  normalization_type="LN", d_vocab=1024, model_name="hand-built", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tiny_tokenizer() if tokenizer is None else tokenizer)
    return model.eval()


@pytest.fixture(scope="module")
def task():
    """SST-2, shared: its fixed test demonstrations are computed once."""
    return abft_lens.load_task("sst2")


def test_provenance_is_derived_from_the_model():
    model = hand_built()
    info = model_info(model)
    assert (info.name, info.source, info.hf_dir, info.quantized) == ("hand-built", "user", None, False)
    # TransformerLens hands the model a tokenizer that prepends BOS; the prompts follow the model's tokenizer
    assert info.adds_bos is True and model.tokenizer("a").input_ids[0] == model.tokenizer.bos_token_id
    described = describe_model(model)
    assert described["name"] == "hand-built" and described["source"] == "user"
    assert (described["n_layers"], described["n_heads"], described["d_head"], described["dtype"]) == (2, 4, 8, "float32")
    assert not hasattr(model, "abft_lens_info")  # deriving the record leaves the user's model as it was


@pytest.mark.skipif(not HAS_HOOKED, reason="3.9 only: a TransformerLens 4.x bridge always carries a tokenizer")
def test_a_model_without_tokenizer_is_refused_with_a_fix(task):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, n_ctx=64, act_fn="relu",
                                  d_vocab=1024, model_name="no-tokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    with pytest.raises(AbftLensError, match="no tokenizer") as raised:
        abft_lens.evaluate(model, task, k=4, n_test=2)
    assert "tokenizer=" in raised.value.fix


def test_evaluate_matches_the_model_run_directly(task):
    """evaluate's probabilities equal a plain forward pass: full logits at the last position, softmax over the
    label words' first tokens (the BOS the model's tokenizer adds leads every prompt)."""
    model = hand_built()
    result = abft_lens.evaluate(model, task, k=4, n_test=N_TEST, batch_size=3)
    assert 0.0 <= result.accuracy <= 1.0 and len(result.gold) == N_TEST
    assert result.info["model"] == "hand-built"
    builder = abft_lens.prompt_builder(model, task)
    prompts = abft_lens.test_prompts(builder, 4, N_TEST)
    assert all(p.token_ids[0] == model.tokenizer.bos_token_id for p in prompts)
    label_ids = torch.tensor(builder.label_token_ids)
    with torch.no_grad():
        expected = torch.stack([model(torch.tensor([p.token_ids]))[0, -1, label_ids].double().softmax(-1)
                                for p in prompts])
    torch.testing.assert_close(torch.tensor(result.probs, dtype=torch.float64), expected, rtol=0, atol=1e-5)


def test_head_scores_on_a_hand_built_model(task):
    model = hand_built()
    scores = abft_lens.head_scores(model, task, k=4, n_prompts=4, n_seqs=4, seq_len=12, batch_size=4)
    for name in ("induction", "copying", "label_attention", "filter_pass_rate"):
        assert scores[name].scores.shape == (2, 4) and torch.isfinite(scores[name].scores).all(), name
    assert ((0 <= scores["label_attention"].scores) & (scores["label_attention"].scores <= 1)).all()


def test_train_compare_and_report_end_to_end(task, tmp_path):
    model = hand_built()
    base_q = {layer: qk.value(model, f"blocks.{layer}.attn.W_Q").detach().clone() for layer in range(2)}
    # the 4.x hand-built Llama attends more evenly than 3.9's: no head passes 0.05 there, every head passes 0
    config = abft_lens.TrainConfig(k=4, train_samples=4, pseudo_batch_size=2, epochs=1, lr=1e-2,
                                   threshold=0.05 if HAS_HOOKED else 0.0)
    run_dir = tmp_path / "run"
    run = abft_lens.run_training(model, task, config, run_dir=run_dir, n_test=N_TEST, progress=False)

    files = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "log.jsonl", "fore_test.json", "post_test.json", "metrics.json",
            "trained.safetensors"} <= files and "checkpoint.pt" not in files
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["model"]["name"] == "hand-built" and meta["model"]["source"] == "user"
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == config.total_steps == 2
    assert 0.0 <= run.fore.accuracy <= 1.0 and 0.0 <= run.post.accuracy <= 1.0
    # the model is given back as it came; the run's trained W_Q moved away from the base
    assert all(torch.equal(qk.value(model, f"blocks.{layer}.attn.W_Q"), base_q[layer]) for layer in range(2))
    assert any(not torch.equal(run.trained[f"blocks.{layer}.attn.W_Q"], base_q[layer]) for layer in range(2))

    # the run applies to a fresh copy of the hand-built base and reproduces its post test
    fresh = hand_built()
    assert all(torch.equal(qk.value(fresh, f"blocks.{layer}.attn.W_Q"), base_q[layer]) for layer in range(2))
    abft_lens.load_run(run_dir, fresh)
    again = abft_lens.evaluate(fresh, task, k=4, n_test=N_TEST)
    assert again.predictions == run.post.predictions
    torch.testing.assert_close(torch.tensor(again.probs), torch.tensor(run.post.probs), rtol=0, atol=1e-6)

    # compare_run cannot rebuild a hand-built model from the folder: it takes the untrained base
    base = hand_built()
    result = report_from_run(run_dir, model=base, task=task, n_prompts=2, n_seqs=4, seq_len=12)
    assert not result.reused and result.html_path == run_dir / "report.html"
    comparison = json.loads(result.comparison_path.read_text())
    assert comparison["run"]["model"]["name"] == "hand-built"
    assert any(value > 0 for row in comparison["weight_change"] for value in row)
    # the comparison leaves the base it was given holding the run's trained weights
    assert all(torch.equal(qk.value(base, f"blocks.{layer}.attn.W_Q"), run.trained[f"blocks.{layer}.attn.W_Q"]) for layer in range(2))
    page = result.html_path.read_text(encoding="utf-8")
    heads = [f"L{layer}H{head}" for layer, head in comparison["prompt_example"]["heads"]]
    assert "hand-built" in page and heads and all(name in page for name in heads)


def test_compare_run_without_a_model_names_the_fix(task, tmp_path):
    """A hand-built model's name is no load_model spec: without ``model=`` the message says what to pass."""
    model = hand_built()
    config = abft_lens.TrainConfig(k=4, train_samples=2, pseudo_batch_size=2, epochs=1, lr=1e-2, threshold=0.05)
    abft_lens.run_training(model, task, config, run_dir=tmp_path / "run", n_test=2, fore_test=False,
                           post_test=False, progress=False)
    with pytest.raises(AbftLensError, match="built by hand") as raised:
        abft_lens.compare_run(tmp_path / "run", n_prompts=2)
    assert "model=" in raised.value.fix
