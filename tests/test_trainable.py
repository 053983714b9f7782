"""The trainable set: full and LoRA W_Q/W_K, per-head restricted gradients, masked optimizer steps.

Every test reads and writes the Q/K tensors through :mod:`abft_lens.backends.qk` (TransformerLens names and layout
on a ``HookedTransformer`` and on a ``TransformerBridge`` alike), so it runs under TransformerLens 3.9 and 4.x;
the few that check a hooked model's own LoRA parametrization stay 3.9-only, each with its reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.utils import parametrize

from abft_lens.backends import qk
from abft_lens.backends.bridge import is_bridge, load_bridge, lora_layer
from abft_lens.backends.loading import tiny_model
from abft_lens.training.adapters import attach, masked_step
from abft_lens.training.trainable import TrainableConfig

from conftest import hooked_only, named_tensors

N_LAYERS, N_HEADS = 2, 4


def _tokens(batch: int = 3, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(7))


def _loss(model, tokens):
    return model(tokens, return_type="loss")


def _snapshot(model) -> dict[str, Tensor]:
    """Detached copies of every model tensor but LoRA adapters: the Q/K tensors by TransformerLens name and layout
    on either backend (``conftest.named_tensors``; the base tensors under an attached LoRA), the rest by their own
    names."""
    return {name: tensor for name, tensor in named_tensors(model).items() if "lora_" not in name}


def _heads(*pairs) -> torch.Tensor:
    m = torch.zeros(N_LAYERS, N_HEADS, dtype=torch.bool)
    for l, h in pairs:
        m[l, h] = True
    return m


def _is_adapter(name: str) -> bool:
    """True for a LoRA adapter's name (``....lora_A`` / ``....lora_B``), False for a model Q/K tensor's."""
    return qk.parse_name(name)[2] is not None


def _as_tl(model, name: str, tensor: Tensor) -> Tensor:
    """``tensor``, shaped like the parameter that trains ``name`` (a gradient, an optimizer moment), in
    TransformerLens layout, the layout of ``Trainable.head_masks`` and ``state_dict``: a bridge's Q/K leaf holds
    ``d_head`` rows per head (:func:`abft_lens.backends.qk.leaf`); LoRA adapters have one layout on both backends."""
    if _is_adapter(name):
        return tensor
    rows = qk.leaf(model, name)[1]
    return tensor if rows == 1 else qk.tl_layout(tensor, rows)


def _trained_values(model, trainable) -> dict[str, Tensor]:
    """Copies of the trained tensors in TransformerLens layout: ``qk.value`` for a model Q/K tensor, the adapter
    itself for LoRA."""
    return {name: (p if _is_adapter(name) else qk.value(model, name)).detach().clone()
            for name, p in trainable.named_parameters()}


def _trained_grads(model, trainable) -> dict[str, Tensor]:
    """The gradients of the trained tensors in TransformerLens layout (``qk.grad`` for a model Q/K tensor)."""
    return {name: p.grad if _is_adapter(name) else qk.grad(model, name) for name, p in trainable.named_parameters()}


def _optimizer_state(model, trainable, optimizer) -> dict[str, dict[str, Tensor]]:
    """Copies of each trained tensor's optimizer state, the moments (shaped like the parameter) in TransformerLens
    layout."""
    return {name: {key: (_as_tl(model, name, v) if v.shape == p.shape else v).clone()
                   for key, v in optimizer.state[p].items()}
            for name, p in trainable.named_parameters()}


def _parameter_ids(params) -> set[int]:
    """Identities of ``params`` (parameters compare by identity: a bridge's have Hugging Face names)."""
    return {id(p) for p in params}


def _requiring_grad(model) -> set[int]:
    """Identities of the model's parameters that require a gradient."""
    return _parameter_ids(p for p in model.parameters() if p.requires_grad)


def _carries_adapters(model) -> bool:
    """True while LoRA adapters sit in the model: a parametrization of a hooked attention block, or a PEFT LoRA
    layer around a bridge's q/k projection."""
    if is_bridge(model):
        return any(lora_layer(getattr(block.attn, t)) is not None for block in model.blocks for t in ("q", "k"))
    return any(parametrize.is_parametrized(block.attn) for block in model.blocks)


def _already_attached(model, config: TrainableConfig) -> str:
    """The refusal of a second ``attach(model, config)``: PEFT's for LoRA on a bridge (its adapters are already in),
    the Trainable's otherwise."""
    return "already carries LoRA adapters" if is_bridge(model) and config.kind == "lora" \
        else "already has an attached Trainable"


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
    second = TrainableConfig(kind="lora")
    with pytest.raises(ValueError, match=_already_attached(tiny_gqa, second)):
        attach(tiny_gqa, second)
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


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
@pytest.mark.parametrize("bias", [False, True])
def test_full_trains_exactly_wq_wk(fixture, bias, request):
    model = request.getfixturevalue(fixture)
    attrs = qk.attr_names(model, 0)  # _W_K / _b_K under GQA, W_K / b_K otherwise
    names = [attrs["q"], attrs["k"]] + ([attrs["bq"], attrs["bk"]] if bias else [])
    expected = {qk.tensor_name(l, n) for l in range(N_LAYERS) for n in names}
    tr = attach(model, TrainableConfig(bias=bias))
    assert {n for n, _ in tr.named_parameters()} == expected
    assert _requiring_grad(model) == _parameter_ids(qk.leaf(model, n)[0] for n in expected)
    assert tr.n_trainable == sum(qk.value(model, n).numel() for n in expected)
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


def _fresh_grads(model, trainable, loss: Tensor) -> dict[str, Tensor]:
    """``loss.backward()`` from cleared gradients; the trained tensors' gradients in TransformerLens layout."""
    for p in trainable.parameters():
        p.grad = None
    loss.backward()
    return {name: g.clone() for name, g in _trained_grads(model, trainable).items()}


def test_restricted_gradient_is_the_masked_full_gradient(tiny_gqa64):
    tr = attach(tiny_gqa64, TrainableConfig(bias=True))
    tokens = _tokens(1)
    full = _fresh_grads(tiny_gqa64, tr, _loss(tiny_gqa64, tokens))
    part = _heads((0, 2), (1, 0), (1, 1))
    with tr.restricted(part):
        got = _fresh_grads(tiny_gqa64, tr, _loss(tiny_gqa64, tokens))
    masks = tr.head_masks(part)
    assert set(got) == set(full) == set(masks) == set(qk.qk_names(tiny_gqa64))  # W_Q, K and both biases
    for n in full:
        assert torch.equal(got[n], full[n].masked_fill(~masks[n], 0)), n
        assert (~masks[n]).any() and got[n][masks[n].expand_as(got[n])].abs().sum() > 0, n
    after = _fresh_grads(tiny_gqa64, tr, _loss(tiny_gqa64, tokens))  # context left: unmasked again
    assert all(torch.equal(after[n], full[n]) for n in full)


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
        masks = tr.head_masks(union)  # TransformerLens layout, as _trained_grads / _trained_values
        for n, g in _trained_grads(model, tr).items():
            assert not g[(~masks[n]).expand_as(g)].any(), n  # closed slices got no gradient
        before = (_trained_values(model, tr), _optimizer_state(model, tr, opt))
        masked_step(opt, tr, union)
        after = (_trained_values(model, tr), _optimizer_state(model, tr, opt))
        for n in before[0]:
            closed = ~masks[n].flatten().expand(before[0][n].shape[0])
            assert torch.equal(after[0][n][closed], before[0][n][closed]), n
            for k in ("exp_avg", "exp_avg_sq"):
                old = before[1][n].get(k, torch.zeros_like(before[0][n]))  # state the step created starts at 0
                assert torch.equal(after[1][n][k][closed], old[closed]), (n, k)
        check_step(union, masks, before[0], after[0])


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_restricted_full_keeps_closed_slices_bit_identical(fixture, request):
    model = request.getfixturevalue(fixture)
    tr = attach(model, TrainableConfig())
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.1)
    k = qk.tensor_name(0, qk.attr_names(model, 0)["k"])
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
    w_q = qk.tensor_name(1, "W_Q")
    opt.zero_grad()
    with tr.restricted(_heads((0, 0))):
        _loss(model, _tokens(1)).backward()
    before = qk.value(model, w_q).detach().clone()
    opt.step()
    assert not torch.equal(qk.value(model, w_q)[3], before[3])


