"""Generation quality before/after fine-tuning: continuations, MAUVE and perplexity (the prototype's MAUVE test).

ABFT changes only W_Q/W_K; this module checks that the model still writes like itself.

- :func:`continuations`: greedy (``seed=None``) or seeded sampling. Each prefix is tokenized by the model's
  own tokenizer (so BOS exactly when that tokenizer adds one: none for SmolLM2 and the tiny models, one for
  Llama-3). Prefixes run in length-sorted, left-padded batches with an attention mask and a KV cache
  (:func:`generate_batch`; only the last position is unembedded), so a prefix's continuation is the one it
  gets alone: the tests check greedy batched = one at a time = TransformerLens ``generate`` per prefix = a
  manual argmax loop. Sampling gives prefix ``i`` its own ``torch.Generator`` seeded ``seed + i``, so a
  continuation does not depend on the others. On SmolLM2-135M (one CPU thread, 16 prefixes x 24 tokens) a
  batch of 16 took 3.75 s against 43.3 s for ``generate`` one prefix at a time, with identical results
  (``bench/generation_demo.py``).
- :func:`hidden_features`: the MAUVE features. By default the final-layer hidden state (after the final norm)
  at the **last** token, MAUVE's own convention (it embeds texts by GPT-2-large's last-token hidden state);
  ``pooling="mean"`` averages over the tokens instead. Texts are embedded as prefix + continuation, in
  left-padded batches (equal to one at a time within float rounding, ~1e-6).
- :func:`mauve_score`: MAUVE (Pillutla et al. 2021) of two feature sets, through mauve-text's
  ``compute_mauve(p_features=..., q_features=...)`` when installed (``pip install abft-lens[mauve]``; never its
  text mode, which downloads gpt2-large), else a built-in implementation of the same recipe: l2-normalise,
  PCA keeping 90 % of the variance, k-means (``num_buckets = max(2, round(min(n_p, n_q) / 10))``, 5 restarts)
  on the union, histograms p/q, divergence curve over 25 mixtures with scaling c = 5, area under it.
- :func:`perplexity`: token-level perplexity exp(Σ NLL / Σ predicted tokens) over a set of held-out texts.
  Without a BOS the first token of a text has no context and is not scored. Batched like the features; padding is never scored.

:func:`generation_report` compares a base and a tuned model on the same prefixes: MAUVE(base continuations,
tuned continuations), with human references MAUVE(human, base) and MAUVE(human, tuned), and the perplexity of
the held-out text before/after. All features come from the **base** model (one fixed embedding for every
text set, as MAUVE requires). The held-out text is the references' full lines (prefix + true continuation)
when given, else the prefixes themselves; neither is seen by training, which uses StaICC calibration prompts.
MAUVE needs a few hundred texts per side to be meaningful: with n texts per side it compares histograms
over round(n / 10) k-means buckets (at least 2), e.g. 5 buckets for 48 texts and 26 for 256, so small-n
scores are coarse and noisy. The report records ``num_buckets``.

Prefix files (``--MAUVE_prefix``): one prefix per line, UTF-8, blank lines skipped; a line may hold
``prefix<TAB>true continuation`` to give the human reference for that prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from abft_lens.backends.bridge import is_bridge
from abft_lens.backends import qk
from abft_lens.backends.forward import forward_residual, kv_decoder
from abft_lens.errors import AbftLensError
from abft_lens.backends.provenance import LoadedModel
from abft_lens.data.prompts import left_pad, length_sorted_batches, pad_token_id

__all__ = ["continuations", "generate_batch", "hidden_features", "perplexity", "Perplexity", "read_prefix_file",
           "POOLINGS"]

POOLINGS = ("last", "mean")


# ------------------------------------------------------------------------------------------- prefixes


def read_prefix_file(path: str | Path) -> tuple[list[str], list[str] | None]:
    """(prefixes, references or None) from a prefix file (module docstring); AbftLensError when unusable."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AbftLensError(f"cannot read the MAUVE prefix file {path}: {error}",
                            "pass a UTF-8 text file with one prefix per line.") from error
    rows = [line.split("\t", 1) for line in lines if line.strip()]
    if not rows:
        raise AbftLensError(f"the MAUVE prefix file {path} holds no prefix.", "write one prefix per line.")
    with_ref = [len(r) == 2 for r in rows]
    if any(with_ref) and not all(with_ref):
        first = next(i for i, line in enumerate(filter(str.strip, lines)) if with_ref[i] != with_ref[0])
        raise AbftLensError(f"{path}: some lines give a true continuation after a tab and some do not "
                            f"(non-blank line {first + 1}).", "give a continuation on every line or on none.")
    prefixes = [r[0] for r in rows]
    if any(not p.strip() for p in prefixes):
        raise AbftLensError(f"{path}: a line has an empty prefix before its tab.", "put text before the tab.")
    return prefixes, ([r[1] for r in rows] if all(with_ref) else None)


