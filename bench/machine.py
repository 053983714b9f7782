"""What the machine can do, measured in the benchmark's own run (imported by train_step.py and eval_throughput.py).

- :func:`cpu_report`: the CPU's name, torch's capability (``torch.backends.cpu.get_cpu_capability()``), the
  /proc/cpuinfo flags that decide the matmul kernels (AVX2, AVX-512, AVX512-BF16, AMX), whether
  :func:`abft_lens.backends.cpu.native_bf16` holds, cores, torch threads and the load average.
- :func:`matmul_rates`: GFLOP/s of plain ``F.linear`` products at the shapes the model's layers use, in float32
  and bfloat16, at the current torch thread count: [M x d] @ [d x d] (W_Q, W_O), [M x d] @ [d x g·e] (W_K, W_V),
  [M x d] @ [d x f] (MLP in/gate), [M x f] @ [f x d] (MLP out), with M = one prompt's tokens and eight prompts'.
  Each product repeats for ``seconds`` (at least once); the rate of a dtype is the best M's FLOP-weighted mix
  over a layer's matmuls (total FLOPs / total time): the ceiling a step's matmuls could reach.
- :func:`peak_rss_child`: runs a command line in a child process and reads the JSON line it prints last.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16",
         "amx_tile": "AMX"}


def cpu_report() -> dict:
    """The CPU and the run's conditions: name, capability, feature flags, cores, threads, load average."""
    from abft_lens.backends.cpu import native_bf16

    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": name, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "features": [label for flag, label in FLAGS.items() if flag in flags], "native_bf16": native_bf16(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__}


def describe(report: dict) -> str:
    return (f"{report['cpu']}; torch capability {report['torch_capability']}; "
            f"{', '.join(report['features']) or 'none of AVX2/AVX-512/AMX'}; native bf16: {report['native_bf16']}; "
            f"{report['cores']} cores, {report['threads']} torch threads, load average "
            + " ".join(f"{x:.2f}" for x in report["load_average"]))


def layer_shapes(model) -> list[tuple[str, int, int, int]]:
    """(name, count per layer, in, out) of the model's linear layers (see the module docstring)."""
    cfg = model.cfg
    kv = (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
    mlp_in = 2 if getattr(cfg, "gated_mlp", False) else 1
    return [("d x d (W_Q, W_O)", 2, cfg.d_model, cfg.n_heads * cfg.d_head), ("d x kv (W_K, W_V)", 2, cfg.d_model, kv),
            ("d x f (MLP in)", mlp_in, cfg.d_model, cfg.d_mlp), ("f x d (MLP out)", 1, cfg.d_mlp, cfg.d_model)]


def _seconds_per_product(x: torch.Tensor, w: torch.Tensor, seconds: float) -> float:
    F.linear(x, w)  # warm-up
    runs, start = 0, time.perf_counter()
    while True:
        F.linear(x, w)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / runs


def matmul_rates(model, tokens: int, *, seconds: float = 0.3, batches=(1, 8)) -> dict:
    """``{dtype: {"gflops": mix rate, "by_shape": {M: {shape: GFLOP/s}}}}`` at this thread count (module
    docstring). ``tokens``: one prompt's (mean) length."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            by_m, best = {}, 0.0
            for batch in batches:
                m = tokens * batch
                flops = elapsed = 0.0
                rates = {}
                for name, count, n_in, n_out in layer_shapes(model):
                    x = torch.randn(m, n_in, generator=generator).to(dtype)
                    w = torch.randn(n_out, n_in, generator=generator).to(dtype)
                    per = _seconds_per_product(x, w, seconds)
                    rates[name] = 2 * m * n_in * n_out / per / 1e9
                    flops, elapsed = flops + count * 2 * m * n_in * n_out, elapsed + count * per
                rates["mix"] = flops / elapsed / 1e9
                by_m[m], best = rates, max(best, rates["mix"])
            out[str(dtype).removeprefix("torch.")] = {"gflops": best, "by_shape": by_m}
    return out


def peak_rss_child(command: list[str]) -> dict:
    """Run ``command`` (a child benchmark process) and parse the JSON object on its last line of output."""
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_threads(text: str) -> list[int]:
    """``"1,2"`` -> [1, 2]."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--threads {text!r}: give positive integers, e.g. 1,2")
    return values
