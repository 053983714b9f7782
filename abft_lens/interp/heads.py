"""Per-head scores: which heads are induction, previous-token, duplicate-token or copying heads, and how much
each head looks at the demonstration labels of ICL prompts.

Every score is a :class:`HeadScores` holding a ``[n_layers, n_heads]`` float tensor (query heads; under
grouped-query attention each query head gets its own score). :class:`HeadSet` turns scores into a set of
``(layer, head)`` pairs, e.g. for ``TrainableConfig(heads=...)``.

Classic scores (Olsson et al. 2022, "In-context learning and induction heads"; the patterns are those of
TransformerLens's ``head_detector``) are measured on ``n_seqs`` seeded random token sequences of ``seq_len``
tokens repeated twice (special tokens never drawn; an optional BOS in front). A forward hook on
``blocks.{l}.attn.hook_pattern`` reduces each pattern to the one diagonal a score needs
(``torch.diagonal`` with an offset), so no full pattern is kept. With ``L = seq_len``: ``induction`` is the
mean attention from every position ``i`` of the second copy to ``i - L + 1`` (the token after the earlier
occurrence of the current token), ``duplicate_token`` to ``i - L`` (that earlier occurrence), and
``previous_token`` the mean attention to ``i - 1`` from every position but the first random one.

``copying`` is the eigenvalue copying score of the full OV circuit (Elhage et al. 2021), see
:func:`copying_scores`. The ICL scores (:func:`icl_label_attention`) read the prediction-position row of
every head on real ICL prompts; they are the quantities the ABFT loss and its induction filter act on.
All scores are attention probabilities (mass in [0, 1], or a difference of two masses) except ``copying``
(in [-1, 1]) and ``filter_pass_rate`` (a fraction of prompts).
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.backends.bridge import is_bridge, ov_weights
from abft_lens.backends.provenance import LoadedModel, model_info
from abft_lens.backends.tl import HookedTransformer, HookPoint
from abft_lens.interp.capture import capture_attention_rows, pattern_hook_name
from abft_lens.backends.forward import forward_residual
from abft_lens.interp.induction_filter import induction_threshold
from abft_lens.data.prompts import (
    ICLPrompt, PromptBatch, collate, length_sorted_batches, pad_token_id, prompt_builder, test_prompts,
)

__all__ = [
    "HeadScores", "HeadSet", "SCORE_DESCRIPTIONS", "repeated_tokens", "classic_scores", "induction_scores",
    "previous_token_scores", "duplicate_token_scores", "copying_scores", "label_masses", "icl_label_attention",
    "head_scores",
]

SCORE_DESCRIPTIONS = {
    "induction": "mean attention from the second copy of a repeated random sequence to i - seq_len + 1",
    "previous_token": "mean attention to the previous token (i -> i - 1) on repeated random sequences",
    "duplicate_token": "mean attention from the second copy to the earlier occurrence, i - seq_len",
    "copying": "OV-circuit eigenvalue copying score sum(eig) / sum(|eig|) of W_E W_V W_O W_U, in [-1, 1]",
    "label_attention": "attention mass from the prediction position on all k demonstration labels",
    "correct_label_attention": "attention mass from the prediction position on labels equal to the query's",
    "label_correctness": "attention mass on correct labels minus mass on wrong labels",
    "filter_pass_rate": "fraction of prompts whose label mass exceeds the ABFT threshold k / (k + ln n_tokens)",
    "sink_attention": "attention mass from the prediction position on the prompt's first token",
}
CLASSIC = ("induction", "previous_token", "duplicate_token")
ICL = ("label_attention", "correct_label_attention", "label_correctness", "filter_pass_rate", "sink_attention")


# ---------------------------------------------------------------------------------------------- head sets


@dataclass(frozen=True)
class HeadSet:
    """An immutable set of ``(layer, head)`` pairs (query-head indices, 0-based).

    Iteration is in ascending ``(layer, head)`` order. ``as_trainable_heads()`` gives the frozenset that
    ``TrainableConfig(heads=...)`` accepts.
    """

    heads: frozenset[tuple[int, int]] = frozenset()

    def __post_init__(self) -> None:
        pairs = frozenset((int(layer), int(head)) for layer, head in self.heads)
        if any(layer < 0 or head < 0 for layer, head in pairs):
            raise ValueError(f"HeadSet: (layer, head) pairs must be >= 0, got {sorted(pairs)}")
        object.__setattr__(self, "heads", pairs)

    @classmethod
    def from_scores(cls, scores: "HeadScores | Tensor", *, threshold: float | None = None,
                    top_k: int | None = None) -> "HeadSet":
        """Heads whose score is ``> threshold``, and/or the ``top_k`` highest (both: the top_k among those
        above threshold). At least one of the two must be given; NaN scores are never selected."""
        if threshold is None and top_k is None:
            raise ValueError("HeadSet.from_scores: give threshold=, top_k= or both")
        if top_k is not None and top_k < 0:
            raise ValueError(f"HeadSet.from_scores: top_k={top_k} must be >= 0")
        values = scores.scores if isinstance(scores, HeadScores) else scores
        if values.ndim != 2:
            raise ValueError(f"HeadSet.from_scores: scores must be [layer, head], got shape {tuple(values.shape)}")
        values = values.detach().float().cpu()
        keep = ~torch.isnan(values)
        if threshold is not None:
            keep &= values > threshold
        candidates = [(float(values[l, h]), l, h) for l, h in keep.nonzero().tolist()]
        candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
        if top_k is not None:
            candidates = candidates[:top_k]
        return cls(frozenset((l, h) for _, l, h in candidates))

    def to_mask(self, n_layers: int, n_heads: int) -> Bool[Tensor, "layer head"]:
        """A bool ``[n_layers, n_heads]`` mask, True at the set's heads."""
        bad = sorted(p for p in self.heads if p[0] >= n_layers or p[1] >= n_heads)
        if bad:
            raise ValueError(f"HeadSet.to_mask: heads {bad} out of range for {n_layers} layers x {n_heads} heads")
        mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in self.heads:
            mask[layer, head] = True
        return mask

    def as_trainable_heads(self) -> frozenset[tuple[int, int]]:
        """The pairs as a frozenset, for ``TrainableConfig(heads=...)`` (which refuses an empty set)."""
        return frozenset(self.heads)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(sorted(self.heads))

    def __len__(self) -> int:
        return len(self.heads)

    def __contains__(self, item: object) -> bool:
        return item in self.heads

    def __repr__(self) -> str:
        return f"HeadSet({', '.join(f'L{l}H{h}' for l, h in self)})"

    def _repr_html_(self) -> str:
        items = ", ".join(f"L{l}H{h}" for l, h in self) or "(empty)"
        return f"<b>HeadSet</b> of {len(self)} heads: {html.escape(items)}"


