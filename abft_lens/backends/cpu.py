"""What this CPU can do, asked in one place (tests monkeypatch :func:`native_bf16` to play the other CPU)."""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """True when the CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16), by torch's own CPU probe.

    Without them (AVX2, AVX-512 without BF16, other architectures) torch emulates bfloat16 matmuls, slower
    than float32: ~55x for one large matmul on an AVX2 CPU (README, "Fast training").
    """
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def auto_dtype(device: str) -> tuple[str, str]:
    """``(dtype name, reason)`` for ``--dtype auto``: ``"bfloat16"`` on CUDA or where :func:`native_bf16` is
    true, ``"float32"`` otherwise (where bfloat16 matmuls would be emulated, slower than float32)."""
    if str(device).startswith("cuda"):
        return "bfloat16", "--dtype auto: bfloat16 on CUDA"
    capability = torch.backends.cpu.get_cpu_capability()
    if native_bf16():
        return "bfloat16", ("--dtype auto: this CPU has native bfloat16 matmuls (AVX512-BF16 or AMX; "
                            f"torch: {capability})")
    return "float32", f"--dtype auto: float32, this CPU has no native bfloat16 matmuls (torch: {capability})"
