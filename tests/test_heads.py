"""Head scores: batched, slice-only versions against brute force from run_with_cache, and constructed heads."""

from __future__ import annotations

import pytest
import einops
import torch

from abft_lens.backends.bridge import is_bridge

from abft_lens.interp.heads import (
    HeadScores,
    HeadSet,
    classic_scores,
    copying_scores,
    duplicate_token_scores,
    head_scores,
    icl_label_attention,
    induction_scores,
    label_masses,
    previous_token_scores,
    repeated_tokens,
)
from abft_lens.backends.loading import tiny_model
from abft_lens.interp.induction_filter import induction_threshold

N_SEQS, SEQ_LEN = 5, 7


@pytest.fixture(scope="module")
def tiny():
    from abft_lens.backends.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def sst2_prompts(tiny):
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.data.prompts import test_prompts
    from abft_lens.data.tasks import load_task

    return test_prompts(prompt_builder(tiny, load_task("sst2")), 4, 7)


def _brute_classic(model, tokens, seq_len, bos):
    """Per-sequence loop over run_with_cache with explicit index arithmetic."""
    b, n_layers = int(bos), model.cfg.n_layers
    out = {name: torch.zeros(n_layers, model.cfg.n_heads, dtype=torch.float64)
           for name in ("induction", "duplicate_token", "previous_token")}
    for seq in tokens:
        _, cache = model.run_with_cache(seq[None], attention_mask=torch.ones_like(seq[None]))
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()  # [head, q, k]
            second = range(b + seq_len, b + 2 * seq_len)
            out["induction"][layer] += sum(pattern[:, i, i - seq_len + 1] for i in second) / seq_len
            out["duplicate_token"][layer] += sum(pattern[:, i, i - seq_len] for i in second) / seq_len
            rows = range(b + 1, b + 2 * seq_len)
            out["previous_token"][layer] += sum(pattern[:, i, i - 1] for i in rows) / len(rows)
    return {name: value / len(tokens) for name, value in out.items()}


@pytest.mark.parametrize("bos", [None, 0])
def test_classic_scores_match_brute_force(tiny, bos):
    model = tiny
    scores = classic_scores(model, n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=2, seed=3, bos_token_id=bos)
    tokens = repeated_tokens(model, N_SEQS, SEQ_LEN, seed=3, bos_token_id=bos)
    assert tokens.shape == (N_SEQS, 2 * SEQ_LEN + (bos is not None))
    special = set(tiny.tokenizer.all_special_ids)
    body = tokens[:, 1:] if bos is not None else tokens
    assert not special & set(body.flatten().tolist())
    torch.testing.assert_close(body[:, :SEQ_LEN], body[:, SEQ_LEN:])
    expected = _brute_classic(model, tokens, SEQ_LEN, bos is not None)
    for name, value in expected.items():
        assert scores[name].scores.shape == (model.cfg.n_layers, model.cfg.n_heads)
        torch.testing.assert_close(scores[name].scores.double(), value, atol=1e-6, rtol=0)
    single = induction_scores(model, n_seqs=N_SEQS, seq_len=SEQ_LEN, seed=3, bos_token_id=bos)
    torch.testing.assert_close(single.scores, scores["induction"].scores, atol=1e-6, rtol=0)
    assert previous_token_scores(model, n_seqs=2, seq_len=4).name == "previous_token"
    assert duplicate_token_scores(model, n_seqs=2, seq_len=4).name == "duplicate_token"


