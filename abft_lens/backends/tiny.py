"""Tiny random Llama-style hooked models and their small BPE tokenizer (tests, notebooks, the CLI's ``tiny``)."""

from __future__ import annotations

import torch

from abft_lens.backends.hf_cache import build_once, cache_dir
from abft_lens.backends.provenance import use_own_tokenizer
from abft_lens.backends.relayout import relayout_for_forward
from abft_lens.backends.tl import HookedTransformer, HookedTransformerConfig, quiet_deprecation

__all__ = ["tiny_model", "tiny_tokenizer", "TINY_TOKENIZER_VERSION"]


def tiny_model(
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = 2,
    d_model: int = 32,
    d_head: int = 8,
    d_vocab: int = 64,
    n_ctx: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
) -> HookedTransformer:
    """A randomly initialised Llama-style hooked model (RMSNorm, rotary, gated SiLU MLP, optional GQA).

    ``n_kv_heads=None`` gives plain multi-head attention. Used by tests and notebooks; builds in well under
    a second. With a tokenizer, ``d_vocab`` follows the tokenizer and ``model.tokenizer`` is that tokenizer
    itself (no BOS prepended).
    """
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv_heads,
        d_vocab=d_vocab if tokenizer is None else len(tokenizer),
        d_mlp=4 * d_model,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        gated_mlp=True,
        final_rms=True,
        default_prepend_bos=False,
        seed=seed,
        dtype=dtype,
        init_weights=True,
        tokenizer_prepends_bos=False,
    )
    padding = {"default_padding_side": "left"} if tokenizer is not None else {}
    with quiet_deprecation():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, **padding)
    if tokenizer is not None:
        use_own_tokenizer(model, tokenizer)
    relayout_for_forward(model)
    model.eval()
    return model


TINY_TOKENIZER_VERSION = "tiny-bpe-1024-v1"


def tiny_tokenizer():
    """A 1,024-token byte-level BPE tokenizer trained (deterministically, < 1 s) on StaICC text and cached.

    The label words of each of the ten StaICC datasets start with distinct tokens (several take more than one
    token), so tiny models run every task.
    """
    from transformers import AutoTokenizer

    folder = cache_dir() / TINY_TOKENIZER_VERSION
    build_once(folder, lambda tmp: _train_tiny_tokenizer().save_pretrained(tmp),
                lambda: (folder / "tokenizer.json").is_file())
    return AutoTokenizer.from_pretrained(folder)


def _train_tiny_tokenizer():
    from StaICC.normal import ORIGINAL_DATA_LOADER_NORMAL
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for loader in ORIGINAL_DATA_LOADER_NORMAL:
        data = loader()
        corpus += [" ".join(row[0]) for row in data.table[:300]]
        corpus += [(data.get_label_prefix() + " " + word + "\n") * 20 for word in data.get_label_space()]
        corpus += [data.get_input_text_prefixes()[0] * 20]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