# ------------------------------------------------------------------------------------------------ scores


@dataclass(eq=False)
class HeadScores:
    """One score per head. ``scores`` is ``[n_layers, n_heads]`` float32 on the CPU (units: see the
    ``description`` and the module docstring)."""

    name: str
    scores: Float[Tensor, "layer head"]
    description: str = ""
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores.shape)

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``, best first (NaN last)."""
        flat = torch.nan_to_num(self.scores.float(), nan=-float("inf")).flatten()
        k = min(k, flat.numel())
        order = torch.argsort(flat, descending=True, stable=True)[:k]
        n_heads = self.scores.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(self.scores.flatten()[i])) for i in order]

    def select(self, threshold: float | None = None, top_k: int | None = None) -> HeadSet:
        """See :meth:`HeadSet.from_scores`."""
        return HeadSet.from_scores(self, threshold=threshold, top_k=top_k)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "scores": self.scores.tolist(),
                "info": self.info}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadScores":
        return cls(data["name"], torch.tensor(data["scores"], dtype=torch.float32), data.get("description", ""),
                   dict(data.get("info", {})))

    def __repr__(self) -> str:
        best = ", ".join(f"L{l}H{h}={s:.3f}" for l, h, s in self.top(3))
        return f"HeadScores({self.name!r}, {self.shape[0]}x{self.shape[1]}, top: {best})"

    def _repr_html_(self) -> str:
        """The top 10 heads as a table (no scripts, no network)."""
        body = "".join(f"<tr><td>L{l}H{h}</td><td>{score:.4f}</td></tr>" for l, h, score in self.top(10))
        return (f"<b>{html.escape(self.name)}</b> ({self.shape[0]} layers x {self.shape[1]} heads)<table>"
                f"<tr><th>head</th><th>score</th></tr>{body}</table><small>{html.escape(self.description)}</small>")


def _scores(name: str, values: Tensor, **info) -> HeadScores:
    return HeadScores(name, values.detach().float().cpu(), SCORE_DESCRIPTIONS.get(name, ""), info)


# ---------------------------------------------------------------------------------------- classic scores


def _ordinary_ids(model: HookedTransformer) -> Int[Tensor, " n"]:
    """Vocabulary ids that are not special tokens of the model's tokenizer (all ids without a tokenizer)."""
    banned = set(getattr(getattr(model, "tokenizer", None), "all_special_ids", None) or [])
    ids = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in banned], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("the vocabulary has fewer than 2 ordinary (non-special) tokens")
    return ids


