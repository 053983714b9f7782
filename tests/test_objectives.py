"""ABFT loss against a plain-torch reference (value and W_Q/W_K gradients), filter semantics, training
direction, the self-adaptive penalty and the E2E baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from abft_lens.backends import qk
from abft_lens.backends.bridge import is_bridge
from abft_lens.interp.capture import capture_attention_rows
from abft_lens.backends.forward import forward_residual
from abft_lens.interp.induction_filter import induction_threshold
from abft_lens.training.objectives import PenaltyController, abft_loss, e2e_loss

# --------------------------------------------------------------------------------------------------------
# Plain-torch reference of layer 0 of the tiny Llama-style model, straight from the weights.


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotary(x: torch.Tensor, base: float, rotary_dim: int) -> torch.Tensor:
    """x: [pos, head, d_head]; GPT-NeoX / Llama rotary on the first rotary_dim dims (halves paired)."""
    pos = torch.arange(x.shape[0], dtype=x.dtype)
    inv_freq = base ** (-torch.arange(rotary_dim // 2, dtype=x.dtype) / (rotary_dim / 2))
    angles = pos[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # [pos, 1, rotary_dim]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = x_rot * angles.cos() + _rotate_half(x_rot) * angles.sin()
    return torch.cat([rotated, x_pass], dim=-1)


def _qk(model, attr: str) -> torch.Tensor:
    """Layer 0's ``attr`` in TransformerLens layout on either version (a bridge gets zero biases created)."""
    return qk.value(model, qk.tensor_name(0, attr)) if not qk.is_bias(attr) else \
        qk.value(model, qk.tensor_name(0, attr)) if qk.leaf(model, qk.tensor_name(0, attr), create=True) else None


def _ln1_weight(model) -> torch.Tensor:
    ln = model.blocks[0].ln1
    return ln.original_component.weight if hasattr(ln, "original_component") else ln.w


