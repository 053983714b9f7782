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