def repeated_tokens(
    model: HookedTransformer, n_seqs: int, seq_len: int, *, seed: int = 0, bos_token_id: int | None = None
) -> Int[Tensor, "seq pos"]:
    """``n_seqs`` seeded random sequences of ``seq_len`` ordinary tokens, each repeated twice.

    Shape ``[n_seqs, b + 2 * seq_len]`` with ``b = 1`` when ``bos_token_id`` is given (prepended) else 0.
    Tokens are drawn uniformly (with replacement) from the non-special vocabulary.
    """
    if n_seqs < 1 or seq_len < 2:
        raise ValueError(f"repeated_tokens: need n_seqs >= 1 and seq_len >= 2, got {n_seqs}, {seq_len}")
    ids = _ordinary_ids(model)
    generator = torch.Generator().manual_seed(seed)
    half = ids[torch.randint(0, ids.numel(), (n_seqs, seq_len), generator=generator)]
    parts = [half, half]
    if bos_token_id is not None:
        parts.insert(0, torch.full((n_seqs, 1), int(bos_token_id), dtype=torch.long))
    return torch.cat(parts, dim=1)


def _diagonals(seq_len: int) -> dict[str, tuple[int, int]]:
    """Score name -> (how far back the target is, how many query rows to average: the last ones)."""
    return {"induction": (seq_len - 1, seq_len), "duplicate_token": (seq_len, seq_len),
            "previous_token": (1, 2 * seq_len - 1)}


def classic_scores(
    model: HookedTransformer,
    *,
    n_seqs: int = 32,
    seq_len: int = 40,
    batch_size: int = 8,
    seed: int = 0,
    bos_token_id: int | None = None,
    names: Sequence[str] = CLASSIC,
    progress: bool | str = False,
) -> dict[str, HeadScores]:
    """Induction, duplicate-token and previous-token scores (or the subset ``names``) in one pass.

    Sequences from :func:`repeated_tokens` are run ``batch_size`` at a time through every block (no
    unembedding); each layer's hook takes ``torch.diagonal(pattern, offset=-d)`` ``[batch, head, rows]``,
    keeps the rows the score averages over (module docstring) and adds their sum to a ``[layer, head]``
    float64 accumulator. Returns name -> :class:`HeadScores` with mean attention probabilities in [0, 1].
    """
    unknown = [name for name in names if name not in CLASSIC]
    if unknown or not names:
        raise ValueError(f"classic_scores: names {list(names)} must be a non-empty subset of {CLASSIC}")
    spec = {name: _diagonals(seq_len)[name] for name in names}
    tokens = repeated_tokens(model, n_seqs, seq_len, seed=seed, bos_token_id=bos_token_id)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sums = {name: torch.zeros(n_layers, n_heads, dtype=torch.float64) for name in names}

    def make_hook(layer: int):
        def hook_fn(pattern: Float[Tensor, "batch head query key"], *, hook: HookPoint) -> None:
            for name, (back, rows) in spec.items():
                diagonal = torch.diagonal(pattern, offset=-back, dim1=-2, dim2=-1)[..., -rows:]  # [batch, head, rows]
                sums[name][layer] += diagonal.sum(dim=(0, 2)).double().cpu()

        return hook_fn

    hooks = [(pattern_hook_name(layer), make_hook(layer)) for layer in range(n_layers)]
    bar = tqdm(total=n_seqs, desc=progress if isinstance(progress, str) else "classic scores",
               disable=not progress, unit="seq")
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        for start in range(0, n_seqs, batch_size):
            chunk = tokens[start:start + batch_size].to(model.cfg.device)
            forward_residual(model, chunk)
            bar.update(chunk.shape[0])
    bar.close()
    info = {"n_seqs": n_seqs, "seq_len": seq_len, "seed": seed, "bos": bos_token_id is not None}
    return {name: _scores(name, sums[name] / (n_seqs * spec[name][1]), **info) for name in names}