def _reference_last_row(model, tokens, W_Q, W_K):
    """[head, key_pos] last attention row of layer 0 for one prompt ``tokens`` [pos]."""
    cfg = model.cfg
    x = model.embed.W_E.detach()[tokens]  # [pos, d_model]
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps) * _ln1_weight(model).detach()
    q = torch.einsum("pd,hde->phe", x, W_Q) + _qk(model, "b_Q").detach()
    k = torch.einsum("pd,gde->pge", x, W_K) + _qk(model, "_b_K").detach()
    k = torch.repeat_interleave(k, cfg.n_heads // k.shape[1], dim=1)
    rotary_dim = cfg.rotary_dim or cfg.d_head
    q, k = _rotary(q, cfg.rotary_base, rotary_dim), _rotary(k, cfg.rotary_base, rotary_dim)
    scores = torch.einsum("qhe,khe->hqk", q, k) / math.sqrt(cfg.d_head)
    n = tokens.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return pattern[:, -1, :]


def _reference_loss(row, positions, labels, query_label, award, penalty, threshold):
    """Head by head, in plain Python sums."""
    total = row.new_zeros(())
    for head in range(row.shape[0]):
        alpha = [row[head, p] for p in positions]
        if sum(a.item() for a in alpha) <= threshold:
            continue
        for a, label in zip(alpha, labels):
            total = total + (award * (1 - a) if label == query_label else penalty * a)
    return total


def _float64_tolerance(model) -> dict:
    """How close a float64 model comes to the float64 reference. TransformerLens 3.9 computes in float64
    throughout; a bridge runs Hugging Face's Llama, whose RMSNorm, rotary angles and attention softmax are
    computed in float32 whatever the model's dtype (measured: the row within 9e-8)."""
    return dict(rtol=1e-5, atol=2e-7) if is_bridge(model) else dict(rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("query_label", [1, 2])  # 2: I+ empty
def test_loss_and_gradients_match_plain_torch_reference(tiny_gqa64, query_label):
    model = tiny_gqa64
    close, grad_close = _float64_tolerance(model), dict(rtol=1e-10, atol=1e-13)
    if is_bridge(model):
        grad_close = dict(rtol=1e-4, atol=1e-6)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial norm weight and biases, so the reference must get them right
        ln_noise = torch.randn(model.cfg.d_model, generator=generator, dtype=torch.float64)
        _ln1_weight(model).copy_(1 + 0.3 * ln_noise)
        for bias in ("b_Q", "_b_K"):
            _qk(model, bias).copy_(0.2 * torch.randn(_qk(model, bias).shape, generator=generator, dtype=torch.float64))
        _qk(model, "W_Q").mul_(4.0)  # sharper attention than the random init
    tokens = torch.randint(0, model.cfg.d_vocab, (14,), generator=generator)
    positions, labels = [2, 5, 8, 11], [0, 1, 0, 1]
    award, penalty = 1.0, 0.7

    for p in model.parameters():
        p.requires_grad_(False)
    for attr in ("W_Q", "_W_K"):
        qk.leaf(model, qk.tensor_name(0, attr))[0].requires_grad_(True)
    W_Q = _qk(model, "W_Q").detach().clone().requires_grad_(True)
    W_K = _qk(model, "_W_K").detach().clone().requires_grad_(True)
    ref_row = _reference_last_row(model, tokens, W_Q, W_K)
    sums = sorted(ref_row[:, positions].sum(-1).tolist())
    threshold = (sums[1] + sums[2]) / 2  # two heads pass, two do not
    ref_loss = _reference_loss(ref_row, positions, labels, query_label, award, penalty, threshold)
    ref_loss.backward()

    with capture_attention_rows(model, layers=[0]) as store:
        forward_residual(model, tokens[None], stop_at_layer=store.stop_at_layer)
    row = store.stacked()[0]  # [layer=1, head, key]
    torch.testing.assert_close(row[0].detach(), ref_row.detach(), **close)
    result = abft_loss(
        row, torch.tensor(positions), torch.tensor(labels), query_label,
        award=award, penalty=penalty, threshold=threshold,
    )
    assert result.n_participating == 2
    result.loss.backward()
    torch.testing.assert_close(result.loss.detach(), ref_loss.detach(), **close)
    torch.testing.assert_close(qk.grad(model, "blocks.0.attn.W_Q"), W_Q.grad, **grad_close)
    torch.testing.assert_close(qk.grad(model, "blocks.0.attn._W_K"), W_K.grad, **grad_close)
    assert W_Q.grad.abs().max() > 1e-4 and W_K.grad.abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------------
# Filter semantics on a hand-made row.

ROW = torch.tensor(
    [[[0.1, 0.3, 0.1, 0.4, 0.1],  # head 0: S on positions 1, 3 = 0.7
      [0.5, 0.1, 0.2, 0.1, 0.1]]],  # head 1: S = 0.2
    dtype=torch.float64,
)
POSITIONS, LABELS = torch.tensor([1, 3]), torch.tensor([0, 1])


def test_hand_computed_terms_and_gradient():
    row = ROW.clone().requires_grad_(True)
    result = abft_loss(row, POSITIONS, LABELS, 1, award=1.0, penalty=0.5, threshold=0.5)
    assert result.participating.tolist() == [[True, False]]
    assert result.n_participating == 1
    assert result.award_term.item() == pytest.approx(0.6)  # B (1 - 0.4)
    assert result.penalty_term.item() == pytest.approx(0.15)  # A 0.3
    assert result.loss.item() == pytest.approx(0.75)
    result.loss.backward()
    expected = torch.zeros_like(ROW)
    expected[0, 0, 1], expected[0, 0, 3] = 0.5, -1.0  # dL/dα: A on I-, -B on I+; head 1 filtered out
    torch.testing.assert_close(row.grad, expected)
    assert not result.participating.requires_grad


def test_empty_positive_set_gives_penalty_only():
    result = abft_loss(ROW, POSITIONS, LABELS, 7, award=1.0, penalty=0.5, threshold=0.5)
    assert result.award_term.item() == 0.0
    assert result.penalty_term.item() == pytest.approx(0.5 * 0.7)
    assert result.loss.item() == pytest.approx(0.35)


def test_all_heads_pass_with_low_threshold():
    result = abft_loss(ROW, POSITIONS, LABELS, 1, award=2.0, penalty=0.5, threshold=0.0)
    assert result.n_participating == 2
    assert result.loss.item() == pytest.approx(2 * (0.6 + 0.9) + 0.5 * (0.3 + 0.1))


def test_no_participating_head_is_a_backward_able_zero():
    row = ROW.clone().requires_grad_(True)
    result = abft_loss(row, POSITIONS, LABELS, 1, award=1.0, penalty=0.5, threshold=0.95)
    assert result.n_participating == 0
    assert result.loss.item() == 0.0 and result.loss.requires_grad
    result.loss.backward()
    assert row.grad is not None and row.grad.abs().max() == 0


@pytest.mark.parametrize(
    ("positions", "labels", "kwargs", "message"),
    [
        ([1, 3], [0], {}, "one label index per demonstration"),
        ([1, 5], [0, 1], {}, "out of range"),
        ([-1, 3], [0, 1], {}, "out of range"),
        ([3, 3], [0, 1], {}, "repeats a position"),
        ([], [], {}, "empty"),
        ([1, 3], [0, 1], {"penalty": -0.1}, "must be finite and >= 0"),
    ],
)
def test_abft_loss_rejects_bad_inputs(positions, labels, kwargs, message):
    arguments = {"award": 1.0, "penalty": 0.5, "threshold": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        abft_loss(ROW, torch.tensor(positions, dtype=torch.long), torch.tensor(labels, dtype=torch.long), 1,
                  **arguments)


def test_abft_loss_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\[layer, head, key_pos\]"):
        abft_loss(ROW[0], POSITIONS, LABELS, 1, award=1.0, penalty=0.5, threshold=0.5)
    with pytest.raises(ValueError, match="label_positions must be a 1-D integer tensor"):
        abft_loss(ROW, POSITIONS.float(), LABELS, 1, award=1.0, penalty=0.5, threshold=0.5)


def test_induction_threshold_natural_log():
    assert induction_threshold(4, 64) == pytest.approx(0.4903, abs=1e-4)
    assert induction_threshold(4, 128) == pytest.approx(0.4519, abs=1e-4)
    assert induction_threshold(4, 256) == pytest.approx(0.4190, abs=1e-4)
    assert induction_threshold(4, 1) == 1.0
    with pytest.raises(ValueError, match="k >= 1"):
        induction_threshold(0, 64)
    with pytest.raises(ValueError, match="n_tokens >= 1"):
        induction_threshold(4, 0)


# --------------------------------------------------------------------------------------------------------
# Direction: optimising W_Q/W_K with the ABFT loss moves attention onto the correct labels.


def _label_masses(model, tokens, positions, labels, query_label):
    with capture_attention_rows(model, detach=True) as store:
        forward_residual(model, tokens[None], stop_at_layer=store.stop_at_layer)
    alpha = store.stacked()[0][:, :, positions]  # [layer, head, k]
    correct = torch.tensor(labels) == query_label
    return alpha[..., correct].sum(-1), alpha[..., ~correct].sum(-1)


def test_abft_steps_move_attention_to_correct_labels(tiny_gqa):
    model = tiny_gqa
    tokens = torch.randint(0, model.cfg.d_vocab, (16,), generator=torch.Generator().manual_seed(5))
    positions, labels, query_label = [3, 7, 11, 14], [0, 1, 0, 2], 1  # one correct label: loss floor 0
    params = [qk.leaf(model, qk.tensor_name(layer, attr))[0] for layer in range(model.cfg.n_layers)
              for attr in ("W_Q", "_W_K")]
    optimizer = torch.optim.Adam(params, lr=0.05)
    right_before, wrong_before = _label_masses(model, tokens, positions, labels, query_label)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        with capture_attention_rows(model) as store:
            forward_residual(model, tokens[None], stop_at_layer=store.stop_at_layer)
        result = abft_loss(
            store.stacked()[0], torch.tensor(positions), torch.tensor(labels), query_label,
            award=1.0, penalty=0.5, threshold=0.0,
        )
        assert result.n_participating == model.cfg.n_layers * model.cfg.n_heads
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    right_after, wrong_after = _label_masses(model, tokens, positions, labels, query_label)
    assert losses[-1] < 0.5 * losses[0]
    assert (right_after - right_before).mean() > 0.5  # mass on the correct label, averaged over heads
    assert bool((wrong_after < wrong_before).all())  # every head: less mass on the wrong labels
    assert bool((right_after - wrong_after > right_before - wrong_before).all())  # every head: wider margin


# --------------------------------------------------------------------------------------------------------
# End-to-end baseline.


def test_e2e_loss_is_cross_entropy_and_trains(tiny_gqa):
    model = tiny_gqa
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 10), generator=torch.Generator().manual_seed(7))
    gold = 11
    logits = model(tokens)[0, -1]
    expected = F.cross_entropy(logits[None], torch.tensor([gold]))
    torch.testing.assert_close(e2e_loss(logits, gold), expected)
    torch.testing.assert_close(e2e_loss(logits.half(), gold), expected, atol=2e-3, rtol=1e-3)

    params = [qk.leaf(model, qk.tensor_name(layer, attr))[0] for layer in range(model.cfg.n_layers)
              for attr in ("W_Q", "_W_K")]
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = e2e_loss(model(tokens)[0, -1], gold)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="out of range"):
        e2e_loss(logits, model.cfg.d_vocab)
    with pytest.raises(ValueError, match=r"\[vocab\]"):
        e2e_loss(logits[None], gold)


