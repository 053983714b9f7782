"""Capturing attention rows with their autograd graph.

ABFT needs α, the row of a head's post-softmax attention pattern at the query position (the last prompt
token), for every layer whose heads the loss looks at. TransformerLens's ``run_with_cache`` detaches every
activation, so it cannot feed a loss. :func:`capture_attention_rows` registers its own forward hooks on
``blocks.{l}.attn.hook_pattern`` (pattern shape ``[batch, head, query_pos, key_pos]``, probabilities in
[0, 1]) and keeps only the needed row of each pattern, still attached to the graph.

:func:`forward_residual` runs the model only as far as the captured layers need (``stop_at_layer``), which
skips the final norm and the unembedding, the most expensive matmul of a small model;
:func:`forward_to_last_pattern` stops even earlier, right after the last captured layer's pattern (what ABFT's
loss reads): that layer's pattern·V, W_O and MLP never run. Both work unchanged on
a ``TransformerBridge`` (the 4-bit backend of :mod:`abft_lens.backends.bridge`), which fires the same hook names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor

from abft_lens.backends.forward import forward_residual
from abft_lens.backends.tl import HookedTransformer, HookPoint

__all__ = ["AttentionRows", "capture_attention_rows", "forward_to_last_pattern", "pattern_hook_name"]


def pattern_hook_name(layer: int) -> str:
    """The TransformerLens hook name of layer ``layer``'s post-softmax attention pattern."""
    return f"blocks.{layer}.attn.hook_pattern"


class AttentionRows:
    """What :func:`capture_attention_rows` collects during one forward pass.

    ``layers`` are the captured layer indices, ascending. Each forward pass inside the context fills one row
    tensor ``[batch, head, key_pos]`` per layer; a second pass inside the same context is refused (open one
    context per forward pass, or call :meth:`clear` in between).
    """

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers: tuple[int, ...] = tuple(layers)
        self._rows: dict[int, Tensor] = {}

    @property
    def stop_at_layer(self) -> int:
        """The smallest ``stop_at_layer`` for which every captured layer still runs: ``max(layers) + 1``."""
        return max(self.layers) + 1

    @property
    def captured_layers(self) -> tuple[int, ...]:
        """The layers whose hook has fired so far, ascending."""
        return tuple(sorted(self._rows))

    def clear(self) -> None:
        """Forget the captured rows, so the same context can serve another forward pass."""
        self._rows.clear()

    def _store(self, layer: int, row: Float[Tensor, "batch head key"]) -> None:
        if layer in self._rows:
            raise RuntimeError(
                f"layer {layer}'s attention pattern fired twice inside one capture: use one "
                "capture_attention_rows context per forward pass, or call store.clear() between passes"
            )
        self._rows[layer] = row

    def layer(self, layer: int) -> Float[Tensor, "batch head key"]:
        """The captured row of one layer: ``[batch, head, key_pos]`` attention probabilities."""
        if layer not in self._rows:
            raise ValueError(
                f"layer {layer} was not captured (captured: {list(self.captured_layers)}); run the model "
                f"inside the context with stop_at_layer >= {layer + 1}, and include {layer} in layers"
            )
        return self._rows[layer]

    def stacked(self) -> Float[Tensor, "batch layer head key"]:
        """All captured rows stacked over ``self.layers`` (in that order): ``[batch, layer, head, key_pos]``.

        Raises ``ValueError`` when a requested layer did not fire, e.g. because ``stop_at_layer`` cut the
        forward pass short.
        """
        missing = [layer for layer in self.layers if layer not in self._rows]
        if missing:
            raise ValueError(
                f"layers {missing} were not captured; run the model inside the context with "
                f"stop_at_layer >= {self.stop_at_layer} (store.stop_at_layer) or without stop_at_layer"
            )
        return torch.stack([self._rows[layer] for layer in self.layers], dim=1)


def _check_layers(model: HookedTransformer, layers: Sequence[int] | None) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    chosen = [int(layer) for layer in layers]
    if not chosen:
        raise ValueError("layers is empty: pass None to capture every layer, or at least one layer index")
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {chosen} contains duplicates: list each layer once")
    return sorted(chosen)


