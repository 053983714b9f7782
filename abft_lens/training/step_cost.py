"""What a training step costs, counted from the model's dimensions and the prompts' lengths: FLOPs, peak memory,
and the micro-batch size that keeps a step's memory within a budget (``TrainConfig.micro_batch_size=None``).

Notation: a prompt of T tokens; d = d_model, h query heads, g key/value heads (g = h without GQA), e = d_head,
f = d_mlp, M = the MLP's matrices (3 gated, 2 plain), L = n_layers, V = the unembedding columns computed.

**FLOPs** (matmuls only, 2 per multiply-add; norms, softmax, rotary and the optimizer are left out). Per layer
the matmuls are q = 2·T·d·h·e, k = v = 2·T·d·g·e, o = 2·T·h·e·d, mlp = M·2·T·d·f and the attention's
qk = av = 2·h·T²·e (every query against every key: TransformerLens masks the upper triangle, it does not skip
it); a layer's weights P = d·e·(2h + 2g) + M·d·f.

- forward, one layer: 2·T·P + 4·h·T²·e; so a forward is 2·params·T + attention's QK/AV terms. ABFT's last layer
  stops at its pattern (:func:`abft_lens.interp.capture.forward_to_last_pattern`): q + k + v + qk.
- backward (ABFT, full W_Q/W_K trained in every layer): the W_Q/W_K gradients, q + k per layer, and the
  gradients to the activations that autograd computes: in a middle layer every matmul's (one per linear,
  two per attention matmul: q + 2k + o + mlp + 2qk + 2av, with v's input gradient as big as k's); in layer 0 none
  into the embedding (o + mlp + 2qk + av: v there depends on frozen weights only); in the last layer
  2qk + q + k. That is ≈ the forward again (its rule of thumb), and equals torch's own flop counter on the
  tiny model (tested).
- an E2E step runs the last layer whole (a middle layer's backward) and adds the unembedding, 2·d·V at the last
  position (V = d_vocab), forward and backward.
- evaluation per prompt: the forward of every layer + 2·d·V (V = the label words:
  :func:`abft_lens.evaluation.evaluator.label_logits` computes those columns only).

For SmolLM2-135M (d 576, h 9, g 3, e 64, f 1536, L 30) and a 94-token prompt: a full forward 20.6 GFLOP (0.6 of
it attention), an ABFT step 43.0 GFLOP (forward 20.0, backward 23.0; issue 19 estimated 42.5).

**Peak memory** of a step at ``m`` prompts per forward (bytes):

- activations kept for the backward, per prompt of T tokens, per layer, in elements:
  T·(6·d + 8·h·e + 4·f) + 3·h·T² (residual in/out of both norms and the attention output; q, k, v repeated to
  h heads, their rotary copies and z; the gated MLP's gate, activation, up and product; scores, masked scores
  and pattern); 4 bytes each in float32, 3 under bfloat16 autocast (matmul outputs bfloat16, norms and softmax
  float32); times :data:`ACTIVATION_OVERHEAD` (1.3: the backward's gradient buffers beside the saved
  activations, and the allocator's slack). Calibration, issue 19's SmolLM2 peaks (16 SST-2 prompts, the longest
  133 tokens, so every micro-batch's widest one is padded to 133): each prompt added 290-357 MiB in
  micro-batches of 4, 8 and 16 over the per-sample loop's 1568 MiB, against 271 MiB counted here at 133
  tokens; with 1.3 the estimate is 352 MiB a prompt, 1526 MiB per sample, 2582 MiB at 4 (measured 2580).
- fixed: the process (:data:`RUNTIME_MIB`: Python, torch, the tokenizer and the data), the model's parameters
  and buffers, 3 float32 copies of the trained tensors (gradient, Adam's two moments), and under bfloat16
  autocast the bfloat16 copies of the matmul weights that the backward keeps.
- peak(m) = fixed + m · activations(T_max), T_max the longest training prompt (micro-batches are sorted by
  length, so the longest prompts share the widest one).

:func:`pick_micro_batch` takes the largest m (at most the prompts a process gets per step) with
peak(m) <= ``ratio`` · peak(1), ``ratio`` = :data:`MEMORY_BUDGET` = 1.3 by default; on CUDA the whole
pseudo-batch. Its reason is written to the run's ``config.json`` (``resolved``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Dims", "forward_flops", "backward_flops", "abft_step_flops", "eval_flops", "activation_bytes", "fixed_bytes",
           "step_peak_bytes", "model_bytes_of", "trained_elements", "pick_micro_batch", "MEMORY_BUDGET",
           "RUNTIME_MIB", "ACTIVATION_OVERHEAD"]

MEMORY_BUDGET = 1.3  # default: a step's peak RSS at most 1.3x the per-sample step's
RUNTIME_MIB = 400.0  # a Python process with torch, transformers, the tokenizer and a task loaded (measured ~400)
ACTIVATION_OVERHEAD = 1.3  # measured / counted activation memory on SmolLM2 (issue 19's micro-batch peaks)
_MIB = 2**20


@dataclass(frozen=True)
class Dims:
    """The dimensions a cost is counted from (see the module docstring for the letters)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    mlp_matrices: int
    d_vocab: int

    @classmethod
    def of(cls, model) -> "Dims":
        """The dimensions of a HookedTransformer or a bridge (``model.cfg``)."""
        cfg = model.cfg
        return cls(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                   n_kv_heads=cfg.n_key_value_heads or cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp or 0,
                   mlp_matrices=3 if getattr(cfg, "gated_mlp", False) else 2, d_vocab=cfg.d_vocab)

    @property
    def layer_weights(self) -> int:
        """P: one layer's matmul weights (W_Q, W_K, W_V, W_O, the MLP), elements."""
        return self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads) \
            + self.mlp_matrices * self.d_model * self.d_mlp

    @property
    def qk_weights(self) -> int:
        """One layer's W_Q and W_K, elements."""
        return self.d_model * self.d_head * (self.n_heads + self.n_kv_heads)


