"""Training cost per prompt: abft-lens's ABFT step in its variants against a plain Hugging Face ABFT step, and
against the machine's own matmul rate.

On ``--model`` (default the embedded SmolLM2-135M) and the same ``--prompts`` SST-2 training prompts (k+1 seeded
calibration examples), one optimizer step over all of them per timed unit, divided by the number of prompts.
The demo's step: ABFT with the restricted gradient, W_Q/W_K of every layer, Adam, PID, the threshold
k / (k + ln n_t).

  loop       ``Trainer.step`` with ``micro_batch_size=1``: one forward+backward per prompt (before issue 11)
  default    ``micro_batch_size=None``: the size the memory budget picks (issue 19; printed with its reason)
  mb4/8/16   the same step in left-padded micro-batches of 4 / 8 / 16 prompts (routed restricted gradient)
  bf16-mb8   micro-batches of 8 under bfloat16 autocast (float32 weights, gradients and Adam state)
  paper-abft the paper preset's step (``TrainConfig.paper()``'s settings: no restricted gradient, PID), default
             micro-batch: the ABFT side of issue 21's E2E/ABFT cost ratio
  paper-e2e  the same with ``method="E2E"``: every layer whole, the full-vocabulary unembedding at the last
             position, cross-entropy (the same prompts and trained W_Q/W_K)
  bare       per prompt: ``forward_residual`` and ``backward`` of the last residual's sum, Adam: the network
  hf         a plain Hugging Face implementation written here from the method sheet, importing nothing of
             abft_lens: eager attention, ``output_attentions=True`` on the decoder (no LM head), one prompt
             per forward+backward, per-prompt masks on q_proj/k_proj gradients (K: union over its group), Adam
             (only for a model with a Hugging Face folder: not ``tiny``)

Before timing, the hf step's accumulated gradients (and head counts) are checked against abft-lens's (``mb8``
and ``loop``) on the same prompts and weights. For each ``--threads`` count (default 1 and 2): the machine's
matmul rate at the model's shapes, float32 and bfloat16 (``machine.matmul_rates``), then the variants
interleaved round by round (order reversed every round, round 0 an untimed warm-up); the median over
``--rounds`` is reported with ratios to ``hf``, the achieved GFLOP/s and its share of the matmul rate of the
variant's dtype. FLOPs are the ABFT step's own count on each prompt's length
(:func:`abft_lens.training.step_cost.abft_step_flops`: padding is not counted, so a variant that pads or runs
more than the loss needs shows a lower rate); ``bare`` counts its full forward and backward. Each variant then
runs alone in a child process (``--child``) for its peak RSS (``VmHWM``, load included; once, at the first
thread count): the hf child imports torch, transformers and abft_lens.resources only. ``--profile`` adds where
one unit's time goes (torch.profiler): attention and MLP per layer (forward ops inside the modules, backward
ops by autograd sequence number), the routing of the restricted gradient, and the rest (embedding, norms, loss,
filter, optimizer). The CPU's capability (AVX2 / AVX-512 / AVX512-BF16 / AMX), threads and load are printed.

    .venv/bin/python bench/train_step.py --rounds 5 --prompts 32 --threads 1,2 --output bench/results/train_step.json
    .venv/bin/python bench/train_step.py --model tiny --rounds 1 --prompts 4 --variants loop default bf16-mb8 \
        --threads 1 --output /tmp/train_step_tiny.json  # a check that it all works, in seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import machine  # bench/ is the script's own folder, first on sys.path

VARIANTS = ("loop", "default", "mb4", "mb8", "mb16", "bf16-mb8", "paper-abft", "paper-e2e", "bare", "hf")
SETTINGS = dict(lr=1e-6, restricted_gradient=True, award=1.0, penalty=0.5)  # lr: keep weights ~fixed over rounds


# ------------------------------------------------------------------------------------------ plain HF


def load_hf(hf_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    projections = []
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.requires_grad_(True)
            projections.append(proj.weight)
    return model, torch.optim.Adam(projections, lr=SETTINGS["lr"])


def hf_step(model, optimizer, prompts: list[dict]) -> list[list[int]]:
    """One ABFT optimizer step (method sheet §1), one prompt per forward+backward; returns head counts."""
    cfg = model.config
    n_heads, n_kv, d_head = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layers = model.model.layers
    counts = torch.zeros(len(layers), n_heads, dtype=torch.long)
    current: dict[str, torch.Tensor] = {}

    def mask(grad, layer: int, target: str):  # restricted gradient: this prompt's open heads only
        open_ = current["heads"][layer]
        if target == "k":
            open_ = open_.view(n_kv, n_heads // n_kv).any(1)
        return grad * open_.repeat_interleave(d_head).to(grad.dtype)[:, None]

    hooks = [getattr(layer.self_attn, f"{t}_proj").weight.register_hook(lambda g, l=i, t=t: mask(g, l, t))
             for i, layer in enumerate(layers) for t in ("q", "k")]
    optimizer.zero_grad(set_to_none=True)
    for prompt in prompts:
        out = model.model(input_ids=torch.tensor([prompt["tokens"]]), output_attentions=True)
        rows = torch.stack([attention[0, :, -1, :] for attention in out.attentions])  # [layer, head, key]
        alpha = rows[:, :, prompt["label_positions"]]
        correct = (torch.tensor(prompt["demo_labels"]) == prompt["query_label"]).float()
        threshold = prompt["k"] / (prompt["k"] + math.log(len(prompt["tokens"])))
        heads = alpha.detach().sum(-1) > threshold
        per_head = SETTINGS["penalty"] * (alpha * (1 - correct)).sum(-1) + SETTINGS["award"] * ((1 - alpha) * correct).sum(-1)
        current["heads"] = heads
        ((per_head * heads).sum() / len(prompts)).backward()
        counts += heads.long()
    for hook in hooks:
        hook.remove()
    optimizer.step()  # a fresh Adam moves no zero-gradient entry on its first step
    return counts.tolist()


# ------------------------------------------------------------------------------------------ abft-lens


def abft_unit(variant: str, model, builder, n: int, seed: int):
    """(trainer, callable running one optimizer step over the n prompts) for an abft-lens variant."""
    from abft_lens.backends.forward import forward_residual
    from abft_lens.training.train import TrainConfig, Trainer

    micro = {"loop": 1, "default": None, "mb4": 4, "mb8": 8, "mb16": 16, "bf16-mb8": 8, "bare": 1,
             "paper-abft": None, "paper-e2e": None}[variant]
    settings = dict(SETTINGS, restricted_gradient=False, method="E2E" if variant == "paper-e2e" else "ABFT") \
        if variant.startswith("paper") else SETTINGS
    config = TrainConfig(train_samples=n, pseudo_batch_size=n, epochs=1, seed=seed, micro_batch_size=micro,
                         compute_dtype="bfloat16" if variant.startswith("bf16") else None, **settings)
    trainer = Trainer(model, builder, config)
    if variant != "bare":
        return trainer, lambda: trainer.step(trainer.prompts)

    def bare() -> None:
        trainer.optimizer.zero_grad(set_to_none=True)
        for prompt in trainer.prompts:
            (forward_residual(model, torch.tensor([prompt.token_ids]))[0, -1].sum() / n).backward()
        trainer.optimizer.step()

    return trainer, bare


def prompt_records(trainer) -> list[dict]:
    return [dict(tokens=list(p.token_ids), label_positions=list(p.label_positions), demo_labels=list(p.demo_labels),
                 query_label=p.query_label, k=p.k) for p in trainer.prompts]


def check_hf_against_abft(model, builder, hf_model, args) -> tuple[dict, list[dict]]:
    """The hf step's gradients and head counts against abft-lens's (``loop`` and ``mb8``), same weights;
    returns the report and the prompts (as plain records for the hf step)."""
    from einops import rearrange

    report, records = {}, []
    for variant in ("loop", "mb8"):
        trainer, _ = abft_unit(variant, model, builder, args.prompts, args.seed)
        captured = {}
        trainer.optimizer.step = lambda: captured.update(
            {name: p.grad.detach().clone() for name, p in trainer.trainable.named_parameters()})
        result = trainer.step(trainer.prompts)
        trainer.trainable.merge()
        hf_optimizer = torch.optim.SGD([p for p in hf_model.parameters() if p.requires_grad], lr=0.0)
        records = prompt_records(trainer)
        counts = hf_step(hf_model, hf_optimizer, records)
        worst = 0.0
        d_head = model.cfg.d_head
        for layer, block in enumerate(hf_model.model.layers):
            for target, name in (("q", "W_Q"), ("k", "_W_K" if model.cfg.n_key_value_heads else "W_K")):
                ours = captured[f"blocks.{layer}.attn.{name}"]
                theirs = rearrange(getattr(block.self_attn, f"{target}_proj").weight.grad, "(n h) m -> n m h", h=d_head)
                scale = float(theirs.norm())
                worst = max(worst, float((ours - theirs).norm()) / scale if scale else float(ours.norm()))
        report[variant] = {"max_relative_gradient_error": worst, "head_counts_equal": counts == result.head_counts}
        if worst > 1e-4 or counts != result.head_counts:
            raise SystemExit(f"hf step disagrees with abft-lens {variant}: {report[variant]}")
    return report, records


# ------------------------------------------------------------------------------------------ profile


def profile_unit(variant: str, model, builder, args) -> dict:
    """Seconds of one unit by where they go: attention / MLP (forward + their backward ops), routing, rest."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trainer, unit = abft_unit(variant, model, builder, args.prompts, args.seed)
    handles, open_ranges = [], []
    for block in model.blocks:
        for kind, module in (("attention", block.attn), ("mlp", block.mlp)):
            def enter(*_, kind=kind, **__):
                open_ranges.append(record_function(f"bench::{kind}").__enter__())

            def leave(*_, **__):
                open_ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter, with_kwargs=True),
                        module.register_forward_hook(leave, always_call=True)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        unit()
        total = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    trainer.trainable.merge()
    kind_of_sequence, seconds = {}, defaultdict(float)
    events = prof.events()
    for event in events:  # forward ops: the range they run in
        parent, kind = event, None
        while parent is not None and kind is None:
            kind = parent.name[len("bench::"):] if parent.name.startswith("bench::") else None
            parent = parent.cpu_parent
        if kind and getattr(event, "sequence_nr", -1) >= 0 and not event.name.startswith("autograd::"):
            kind_of_sequence.setdefault(event.sequence_nr, kind)
        if event.name.startswith("bench::"):
            seconds[f"{kind} forward"] += event.cpu_time_total / 1e6
    for event in events:  # backward nodes: the kind of the forward op with the same sequence number
        if event.name.startswith("autograd::engine::evaluate_function"):
            if "RouteToInput" in event.name:
                seconds["routing (restricted gradient) backward"] += event.cpu_time_total / 1e6
            elif event.sequence_nr in kind_of_sequence:
                seconds[f"{kind_of_sequence[event.sequence_nr]} backward"] += event.cpu_time_total / 1e6
    seconds["rest"] = total - sum(seconds.values())
    return {"variant": variant, "seconds_per_prompt": {k: v / args.prompts for k, v in sorted(seconds.items())},
            "total_seconds_per_prompt": total / args.prompts}


