"""4-bit base vs full precision: the demo's ABFT settings with LoRA r=16 on W_Q/W_K, on SmolLM2 loaded in 4-bit NF4
(TransformerBridge + bitsandbytes + PEFT) and in float32 (HookedTransformer), side by side in one invocation.

Each run is ``abft-lens demo --lora-r 16 [--quantized] --run-dir RUN_DIR`` (128 training prompts, 8 steps of 16,
lr 5e-4, restricted gradient, validation guard every 2 steps with keep-best, 256 test prompts) under
``/usr/bin/time -v`` (wall time, peak RSS). Then, in this process, the resident size of each loaded model's
weights. Accuracy before/after, gained/lost and an exact McNemar p come from the run folders.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quantized_demo.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from gemma_demo import paired, time_v

from abft_lens.io import write_json
from abft_lens.run_files import METRICS_FILE, read_log, read_run_json

VARIANTS = {"4bit-lora16": ["--quantized"], "float32-lora16": []}


def weight_memory_mib() -> dict:
    """Bytes of parameters and buffers of the loaded model, MiB (what the 4-bit layers save)."""
    from abft_lens.backends.loading import load_model
    from abft_lens.backends.provenance import model_info

    out = {}
    for name, quantized in (("4bit", True), ("float32", False)):
        model = load_model("smollm2-135m", quantized=quantized)
        tensors = [*model.parameters(), *model.buffers()]
        if quantized:
            tensors = [*model.original_model.parameters(), *model.original_model.buffers()]
        out[name] = {"weights_mib": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1),
                     "load_seconds": round(model_info(model).load_seconds, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--output", type=Path, default=Path("bench/results/quantized_demo.json"))
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the demo's 5e-4)")
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("abft-lens"))
    record: dict = {"environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()},
                    "weights": weight_memory_mib(), "runs": {}}
    for name, extra in VARIANTS.items():
        run_dir = args.runs / (f"{name}-demo" + (f"-lr{args.lr:g}" if args.lr else ""))
        lr = ["--lr", str(args.lr)] if args.lr else []
        command = [cli, "demo", "--lora-r", "16", *lr, *extra, "--run-dir", str(run_dir)]
        load_before = os.getloadavg()
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(done.returncode)
        metrics = read_run_json(run_dir, METRICS_FILE)
        log = read_log(run_dir)
        record["runs"][name] = {
            "command": " ".join(["abft-lens"] + command[1:]),
            "process": time_v(done.stderr) | {"load_average_before": load_before, "load_average_after": os.getloadavg()},
            "before": metrics["fore"], "after": metrics["post"], "paired": paired(run_dir),
            "train_seconds": metrics.get("train_seconds"), "best_validation_step": metrics.get("best_validation_step"),
            "validation_accuracy": {line["step"]: line["accuracy"] for line in log if line.get("event") == "validation"},
        }
        print(name, record["runs"][name]["before"], "->", record["runs"][name]["after"], record["runs"][name]["paired"])
    print(f"wrote {write_json(args.output, record)}")


if __name__ == "__main__":
    main()