def induction_scores(model: HookedTransformer, **kwargs) -> HeadScores:
    """Prefix-matching induction score per head; options of :func:`classic_scores`."""
    return classic_scores(model, names=("induction",), **kwargs)["induction"]


def previous_token_scores(model: HookedTransformer, **kwargs) -> HeadScores:
    """Previous-token score per head; options of :func:`classic_scores`."""
    return classic_scores(model, names=("previous_token",), **kwargs)["previous_token"]


def duplicate_token_scores(model: HookedTransformer, **kwargs) -> HeadScores:
    """Duplicate-token score per head; options of :func:`classic_scores`."""
    return classic_scores(model, names=("duplicate_token",), **kwargs)["duplicate_token"]


def copying_scores(model: HookedTransformer, *, n_tokens: int = 1000, seed: int = 0) -> HeadScores:
    """Eigenvalue copying score of each head's full OV circuit, ``Σ λ_i / Σ |λ_i|`` in [-1, 1].

    The full OV circuit of head h is ``M = W_E[S] W_V^h W_O^h W_U[:, S]`` (``[s, s]``) on a seeded subset
    ``S`` of ``n_tokens`` ordinary (non-special) tokens (all of them when the vocabulary is smaller), to keep
    the cost low. Its non-zero eigenvalues are those of the ``[d_head, d_head]`` matrix
    ``W_O^h (W_U[:, S] W_E[S]) W_V^h`` (eig(AB) = eig(BA) up to zeros), computed in float64. A head whose
    OV circuit copies tokens (positive eigenvalues) scores near 1, one that suppresses them near -1.

    Under GQA, ``attn.W_V`` repeats each kv head's values for the query heads of its group. Norms are
    ignored: the weights are unprocessed (RMSNorm/LayerNorm scales not folded in), so ln1's and ln_final's
    scales and the normalisation itself are left out of M; biases are left out too.
    """
    ids = _ordinary_ids(model)
    if ids.numel() > n_tokens:
        generator = torch.Generator().manual_seed(seed)
        ids = ids[torch.randperm(ids.numel(), generator=generator)[:n_tokens]].sort().values
    scores = torch.empty(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
    with torch.inference_mode():
        ids = ids.to(model.W_E.device)
        unembed_embed = model.W_U[:, ids].double() @ model.W_E[ids].double()  # [d_model, d_model]
        for layer, block in enumerate(model.blocks):
            w_v, w_o = ov_weights(model, layer) if is_bridge(model) else (block.attn.W_V, block.attn.W_O)
            # W_O [head, d_head, d_model] @ [d_model, d_model] @ W_V [head, d_model, d_head] -> [head, d_head, d_head]
            reduced = w_o.double().to(ids.device) @ unembed_embed @ w_v.double().to(ids.device)
            eigenvalues = torch.linalg.eigvals(reduced)  # [head, d_head] complex
            total = eigenvalues.abs().sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
            scores[layer] = (eigenvalues.real.sum(-1) / total).cpu()
    return _scores("copying", scores, n_tokens=int(ids.numel()), seed=seed)


# ---------------------------------------------------------------------------------------------- ICL scores


def label_masses(
    rows: Float[Tensor, "batch layer head key"], batch: PromptBatch
) -> tuple[Float[Tensor, "batch layer head"], Float[Tensor, "batch layer head"]]:
    """Per prompt and head, the attention of the prediction row to the k demonstration labels: to all of them
    (Σ_I α) and to those whose label is the query's (Σ_{I⁺} α). ``rows`` is the last row of every pattern of
    ``batch`` (the output of :func:`capture_attention_rows` on a collated batch)."""
    index = einops.repeat(batch.label_positions.to(rows.device), "b k -> b l h k", l=rows.shape[1], h=rows.shape[2])
    at_labels = rows.gather(-1, index)  # [batch, layer, head, k]
    correct = einops.rearrange(batch.demo_labels == batch.query_labels[:, None], "b k -> b 1 1 k")
    return at_labels.sum(-1), (at_labels * correct.to(rows.device)).sum(-1)


def icl_label_attention(
    model: HookedTransformer,
    prompts: Sequence[ICLPrompt],
    *,
    batch_size: int = 8,
    pad_id: int | None = None,
    progress: bool | str = False,
) -> dict[str, HeadScores]:
    """Where every head looks from the prediction position of ICL prompts, averaged over ``prompts``.

    Prompts are batched by length (left padding, so the prediction position is the last column; label
    positions are shifted by :func:`~abft_lens.data.prompts.collate`). One forward pass per batch keeps only the
    last row ``[batch, layer, head, key]`` of every pattern (:func:`capture_attention_rows`, detached).
    Per prompt and head, with α that row, I the k label positions and I⁺ those whose label is the query's:
    ``label_attention`` = Σ_I α, ``correct_label_attention`` = Σ_{I⁺} α, ``label_correctness`` = Σ_{I⁺} α −
    Σ_{I \\ I⁺} α, ``filter_pass_rate`` = [Σ_I α > k / (k + ln n_tokens)] (the ABFT filter of that prompt),
    ``sink_attention`` = α at the prompt's first real token. Returns name -> :class:`HeadScores`.
    """
    if not prompts:
        raise ValueError("icl_label_attention: no prompts")
    if pad_id is None:
        pad_id = pad_token_id(model.tokenizer) if getattr(model, "tokenizer", None) is not None else 0
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sums = {name: torch.zeros(n_layers, n_heads, dtype=torch.float64) for name in ICL}
    bar = tqdm(total=len(prompts), desc=progress if isinstance(progress, str) else "label attention",
               disable=not progress, unit="prompt")
    with torch.inference_mode():
        for indices in length_sorted_batches([p.n_tokens for p in prompts], batch_size):
            chunk = [prompts[i] for i in indices]
            batch = collate(chunk, pad_id)
            with capture_attention_rows(model, detach=True) as store:
                forward_residual(model, batch.tokens.to(model.cfg.device), batch.attention_mask.to(model.cfg.device))
            rows = store.stacked().double().cpu()  # [batch, layer, head, key]
            label_mass, correct_mass = label_masses(rows, batch)  # [batch, layer, head]
            thresholds = torch.tensor([induction_threshold(p.k, p.n_tokens) for p in chunk], dtype=torch.float64)
            first = einops.repeat(batch.padding, "b -> b l h 1", l=n_layers, h=n_heads)  # first real token
            sums["label_attention"] += label_mass.sum(0)
            sums["correct_label_attention"] += correct_mass.sum(0)
            sums["label_correctness"] += (2 * correct_mass - label_mass).sum(0)
            sums["filter_pass_rate"] += (label_mass > thresholds[:, None, None]).double().sum(0)
            sums["sink_attention"] += rows.gather(-1, first)[..., 0].sum(0)
            bar.update(len(chunk))
    bar.close()
    info = {"n_prompts": len(prompts), "k": prompts[0].k}
    return {name: _scores(name, sums[name] / len(prompts), **info) for name in ICL}


def head_scores(
    model: LoadedModel,
    task,
    *,
    k: int = 4,
    n_prompts: int = 64,
    n_seqs: int = 32,
    seq_len: int = 40,
    batch_size: int = 8,
    seed: int = 0,
    prompts: Sequence[ICLPrompt] | None = None,
    progress: bool = False,
) -> dict[str, HeadScores]:
    """Every score of this module for ``model`` (a ``HookedTransformer`` or a bridge) on ``task``.

    The ICL scores use the first ``n_prompts`` fixed test prompts of ``task`` with ``k`` demonstrations
    (or ``prompts`` when given); the classic scores prepend the tokenizer's BOS when the model's tokenizer
    adds one. Keys: ``induction``, ``previous_token``, ``duplicate_token``, ``copying`` and the five ICL
    scores (the names of :class:`~abft_lens.training.comparison.Comparison`).
    """
    if prompts is None:
        prompts = test_prompts(prompt_builder(model, task), k, n_prompts)
    bos = model.tokenizer.bos_token_id if model_info(model).adds_bos else None
    scores = classic_scores(model, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, seed=seed,
                            bos_token_id=bos, progress="classic scores" if progress else False)
    scores["copying"] = copying_scores(model, seed=seed)
    scores.update(icl_label_attention(model, prompts, batch_size=batch_size, pad_id=pad_token_id(model.tokenizer),
                                      progress="label attention" if progress else False))
    return scores