def test_constructed_heads_score_one(tiny):
    """Heads forced to exact previous-token / induction / duplicate patterns score 1 on their own score."""
    model, seq_len = tiny, 6
    n = 2 * seq_len
    fixed = torch.zeros(3, n, n)
    for i in range(n):
        fixed[0, i, max(i - 1, 0)] = 1  # previous token (position 0 attends to itself)
        for head, back in ((1, seq_len - 1), (2, seq_len)):
            fixed[head, i, i - back if i >= seq_len else i] = 1  # induction / duplicate in the second copy

    def override(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :3] = fixed
        return pattern

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", override)]):
        scores = classic_scores(model, n_seqs=4, seq_len=seq_len, batch_size=3)
    assert scores["previous_token"].scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert scores["induction"].scores[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert scores["duplicate_token"].scores[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert scores["induction"].scores[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert scores["previous_token"].top(1)[0][:2] == (0, 0)
    assert not model.hook_dict["blocks.0.attn.hook_pattern"].fwd_hooks  # every hook removed


def _brute_icl(model, prompts):
    """Unbatched: one run_with_cache per prompt, python loops over labels."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = ("label_attention", "correct_label_attention", "label_correctness", "filter_pass_rate", "sink_attention")
    out = {name: torch.zeros(n_layers, n_heads, dtype=torch.float64) for name in names}
    for prompt in prompts:
        tokens = torch.tensor([prompt.token_ids])
        _, cache = model.run_with_cache(tokens, attention_mask=torch.ones_like(tokens))
        threshold = induction_threshold(prompt.k, prompt.n_tokens)
        for layer in range(n_layers):
            row = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1].double()  # [head, key]
            total = sum(row[:, p] for p in prompt.label_positions)
            good = sum((row[:, p] for p, y in zip(prompt.label_positions, prompt.demo_labels)
                        if y == prompt.query_label), torch.zeros(n_heads, dtype=torch.float64))
            out["label_attention"][layer] += total
            out["correct_label_attention"][layer] += good
            out["label_correctness"][layer] += good - (total - good)
            out["filter_pass_rate"][layer] += (total > threshold).double()
            out["sink_attention"][layer] += row[:, 0]
    return {name: value / len(prompts) for name, value in out.items()}


def test_icl_label_attention_matches_unbatched(tiny, sst2_prompts):
    assert len({p.n_tokens for p in sst2_prompts}) > 1  # batches are really padded
    scores = icl_label_attention(tiny, sst2_prompts, batch_size=3)
    expected = _brute_icl(tiny, sst2_prompts)
    assert set(scores) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(scores[name].scores.double(), value, atol=2e-5, rtol=0, msg=name)
    assert scores["label_attention"].info == {"n_prompts": 7, "k": 4}


def test_label_masses_against_a_loop(sst2_prompts):
    """Per prompt and head: the sum of the row over the label positions, and over those whose label is the query's."""
    from abft_lens.data.prompts import collate

    batch = collate(sst2_prompts, 0)
    rows = torch.rand(len(sst2_prompts), 2, 3, batch.tokens.shape[1], generator=torch.Generator().manual_seed(0))
    label_mass, correct_mass = label_masses(rows, batch)
    assert label_mass.shape == correct_mass.shape == (len(sst2_prompts), 2, 3)
    for b in range(len(sst2_prompts)):
        positions = batch.label_positions[b].tolist()
        correct = [pos for pos, label in zip(positions, batch.demo_labels[b].tolist())
                   if label == batch.query_labels[b].item()]
        torch.testing.assert_close(label_mass[b], rows[b][..., positions].sum(-1))
        torch.testing.assert_close(correct_mass[b], rows[b][..., correct].sum(-1))
    assert (correct_mass < label_mass).any()  # some demonstrations carry a wrong label


def test_filter_pass_rate_uses_induction_threshold(tiny, sst2_prompts):
    """Heads of layer 0 forced to put mass c on the labels (rest on the last token): pass iff c > T(k, n)."""
    model, k = tiny, 4
    order = sorted(sst2_prompts, key=lambda p: p.n_tokens)
    thresholds = sorted(induction_threshold(k, p.n_tokens) for p in order)
    middle = (thresholds[2] + thresholds[3]) / 2  # between two prompts' thresholds: some pass, some fail
    masses = [1.0, 0.0, middle, thresholds[-1] + 1e-3]
    from abft_lens.data.prompts import collate

    batch = collate(order, 0)

    def override(pattern, hook):
        pattern = pattern.clone()
        for b in range(pattern.shape[0]):
            for head, mass in enumerate(masses):
                pattern[b, head, -1] = 0
                pattern[b, head, -1, batch.label_positions[b]] = mass / k
                pattern[b, head, -1, -1] += 1 - mass
        return pattern

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", override)]):
        scores = icl_label_attention(model, sst2_prompts, batch_size=len(sst2_prompts))
    for head, mass in enumerate(masses):
        expected = sum(mass > induction_threshold(k, p.n_tokens) for p in order) / len(order)
        assert scores["filter_pass_rate"].scores[0, head] == pytest.approx(expected)
        assert scores["label_attention"].scores[0, head] == pytest.approx(mass, abs=1e-6)
        assert scores["sink_attention"].scores[0, head] == pytest.approx(0.0, abs=1e-7)
    assert 0 < scores["filter_pass_rate"].scores[0, 2] < 1
    assert scores["filter_pass_rate"].scores[0, 3] == 1.0


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_copying_score_identity_and_negated(n_kv_heads):
    model = tiny_model(n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, d_model=32, d_head=8, seed=2)
    attn = model.blocks[0].attn
    q, _ = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        if is_bridge(model):  # the Hugging Face leaves: lm_head [vocab, d_model], v_proj [(n h), d], o_proj [d, (n h)]
            model.unembed.original_component.weight.copy_(model.embed.W_E)
            v_proj, o_proj = attn.v.original_component.weight, attn.o.original_component.weight
            v_proj.copy_(einops.repeat(q.T, "h m -> (n h) m", n=v_proj.shape[0] // 8))
            o_proj.copy_(einops.repeat(q, "m h -> m (n h)", n=4))
            o_proj[:, 8:16].neg_()  # head 1 writes back the negated token: anti-copying
        else:
            model.unembed.W_U.copy_(model.embed.W_E.T)  # tied: W_U W_E restricted to S is positive semi-definite
            value = attn._W_V if n_kv_heads else attn.W_V
            value.copy_(q.expand_as(value))
            attn.W_O.copy_(q.T.expand_as(attn.W_O))
            attn.W_O[1].neg_()  # head 1 writes back the negated token: anti-copying
    for n_tokens in (1000, 20):
        scores = copying_scores(model, n_tokens=n_tokens).scores[0]
        assert scores[[0, 2, 3]].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
        assert scores[1].item() == pytest.approx(-1.0, abs=1e-6)


def test_copying_score_matches_full_ov_circuit():
    model = tiny_model(n_layers=2, n_heads=4, n_kv_heads=2, d_vocab=40, seed=5)
    scores = copying_scores(model).scores
    for layer, block in enumerate(model.blocks):
        for head in range(4):
            w_v = block.attn.W_V  # a bridge's has the kv heads only (3.9's repeats them per query head)
            w_v = w_v.repeat_interleave(model.cfg.n_heads // w_v.shape[0], dim=0)
            full = (model.W_E @ w_v[head] @ block.attn.W_O[head] @ model.W_U).double()  # [vocab, vocab]
            eig = torch.linalg.eigvals(full.detach())
            assert scores[layer, head].item() == pytest.approx((eig.real.sum() / eig.abs().sum()).item(), abs=1e-4)


def test_head_set_selection_and_trainable():
    from abft_lens.training.adapters import attach
    from abft_lens.training.trainable import TrainableConfig

    values = torch.tensor([[0.1, 0.9, 0.3, float("nan")], [0.5, 0.2, 0.8, 0.05]])
    scores = HeadScores("induction", values, "test")
    assert scores.top(2) == [(0, 1, pytest.approx(0.9)), (1, 2, pytest.approx(0.8))]
    by_threshold = scores.select(threshold=0.4)
    assert list(by_threshold) == [(0, 1), (1, 0), (1, 2)]
    assert scores.select(top_k=2) == HeadSet({(0, 1), (1, 2)})
    assert list(HeadSet.from_scores(values, threshold=0.25, top_k=3)) == [(0, 1), (1, 0), (1, 2)]
    assert len(scores.select(threshold=0.95)) == 0 and (0, 1) in by_threshold and (0, 0) not in by_threshold
    mask = by_threshold.to_mask(2, 4)
    assert mask.dtype == torch.bool and mask.sum() == 3 and mask[1, 2]
    with pytest.raises(ValueError):
        scores.select()
    with pytest.raises(ValueError):
        by_threshold.to_mask(1, 4)
    with pytest.raises(Exception):
        by_threshold.heads = frozenset()  # immutable
    config = TrainableConfig(heads=by_threshold.as_trainable_heads())
    assert config.heads == {(0, 1), (1, 0), (1, 2)}
    model = tiny_model(n_layers=2, n_heads=4, n_kv_heads=2)
    trainable = attach(model, config)
    masks = trainable.head_masks()
    assert masks["blocks.0.attn.W_Q"].flatten().tolist() == [False, True, False, False]
    trainable.merge()
    assert "L1H2" in by_threshold._repr_html_() and "L0H1" in scores._repr_html_()
    restored = HeadScores.from_dict(scores.to_dict())
    torch.testing.assert_close(restored.scores, values, equal_nan=True)


def test_head_scores_has_every_comparison_name(tiny, sst2_prompts):
    from abft_lens.data.tasks import load_task

    scores = head_scores(tiny, load_task("sst2"), prompts=sst2_prompts[:2], n_seqs=2, seq_len=5)
    assert set(scores) == {"induction", "previous_token", "duplicate_token", "copying", "label_attention",
                           "correct_label_attention", "label_correctness", "filter_pass_rate", "sink_attention"}
    for name, value in scores.items():
        assert value.name == name and value.shape == (2, 4) and value.description
        assert torch.isfinite(value.scores).all()


@pytest.mark.embedded
def test_smollm2_induction_heads():
    """SmolLM2-135M (30 layers x 9 heads, GQA 3 kv heads) has clear induction heads."""
    from abft_lens.backends.loading import load_model

    model = load_model("smollm2-135m")
    scores = induction_scores(model, n_seqs=8, seq_len=30, batch_size=8)
    assert scores.shape == (30, 9)
    values = scores.scores
    assert torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    top = scores.top(5)
    assert top[0][2] > 0.3 and top[0][2] > 10 * values.median().item()
    assert all(score > 3 * values.median().item() for _, _, score in top)


def test_heads_cli_prints_and_writes_json(tmp_path, capsys):
    import json

    from abft_lens.cli import main

    output = tmp_path / "scores.json"
    assert main(["heads", "--model", "tiny", "--dataset", "sst2", "--n-prompts", "3", "--top", "2",
                 "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "top 2 induction heads of tiny" in printed and "top 2 label_attention heads" in printed
    assert printed.count("  L") == 4 and f"wrote {output}" in printed
    data = json.loads(output.read_text())
    assert data["k"] == 4 and data["n_prompts"] == 3 and data["model"]["name"] == "tiny"
    assert len(data["scores"]) == 9
    restored = HeadScores.from_dict(data["scores"]["induction"])
    assert restored.shape == (2, 4) and restored.name == "induction"