def _encode(model: LoadedModel, text: str) -> list[int]:
    """Token ids as the model's own tokenizer makes them (BOS exactly when it adds one)."""
    return list(model.tokenizer(text).input_ids)


# ----------------------------------------------------------------------------------------- generation


def continuations(
    model: LoadedModel,
    prefixes: Sequence[str],
    max_new_tokens: int = 32,
    seed: int | None = None,
    *,
    temperature: float = 1.0,
    top_p: float | None = None,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[str]:
    """The decoded new text after each prefix: greedy when ``seed`` is None, else sampled (prefix i: seed + i).

    Prefixes are generated ``batch_size`` at a time (sorted by length, left-padded, attention mask, KV cache);
    each row's result is the one it gets alone: padding is masked, positions start at its first real token,
    and sampling draws from a ``torch.Generator`` of its own, so the global RNG is never touched. Generation
    of a prefix stops at the tokenizer's EOS; special tokens are dropped from the decoded text.
    """
    if max_new_tokens <= 0:
        raise AbftLensError(f"max_new_tokens={max_new_tokens} must be positive.", "generate at least one token.")
    if batch_size <= 0:
        raise AbftLensError(f"batch_size={batch_size} must be positive.", "pass e.g. 16.")
    if seed is not None and temperature <= 0:
        raise AbftLensError(f"temperature={temperature} must be positive when sampling.",
                            "pass seed=None for greedy decoding.")
    tokenizer = model.tokenizer
    if is_bridge(model) and qk.is_quantized(model):
        raise AbftLensError("generation (the MAUVE test) is not supported on a 4-bit TransformerBridge base.",
                            "run the MAUVE test on the full-precision model (without --quantized): a 4-bit run's "
                            "adapters load onto it.")
    encoded = []
    for i, prefix in enumerate(prefixes):
        ids = _encode(model, prefix)
        if not ids:
            raise AbftLensError(f"prefix {i} ({prefix!r}) has no tokens.", "remove empty prefixes.")
        encoded.append(ids[-(model.cfg.n_ctx - max_new_tokens):] if len(ids) + max_new_tokens > model.cfg.n_ctx
                       else ids)
    out: list[str] = [""] * len(encoded)
    bar = tqdm(total=len(encoded), desc=progress if isinstance(progress, str) else "generating",
               disable=not progress, unit="prefix")
    for rows in length_sorted_batches([len(ids) for ids in encoded], batch_size):
        generators = None if seed is None else [
            torch.Generator(device=model.cfg.device).manual_seed(seed + i) for i in rows]
        new = generate_batch(model, [encoded[i] for i in rows], max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad_token_id(tokenizer), generators=generators, temperature=temperature,
                             top_p=top_p)
        for i, tokens in zip(rows, new):
            out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        bar.update(len(rows))
    bar.close()
    return out


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                   pad_token_id: int = 0, generators: Sequence[torch.Generator] | None = None,
                   temperature: float = 1.0, top_p: float | None = None) -> list[list[int]]:
    """New token ids for each prompt (without the EOS that ends it): one left-padded batch, KV cache.

    The first forward runs the padded prompts with their attention mask; every later step feeds only the
    tokens just chosen (:func:`~abft_lens.backends.forward.kv_decoder`: TransformerLens's cache on a hooked
    model, Hugging Face's ``past_key_values`` on a bridge). Only the last position is unembedded. Greedy
    (argmax) when ``generators`` is None, else row ``r`` samples with ``generators[r]``.
    """
    device, n = model.cfg.device, len(prompts)
    tokens, mask = left_pad(prompts, pad_token_id, device)
    step = kv_decoder(model, tokens, mask)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * n
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = step(tokens)
            chosen = _choose(logits, generators, temperature, top_p).tolist()
            for r, token in enumerate(chosen):
                if done[r]:
                    continue
                if eos_token_id is not None and token == eos_token_id:
                    done[r] = True
                else:
                    new[r].append(token)
            if all(done):
                break
            tokens = torch.tensor(chosen, device=device)[:, None]
    return new


