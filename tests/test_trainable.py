"""The trainable set: full and LoRA W_Q/W_K, per-head restricted gradients, masked optimizer steps."""

from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.nn.utils import parametrize

from abft_lens.backends.loading import tiny_model
from abft_lens.training.adapters import attach, masked_step
from abft_lens.training.trainable import TrainableConfig

from conftest import needs_hooked

HOOKED_ONLY = needs_hooked("reads the model's own parameters (model.named_parameters(), attn.W_Q.grad, LoRA "
                          'parametrizations)')

N_LAYERS, N_HEADS = 2, 4


def _tokens(batch: int = 3, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(7))


def _loss(model, tokens):
    return model(tokens, return_type="loss")


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Model parameters under their plain names (parametrized weights map to their ``original``)."""
    return {
        n.replace("parametrizations.", "").replace(".original", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" not in n
    }


def _heads(*pairs) -> torch.Tensor:
    m = torch.zeros(N_LAYERS, N_HEADS, dtype=torch.bool)
    for l, h in pairs:
        m[l, h] = True
    return m


def _k_name(model) -> str:
    return "_W_K" if model.cfg.n_key_value_heads else "W_K"


# --- config -----------------------------------------------------------------------------------------------


def test_config_normalises_and_round_trips_through_json():
    c = TrainableConfig(kind="lora", targets=("k", "q"), lora_r=4, lora_alpha=8, heads=[(1, 2), (0, 3)])
    assert c.targets == ("q", "k")
    assert c.heads == frozenset({(0, 3), (1, 2)})
    assert c.lora_scale == 2.0
    assert TrainableConfig(lora_r=8).lora_scale == 1.0
    d = json.loads(json.dumps(c.to_dict()))
    assert d["heads"] == [[0, 3], [1, 2]]
    assert TrainableConfig.from_dict(d) == c
    assert TrainableConfig.from_dict(TrainableConfig().to_dict()) == TrainableConfig()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "qlora"}, "kind"),
        ({"targets": ("q", "v")}, "targets"),
        ({"targets": ()}, "targets"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_r": -3}, "lora_r"),
        ({"lora_alpha": 0.0}, "lora_alpha"),
        ({"heads": [(0, -1)]}, "heads"),
        ({"heads": [(0,)]}, "heads"),
        ({"heads": [(0, 1.5)]}, "heads"),
        ({"heads": []}, "heads"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainableConfig(**kwargs)


@HOOKED_ONLY
def test_bad_inputs_raise_value_error(tiny_gqa):
    with pytest.raises(ValueError, match="unknown keys.*rank"):
        TrainableConfig.from_dict({"kind": "full", "rank": 3})
    for heads in ({(0, 4)}, {(2, 0)}):
        with pytest.raises(ValueError, match="out of range.*2 layers x 4 heads"):
            attach(tiny_gqa, TrainableConfig(heads=heads))
    tr = attach(tiny_gqa, TrainableConfig(kind="lora", lora_r=2))
    with pytest.raises(ValueError, match="bool tensor"):
        tr.head_masks(torch.ones(N_LAYERS, N_HEADS))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        with tr.restricted(torch.ones(N_LAYERS, N_HEADS + 1, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="already has an attached Trainable"):
        attach(tiny_gqa, TrainableConfig(kind="lora"))
    sd = tr.state_dict()
    sd["blocks.9.attn.W_Q.lora_A"] = sd.pop("blocks.0.attn.W_Q.lora_A")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.W_Q.lora_A'\].*unexpected keys \['blocks.9"):
        tr.load_state_dict(sd)
    sd = tr.state_dict()
    sd["blocks.0.attn.W_Q.lora_B"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="lora_B has shape"):
        tr.load_state_dict(sd)
    tr.merge()
    with pytest.raises(ValueError, match="merged or removed"):
        list(tr.parameters())


def test_one_trainable_per_model_and_full_remove_is_an_error(tiny_mha):
    tr = attach(tiny_mha, TrainableConfig())
    with pytest.raises(ValueError, match="nothing to remove"):
        tr.remove()
    with pytest.raises(ValueError, match="already has an attached Trainable"):
        attach(tiny_mha, TrainableConfig(targets=("q",)))
    tr.merge()
    assert not any(p.requires_grad for p in tiny_mha.parameters())
    tr = attach(tiny_mha, TrainableConfig(targets=("q",)))
    assert [n for n, _ in tr.named_parameters()] == ["blocks.0.attn.W_Q", "blocks.1.attn.W_Q"]


def test_lora_init_is_seeded():
    def a_of(seed):
        tr = attach(tiny_model(), TrainableConfig(kind="lora", lora_r=2, lora_init_seed=seed))
        sd = tr.state_dict()
        assert not any(t.any() for n, t in sd.items() if n.endswith("lora_B"))
        return sd["blocks.1.attn._W_K.lora_A"]

    assert torch.equal(a_of(3), a_of(3)) and not torch.equal(a_of(3), a_of(4))


# --- full mode --------------------------------------------------------------------------------------------


@HOOKED_ONLY
@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
@pytest.mark.parametrize("bias", [False, True])
def test_full_trains_exactly_wq_wk(fixture, bias, request):
    model = request.getfixturevalue(fixture)
    k, bk = _k_name(model), "_b_K" if model.cfg.n_key_value_heads else "b_K"
    names = ["W_Q", k] + (["b_Q", bk] if bias else [])
    expected = {f"blocks.{l}.attn.{n}" for l in range(N_LAYERS) for n in names}
    tr = attach(model, TrainableConfig(bias=bias))
    assert {n for n, _ in tr.named_parameters()} == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert tr.n_trainable == sum(model.get_parameter(n).numel() for n in expected)
    before = _snapshot(model)
    opt = torch.optim.Adam(tr.parameters(), lr=1e-2)
    _loss(model, _tokens()).backward()
    opt.step()
    after = _snapshot(model)
    for n in before:
        if n not in expected:
            assert torch.equal(before[n], after[n]), n
        elif "W_" in n or "b_Q" in n:
            assert not torch.equal(before[n], after[n]), n
    sd = tr.state_dict()
    assert set(sd) == expected and all(t.is_contiguous() and t.device.type == "cpu" for t in sd.values())
    assert all(torch.equal(sd[n], after[n]) for n in expected)


def test_head_masks_union_rule_for_k():
    gqa = attach(tiny_model(n_kv_heads=2), TrainableConfig(bias=True))
    m = gqa.head_masks(_heads((0, 1), (1, 2), (1, 3)))
    assert m["blocks.0.attn.W_Q"].flatten().tolist() == [False, True, False, False]
    assert m["blocks.0.attn.W_Q"].shape == (4, 1, 1) and m["blocks.0.attn.b_Q"].shape == (4, 1)
    assert m["blocks.0.attn._W_K"].flatten().tolist() == [True, False]  # kv 0 serves query heads 0 and 1
    assert m["blocks.1.attn._W_K"].flatten().tolist() == [False, True]
    assert m["blocks.1.attn._b_K"].flatten().tolist() == [False, True]
    mqa = attach(tiny_model(n_kv_heads=1), TrainableConfig())
    m = mqa.head_masks(_heads((0, 3)))
    assert m["blocks.0.attn._W_K"].flatten().tolist() == [True]  # one kv head: open if any head of the layer is
    assert m["blocks.1.attn._W_K"].flatten().tolist() == [False]
    mha = attach(tiny_model(n_kv_heads=None), TrainableConfig())
    assert mha.head_masks(_heads((1, 2)))["blocks.1.attn.W_K"].flatten().tolist() == [False, False, True, False]


@HOOKED_ONLY
def test_restricted_gradient_is_the_masked_full_gradient(tiny_gqa64):
    tr = attach(tiny_gqa64, TrainableConfig(bias=True))
    params = dict(tr.named_parameters())
    tokens = _tokens(1)
    full = dict(zip(params, torch.autograd.grad(_loss(tiny_gqa64, tokens), list(params.values()))))
    part = _heads((0, 2), (1, 0), (1, 1))
    with tr.restricted(part):
        got = dict(zip(params, torch.autograd.grad(_loss(tiny_gqa64, tokens), list(params.values()))))
    masks = tr.head_masks(part)
    for n in params:
        assert torch.equal(got[n], full[n].masked_fill(~masks[n], 0)), n
        assert (~masks[n]).any() and got[n][masks[n].expand_as(got[n])].abs().sum() > 0, n
    after = torch.autograd.grad(_loss(tiny_gqa64, tokens), list(params.values()))  # context left: unmasked again
    assert all(torch.equal(a, full[n]) for a, n in zip(after, params))


# One optimizer step per entry; each entry lists the per-sample participating heads of the pseudo-batch.
SCHEDULE = [
    [[(0, 0)], [(1, 3)]],
    [[(0, 2), (0, 3)], []],
    [[(0, 1)], [(1, 0), (0, 1)]],
    [[], [(1, 1)]],
]


def _restricted_run(model, tr, opt, check_step):
    """Per-sample restricted backward, masked AdamW step; check_step(union, before, after) after each step."""
    tokens = _tokens(2)
    for samples in SCHEDULE:
        opt.zero_grad()
        union = torch.zeros(N_LAYERS, N_HEADS, dtype=torch.bool)
        for i, pairs in enumerate(samples):
            part = _heads(*pairs)
            union |= part
            with tr.restricted(part):
                (_loss(model, tokens[i : i + 1]) / len(samples)).backward()
        masks = tr.head_masks(union)
        for n, p in tr.named_parameters():
            assert not p.grad[(~masks[n]).expand_as(p)].any(), n  # closed slices got no gradient
        state = lambda: {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in tr.named_parameters()}
        before = ({n: p.detach().clone() for n, p in tr.named_parameters()}, state())
        masked_step(opt, tr, union)
        after = ({n: p.detach().clone() for n, p in tr.named_parameters()}, state())
        for n in before[0]:
            closed = ~masks[n].flatten().expand(before[0][n].shape[0])
            assert torch.equal(after[0][n][closed], before[0][n][closed]), n
            for k in ("exp_avg", "exp_avg_sq"):
                old = before[1][n].get(k, torch.zeros_like(before[0][n]))  # state the step created starts at 0
                assert torch.equal(after[1][n][k][closed], old[closed]), (n, k)
        check_step(union, masks, before[0], after[0])


@HOOKED_ONLY
@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_restricted_full_keeps_closed_slices_bit_identical(fixture, request):
    model = request.getfixturevalue(fixture)
    tr = attach(model, TrainableConfig())
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.1)
    k = f"blocks.0.attn.{_k_name(model)}"
    seen_k_masks = []

    def check(union, masks, before, after):
        seen_k_masks.append(masks[k].flatten().tolist())
        for n in before:
            open_ = masks[n].flatten().expand(before[n].shape[0])
            for i in open_.nonzero().flatten().tolist():
                assert not torch.equal(after[n][i], before[n][i]), (n, i)

    _restricted_run(model, tr, opt, check)
    if fixture == "tiny_gqa":  # union rule: layer 0 opens {0}, {2,3}, {1}, {} -> kv groups {0}, {1}, {0}, {}
        assert seen_k_masks == [[True, False], [False, True], [True, False], [False, False]]
    else:
        assert seen_k_masks[1] == [False, False, True, True]
    # Without masked_step, AdamW's decay and stale moments move closed slices: the reason it exists.
    w = tr.model.blocks[1].attn.W_Q
    opt.zero_grad()
    with tr.restricted(_heads((0, 0))):
        _loss(model, _tokens(1)).backward()
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w[3], before[3])


# --- LoRA -------------------------------------------------------------------------------------------------


@HOOKED_ONLY
def test_lora_attach_train_merge_remove_and_state_dict_round_trip(tiny_gqa):
    tokens = _tokens()
    base_logits, base = tiny_gqa(tokens), _snapshot(tiny_gqa)
    config = TrainableConfig(kind="lora", lora_r=4, lora_alpha=8)
    tr = attach(tiny_gqa, config)
    assert torch.equal(tiny_gqa(tokens), base_logits)
    assert {n for n, p in tiny_gqa.named_parameters() if p.requires_grad} == {
        f"blocks.{l}.attn.parametrizations.{w}.0.lora_{ab}" for l in range(2) for w in ("W_Q", "_W_K") for ab in "AB"
    }
    names = {n for n, _ in tr.named_parameters()}
    assert names == {f"blocks.{l}.attn.{w}.lora_{ab}" for l in range(2) for w in ("W_Q", "_W_K") for ab in "AB"}
    assert tr.n_trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    opt = torch.optim.Adam(tr.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _loss(tiny_gqa, tokens).backward()
        opt.step()
    trained_logits = tiny_gqa(tokens).detach()
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)
    now = _snapshot(tiny_gqa)
    assert all(torch.equal(now[n], base[n]) for n in base)  # base weights untouched, only adapters moved

    sd = st_load(st_save(tr.state_dict()))  # safetensors-ready: contiguous CPU tensors
    merged = tr.merged_state_dict()
    fresh = tiny_model(n_layers=2, n_heads=4, n_kv_heads=2, seed=0)
    tr_fresh = attach(fresh, config)
    tr_fresh.load_state_dict(sd)
    assert torch.equal(fresh(tokens), trained_logits)
    tr_fresh.merge()
    assert not parametrize.is_parametrized(fresh.blocks[0].attn)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.allclose(fresh(tokens), trained_logits, atol=1e-5)
    assert torch.equal(fresh.blocks[1].attn._W_K, merged["blocks.1.attn._W_K"])

    tr.remove()
    assert not parametrize.is_parametrized(tiny_gqa.blocks[0].attn)
    assert torch.equal(tiny_gqa(tokens), base_logits)
    assert all(torch.equal(p, base[n]) for n, p in tiny_gqa.named_parameters())


@HOOKED_ONLY
def test_lora_remove_restores_trained_biases(tiny_mha):
    tokens = _tokens()
    base_logits = tiny_mha(tokens)
    tr = attach(tiny_mha, TrainableConfig(kind="lora", bias=True, lora_r=2))
    assert "blocks.0.attn.b_Q" in dict(tr.named_parameters())
    opt = torch.optim.Adam(tr.parameters(), lr=1e-2)
    _loss(tiny_mha, tokens).backward()
    opt.step()
    assert not torch.equal(tiny_mha(tokens), base_logits)
    tr.remove()
    assert torch.equal(tiny_mha(tokens), base_logits)


@HOOKED_ONLY
def test_lora_restricted_a_learns_only_through_open_heads(tiny_gqa64):
    tr = attach(tiny_gqa64, TrainableConfig(kind="lora", lora_r=3, lora_alpha=6))
    g = torch.Generator().manual_seed(1)
    tr.load_state_dict({n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in tr.state_dict().items()})
    part = _heads((0, 1), (0, 3))  # layer 1 fully closed
    masks = tr.head_masks(part)
    attns = [tiny_gqa64.blocks[l].attn for l in range(N_LAYERS)]
    with parametrize.cached():  # the effective weights are then single tensors we can differentiate against
        weights = {f"blocks.{l}.attn.{w}": getattr(a, w) for l, a in enumerate(attns) for w in ("W_Q", "_W_K")}
        params = dict(tr.named_parameters())
        loss = _loss(tiny_gqa64, _tokens(1))
        with tr.restricted(part):
            grads = torch.autograd.grad(loss, list(weights.values()) + list(params.values()))
    g_w = dict(zip(weights, grads[: len(weights)]))
    g_p = dict(zip(params, grads[len(weights) :]))
    for w, gw in g_w.items():
        a, b = params[w + ".lora_A"], params[w + ".lora_B"]
        open_gw = rearrange(gw.masked_fill(~masks[w + ".lora_B"].reshape(-1, 1, 1)[:: tiny_gqa64.cfg.d_head], 0),
                            "n m h -> (n h) m")
        assert torch.allclose(g_p[w + ".lora_A"], 2.0 * b.T @ open_gw, atol=1e-12), w
        assert torch.allclose(g_p[w + ".lora_B"], 2.0 * open_gw @ a.T, atol=1e-12), w
        assert not g_p[w + ".lora_B"][~masks[w + ".lora_B"].flatten()].any(), w
    assert not g_p["blocks.1.attn.W_Q.lora_A"].any() and g_p["blocks.0.attn.W_Q.lora_A"].abs().sum() > 0


@HOOKED_ONLY
def test_lora_restricted_training_keeps_closed_heads(tiny_gqa):
    base = _snapshot(tiny_gqa)
    tr = attach(tiny_gqa, TrainableConfig(kind="lora", lora_r=4))
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.1)
    q_history = []
    _restricted_run(tiny_gqa, tr, opt, lambda *_: q_history.append(tiny_gqa.blocks[0].attn.W_Q.detach().clone()))
    opened = {p for samples in SCHEDULE for pairs in samples for p in pairs}
    for l in range(N_LAYERS):
        w_q = tiny_gqa.blocks[l].attn.W_Q
        for h in range(N_HEADS):
            assert torch.equal(w_q[h], base[f"blocks.{l}.attn.W_Q"][h]) == ((l, h) not in opened), (l, h)
    # Documented consequence of the shared A: layer-0 head 0 was open only at step 0; its B rows stay frozen
    # afterwards, yet its effective W_Q slice keeps moving while A learns through heads 2, 3 and 1.
    b_rows = tr.state_dict()["blocks.0.attn.W_Q.lora_B"][0:8]
    assert b_rows.abs().sum() > 0
    assert not torch.equal(q_history[1][0], q_history[0][0])


# --- fixed head selection -----------------------------------------------------------------------------------


@HOOKED_ONLY
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fixed_heads_restrict_updates(kind, tiny_gqa):
    base = _snapshot(tiny_gqa)
    tr = attach(tiny_gqa, TrainableConfig(kind=kind, lora_r=4, heads={(0, 1), (1, 2)}))
    masks = tr.head_masks(_heads((0, 0), (0, 1), (1, 3)))  # intersection with the fixed set: only (0, 1)
    if kind == "full":
        assert masks["blocks.0.attn.W_Q"].flatten().tolist() == [False, True, False, False]
        assert not masks["blocks.1.attn.W_Q"].any()
    else:
        assert masks["blocks.0.attn.W_Q.lora_A"].item() and not masks["blocks.1.attn.W_Q.lora_A"].item()
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        _loss(tiny_gqa, _tokens()).backward()  # no restriction: the fixed selection alone masks
        masked_step(opt, tr)
    changed_q = {(l, h) for l in range(2) for h in range(4)
                 if not torch.equal(tiny_gqa.blocks[l].attn.W_Q[h], base[f"blocks.{l}.attn.W_Q"][h])}
    changed_k = {(l, g) for l in range(2) for g in range(2)
                 if not torch.equal(tiny_gqa.blocks[l].attn._W_K[g], base[f"blocks.{l}.attn._W_K"][g])}
    assert changed_q == {(0, 1), (1, 2)}
    assert changed_k == {(0, 0), (1, 1)}  # kv group of head 1 is 0, of head 2 is 1


@HOOKED_ONLY
def test_masked_step_alone_freezes_closed_slices_that_had_gradient(tiny_gqa):
    """No per-sample restriction: closed slices got gradient, masked_step still keeps them (and fresh moments 0)."""
    tr = attach(tiny_gqa, TrainableConfig())
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    w = tiny_gqa.blocks[0].attn.W_Q
    for step, open_heads in enumerate([_heads((0, 0)), _heads((0, 1)), _heads((1, 0))]):
        opt.zero_grad()
        _loss(tiny_gqa, _tokens()).backward()
        assert w.grad[2].abs().sum() > 0
        before, moments = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
        masked_step(opt, tr, open_heads)
        assert torch.equal(w[2], before[2]) and torch.equal(w[3], before[3])
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            old = moments[k][2] if step else torch.zeros_like(w[2])
            assert torch.equal(opt.state[w][k][2], old), (step, k)
    assert not torch.equal(opt.state[w]["exp_avg"][1], torch.zeros_like(w[1]))
