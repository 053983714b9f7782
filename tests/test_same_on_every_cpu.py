"""The same behaviour on every CPU (issue 18). What differs between AVX2 and AVX-512/AVX512-BF16/AMX CPUs is
decided in one small place each, and these tests play both CPUs by monkeypatching that place:

- bitsandbytes (imported by TransformerLens) logs a notice about the optional ``kernels`` package on import,
  on AVX512-BF16 CPUs only: :func:`abft_lens.backends.tl.quiet_bitsandbytes` drops that record, and only it;
- the real commands, run as processes, print exactly one error line and one fix line on stderr;
- the bfloat16 training warning follows :func:`abft_lens.backends.cpu.native_bf16`;
- the 4-bit layers never take bitsandbytes' AVX512-BF16 repack path, whether bitsandbytes detects it or not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from abft_lens.backends import cpu, tl
from abft_lens.backends.tl import BNB_CPU_LOGGER, BNB_KERNELS_NOTICE, DropKernelsNotice, quiet_bitsandbytes

ROOT = Path(__file__).resolve().parent.parent
# bitsandbytes 0.50.2, backends/cpu/ops.py: the record as it is logged (format string and its argument)
NOTICE = (BNB_KERNELS_NOTICE + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
          ModuleNotFoundError("No module named 'kernels'"))

# ------------------------------------------------------------------------------ the bitsandbytes notice


def _record(name: str, msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, "ops.py", 252, msg, args, None)


def test_the_filter_drops_the_kernels_notice_and_nothing_else():
    drop = DropKernelsNotice()
    assert not drop.filter(_record(BNB_CPU_LOGGER, *NOTICE))
    assert drop.filter(_record(BNB_CPU_LOGGER, "Failed to load CPU gemm_4bit_forward"))  # a prefix is not enough
    assert drop.filter(_record(BNB_CPU_LOGGER, "int8 matmul falls back to %s", "fp32"))
    assert drop.filter(_record(BNB_CPU_LOGGER, "see: " + NOTICE[0], NOTICE[1]))  # the notice must start the line


@pytest.fixture
def bitsandbytes_not_yet_imported(monkeypatch):
    """The moment before TransformerLens first imports bitsandbytes (installed or not in this environment)."""
    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(tl.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else find_spec(name, *a))


def test_quiet_bitsandbytes_drops_the_notice_only_inside_the_block(bitsandbytes_not_yet_imported, caplog):
    logger = logging.getLogger(BNB_CPU_LOGGER)
    filters = list(logger.filters)
    caplog.set_level(logging.WARNING)
    with quiet_bitsandbytes():
        logger.warning(*NOTICE)  # what bitsandbytes logs on an AVX512-BF16 CPU without `kernels`
        logger.warning("another bitsandbytes warning")
        logging.getLogger("bitsandbytes.functional").warning(*NOTICE)  # the same text from elsewhere
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (BNB_CPU_LOGGER, "another bitsandbytes warning"),
        ("bitsandbytes.functional", NOTICE[0] % NOTICE[1])]
    assert logger.filters == filters  # nothing left behind
    caplog.clear()
    logger.warning(*NOTICE)
    assert [r.getMessage() for r in caplog.records] == [NOTICE[0] % NOTICE[1]]


def test_quiet_bitsandbytes_does_nothing_once_bitsandbytes_is_imported_or_when_it_is_absent(monkeypatch):
    logger = logging.getLogger(BNB_CPU_LOGGER)
    filters = list(logger.filters)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    with quiet_bitsandbytes():
        assert logger.filters == filters
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    monkeypatch.setattr(tl.importlib.util, "find_spec", lambda name, *a: None)
    with quiet_bitsandbytes():
        assert logger.filters == filters


def test_importing_abft_lens_left_no_filter_on_the_bitsandbytes_logger():
    assert not any(isinstance(f, DropKernelsNotice) for f in logging.getLogger(BNB_CPU_LOGGER).filters)


# --------------------------------------------------------------------------- real commands, real stderr


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _unknown_model_lines() -> list[str]:
    """The message for ``--model nonexist`` (it quotes TransformerLens's list of names), built in-process."""
    from abft_lens.backends.loading import load_model
    from abft_lens.errors import AbftLensError

    with pytest.raises(AbftLensError) as info:
        load_model("nonexist")
    return f"abft-lens: error: {info.value}".splitlines()


CASES = {
    "python -m abft_lens eval --model nonexist": (
        [sys.executable, "-m", "abft_lens", "eval", "--model", "nonexist"], _unknown_model_lines),
    "abft-lens train --lr -1": (
        ["abft-lens", "train", "--model", "tiny", "--lr", "-1", "--run-dir", "run"],
        lambda: ["abft-lens: error: --lr -1.0 must be a finite number > 0.", "  fix: pass e.g. --lr 2e-5."]),
    "python -m abft_lens.cli report missing": (
        [sys.executable, "-m", "abft_lens.cli", "report", "missing"],
        lambda: ["abft-lens: error: missing is not an abft-lens run folder (no config.json).",
                 "  fix: point at a folder written by `abft-lens train` or `abft-lens demo`."]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_command_prints_exactly_its_message_and_fix(case, tmp_path):
    """The whole stderr of the real process: the error line and the fix line, no third-party line before them
    (bitsandbytes' notice on AVX512-BF16 CPUs, for instance), exit status 2, nothing written."""
    command, expected = CASES[case]
    if command[0] == "abft-lens":
        script = Path(sys.executable).with_name("abft-lens")  # the console script of the installed package
        if not script.is_file():
            pytest.skip("the abft-lens console script is not installed next to this Python")
        command = [str(script), *command[1:]]
    process = _run(command, tmp_path)
    assert process.returncode == 2, process.stderr[-2000:]
    lines = expected()
    assert len(lines) == 2 and lines[1].startswith("  fix: ")
    assert process.stderr.splitlines() == lines
    assert process.stdout == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- bfloat16 warning


@pytest.mark.parametrize("capabilities, native", [
    ({"architecture": "x86_64", "avx2": True}, False),
    ({"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False}, False),
    ({"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True}, True),
    ({"architecture": "x86_64", "avx2": True, "amx_tile": True, "amx_bf16": True}, True),
    ({"architecture": "aarch64", "neon": True}, False),
])
def test_native_bf16_reads_torchs_cpu_probe(capabilities, native, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert cpu.native_bf16() is native


@pytest.mark.parametrize("native, compute_dtype, warned", [
    (True, "bfloat16", False),   # AVX512-BF16 / AMX
    (False, "bfloat16", True),   # AVX2: emulated bfloat16
    (False, None, False),        # float32 training never warns
])
def test_the_bfloat16_warning_follows_the_cpu(native, compute_dtype, warned, monkeypatch, caplog):
    from abft_lens.backends.loading import load_model
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.data.tasks import load_task
    from abft_lens.training.train import TrainConfig, Trainer

    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    model = load_model("tiny")
    caplog.set_level(logging.WARNING, logger="abft_lens.training.train")
    Trainer(model, prompt_builder(model, load_task("sst2")),
            TrainConfig(train_samples=2, pseudo_batch_size=2, epochs=1, compute_dtype=compute_dtype))
    messages = [r.getMessage() for r in caplog.records if r.name == "abft_lens.training.train"]
    assert len(messages) == int(warned)
    if warned:
        assert messages[0].startswith("bfloat16 training on a CPU without bfloat16 instructions (no AVX512-BF16 "
                                      "or AMX; torch reports ") and messages[0].endswith("train in float32")


# -------------------------------------------------------------------------------- the 4-bit repack path


@pytest.mark.parametrize("bitsandbytes_sees_avx512bf16", [True, False])
def test_4bit_layers_never_take_the_avx512bf16_repack_path(bitsandbytes_sees_avx512bf16, monkeypatch):
    """bitsandbytes turns its CPU repack on when it detects AVX512-BF16 (``Linear4bit.__init__``); the layers of
    :func:`quantize_linears` switch it off either way: an eval-mode pass leaves the weights in the plain NF4
    format and computes the dequantized float32 model."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    from abft_lens.backends.bridge import dense_weight, quantize_linears

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: bitsandbytes_sees_avx512bf16)
    # bitsandbytes' own default follows the (monkeypatched) detection: both branches are really exercised
    assert bnb.nn.Linear4bit(64, 32, device="meta").support_avx512bf16_for_cpu is bitsandbytes_sees_avx512bf16
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))  # sizes the repack accepts (multiples of 32)
    assert quantize_linears(block, compute_dtype=torch.float32, skip=()) == 2
    block.to("cpu").eval()  # Params4bit quantizes on this move
    x = torch.randn(3, 64)
    with torch.inference_mode():  # the repack's conditions: CPU, eval mode, no gradient
        out = block(x)
        reference = x
        for layer in block:
            reference = nn.functional.linear(reference, dense_weight(layer), layer.bias)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for layer in block:
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert type(layer).__name__ == "Linear4bit" and layer.support_avx512bf16_for_cpu is False
