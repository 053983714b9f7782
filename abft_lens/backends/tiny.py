"""Tiny random Llama-style hooked models and their small BPE tokenizer (tests, notebooks, the CLI's ``tiny``)."""

from __future__ import annotations

import torch

from abft_lens.backends.hf_cache import build_once, cache_dir
from abft_lens.backends.provenance import use_own_tokenizer
from abft_lens.backends.relayout import relayout_for_forward
from abft_lens.backends.tl import HAS_HOOKED, HookedTransformer, HookedTransformerConfig, quiet_deprecation

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

    Under TransformerLens 4.x the same architecture is a Hugging Face ``LlamaForCausalLM`` drawn from ``seed``
    (initializer range 0.8/sqrt(d_model), TransformerLens's own) inside a ``TransformerBridge``; its values
    differ from the 3.9 model of the same seed.
    """
    if not HAS_HOOKED:
        return _tiny_bridge(n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=d_model,
                            d_head=d_head, d_vocab=d_vocab if tokenizer is None else len(tokenizer), n_ctx=n_ctx,
                            seed=seed, dtype=dtype, tokenizer=tokenizer)
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


def _tiny_bridge(*, n_layers: int, n_heads: int, n_kv_heads: int | None, d_model: int, d_head: int, d_vocab: int,
                 n_ctx: int, seed: int, dtype: torch.dtype, tokenizer):
    """The tiny model under TransformerLens 4.x: a seeded random Llama in a bridge (global RNG untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from abft_lens.backends.bridge import boot_bridge

    config = LlamaConfig(vocab_size=d_vocab, hidden_size=d_model, intermediate_size=4 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=1, num_key_value_heads=1, head_dim=d_head,
                         max_position_embeddings=n_ctx, rms_norm_eps=1e-5, initializer_range=0.8 / d_model ** 0.5,
                         tie_word_embeddings=False, attn_implementation="eager")
    # set after validation: Hugging Face asks d_model % n_heads == 0 even with head_dim given (TL does not)
    config.num_attention_heads, config.num_key_value_heads = n_heads, n_kv_heads or n_heads
    if tokenizer is not None:
        config.update(dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = LlamaForCausalLM(config).to(dtype)
    bridge = boot_bridge(hf_model, tokenizer or tiny_tokenizer(), f"tiny-llama-{n_layers}x{n_heads}", dtype=dtype)
    if tokenizer is None:  # as the hooked tiny model: no tokenizer (booting needs one, offline)
        bridge._tokenizer = None
    bridge.cfg.seed = seed
    return bridge


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