def _select_rows(
    pattern: Float[Tensor, "batch head query key"], query_positions: Int[Tensor, "batch"] | None
) -> Float[Tensor, "batch head key"]:
    if query_positions is None:
        return pattern[:, :, -1, :]
    batch, _, n_query, _ = pattern.shape
    if query_positions.shape != (batch,):
        raise ValueError(
            f"query_positions has shape {tuple(query_positions.shape)} but the batch has {batch} prompts: "
            "pass one query position per prompt"
        )
    positions = query_positions.to(pattern.device)
    if bool(((positions < -n_query) | (positions >= n_query)).any()):
        raise ValueError(
            f"query_positions {positions.tolist()} out of range for a prompt of {n_query} tokens: "
            f"use positions in [-{n_query}, {n_query})"
        )
    batch_index = torch.arange(batch, device=pattern.device)
    # advanced indices on dims 0 and 2 with a slice between them: the indexed dim comes first -> [batch, head, key]
    return pattern[batch_index, :, positions, :]


@contextmanager
def capture_attention_rows(
    model: HookedTransformer,
    *,
    layers: Sequence[int] | None = None,
    query_positions: Int[Tensor, "batch"] | None = None,
    detach: bool = False,
) -> Iterator[AttentionRows]:
    """Capture one attention row per prompt and head at ``blocks.{l}.attn.hook_pattern``.

    Args:
        model: the hooked model; hooks are added through ``model.hooks`` and removed on exit, also on error.
        layers: layer indices to capture; ``None`` captures every layer. Stored ascending.
        query_positions: ``[batch]`` integer positions, the query row to keep for each prompt; ``None``
            keeps the last position (``pattern[:, :, -1, :]``), which is right for left-padded batches
            and for unpadded single prompts.
        detach: ``False`` (training) keeps the autograd graph, so a loss on the rows reaches W_Q/W_K of
            that layer and of every layer below; ``True`` (analysis) keeps detached copies and no graph.

    Yields:
        An :class:`AttentionRows` store; ``store.stacked()`` gives ``[batch, layer, head, key_pos]``.
        Captured tensors stay valid (and backward-able when ``detach=False``) after the context exits.
        Only one row per head is cloned out of each pattern, but with ``detach=False`` the graph still holds
        the full patterns until backward runs, as any backward through a softmax must.
    """
    chosen = _check_layers(model, layers)
    if query_positions is not None:
        if query_positions.ndim != 1 or query_positions.dtype.is_floating_point or query_positions.is_complex():
            raise ValueError(
                f"query_positions must be a 1-D integer tensor [batch], got dtype {query_positions.dtype} "
                f"and shape {tuple(query_positions.shape)}"
            )
    store = AttentionRows(chosen)

    def make_hook(layer: int):
        def hook_fn(pattern: Float[Tensor, "batch head query key"], *, hook: HookPoint) -> None:
            row = _select_rows(pattern, query_positions)
            # clone so the kept row owns its memory instead of viewing the whole pattern
            row = row.detach().clone() if detach else row.clone()
            store._store(layer, row)

        return hook_fn

    fwd_hooks = [(pattern_hook_name(layer), make_hook(layer)) for layer in chosen]
    with model.hooks(fwd_hooks=fwd_hooks):
        yield store


class _PatternsCaptured(Exception):
    """Raised by :func:`forward_to_last_pattern`'s stop hook: every pattern the capture needs is stored."""


def _stop(pattern: Float[Tensor, "batch head query key"], *, hook: HookPoint) -> None:
    raise _PatternsCaptured


def forward_to_last_pattern(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    store: AttentionRows,
) -> None:
    """Run the model inside a :func:`capture_attention_rows` context until ``store``'s last layer has fired its
    pattern hook, and no further: the rest of that block (pattern·V, W_O, the MLP), later blocks, the final norm
    and the unembedding never run. The captured rows are the ones a full forward gives, bit for bit.

    A hook registered after the capture's own raises a private exception at ``blocks.{last}.attn.hook_pattern``
    (hooks fire in registration order, so the row is stored first); the exception ends the pass and is caught
    here. Works on a HookedTransformer and on a bridge (same hook names).
    """
    last = max(store.layers)
    try:
        with model.hooks(fwd_hooks=[(pattern_hook_name(last), _stop)]):
            forward_residual(model, tokens, attention_mask, stop_at_layer=last + 1)
    except _PatternsCaptured:
        pass
    if last not in store.captured_layers:
        raise RuntimeError(f"layer {last}'s attention pattern was not captured before the stop: call "
                           "forward_to_last_pattern inside the capture_attention_rows context of that store")