# --- LoRA -------------------------------------------------------------------------------------------------


def test_qk_reads_the_base_tensors_under_attached_lora(tiny_gqa):
    """``qk.qk_names``/``leaf``/``value``/``snapshot`` see the same names and the base values with LoRA adapters
    attached as without, on a hooked model (the parametrization's ``original``) and on a bridge (PEFT's base
    layer); ``layer_qk`` is the effective weight, base plus the adapters' delta."""
    names, base = qk.qk_names(tiny_gqa), qk.snapshot(tiny_gqa)
    tr = attach(tiny_gqa, TrainableConfig(kind="lora", lora_r=2))
    g = torch.Generator().manual_seed(3)
    tr.load_state_dict({n: torch.randn(t.shape, generator=g) for n, t in tr.state_dict().items()})
    assert qk.qk_names(tiny_gqa) == names
    under_lora = qk.snapshot(tiny_gqa)
    assert under_lora.keys() == base.keys() and all(torch.equal(under_lora[n], base[n]) for n in base)
    assert all(not qk.leaf(tiny_gqa, n)[0].requires_grad for n in names)  # the base stays frozen
    effective_q = qk.layer_qk(tiny_gqa)[0][0]
    assert not torch.equal(effective_q, base["blocks.0.attn.W_Q"])  # the adapters move the effective weight
    tr.remove()
    assert all(torch.equal(qk.value(tiny_gqa, n), base[n]) for n in names)


