"""The trainable set of ABFT: W_Q/W_K of every attention layer, fully or through LoRA, with per-head masks.

PEFT-style: a :class:`TrainableConfig` says what trains, :func:`attach` freezes the whole model and wraps the
targets, the returned :class:`Trainable` hands its parameters to the optimizer and ends with ``merge()`` or
``remove()``. The trainable set follows from the config alone; one Trainable per model at a time.

Head slices. Query head ``h`` of layer ``l`` owns ``W_Q[h]`` (``[d_model, d_head]``) and ``b_Q[h]``. Under
grouped-query attention TransformerLens stores ``_W_K`` ``[n_kv_heads, d_model, d_head]``; query head ``h``
reads kv head ``h // (n_heads // n_kv_heads)``. A K slice is therefore *shared*: it is open when ANY query
head of its group is open (the union rule), and a participating head's K update also changes what the other
heads of its group see. A multi-query model (one kv head) opens K whenever any head of the layer is open.

LoRA. ``delta = scale * (B @ A)`` with ``A [r, d_model]``, ``B [n_out_heads * d_head, r]`` (rows head-major,
the layout of Hugging Face's ``q_proj``/``k_proj`` weight), viewed as ``[n_out_heads, d_model, d_head]``. The
per-head slice of an adapter is its block of ``d_head`` rows of ``B``; ``A`` is shared by the heads of its
(layer, target). Restriction masks the gradient of ``delta``, so ``A`` receives gradient only through the open
heads' rows and ``A`` counts as open when any head of its (layer, target) is open. Consequence (like K under
GQA): a head whose rows of ``B`` are non-zero sees its delta move when ``A`` moves, even while it is closed; a
head that was never open keeps ``B`` rows at zero and its effective weights bit-identical to the base.

Batches. ``restricted()`` also takes one mask per prompt of a batched forward pass (``[batch, layer, head]``):
the hooks of :mod:`abft_lens.training.routing` then route each prompt's query/key gradient by its own open
heads (the weight hooks above see the union), which gives the per-sample loop's gradients exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
import operator
import weakref
from dataclasses import dataclass

import torch
from einops import rearrange, reduce, repeat
from jaxtyping import Bool
from torch import Tensor, nn
from torch.nn.utils import parametrize

from abft_lens.backends import qk
from abft_lens.backends.tl import HookedTransformer
from abft_lens.errors import AbftLensError
from abft_lens.training.routing import install_router
from abft_lens.training.slots import LoraDelta, Slot

KINDS = ("full", "lora")
TARGETS = ("q", "k")
MAX_LORA_R = 4096  # a rank above the model width buys nothing; 4096 exceeds every model abft-lens loads
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its live Trainable


@dataclass(frozen=True)
class TrainableConfig:
    """What trains. ``heads``: optional fixed selection of ``(layer, head)`` pairs; only their slices change."""

    kind: str = "full"
    targets: tuple[str, ...] = ("q", "k")
    bias: bool = False
    lora_r: int = 16
    lora_alpha: float | None = None
    lora_init_seed: int = 0
    heads: frozenset[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AbftLensError(f"TrainableConfig.kind={self.kind!r} is unknown.", f"use one of {KINDS}.")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise AbftLensError(f"TrainableConfig.targets={self.targets!r}: each must be one of {TARGETS}.",
                                "give at least one of 'q' and 'k'.")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or not 0 < self.lora_r <= MAX_LORA_R:
            raise AbftLensError(f"TrainableConfig.lora_r={self.lora_r!r} must be an integer in 1..{MAX_LORA_R}.",
                                "pass a LoRA rank such as lora_r=16.", names=("lora_r",))
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, (int, float))
                                                and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise AbftLensError(f"TrainableConfig.lora_alpha={self.lora_alpha!r} must be a finite number > 0.",
                                "pass None for alpha = r.")
        if isinstance(self.lora_init_seed, bool) or not isinstance(self.lora_init_seed, int) or self.lora_init_seed < 0:
            raise AbftLensError(f"TrainableConfig.lora_init_seed={self.lora_init_seed!r} must be an integer >= 0.",
                                "pass e.g. 0.")
        if not isinstance(self.bias, bool):
            raise AbftLensError(f"TrainableConfig.bias={self.bias!r} must be True or False.", "pass a bool.")
        if self.heads is not None:
            try:
                heads = frozenset((operator.index(l), operator.index(h)) for l, h in self.heads)
            except (TypeError, ValueError):
                raise AbftLensError(f"TrainableConfig.heads={self.heads!r} is not a set of (layer, head) pairs.",
                                    "give (layer, head) integer pairs, e.g. HeadSet.as_trainable_heads().") from None
            if not heads or any(l < 0 or h < 0 for l, h in heads):
                raise AbftLensError(f"TrainableConfig.heads={self.heads!r}: the set is empty or has a negative index.",
                                    "give a non-empty set of (layer, head) pairs >= 0.")
            object.__setattr__(self, "heads", heads)

    @property
    def lora_scale(self) -> float:
        """LoRA multiplier alpha / r (1.0 with the default alpha = r)."""
        return (self.lora_r if self.lora_alpha is None else self.lora_alpha) / self.lora_r

    def to_dict(self) -> dict:
        """JSON-ready dict; ``heads`` becomes a sorted list of ``[layer, head]``."""
        return {
            "kind": self.kind, "targets": list(self.targets), "bias": self.bias, "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha, "lora_init_seed": self.lora_init_seed,
            "heads": None if self.heads is None else [list(p) for p in sorted(self.heads)],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainableConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they usually mean a version mismatch)."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise AbftLensError(f"TrainableConfig.from_dict: unknown keys {unknown}.",
                                f"use only {list(cls.__dataclass_fields__)} (a run from another version?).")
        kw = dict(d)
        if "targets" in kw:
            kw["targets"] = tuple(kw["targets"])
        if kw.get("heads") is not None:
            kw["heads"] = frozenset(tuple(p) for p in kw["heads"])
        return cls(**kw)


class Trainable:
    """Handle on an attached model; build the optimizer from :meth:`parameters`. Created by :func:`attach`.

    On a hooked model the trained tensors are its ``W_Q``/``_W_K`` parameters; on a full-precision bridge
    (TransformerLens 4.x) full training trains the Hugging Face q/k leaves (:func:`abft_lens.backends.qk.leaf`),
    masked by row blocks of ``d_head``, with the same names and TransformerLens-layout state dict.
    """

    keeps_adapters = False  # True where the run ends by removing adapters (PEFT on a bridge), not by merging

    def __init__(self, model: HookedTransformer, config: TrainableConfig):
        self.model, self.config = model, config
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.group = qk.group_size(cfg)  # query heads per kv head
        self._fixed: Bool[Tensor, "layer head"] | None = None
        if config.heads is not None:
            bad = sorted(p for p in config.heads if p[0] >= self.n_layers or p[1] >= self.n_heads)
            if bad:
                raise ValueError(f"TrainableConfig.heads {bad} out of range: model has {self.n_layers} layers x "
                                 f"{self.n_heads} heads (0-based)")
            self._fixed = torch.zeros(self.n_layers, self.n_heads, dtype=torch.bool)
            self._fixed[tuple(torch.tensor(sorted(config.heads)).T)] = True
        self._sample: Bool[Tensor, "layer head"] | None = None
        self._slots: list[Slot] = []
        self._loras: dict[tuple[int, str], LoraDelta] = {}
        self._lora_attr: dict[tuple[int, str], str] = {}
        self._bias_backup: dict[str, Tensor] = {}
        self._hooks: list = []
        self._open = True
        self._wire()

    # --- wiring -------------------------------------------------------------------------------------------
    def _wire(self) -> None:
        model, config = self.model, self.config
        if getattr(model.cfg, "load_in_4bit", False) or qk.is_quantized(model):
            raise ValueError("attach: 4-bit TransformerLens weights are packed uint8 and cannot be trained or "
                             "parametrized; load the model unquantized")
        live = attached(model)
        if (live is not None and live._open) or any(parametrize.is_parametrized(b.attn) for b in model.blocks):
            raise ValueError("attach: this model already has an attached Trainable (or parametrized attention); "
                             "call merge() or remove() on it first")
        register_attached(model, self)
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(config.lora_init_seed)
        weight_names = [qk.attr_names(model, layer) for layer in range(self.n_layers)]  # before any parametrization
        for layer in range(self.n_layers):
            attn, names = self.model.blocks[layer].attn, weight_names[layer]
            for t in config.targets:
                w_name = names[t]
                if config.kind == "full":
                    param, rows = qk.leaf(model, qk.tensor_name(layer, w_name))
                    self._add(Slot(qk.tensor_name(layer, w_name), layer, t, "weight", param, rows))
                else:
                    lora = LoraDelta(getattr(attn, w_name).detach(), config.lora_r, config.lora_scale, gen)
                    parametrize.register_parametrization(attn, w_name, lora)
                    self._loras[(layer, t)] = lora
                    self._lora_attr[(layer, t)] = w_name
                    for role in qk.LORA_ROLES:
                        self._slots.append(Slot(qk.tensor_name(layer, w_name, role), layer, t, role,
                                                getattr(lora, role)))
                if config.bias:
                    b_name = qk.tensor_name(layer, names["b" + t])
                    b, rows = qk.leaf(model, b_name, create=True)
                    self._add(Slot(b_name, layer, t, "bias", b, rows))
                    if config.kind == "lora":
                        self._bias_backup[b_name] = b.detach().clone()
        self._hooks += install_router(model, config.targets, weight_names, self._route_mask)
        self._refresh_masks()

    def _add(self, slot: Slot) -> None:
        """A directly trained model tensor: requires grad, with a hook that masks its gradient per head."""
        slot.param.requires_grad_(True)
        self._slots.append(slot)
        self._hooks.append(slot.param.register_hook(lambda g, s=slot: self._mask_leaf_grad(s, g)))

    def _mask_leaf_grad(self, slot: Slot, grad: Tensor) -> Tensor | None:
        heads = self._union_heads()
        return None if heads is None else grad.masked_fill(~self._slot_mask(slot, heads), 0)

    def _active_heads(self) -> Bool[Tensor, "... layer head"] | None:
        """Open heads now: the sample's (``[layer, head]``, or ``[batch, layer, head]`` for a batch) & fixed."""
        s, f = self._sample, self._fixed
        return f if s is None else (s if f is None else s & f)

    def _union_heads(self) -> Bool[Tensor, "layer head"] | None:
        """The open heads of any prompt: what the weight-side masks apply (the router does each prompt's)."""
        heads = self._active_heads()
        return heads.any(0) if heads is not None and heads.ndim == 3 else heads

    def _route_mask(self, layer: int, target: str) -> Bool[Tensor, "batch n_out"] | None:
        """Per-prompt open output heads of one (layer, target) for the router; None unless batch masks are set."""
        heads = self._active_heads()
        return None if heads is None or heads.ndim != 3 else self._out_open(heads[:, layer], target)

    def _refresh_masks(self) -> None:
        heads = self._union_heads()
        for (layer, t), lora in self._loras.items():
            lora.grad_mask = None if heads is None else rearrange(
                self._out_open(heads[layer], t).to(lora.lora_B.device), "n -> n 1 1")

    # --- masks --------------------------------------------------------------------------------------------
    def _check_heads(self, heads: Tensor) -> Bool[Tensor, "layer head"]:
        if not isinstance(heads, Tensor) or heads.dtype != torch.bool or tuple(heads.shape) != (self.n_layers, self.n_heads):
            got = f"{heads.dtype} {tuple(heads.shape)}" if isinstance(heads, Tensor) else type(heads).__name__
            raise ValueError(f"expected a bool tensor [layer, head] = ({self.n_layers}, {self.n_heads}) of "
                             f"participating heads, got {got}; build it with e.g. scores > threshold")
        return heads.cpu()

    def _check_sample_heads(self, heads: Tensor) -> Bool[Tensor, "... layer head"]:
        """``[layer, head]`` (one prompt) or ``[batch, layer, head]`` (one mask per prompt of a batch)."""
        if isinstance(heads, Tensor) and heads.dtype == torch.bool and heads.ndim == 3 and heads.shape[0] > 0 \
                and tuple(heads.shape[1:]) == (self.n_layers, self.n_heads):
            return heads.cpu()
        return self._check_heads(heads)

    def _out_open(self, layer_heads: Bool[Tensor, "... head"], target: str) -> Bool[Tensor, "... n_out"]:
        """Open output heads of one (layer, target): the query heads for q, the union per kv group for k."""
        return layer_heads if target == "q" else reduce(layer_heads, "... (g r) -> ... g", "any", r=self.group)

    def _slot_mask(self, slot: Slot, heads: Bool[Tensor, "layer head"], own_layout: bool = True) -> Tensor:
        """Bool mask of ``slot.param``'s open entries, shape ``[size0, 1, ...]`` (or all-ones ``[1, ...]``);
        ``own_layout=False``: of the tensor in TransformerLens layout (what :meth:`state_dict` holds)."""
        open_, p = self._out_open(heads[slot.layer], slot.target), slot.param
        if not own_layout:
            p = slot.to_tl(p)
        if slot.role == "lora_B":
            open_ = repeat(open_, "n -> (n h)", h=self.d_head)
        elif slot.rows > 1 and own_layout:
            open_ = repeat(open_, "n -> (n h)", h=slot.rows)
        elif slot.role == "lora_A":
            open_ = open_.any().reshape(1)
        return open_.reshape(-1, *([1] * (p.dim() - 1))).to(p.device)

    def head_masks(self, participating: Bool[Tensor, "layer head"] | None = None, *,
                   own_layout: bool = False) -> dict[str, Tensor]:
        """Open-entry masks per trained tensor for a head set, intersected with the fixed ``heads=``.

        ``participating[l, h]`` opens W_Q/b_Q head h of layer l; K slices follow the union rule (module
        docstring); LoRA opens B's rows of the open heads and A when any head of its (layer, target) is open.
        ``None`` means every head. Each mask is bool, broadcastable to its tensor (TransformerLens layout, as in
        :meth:`state_dict`), varying only along dim 0. ``own_layout=True``: to the parameter itself instead (a
        bridge's Hugging Face leaf, ``d_head`` rows per head), what :func:`masked_step` applies.
        """
        heads = torch.ones(self.n_layers, self.n_heads, dtype=torch.bool) if participating is None \
            else self._check_heads(participating)
        if self._fixed is not None:
            heads = heads & self._fixed
        return {s.name: self._slot_mask(s, heads, own_layout) for s in self._live_slots()}

    @contextmanager
    def restricted(self, participating: Bool[Tensor, "layer head"]) -> Iterator[None]:
        """Restricted gradient for one sample: gradients computed inside reach only the open heads' slices.

        Wrap that sample's ``backward()`` (the forward may run outside): masks are applied as gradients are
        produced, so accumulation over a pseudo-batch sums per-sample masked gradients. Full mode masks each tensor's slices; LoRA masks
        the delta's gradient per head, so A learns only through open heads. Combine with :func:`masked_step`
        to keep closed slices bit-identical through the optimizer step.

        ``participating`` ``[batch, layer, head]``: the masks of the prompts of one batched forward pass, in
        batch order (that forward must run while this Trainable is attached, with gradients on); each prompt's
        gradient then reaches only its own open heads' slices, the per-sample loop's result in one backward.
        """
        self._live_slots()
        previous, self._sample = self._sample, self._check_sample_heads(participating)
        self._refresh_masks()
        try:
            yield
        finally:
            self._sample = previous
            self._refresh_masks()

    # --- parameters and state -----------------------------------------------------------------------------
    def _live_slots(self) -> list[Slot]:
        if not self._open:
            raise ValueError("this Trainable was merged or removed; call attach(model, config) again to train")
        return self._slots

    @property
    def is_open(self) -> bool:
        """True until :meth:`merge` or :meth:`remove` ends this Trainable."""
        return self._open

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(stable name, parameter) of every trained tensor; names are model names (+ ``.lora_A``/``.lora_B``)."""
        return ((s.name, s.param) for s in self._live_slots())

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trained tensors, for the optimizer."""
        return (s.param for s in self._live_slots())

    @property
    def n_trainable(self) -> int:
        """Number of trained scalars (the paper reports trainable-parameter counts)."""
        return sum(s.param.numel() for s in self._live_slots())

    def state_dict(self) -> dict[str, Tensor]:
        """The trained tensors only, TransformerLens layout: detached, contiguous copies on CPU (safetensors-ready)."""
        return {s.name: s.to_tl(s.param.detach()).to("cpu", copy=True).contiguous() for s in self._live_slots()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Strict load of :meth:`state_dict` output (device/dtype converted); mismatches raise ValueError."""
        slots = {s.name: s for s in self._live_slots()}
        params = {name: s.to_tl(s.param) for name, s in slots.items()}
        missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise ValueError(f"Trainable.load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                             "attach with the TrainableConfig the state dict was saved with")
        for name, p in params.items():
            if tuple(state_dict[name].shape) != tuple(p.shape):
                raise ValueError(f"Trainable.load_state_dict: {name} has shape {tuple(state_dict[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}; was it saved from another model?")
        with torch.no_grad():
            for name, slot in slots.items():
                slot.param.copy_(slot.from_tl(state_dict[name].to(slot.param.device)))

    def merged_state_dict(self) -> dict[str, Tensor]:
        """Effective trained model tensors (W_Q, _W_K or W_K, biases) as CPU copies, without merging: exports."""
        out = {}
        for s in self._live_slots():
            name = qk.effective_name(s.name)
            if s.role.startswith("lora"):
                attn = self.model.blocks[s.layer].attn
                out[name] = getattr(attn, name.rsplit(".", 1)[1]).detach().to("cpu", copy=True).contiguous()
            else:
                out[name] = qk.value(self.model, name).detach().to("cpu", copy=True).contiguous()
        return out

    # --- ending -------------------------------------------------------------------------------------------
    def _close(self, leave_parametrized: bool) -> None:
        for h in self._hooks:
            h.remove()
        for (layer, t), w_name in self._lora_attr.items():
            parametrize.remove_parametrizations(self.model.blocks[layer].attn, w_name, leave_parametrized=leave_parametrized)
        for s in self._slots:
            s.param.requires_grad_(False)
        self._open = False

    def merge(self) -> None:
        """LoRA: fold the adapters into W_Q/W_K, drop the parametrization. Full: weights are already in place.
        Ends this Trainable either way (hooks removed, everything frozen)."""
        self._live_slots()
        self._close(leave_parametrized=True)

    def remove(self) -> None:
        """LoRA: drop the adapters and restore the original weights (and trained biases) exactly."""
        self._live_slots()
        if self.config.kind == "full":
            raise ValueError("remove(): full fine-tuning writes into W_Q/W_K in place, there is nothing to remove; "
                             "reload the model (or use kind='lora') to get the original weights back")
        with torch.no_grad():
            qk.restore(self.model, self._bias_backup)
        self._close(leave_parametrized=False)


def attached(model) -> Trainable | None:
    """The Trainable currently attached to ``model`` (open, merged or removed), or None: one per model."""
    return _ATTACHED.get(model)


def register_attached(model, trainable: Trainable) -> None:
    """Record ``trainable`` as the one attached to ``model`` (called by each Trainable's wiring)."""
    _ATTACHED[model] = trainable
