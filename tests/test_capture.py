"""Attention capture: same values as run_with_cache, but with the graph; hooks cleaned up; stop_at_layer; the
forward that stops at the last captured pattern (ABFT's)."""

from __future__ import annotations

import pytest
import torch

from abft_lens.backends import qk

from abft_lens.interp.capture import capture_attention_rows, forward_to_last_pattern, pattern_hook_name
from abft_lens.backends.forward import forward_residual


def _tokens(model, batch: int = 2, pos: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=generator)


def _active_fwd_hooks(model) -> list[str]:
    return [name for name, hook_point in model.hook_dict.items() if hook_point.fwd_hooks]


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_rows_equal_run_with_cache_last_row(fixture, request):
    model = request.getfixturevalue(fixture)
    tokens = _tokens(model)
    with capture_attention_rows(model) as store:
        forward_residual(model, tokens)
    rows = store.stacked()
    assert rows.shape == (2, model.cfg.n_layers, model.cfg.n_heads, tokens.shape[1])
    assert store.layers == tuple(range(model.cfg.n_layers))
    _, cache = model.run_with_cache(tokens)
    for index, layer in enumerate(store.layers):
        expected = cache[pattern_hook_name(layer)][:, :, -1, :]
        torch.testing.assert_close(rows[:, index], expected, rtol=0, atol=0)
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))