def test_lora_attach_train_merge_remove_and_state_dict_round_trip(tiny_gqa):
    tokens = _tokens()
    base_logits, base = tiny_gqa(tokens), _snapshot(tiny_gqa)
    config = TrainableConfig(kind="lora", lora_r=4, lora_alpha=8)
    tr = attach(tiny_gqa, config)
    assert torch.equal(tiny_gqa(tokens), base_logits)
    assert _carries_adapters(tiny_gqa)
    assert _requiring_grad(tiny_gqa) == _parameter_ids(tr.parameters())  # the adapters, nothing else
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
    # hooked: the adapters fold into W_Q/_W_K; bridge: they stay in, frozen (its weights are not rewritten)
    assert _carries_adapters(fresh) == tr_fresh.keeps_adapters == is_bridge(fresh)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.allclose(fresh(tokens), trained_logits, atol=1e-5)
    assert torch.equal(qk.layer_qk(fresh)[1][1], merged["blocks.1.attn._W_K"])  # effective K of layer 1

    tr.remove()
    assert not _carries_adapters(tiny_gqa)
    assert torch.equal(tiny_gqa(tokens), base_logits)
    restored = _snapshot(tiny_gqa)
    assert restored.keys() == base.keys() and all(torch.equal(restored[n], base[n]) for n in base)


@hooked_only("TransformerLens's LoRA is a torch parametrization of the hooked attention block; a bridge has none "
             "(PEFT LoRA layers, test_bridge.py)")
def test_hooked_lora_adapters_are_parametrizations_of_the_attention_weights(tiny_gqa):
    tr = attach(tiny_gqa, TrainableConfig(kind="lora", lora_r=4))
    assert {n for n, p in tiny_gqa.named_parameters() if p.requires_grad} == {
        f"blocks.{l}.attn.parametrizations.{w}.0.lora_{ab}" for l in range(2) for w in ("W_Q", "_W_K") for ab in "AB"
    }
    tr.merge()
    assert not any(parametrize.is_parametrized(block.attn) for block in tiny_gqa.blocks)
    assert {"blocks.0.attn.W_Q", "blocks.0.attn._W_K"} <= dict(tiny_gqa.named_parameters()).keys()


@hooked_only("LoRA with bias training exists on a HookedTransformer only: PEFT LoRA on a bridge trains no "
             "biases, and attach refuses it (test_lora_bias_training_is_refused_on_a_bridge)")
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


def test_lora_bias_training_is_refused_on_a_bridge(hf_llama_dir):
    """PEFT LoRA on a bridge trains no biases: attach refuses LoRA with bias training with a clear error, before it
    touches the model, and LoRA without biases attaches afterwards (a bridge under either TransformerLens)."""
    bridge = load_bridge(hf_llama_dir, name="t", source="hf-folder", quantize=False)
    base, requiring_grad = _snapshot(bridge), _requiring_grad(bridge)
    with pytest.raises(ValueError, match=r"LoRA adapters only: use TrainableConfig\(kind='lora', bias=False\)"):
        attach(bridge, TrainableConfig(kind="lora", bias=True, lora_r=2))
    after = _snapshot(bridge)
    assert not _carries_adapters(bridge) and _requiring_grad(bridge) == requiring_grad
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base)  # no bias created
    tr = attach(bridge, TrainableConfig(kind="lora", lora_r=2))
    assert _carries_adapters(bridge) and not any(qk.is_bias(qk.parse_name(n)[1]) for n, _ in tr.named_parameters())