# ------------------------------------------------------------------------------------------ driver


def hf_dir_of(model):
    from abft_lens.backends.provenance import model_info

    return model_info(model).hf_dir


def load_abft(name: str):
    from abft_lens.backends.loading import load_model
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.data.tasks import load_task

    model = load_model(name)
    return model, prompt_builder(model, load_task("sst2"))


def unit_flops(variant: str, model, records: list[dict]) -> int:
    """FLOPs of one unit (a step over every prompt), counted on each prompt's own length."""
    from abft_lens.training.step_cost import Dims, abft_step_flops, backward_flops, forward_flops

    dims = Dims.of(model)
    if variant == "bare":  # every layer whole, backward from the residual (E2E's without the unembedding)
        return sum(forward_flops(dims, n) + backward_flops(dims, n, method="E2E") - 2 * dims.d_model * dims.d_vocab
                   for n in (len(r["tokens"]) for r in records))
    method = "E2E" if variant == "paper-e2e" else "ABFT"
    return sum(abft_step_flops(dims, len(r["tokens"]), method=method) for r in records)


def child(args) -> None:
    """Load, then run one variant alone for two units; print peak RSS (load included) and RSS, MiB."""
    from abft_lens.resources import peak_rss_mib

    torch.set_num_threads(args.child_threads)
    if args.child == "hf":
        prompts = json.loads(Path(args.prompts_file).read_text())
        model, optimizer = load_hf(args.hf_dir)
        loaded_rss = _current_rss_mib()
        unit = lambda: hf_step(model, optimizer, prompts)  # noqa: E731
    else:
        model, builder = load_abft(args.model)
        loaded_rss = _current_rss_mib()
        _, unit = abft_unit(args.child, model, builder, args.prompts, args.seed)
    load_peak = peak_rss_mib()
    for _ in range(2):
        unit()
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "load_peak_rss_mib": load_peak,
                      "rss_after_load_mib": loaded_rss, "rss_after_steps_mib": _current_rss_mib()}))