# --------------------------------------------------------------------------------------------------------
# Self-adaptive penalty.


def _run(controller, heads):
    return [controller.update(n) for n in heads]


def test_pid_sequence_by_hand():
    controller = PenaltyController(mode="PID")
    # t3: .03(-1) + .005(1) + .005(11-24+10) = -0.04; t4: .03(4) + .005(5) + .005(5) = 0.17;
    # t5: 0 + .005(5) + .005(15-30+11) = 0.005
    assert _run(controller, [10, 12, 11, 15, 15]) == pytest.approx([0.5, 0.5, 0.46, 0.63, 0.635])
    assert [heads for _, heads in controller.history] == [10, 12, 11, 15, 15]
    assert [penalty for penalty, _ in controller.history] == pytest.approx([0.5, 0.5, 0.46, 0.63, 0.635])
    assert controller.penalty == pytest.approx(0.635) and controller.step == 5


def test_p_sequence_by_hand():
    controller = PenaltyController(mode="P")
    assert _run(controller, [10, 12, 11, 15]) == pytest.approx([0.5, 0.56, 0.53, 0.65])


def test_none_mode_keeps_penalty():
    controller = PenaltyController(mode="None", initial_penalty=0.25)
    assert _run(controller, [10, 30, 0, 7]) == [0.25] * 4
    assert controller.mean_heads == [10, 30, 0, 7]