def test_rows_keep_graph_and_backward_after_exit(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with capture_attention_rows(tiny_gqa, layers=[1]) as store:
        forward_residual(tiny_gqa, tokens, stop_at_layer=store.stop_at_layer)
    rows = store.stacked()
    assert rows.requires_grad and rows.grad_fn is not None
    assert _active_fwd_hooks(tiny_gqa) == []
    rows[:, 0, :, 3].sum().backward()  # a loss on layer 1 reaches W_Q/W_K of layers 1 and 0
    for layer in (0, 1):
        attn = tiny_gqa.blocks[layer].attn
        for attr in ("W_Q", "_W_K"):  # the parameters, in TransformerLens layout on either version
            grad = qk.grad(tiny_gqa, f"blocks.{layer}.attn.{attr}")
            assert grad is not None and grad.abs().sum() > 0


def test_detach_keeps_no_graph(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with capture_attention_rows(tiny_gqa, detach=True) as store:
        forward_residual(tiny_gqa, tokens)
    rows = store.stacked()
    assert not rows.requires_grad and rows.grad_fn is None
    with capture_attention_rows(tiny_gqa) as store_graph:
        forward_residual(tiny_gqa, tokens)
    torch.testing.assert_close(rows, store_graph.stacked().detach(), rtol=0, atol=0)


def test_stop_at_layer_fires_needed_hooks_only(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with capture_attention_rows(tiny_gqa, layers=[0]) as store:
        assert store.stop_at_layer == 1
        residual = forward_residual(tiny_gqa, tokens, stop_at_layer=store.stop_at_layer)
    assert store.captured_layers == (0,)
    _, cache = tiny_gqa.run_with_cache(tokens)
    torch.testing.assert_close(residual, cache["blocks.0.hook_resid_post"], rtol=0, atol=0)
    torch.testing.assert_close(
        store.stacked()[:, 0], cache[pattern_hook_name(0)][:, :, -1], rtol=0, atol=0
    )


def test_missing_layer_is_reported(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with capture_attention_rows(tiny_gqa, layers=[0, 1]) as store:
        forward_residual(tiny_gqa, tokens, stop_at_layer=1)
    assert store.captured_layers == (0,)
    with pytest.raises(ValueError, match=r"layers \[1\] were not captured.*stop_at_layer >= 2"):
        store.stacked()
    with pytest.raises(ValueError, match="layer 1 was not captured"):
        store.layer(1)


def test_forward_residual_default_skips_unembed(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    residual = forward_residual(tiny_gqa, tokens)
    _, cache = tiny_gqa.run_with_cache(tokens)
    assert residual.shape == (2, tokens.shape[1], tiny_gqa.cfg.d_model)
    torch.testing.assert_close(residual, cache[f"blocks.{tiny_gqa.cfg.n_layers - 1}.hook_resid_post"])


def test_query_positions_pick_one_row_per_prompt(tiny_mha):
    tokens = _tokens(tiny_mha)
    query_positions = torch.tensor([4, -3])
    with capture_attention_rows(tiny_mha, layers=[1], query_positions=query_positions) as store:
        forward_residual(tiny_mha, tokens)
    rows = store.layer(1)
    _, cache = tiny_mha.run_with_cache(tokens)
    pattern = cache[pattern_hook_name(1)]
    torch.testing.assert_close(rows[0], pattern[0, :, 4], rtol=0, atol=0)
    torch.testing.assert_close(rows[1], pattern[1, :, -3], rtol=0, atol=0)


def test_left_padding_matches_unpadded_prompt(tiny_gqa):
    tokens = _tokens(tiny_gqa, batch=1, pos=9)
    padded = torch.cat([torch.zeros(1, 3, dtype=tokens.dtype), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with capture_attention_rows(tiny_gqa, detach=True) as plain:
        forward_residual(tiny_gqa, tokens)
    with capture_attention_rows(tiny_gqa, detach=True) as padded_store:
        forward_residual(tiny_gqa, padded, attention_mask=mask)
    padded_rows = padded_store.stacked()
    assert padded_rows[..., :3].abs().max() == 0
    torch.testing.assert_close(padded_rows[..., 3:], plain.stacked(), atol=1e-6, rtol=1e-5)


def test_hooks_removed_on_error(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention_rows(tiny_gqa):
            assert len(_active_fwd_hooks(tiny_gqa)) == tiny_gqa.cfg.n_layers
            forward_residual(tiny_gqa, tokens)
            raise RuntimeError("boom")
    assert _active_fwd_hooks(tiny_gqa) == []


def test_second_forward_in_one_context_is_refused(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with capture_attention_rows(tiny_gqa, layers=[0]) as store:
        forward_residual(tiny_gqa, tokens, stop_at_layer=1)
        with pytest.raises(RuntimeError, match="fired twice"):
            forward_residual(tiny_gqa, tokens, stop_at_layer=1)
        store.clear()
        forward_residual(tiny_gqa, tokens, stop_at_layer=1)
    assert store.captured_layers == (0,)
    assert _active_fwd_hooks(tiny_gqa) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [2]}, "out of range"),
        ({"layers": []}, "layers is empty"),
        ({"layers": [0, 0]}, "duplicates"),
        ({"query_positions": torch.tensor([[1]])}, "1-D integer tensor"),
        ({"query_positions": torch.tensor([1.0])}, "1-D integer tensor"),
    ],
)
def test_capture_rejects_bad_arguments(tiny_gqa, kwargs, message):
    with pytest.raises(ValueError, match=message):
        with capture_attention_rows(tiny_gqa, **kwargs):
            pass
    assert _active_fwd_hooks(tiny_gqa) == []


def test_query_positions_checked_against_batch(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with pytest.raises(ValueError, match="one query position per prompt"):
        with capture_attention_rows(tiny_gqa, query_positions=torch.tensor([1, 2, 3])):
            forward_residual(tiny_gqa, tokens)
    with pytest.raises(ValueError, match="out of range"):
        with capture_attention_rows(tiny_gqa, query_positions=torch.tensor([1, 12])):
            forward_residual(tiny_gqa, tokens)


def test_forward_residual_rejects_bad_arguments(tiny_gqa):
    tokens = _tokens(tiny_gqa)
    with pytest.raises(ValueError, match="stop_at_layer=3 out of range"):
        forward_residual(tiny_gqa, tokens, stop_at_layer=3)
    with pytest.raises(ValueError, match="stop_at_layer=-1"):
        forward_residual(tiny_gqa, tokens, stop_at_layer=-1)
    with pytest.raises(ValueError, match="attention_mask shape"):
        forward_residual(tiny_gqa, tokens, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        forward_residual(tiny_gqa, tokens.float())


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_forward_to_last_pattern_gives_the_full_forwards_rows_and_gradient_bit_for_bit(fixture, request):
    """ABFT's forward: the rows and a loss's W_Q/W_K gradients equal a full forward's exactly; the last block's
    pattern·V (hook_z) and MLP never run; no hook is left behind."""
    model = request.getfixturevalue(fixture)
    tokens = _tokens(model, batch=3)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # a left-padded prompt
    fired = []
    last = model.cfg.n_layers - 1
    for name in (f"blocks.{last}.attn.hook_z", f"blocks.{last}.hook_mlp_out"):
        # the name asked for (a bridge's hook_z is an alias of attn.o.hook_in)
        model.hook_dict[name].add_hook(lambda x, *, hook, name=name: fired.append(name), is_permanent=True)

    def rows_and_grads(stop: bool):
        with capture_attention_rows(model) as store:
            forward_to_last_pattern(model, tokens, mask, store) if stop else forward_residual(model, tokens, mask)
        rows = store.stacked()
        loss = (rows * torch.linspace(0, 1, rows.shape[-1])).sum()
        weights = [qk.leaf(model, f"blocks.{layer}.attn.W_Q")[0] for layer in range(model.cfg.n_layers)]
        return rows, torch.autograd.grad(loss, weights)

    full_rows, full_grads = rows_and_grads(stop=False)
    assert fired == [f"blocks.{last}.attn.hook_z", f"blocks.{last}.hook_mlp_out"]
    fired.clear()
    rows, grads = rows_and_grads(stop=True)
    assert fired == []
    assert torch.equal(rows, full_rows) and all(torch.equal(a, b) for a, b in zip(grads, full_grads))
    model.reset_hooks(including_permanent=True)
    assert _active_fwd_hooks(model) == []


def test_forward_to_last_pattern_outside_its_capture_is_refused(tiny_gqa):
    with capture_attention_rows(tiny_gqa, layers=[0]) as store:
        pass
    with pytest.raises(RuntimeError, match="not captured"):
        forward_to_last_pattern(tiny_gqa, _tokens(tiny_gqa), None, store)
    assert _active_fwd_hooks(tiny_gqa) == []