def _current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_variants(args, model, builder, hf_model, hf_optimizer, records) -> dict[str, list[float]]:
    """Seconds per prompt of every variant, interleaved over ``--rounds`` timed rounds (round 0 warms up)."""
    seconds: dict[str, list[float]] = {v: [] for v in args.variants}
    for round_index in range(args.rounds + 1):
        order = args.variants if round_index % 2 == 0 else args.variants[::-1]
        for variant in order:
            trainer = None
            if variant == "hf":
                unit = lambda: hf_step(hf_model, hf_optimizer, records)  # noqa: E731
            else:
                trainer, unit = abft_unit(variant, model, builder, args.prompts, args.seed)
            start = time.perf_counter()
            unit()
            if round_index > 0:
                seconds[variant].append((time.perf_counter() - start) / args.prompts)
            if trainer is not None:
                trainer.trainable.merge()
    return seconds


def measure_memory(args, model, records) -> dict:
    """Each variant alone in a child process: its peak RSS (VmHWM), MiB."""
    memory = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(records, handle)
    try:
        for variant in args.variants:
            memory[variant] = machine.peak_rss_child(
                [sys.executable, __file__, "--child", variant, "--model", args.model, "--prompts", str(args.prompts),
                 "--seed", str(args.seed), "--hf-dir", str(hf_dir_of(model)), "--prompts-file", handle.name,
                 "--child-threads", str(args.threads[0])])
    finally:
        os.unlink(handle.name)
    return memory