def test_penalty_clamped_at_zero():
    p_mode = PenaltyController(mode="P", initial_penalty=0.2, p_gain=0.1)
    assert _run(p_mode, [10, 5, 6]) == pytest.approx([0.2, 0.0, 0.1])  # continues from the clamped value
    pid = PenaltyController(mode="PID", initial_penalty=0.01)
    assert _run(pid, [10, 10, 0]) == pytest.approx([0.01, 0.01, 0.0])


def test_state_dict_round_trip_resumes_identically():
    original = PenaltyController(mode="PID", kp=0.05)
    _run(original, [8, 9.5, 7.25])
    state = json.loads(json.dumps(original.state_dict()))
    resumed = PenaltyController(mode="PID", kp=0.05)
    resumed.load_state_dict(state)
    assert resumed == original
    assert PenaltyController.from_state_dict(state) == original
    assert _run(resumed, [12, 3]) == _run(original, [12, 3])
    with pytest.raises(ValueError, match=r"different \['kp'\]"):
        PenaltyController(mode="PID").load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        PenaltyController().load_state_dict({"mode": "PID"})


def test_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode='pid' unknown"):
        PenaltyController(mode="pid")
    with pytest.raises(ValueError, match="initial_penalty"):
        PenaltyController(initial_penalty=-1.0)
    with pytest.raises(ValueError, match="finite head count"):
        PenaltyController().update(float("nan"))