def test_lora_restricted_a_learns_only_through_open_heads(tiny_gqa64):
    tr = attach(tiny_gqa64, TrainableConfig(kind="lora", lora_r=3, lora_alpha=6))
    g = torch.Generator().manual_seed(1)
    tr.load_state_dict({n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in tr.state_dict().items()})
    part = _heads((0, 1), (0, 3))  # layer 1 fully closed
    masks = tr.head_masks(part)
    # the gradient of each base weight is the effective weight's (W = W_base + delta), unmasked
    bases = {qk.tensor_name(l, w): qk.leaf(tiny_gqa64, qk.tensor_name(l, w))
             for l in range(N_LAYERS) for w in ("W_Q", "_W_K")}
    for base, _ in bases.values():
        base.requires_grad_(True)
    params = dict(tr.named_parameters())
    loss = _loss(tiny_gqa64, _tokens(1))
    with tr.restricted(part):
        grads = torch.autograd.grad(loss, [base for base, _ in bases.values()] + list(params.values()))
    g_w = {w: g if rows == 1 else qk.tl_layout(g, rows) for (w, (_, rows)), g in zip(bases.items(), grads)}
    g_p = dict(zip(params, grads[len(bases) :]))
    for w, gw in g_w.items():
        a, b = params[w + ".lora_A"], params[w + ".lora_B"]
        open_gw = rearrange(gw.masked_fill(~masks[w + ".lora_B"].reshape(-1, 1, 1)[:: tiny_gqa64.cfg.d_head], 0),
                            "n m h -> (n h) m")
        assert torch.allclose(g_p[w + ".lora_A"], 2.0 * b.T @ open_gw, atol=1e-12), w
        assert torch.allclose(g_p[w + ".lora_B"], 2.0 * open_gw @ a.T, atol=1e-12), w
        assert not g_p[w + ".lora_B"][~masks[w + ".lora_B"].flatten()].any(), w
    assert not g_p["blocks.1.attn.W_Q.lora_A"].any() and g_p["blocks.0.attn.W_Q.lora_A"].abs().sum() > 0


def test_lora_restricted_training_keeps_closed_heads(tiny_gqa):
    base = qk.layer_qk(tiny_gqa)  # effective (W_Q, K) per layer: with the adapters' delta while they are attached
    tr = attach(tiny_gqa, TrainableConfig(kind="lora", lora_r=4))
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.1)
    q_history = []
    _restricted_run(tiny_gqa, tr, opt, lambda *_: q_history.append(qk.layer_qk(tiny_gqa)[0][0]))
    opened = {p for samples in SCHEDULE for pairs in samples for p in pairs}
    now = qk.layer_qk(tiny_gqa)
    for l in range(N_LAYERS):
        for h in range(N_HEADS):
            assert torch.equal(now[l][0][h], base[l][0][h]) == ((l, h) not in opened), (l, h)
    # Documented consequence of the shared A: layer-0 head 0 was open only at step 0; its B rows stay frozen
    # afterwards, yet its effective W_Q slice keeps moving while A learns through heads 2, 3 and 1.
    b_rows = tr.state_dict()["blocks.0.attn.W_Q.lora_B"][0:8]
    assert b_rows.abs().sum() > 0
    assert not torch.equal(q_history[1][0], q_history[0][0])


# --- fixed head selection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fixed_heads_restrict_updates(kind, tiny_gqa):
    base = qk.layer_qk(tiny_gqa)  # effective (W_Q, _W_K) per layer
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
    now = qk.layer_qk(tiny_gqa)
    assert [tuple(k.shape) for _, k in now] == [(2, 32, 8)] * N_LAYERS  # _W_K: one slice per kv head
    changed_q = {(l, h) for l in range(2) for h in range(4) if not torch.equal(now[l][0][h], base[l][0][h])}
    changed_k = {(l, g) for l in range(2) for g in range(2) if not torch.equal(now[l][1][g], base[l][1][g])}
    assert changed_q == {(0, 1), (1, 2)}
    assert changed_k == {(0, 0), (1, 1)}  # kv group of head 1 is 0, of head 2 is 1


def test_masked_step_alone_freezes_closed_slices_that_had_gradient(tiny_gqa):
    """No per-sample restriction: closed slices got gradient, masked_step still keeps them (and fresh moments 0)."""
    tr = attach(tiny_gqa, TrainableConfig())
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    w_q = qk.tensor_name(0, "W_Q")
    moment = lambda k: _optimizer_state(tiny_gqa, tr, opt)[w_q][k]  # noqa: E731  (TransformerLens layout)
    for step, open_heads in enumerate([_heads((0, 0)), _heads((0, 1)), _heads((1, 0))]):
        opt.zero_grad()
        _loss(tiny_gqa, _tokens()).backward()
        assert qk.grad(tiny_gqa, w_q)[2].abs().sum() > 0
        before, moments = qk.value(tiny_gqa, w_q).detach().clone(), _optimizer_state(tiny_gqa, tr, opt)[w_q]
        masked_step(opt, tr, open_heads)
        after = qk.value(tiny_gqa, w_q)
        assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            old = moments[k][2] if step else torch.zeros_like(before[2])
            assert torch.equal(moment(k)[2], old), (step, k)
    assert not torch.equal(moment("exp_avg")[1], torch.zeros_like(before[1]))