def _matmuls(dims: Dims, tokens: int) -> dict[str, int]:
    """One layer's matmul FLOPs at ``tokens`` tokens, by name (see the module docstring)."""
    d, e, t = dims.d_model, dims.d_head, tokens
    return {"q": 2 * t * d * dims.n_heads * e, "k": 2 * t * d * dims.n_kv_heads * e,
            "o": 2 * t * dims.n_heads * e * d, "mlp": dims.mlp_matrices * 2 * t * d * dims.d_mlp,
            "qk": 2 * dims.n_heads * t * t * e}


def forward_flops(dims: Dims, tokens: int, *, stop_at_last_pattern: bool = False, unembed_columns: int = 0) -> int:
    """FLOPs of one prompt's forward (``tokens`` long): every layer, or ABFT's (the last layer up to its
    pattern), plus ``unembed_columns`` unembedding columns at the last position."""
    m = _matmuls(dims, tokens)
    layer = m["q"] + 2 * m["k"] + m["o"] + m["mlp"] + 2 * m["qk"]
    if not stop_at_last_pattern:
        return dims.n_layers * layer + 2 * dims.d_model * unembed_columns
    return (dims.n_layers - 1) * layer + m["q"] + 2 * m["k"] + m["qk"] + 2 * dims.d_model * unembed_columns


def backward_flops(dims: Dims, tokens: int, *, method: str = "ABFT") -> int:
    """FLOPs of one prompt's backward with full W_Q/W_K trained in every layer: their weight gradients and the
    activation gradients autograd computes (module docstring)."""
    m, n = _matmuls(dims, tokens), dims.n_layers
    middle = m["q"] + 2 * m["k"] + m["o"] + m["mlp"] + 4 * m["qk"]
    first = m["o"] + m["mlp"] + 3 * m["qk"]
    if method == "E2E":
        last = middle if n > 1 else first
        unembed = 2 * dims.d_model * dims.d_vocab
    else:
        last = 2 * m["qk"] + (m["q"] + m["k"] if n > 1 else 0)
        unembed = 0
    inner = first + (n - 2) * middle if n > 1 else 0
    return n * (m["q"] + m["k"]) + inner + last + unembed


