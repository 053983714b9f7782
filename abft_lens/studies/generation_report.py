"""The before/after generation report (:func:`generation_report`) and the train-time MAUVE test (:class:`MauveTest`,
``train --MAUVE_test``): continuations, MAUVE and perplexity of a base and a tuned model on the same prefixes.
See :mod:`abft_lens.studies.generation` for how each part is computed.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from torch import Tensor

from abft_lens.backends import qk
from abft_lens.errors import AbftLensError
from abft_lens.io import write_json
from abft_lens.run_files import GENERATION_FILE
from abft_lens.studies.generation import Perplexity, continuations, hidden_features, perplexity, read_prefix_file
from abft_lens.studies.mauve import auto_buckets, mauve_available, mauve_score
from abft_lens.backends.provenance import LoadedModel, model_info

@dataclass
class GenerationSide:
    """What one model produced for the prefixes: its continuations and its perplexity of the held-out text."""

    continuations: list[str]
    perplexity: Perplexity


def generate_side(model: LoadedModel, prefixes: Sequence[str], held_out: Sequence[str], *,
                  max_new_tokens: int = 32, seed: int | None = None, progress: bool = False,
                  label: str = "") -> GenerationSide:
    """Continuations of ``prefixes`` and perplexity of ``held_out`` under ``model`` (as it is now)."""
    conts = continuations(model, prefixes, max_new_tokens, seed, progress=f"generating {label}".strip()
                          if progress else False)
    return GenerationSide(conts, perplexity(model, held_out))


@dataclass
class GenerationReport:
    """MAUVE scores and perplexities of a base and a tuned model on the same prefixes."""

    mauve: dict[str, float]
    perplexity: dict[str, dict]
    samples: list[dict]
    info: dict = field(default_factory=dict)
    features: dict[str, Tensor] = field(default_factory=dict, repr=False)  # "base"/"tuned"/"human"; not in to_dict

    def to_dict(self) -> dict:
        return {"mauve": self.mauve, "perplexity": self.perplexity, **self.info, "samples": self.samples}

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [(f"MAUVE {name.replace('_', ' ')}", f"{value:.4f}") for name, value in self.mauve.items()]
        rows.append(("perplexity", f"{self.perplexity['before']['perplexity']:.3f} -> "
                                   f"{self.perplexity['after']['perplexity']:.3f}"))
        return rows


def held_out_texts(prefixes: Sequence[str], references: Sequence[str] | None) -> list[str]:
    """The perplexity text: prefix + true continuation when references are given, else the prefixes."""
    return list(prefixes) if references is None else [p + r for p, r in zip(prefixes, references)]


def score_generations(feature_model: LoadedModel, prefixes: Sequence[str], base: GenerationSide,
                      tuned: GenerationSide, references: Sequence[str] | None = None, *, pooling: str = "last",
                      backend: str = "auto", seed: int = 25, progress: bool = False, info: dict | None = None
                      ) -> GenerationReport:
    """MAUVE between the sides (features of prefix + continuation by ``feature_model``, the base model)."""
    if references is not None and len(references) != len(prefixes):
        raise AbftLensError(f"{len(references)} references for {len(prefixes)} prefixes.", "give one per prefix.")
    if backend == "auto":
        backend = "mauve-text" if mauve_available() else "builtin"

    def features(texts, label):
        return hidden_features(feature_model, texts, pooling=pooling, progress=f"features {label}" if progress else False)

    f_base = features([p + c for p, c in zip(prefixes, base.continuations)], "base")
    f_tuned = features([p + c for p, c in zip(prefixes, tuned.continuations)], "tuned")
    scores = {"base_vs_tuned": mauve_score(f_base, f_tuned, backend=backend, seed=seed)}
    if references is not None:
        f_human = features([p + r for p, r in zip(prefixes, references)], "human")
        scores["human_vs_base"] = mauve_score(f_human, f_base, backend=backend, seed=seed)
        scores["human_vs_tuned"] = mauve_score(f_human, f_tuned, backend=backend, seed=seed)
    samples = [{"prefix": p, "base": b, "tuned": t, **({"reference": references[i]} if references else {})}
               for i, (p, b, t) in enumerate(zip(prefixes, base.continuations, tuned.continuations))]
    meta = {"n_prefixes": len(prefixes), "pooling": pooling, "mauve_backend": backend, "mauve_seed": seed,
            "num_buckets": auto_buckets(len(prefixes)), "feature_model": model_info(feature_model).name,
            "perplexity_text": "prefix + true continuation" if references is not None else "the prefixes",
            "identical_continuations": sum(b == t for b, t in zip(base.continuations, tuned.continuations)),
            **(info or {})}
    features = {"base": f_base, "tuned": f_tuned, **({"human": f_human} if references is not None else {})}
    return GenerationReport(scores, {"before": base.perplexity.to_dict(), "after": tuned.perplexity.to_dict()},
                            samples, meta, features)


def generation_report(base_model: LoadedModel, tuned_model: LoadedModel, prefixes: Sequence[str], *,
                      references: Sequence[str] | None = None, max_new_tokens: int = 32, seed: int | None = None,
                      pooling: str = "last", backend: str = "auto", progress: bool = False) -> GenerationReport:
    """Generate with both models, then MAUVE (features from the base model) and perplexity before/after."""
    held_out = held_out_texts(prefixes, references)
    base = generate_side(base_model, prefixes, held_out, max_new_tokens=max_new_tokens, seed=seed,
                         progress=progress, label="base")
    tuned = generate_side(tuned_model, prefixes, held_out, max_new_tokens=max_new_tokens, seed=seed,
                          progress=progress, label="tuned")
    return score_generations(base_model, prefixes, base, tuned, references, pooling=pooling, backend=backend,
                             progress=progress, info={"max_new_tokens": max_new_tokens, "sampling_seed": seed})


# ------------------------------------------------------------------------------- the train-time test


MAX_NEW_TOKENS = 2048  # a bound for a quick before/after check; the context bounds it further (check_fits)


class MauveTest:
    """``--MAUVE_test``: :meth:`before` on the base model, train, :meth:`after` writes ``generation.json``.

    ``before`` keeps a copy of the base W_Q/W_K; ``after`` generates with the trained model, puts the base
    tensors back only to embed every text set, and leaves the trained weights in place.
    """

    def __init__(self, prefix_file: str | Path, *, max_new_tokens: int = 32, seed: int | None = None,
                 pooling: str = "last", progress: bool = True):
        self.prefix_file = Path(prefix_file)
        self.prefixes, self.references = read_prefix_file(prefix_file)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or not 0 < max_new_tokens <= MAX_NEW_TOKENS:
            raise AbftLensError(f"--MAUVE-max-new-tokens {max_new_tokens} must be in 1..{MAX_NEW_TOKENS}.",
                                "pass e.g. 32 (the prefix and the new tokens must fit the model's context).")
        self.max_new_tokens, self.seed, self.pooling, self.progress = max_new_tokens, seed, pooling, progress
        self.held_out = held_out_texts(self.prefixes, self.references)
        self.base: GenerationSide | None = None
        self.base_weights: dict[str, Tensor] | None = None

    def check_fits(self, model: LoadedModel) -> None:
        """The longest prefix plus ``max_new_tokens`` fits the model's context (checked before any generation)."""
        longest = max(len(model.tokenizer(prefix).input_ids) for prefix in self.prefixes)
        if longest + self.max_new_tokens > model.cfg.n_ctx:
            raise AbftLensError(f"the longest MAUVE prefix ({longest} tokens) plus --MAUVE-max-new-tokens "
                                f"{self.max_new_tokens} exceeds the model's context of {model.cfg.n_ctx} tokens.",
                                f"pass --MAUVE-max-new-tokens <= {max(1, model.cfg.n_ctx - longest)} or shorter prefixes.")

    def before(self, model: LoadedModel) -> GenerationSide:
        self.check_fits(model)
        self.base_weights = qk.snapshot(model)
        self.base = generate_side(model, self.prefixes, self.held_out, max_new_tokens=self.max_new_tokens,
                                  seed=self.seed, progress=self.progress, label="base")
        return self.base

    def after(self, model: LoadedModel, run_dir: str | Path | None = None) -> GenerationReport:
        if self.base is None:
            raise RuntimeError("MauveTest.after() needs before() on the base model first")
        tuned = generate_side(model, self.prefixes, self.held_out, max_new_tokens=self.max_new_tokens,
                              seed=self.seed, progress=self.progress, label="tuned")
        with qk.restored(model, list(self.base_weights)):
            qk.restore(model, self.base_weights)
            report = score_generations(model, self.prefixes, self.base, tuned, self.references,
                                       pooling=self.pooling, progress=self.progress,
                                       info={"max_new_tokens": self.max_new_tokens, "sampling_seed": self.seed,
                                             "prefix_file": str(self.prefix_file)})
        if run_dir is not None:
            write_json(Path(run_dir) / GENERATION_FILE, report.to_dict())
        return report


__all__ = ["generation_report", "score_generations", "generate_side", "GenerationReport", "GenerationSide",
           "MauveTest", "MauveExtra", "held_out_texts"]


class MauveExtra:
    """``--MAUVE_test`` as a run extra (:class:`~abft_lens.training.runs.RunOptions`): generation on the base
    model before training, ``generation.json`` after it."""

    def __init__(self, test: MauveTest, run_dir: str | Path):
        self.test, self.run_dir = test, Path(run_dir)

    def before(self, model) -> None:
        self.test.before(model)

    def after(self, model) -> list[tuple[str, str]]:
        return self.test.after(model, self.run_dir).summary_rows()
