"""Per-sample training cost: ABFT step, E2E step and a bare forward+backward, side by side in one run.

On the embedded SmolLM2-135M (float32, CPU threads as configured) and the same training prompts (k+1 seeded
calibration examples of SST-2), with the same trainable set (W_Q/W_K of every layer, Adam):

  bare   ``forward_residual`` to the last block (no unembedding) and ``backward`` of the last position's
         residual sum, then an Adam step: the cost of the network itself, no abft-lens machinery.
  ABFT   one ``Trainer.step`` on a pseudo-batch: hooks that keep the last attention row of every head,
         the induction filter, the ABFT loss, backward, Adam step, the PID update.
  E2E    the same ``Trainer.step`` with the E2E loss: the final norm and the full-vocabulary unembedding at
         the last position, cross-entropy on the gold label token (ABFT terms measured without gradient).
  ABFT-stock  the ABFT step on a second copy of the model with every weight made contiguous again, i.e.
         TransformerLens's stock layout, which its forward copies into another layout on every call
         (``abft_lens.backends.loading.relayout_for_forward`` stores the weights in that layout once, at load time).

Each timed unit is one pseudo-batch of ``--batch`` samples (one forward+backward per sample, one optimizer
step), divided by ``--batch``; the methods are interleaved round by round (order reversed every round) and
the median over ``--rounds`` is reported with ratios against ``bare``. Peak memory: each method also runs
alone in a child process (``--child``) whose peak RSS (``ru_maxrss``) is recorded.

    .venv/bin/python bench/train_step.py --rounds 5 --batch 4 --output bench/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from abft_lens.backends.forward import forward_residual
from abft_lens.data.prompts import prompt_builder
from abft_lens.io import write_json
from abft_lens.backends.loading import load_model
from abft_lens.data.tasks import load_task
from abft_lens.training.train import TrainConfig, Trainer

METHODS = ("bare", "ABFT", "E2E", "ABFT-stock")


def stock_layout(model):
    """The model with TransformerLens's stock (contiguous) weight layout, as before ``relayout_for_forward``."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.contiguous()
    return model


_STOCK: dict = {}  # "model": the stock-layout copy ABFT-stock trains, built once per process


def make_unit(method: str, model, builder, batch: int, seed: int):
    """A callable running one pseudo-batch of ``method``; fresh trainable state per method."""
    config = TrainConfig(method="E2E" if method == "E2E" else "ABFT", train_samples=batch, pseudo_batch_size=batch,
                         epochs=1, lr=1e-6, seed=seed)
    if method == "ABFT-stock" and "model" not in _STOCK:
        _STOCK["model"] = stock_layout(load_model("smollm2-135m"))
    trainer = Trainer(_STOCK["model"] if method == "ABFT-stock" else model, builder, config)
    prompts = trainer.prompts
    if method != "bare":
        return trainer, lambda: trainer.step(prompts)

    def bare() -> None:
        trainer.optimizer.zero_grad(set_to_none=True)
        for prompt in prompts:
            tokens = torch.tensor([prompt.token_ids])
            (forward_residual(model, tokens)[0, -1].sum() / len(prompts)).backward()
        trainer.optimizer.step()

    return trainer, bare


def time_methods(model, builder, args) -> dict[str, list[float]]:
    """Seconds per sample of each method and round; round 0 is an untimed warm-up."""
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_index in range(args.rounds + 1):
        order = METHODS if round_index % 2 == 0 else METHODS[::-1]
        for method in order:  # one Trainable per model at a time: attach, run, merge
            trainer, unit = make_unit(method, model, builder, args.batch, args.seed)
            start = time.perf_counter()
            unit()
            if round_index > 0:
                seconds[method].append((time.perf_counter() - start) / args.batch)
            trainer.trainable.merge()
    return seconds


def child(args) -> None:
    """Run one method alone for a few pseudo-batches and print its peak RSS in MiB."""
    model = load_model("smollm2-135m")
    if args.child == "ABFT-stock":
        _STOCK["model"] = stock_layout(model)  # one model in this process, as for the other methods
    builder = prompt_builder(model, load_task(args.dataset))
    _, unit = make_unit(args.child, model, builder, args.batch, args.seed)
    loaded_rss = _current_rss_mib()
    for _ in range(2):
        unit()
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_load_mib": loaded_rss, "rss_after_steps_mib": _current_rss_mib()}))


def _current_rss_mib() -> float:
    """Resident set size now (``/proc/self/statm``), MiB: what the process holds after model loading's peak."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("bench/results/train_step.json"))
    args = parser.parse_args()
    if args.child:
        return child(args)

    model = load_model("smollm2-135m")
    builder = prompt_builder(model, load_task(args.dataset))
    seconds = time_methods(model, builder, args)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    memory = {}
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--batch", str(args.batch),
                              "--dataset", args.dataset], capture_output=True, text=True, check=True)
        memory[method] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = statistics.mean(len(p.token_ids) for p in make_unit("bare", model, builder, args.batch, args.seed)[0].prompts)
    print(f"SmolLM2-135M, float32, {torch.get_num_threads()} threads, ~{tokens:.0f}-token prompts, "
          f"median of {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':<10} {'s/sample':>9} {'x bare':>7} {'peak RSS':>9} {'RSS after 2 steps':>18} (MiB)")
    for method in METHODS:
        print(f"{method:<10} {median[method]:>9.3f} {median[method] / median['bare']:>7.2f} "
              f"{memory[method]['peak_rss_mib']:>9.0f} {memory[method]['rss_after_steps_mib']:>18.0f}")
    write_json(args.output, {
        "model": "smollm2-135m", "dtype": "float32", "threads": torch.get_num_threads(), "batch": args.batch,
        "rounds": args.rounds, "mean_prompt_tokens": tokens, "seconds_per_sample": seconds,
        "median_seconds_per_sample": median, "ratio_to_bare": {m: median[m] / median["bare"] for m in METHODS},
        "memory_mib": memory, "load_average": os.getloadavg(), "torch": torch.__version__,
    })


if __name__ == "__main__":
    main()