def print_table(run: dict, memory: dict, variants: list[str]) -> None:
    print(f"\n{run['threads']} threads ({machine.describe(run['machine'])})")
    print(f"matmul rate at the model's shapes: float32 {run['matmul']['float32']['gflops']:.1f} GFLOP/s, "
          f"bfloat16 {run['matmul']['bfloat16']['gflops']:.1f} GFLOP/s")
    print(f"{'variant':<10} {'s/prompt':>9} {'x hf':>6} {'GFLOP/s':>8} {'% rate':>7} {'peak RSS':>9} {'load peak':>10}"
          " (MiB)")
    for variant in variants:
        mem = memory.get(variant, {})
        print(f"{variant:<10} {run['median_seconds_per_prompt'][variant]:>9.3f} {run['ratio_to_hf'][variant]:>6.2f} "
              f"{run['gflops'][variant]:>8.1f} {100 * run['share_of_matmul_rate'][variant]:>6.0f}% "
              f"{mem.get('peak_rss_mib', float('nan')):>9.0f} {mem.get('load_peak_rss_mib', float('nan')):>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32, help="training prompts per timed unit (one step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=machine.parse_threads, default=[1, 2], help="comma list (default 1,2)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="also profile one unit of loop and mb8")
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes (peak RSS)")
    parser.add_argument("--matmul-seconds", type=float, default=0.3, help="time per matmul shape and dtype")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("bench/results/train_step.json"))
    args = parser.parse_args()
    if args.child:
        return child(args)

    from abft_lens.io import write_json

    model, builder = load_abft(args.model)
    hf_model = hf_optimizer = None
    if hf_dir_of(model) is None:  # tiny: no Hugging Face folder, no hf variant
        args.variants = [v for v in args.variants if v != "hf"]
        trainer, _ = abft_unit("loop", model, builder, args.prompts, args.seed)
        records, check = prompt_records(trainer), None
        trainer.trainable.merge()
    else:
        hf_model, hf_optimizer = load_hf(str(hf_dir_of(model)))
        check, records = check_hf_against_abft(model, builder, hf_model, args)
        print(f"hf step checked against abft-lens: {check}")
    default_trainer, _ = abft_unit("default", model, builder, args.prompts, args.seed)
    default = {"micro_batch_size": default_trainer.micro_batch_size, "reason": default_trainer.micro_batch_reason}
    default_trainer.trainable.merge()
    tokens = statistics.mean(len(r["tokens"]) for r in records)
    flops = {v: unit_flops(v, model, records) for v in args.variants}
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        matmul = machine.matmul_rates(model, round(tokens), seconds=args.matmul_seconds)
        seconds = time_variants(args, model, builder, hf_model, hf_optimizer, records)
        median = {v: statistics.median(s) for v, s in seconds.items()}
        anchor = median.get("hf") or median[args.variants[0]]
        gflops = {v: flops[v] / (median[v] * args.prompts) / 1e9 for v in args.variants}
        rate = {v: matmul["bfloat16" if v.startswith("bf16") else "float32"]["gflops"] for v in args.variants}
        runs.append({"threads": threads, "machine": machine.cpu_report(), "matmul": matmul, "seconds_per_prompt": seconds,
                     "median_seconds_per_prompt": median, "ratio_to_hf": {v: median[v] / anchor for v in median},
                     "gflops": gflops, "share_of_matmul_rate": {v: gflops[v] / rate[v] for v in args.variants}})
    torch.set_num_threads(args.threads[0])
    profiles = [profile_unit(v, model, builder, args) for v in ("loop", "mb8")] if args.profile else []
    memory = {} if args.no_memory else measure_memory(args, model, records)
    print(f"\n{args.model}, {args.prompts} prompts of ~{tokens:.0f} tokens, {flops[args.variants[0]] / args.prompts / 1e9:.2f}"
          f" GFLOP per prompt ({args.variants[0]}), median of {args.rounds} rounds; default micro-batch "
          f"{default['micro_batch_size']}: {default['reason']}; x hf: ratio to the plain HF step"
          + ("" if "hf" in args.variants else " (no hf here: ratio to the first variant)"))
    for run in runs:
        print_table(run, memory, args.variants)
    for entry in profiles:
        print(f"profile {entry['variant']}: " + ", ".join(f"{k} {v:.3f}" for k, v in entry["seconds_per_prompt"].items()))
    write_json(args.output, {
        "model": args.model, "prompts": args.prompts, "rounds": args.rounds, "settings": SETTINGS,
        "mean_prompt_tokens": tokens, "hf_check": check, "default_micro_batch": default, "unit_flops": flops,
        "runs": runs, "memory_mib": memory, "memory_threads": args.threads[0], "profile": profiles,
    })


if __name__ == "__main__":
    main()
