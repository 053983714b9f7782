"""Where a model came from: its tokenizer's BOS convention and the record run folders keep of it.

Every API function takes the model itself, as TransformerLens tools do: a ``HookedTransformer`` or, for 4-bit
bases, a ``TransformerBridge`` (the type alias :data:`LoadedModel`). The tokenizer is ``model.tokenizer``.
:func:`~abft_lens.backends.loading.load_model` attaches a :class:`ModelInfo` to the model it returns (attribute
``abft_lens_info``); :func:`model_info` reads it, or derives one for a model the user built or loaded
themselves. Example, with a model built by hand::

    from abft_lens.backends.provenance import describe_model, model_info
    from abft_lens.backends.tiny import tiny_tokenizer
    from abft_lens.backends.tl import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=64, d_head=4, n_heads=4, act_fn="relu",
                                  model_name="mine")  # d_vocab follows the tokenizer
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer())
    assert model_info(model).source == "user" and describe_model(model)["name"] == "mine"
"""

from __future__ import annotations

import torch

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from abft_lens.backends.tl import HAS_HOOKED, TL_VERSION, HookedTransformer
from abft_lens.errors import AbftLensError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["LoadedModel", "ModelInfo", "INFO_ATTRIBUTE", "attach_info", "model_info", "describe_model",
           "use_own_tokenizer", "tokenizer_adds_bos"]

LoadedModel = Union[HookedTransformer, "TransformerBridge"]
"""What every API function takes: a ``HookedTransformer`` or a ``TransformerBridge`` with a tokenizer."""

INFO_ATTRIBUTE = "abft_lens_info"


@dataclass
class ModelInfo:
    """Where a model came from.

    ``hf_dir`` is the Hugging Face folder the weights were read from (None for official names, tiny models and
    models built by the user); ``adds_bos`` says whether the model's own tokenizer prepends a BOS token (prompts
    then start with one); ``load_seconds`` is wall time in seconds; ``converted`` is True when this load converted
    a GGUF into the cache; ``info`` holds backend details (e.g. ``memory_mib`` of a 4-bit bridge).
    """

    name: str
    source: str
    hf_dir: Path | None = None
    adds_bos: bool = False
    load_seconds: float = 0.0
    converted: bool = False
    quantized: bool = False
    info: dict = field(default_factory=dict)


def attach_info(model: LoadedModel, info: ModelInfo) -> LoadedModel:
    """Record ``info`` on ``model`` (attribute :data:`INFO_ATTRIBUTE`) and return the model."""
    setattr(model, INFO_ATTRIBUTE, info)
    return model


def check_model(model) -> None:
    """``model`` is a TransformerLens model: a ``HookedTransformer`` (3.9) or a ``TransformerBridge`` (a torch
    module with a ``cfg`` over an ``original_model``), not a name or any other object."""
    hooked = isinstance(model, HookedTransformer)
    bridge = isinstance(model, torch.nn.Module) and hasattr(model, "cfg") and hasattr(model, "original_model")
    if not (hooked or bridge):
        shown = repr(model) if isinstance(model, (str, bytes, int, float)) else type(model).__name__
        kinds = "a HookedTransformer or a TransformerBridge" if HAS_HOOKED else "a TransformerBridge"
        raise AbftLensError(f"{shown} is not a TransformerLens model: with TransformerLens {TL_VERSION} installed, "
                            f"abft-lens takes {kinds}.",
                            "load one first, e.g. model = abft_lens.load_model('smollm2-135m'), and pass the model.")


def model_info(model: LoadedModel) -> ModelInfo:
    """The :class:`ModelInfo` that ``load_model`` attached, or one derived from a model built elsewhere.

    Derived: the name is ``cfg.model_name``, the source ``"user"``, ``adds_bos`` follows ``model.tokenizer``
    (TransformerLens gives a hand-built model a tokenizer that prepends BOS when the tokenizer has one).
    """
    check_model(model)
    attached = getattr(model, INFO_ATTRIBUTE, None)
    if attached is not None:
        return attached
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise AbftLensError(f"the model {model.cfg.model_name!r} has no tokenizer, and abft-lens builds prompts "
                            "with the model's own tokenizer.",
                            "pass tokenizer= when building the model, e.g. HookedTransformer(cfg, tokenizer=...) "
                            "with a tokenizer loaded by AutoTokenizer.from_pretrained.")
    return ModelInfo(name=str(model.cfg.model_name), source="user", adds_bos=tokenizer_adds_bos(tokenizer))


def describe_model(model: LoadedModel) -> dict:
    """JSON-able summary for run folders and result files (``load_model_like`` reads it back)."""
    info, cfg = model_info(model), model.cfg
    return {
        "name": info.name,
        "source": info.source,
        "hf_dir": str(info.hf_dir) if info.hf_dir else None,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads,
        "d_head": cfg.d_head,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "adds_bos": info.adds_bos,
        "quantized": info.quantized,
    }


def use_own_tokenizer(model: LoadedModel, tokenizer) -> None:
    """Put ``tokenizer`` itself back on a ``HookedTransformer`` or ``TransformerBridge`` (left padding).

    Both TransformerLens classes replace the tokenizer they are given with a copy that prepends BOS. abft-lens's
    loaders keep the checkpoint's own BOS convention, so ``model.tokenizer`` is the checkpoint's tokenizer and
    ``cfg.tokenizer_prepends_bos`` says what it does.
    """
    tokenizer.padding_side = "left"
    if isinstance(model, HookedTransformer):
        model.tokenizer = tokenizer
    else:  # the bridge's ``tokenizer`` setter would wrap it again; its value lives in ``_tokenizer``
        model._tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = tokenizer_adds_bos(tokenizer)


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when ``tokenizer("a")`` starts with the BOS token that ``add_special_tokens=False`` leaves out."""
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id