def abft_step_flops(dims: Dims, tokens: int, *, method: str = "ABFT") -> int:
    """FLOPs of one prompt's training step: forward and backward (:func:`forward_flops`,
    :func:`backward_flops`). ``method="E2E"`` runs every layer and the full unembedding at the last position."""
    e2e = method == "E2E"
    forward = forward_flops(dims, tokens, stop_at_last_pattern=not e2e, unembed_columns=dims.d_vocab if e2e else 0)
    return forward + backward_flops(dims, tokens, method=method)


def eval_flops(dims: Dims, tokens: int, n_labels: int) -> int:
    """FLOPs of one prompt's evaluation: the full forward and the label words' unembedding columns."""
    return forward_flops(dims, tokens, unembed_columns=n_labels)


def activation_bytes(dims: Dims, tokens: int, *, bfloat16: bool = False) -> float:
    """Bytes one prompt of ``tokens`` tokens keeps for the backward (times :data:`ACTIVATION_OVERHEAD`)."""
    per_layer = tokens * (6 * dims.d_model + 8 * dims.n_heads * dims.d_head + 4 * dims.d_mlp) \
        + 3 * dims.n_heads * tokens**2
    return dims.n_layers * per_layer * (3 if bfloat16 else 4) * ACTIVATION_OVERHEAD


def fixed_bytes(model_bytes: float, trained_elements: int, dims: Dims, *, bfloat16: bool = False) -> float:
    """Bytes a step needs whatever its micro-batch: the process, the model (``model_bytes``: parameters and
    buffers), gradient and Adam state of ``trained_elements`` float32 elements, bfloat16 weight copies."""
    copies = 2 * dims.n_layers * dims.layer_weights if bfloat16 else 0
    return RUNTIME_MIB * _MIB + model_bytes + 3 * 4 * trained_elements + copies


def step_peak_bytes(fixed: float, per_prompt: float, micro_batch: int) -> float:
    """peak(m) = fixed + m · activations(T_max)."""
    return fixed + micro_batch * per_prompt


def model_bytes_of(model) -> int:
    """The bytes of a model's parameters and buffers as stored (a 4-bit weight counts its packed bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def pick_micro_batch(model, lengths: Sequence[int], share: int, trained_elements: int, *, device: str = "cpu",
                     bfloat16: bool = False, ratio: float = MEMORY_BUDGET) -> tuple[int, str]:
    """``(micro-batch size, reason)``: on CUDA ``share`` (the prompts this process gets per step); on CPU the
    largest m <= ``share`` whose estimated peak is at most ``ratio`` times the per-sample step's, for the
    training prompts' ``lengths`` (tokens) and ``trained_elements`` trained float32 elements."""
    if device == "cuda":
        return share, f"CUDA: the whole pseudo-batch share ({share} prompts) in one pass"
    dims = Dims.of(model)
    longest = max(lengths)
    per_prompt = activation_bytes(dims, longest, bfloat16=bfloat16)
    fixed = fixed_bytes(model_bytes_of(model), trained_elements, dims, bfloat16=bfloat16)
    allowed = ratio * step_peak_bytes(fixed, per_prompt, 1)
    size = max(1, min(share, math.floor((allowed - fixed) / per_prompt)))
    return size, (f"CPU memory budget: estimated peak {step_peak_bytes(fixed, per_prompt, size) / _MIB:.0f} MiB "
                  f"at {size} prompts per pass <= {ratio:g} x the per-sample step's "
                  f"{step_peak_bytes(fixed, per_prompt, 1) / _MIB:.0f} MiB (longest prompt {longest} tokens, "
                  f"{per_prompt / _MIB:.1f} MiB of activations each; at most {share})")


def trained_elements(dims: Dims, kind: str, targets: Sequence[str], *, bias: bool = False, lora_r: int = 16) -> int:
    """The float32 elements a trainable set trains (every layer): full W_Q/W_K (and b_Q/b_K with ``bias``), or
    LoRA's A and B of rank ``lora_r`` on them. A fixed head selection trains whole tensors (masked)."""
    total = 0
    for target in targets:
        heads = dims.n_heads if target == "q" else dims.n_kv_heads
        if kind == "lora":
            total += lora_r * (dims.d_model + heads * dims.d_head)
        else:
            total += dims.d_model * heads * dims.d_head + (heads * dims.d_head if bias else 0)
    return dims.n_layers * total
