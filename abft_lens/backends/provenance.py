"""Where a model came from: its tokenizer's BOS convention and the record run folders keep of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from abft_lens.backends.tl import HookedTransformer, HookedTransformerConfig

__all__ = ["LoadedModel", "tokenizer_adds_bos"]


@dataclass
class LoadedModel:
    """A hooked model with its tokenizer and a record of where it came from.

    ``hf_dir`` is the Hugging Face folder the weights were read from (None for official names and tiny
    models); ``adds_bos`` says whether the model's own tokenizer prepends a BOS token.
    """

    model: HookedTransformer
    tokenizer: object
    name: str
    source: str
    hf_dir: Path | None = None
    adds_bos: bool = False
    load_seconds: float = 0.0
    converted: bool = False
    quantized: bool = False
    info: dict = field(default_factory=dict)

    @property
    def cfg(self) -> HookedTransformerConfig:
        return self.model.cfg

    def describe(self) -> dict:
        """JSON-able summary for run folders and result files."""
        cfg = self.model.cfg
        return {
            "name": self.name,
            "source": self.source,
            "hf_dir": str(self.hf_dir) if self.hf_dir else None,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "n_key_value_heads": cfg.n_key_value_heads,
            "d_head": cfg.d_head,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "adds_bos": self.adds_bos,
            "quantized": self.quantized,
        }


def tokenizer_adds_bos(tokenizer) -> bool:
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id