def _choose(logits: Tensor, generators: Sequence[torch.Generator] | None, temperature: float,
            top_p: float | None) -> Tensor:
    """Argmax, or one sample per row from its own generator (temperature, then nucleus filtering as TL's)."""
    if generators is None:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        sorted_logits, indices = logits.sort(-1, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.scatter(-1, indices, sorted_logits.masked_fill(remove, -math.inf))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


# ------------------------------------------------------------------------------------------- features


def hidden_features(model: LoadedModel, texts: Sequence[str], *, pooling: str = "last", batch_size: int = 16,
                    progress: bool | str = False) -> Tensor:
    """``[n_texts, d_model]`` float32: final-layer hidden state after the final norm, last token or mean.

    Texts run ``batch_size`` at a time (length-sorted, left-padded, masked); a text's row equals its features
    alone up to float rounding.
    """
    if pooling not in POOLINGS:
        raise AbftLensError(f"pooling {pooling!r} is unknown.", f"use one of {POOLINGS}.")
    rows: list[Tensor | None] = [None] * len(texts)
    for indices, tokens, mask in _batches(model, texts, batch_size, progress, "features", min_tokens=1):
        with torch.inference_mode():
            final = model.ln_final(forward_residual(model, tokens, mask)).float()
        if pooling == "last":
            pooled = final[:, -1]
        else:
            weights = mask.to(final.dtype)[..., None]
            pooled = (final * weights).sum(1) / weights.sum(1)
        for row, i in enumerate(indices):
            rows[i] = pooled[row].cpu()
    return torch.stack(rows)


def _batches(model: LoadedModel, texts: Sequence[str], batch_size: int, progress: bool | str, desc: str, *,
             min_tokens: int, max_tokens: int = 4096):
    """Yield (text indices, left-padded tokens, attention mask) over length-sorted batches of ``texts``.

    Each text is tokenized alone and keeps its last ``n_ctx`` tokens; a text with fewer than ``min_tokens``
    tokens is an error when ``min_tokens`` is 1 and skipped otherwise. A batch holds at most ``batch_size``
    texts and ``max_tokens`` padded positions (a longer text runs alone), which bounds the logits' memory.
    """
    if batch_size <= 0:
        raise AbftLensError(f"batch_size={batch_size} must be positive.", "pass e.g. 16.")
    encoded = []
    for i, text in enumerate(texts):
        ids = _encode(model, text)[-model.cfg.n_ctx:]
        if not ids and min_tokens == 1:
            raise AbftLensError(f"text {i} ({text!r}) has no tokens.", "remove empty texts.")
        encoded.append(ids)
    order = sorted((i for i in range(len(encoded)) if len(encoded[i]) >= min_tokens),
                   key=lambda i: (len(encoded[i]), i))
    pad = pad_token_id(model.tokenizer)
    bar = tqdm(total=len(order), desc=progress if isinstance(progress, str) else desc, disable=not progress,
               unit="text")
    groups: list[list[int]] = []
    for i in order:  # ascending length: the newest text sets the width; at most max_tokens padded tokens
        if groups and len(groups[-1]) < batch_size and (len(groups[-1]) + 1) * len(encoded[i]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    for indices in groups:
        tokens, mask = left_pad([encoded[i] for i in indices], pad, model.cfg.device)
        yield indices, tokens, mask
        bar.update(len(indices))
    bar.close()


# ------------------------------------------------------------------------------------------ perplexity


@dataclass
class Perplexity:
    """Token-level perplexity over a text set: exp(nll / n_tokens)."""

    value: float
    nll: float
    n_tokens: int
    n_texts: int

    def to_dict(self) -> dict:
        return {"perplexity": self.value, "nll": self.nll, "n_tokens": self.n_tokens, "n_texts": self.n_texts}


def perplexity(model: LoadedModel, texts: Sequence[str], *, batch_size: int = 8,
               progress: bool | str = False) -> Perplexity:
    """exp(Σ NLL / Σ predicted tokens) over ``texts``, each tokenized alone as the model's tokenizer does.

    Every token after the first is predicted from its prefix (the first one too when a BOS is prepended).
    Texts run ``batch_size`` at a time (length-sorted, left-padded, masked; padding is never scored).
    """
    nll, count = 0.0, 0
    for _, tokens, mask in _batches(model, texts, batch_size, progress, "perplexity", min_tokens=2,
                                    max_tokens=1024):  # full-vocabulary logits: ~200 MB at 49k tokens
        with torch.inference_mode():
            logits = model(tokens, attention_mask=mask)[:, :-1].float()
        scored = (mask[:, :-1].bool() & mask[:, 1:].bool()).reshape(-1)
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[scored],
                                                   tokens[:, 1:].reshape(-1)[scored], reduction="none")
        nll += float(losses.double().sum())
        count += int(scored.sum())
    if count == 0:
        raise AbftLensError("no text has two or more tokens: nothing to score for perplexity.",
                            "give longer held-out texts.")
    return Perplexity(math.exp(nll / count), nll, count, len(texts))
