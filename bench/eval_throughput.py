"""Evaluation throughput: StaICC's reference kernel against abft-lens's batched evaluator, same prompts, and
against the machine's own matmul rate.

What is compared, on ``--model`` (default the embedded SmolLM2-135M) and the first ``--n`` fixed StaICC test
prompts (k demos):

  a      StaICC's own per-prompt kernel ``standard_ICL_inference_with_torch_Causal_LM`` on the Hugging Face model
         read from ``model_info(model).hf_dir`` (float32). This is what the paper's harness runs: one unpadded prompt per
         forward, full-vocabulary logits at every position, hidden states returned. (Not for a model without a
         Hugging Face folder, such as ``tiny``; ratios are then to b1.)
  b1     abft-lens ``label_probabilities`` (HookedTransformer, float32), batch size 1.
  bB     the same with ``--batch-size`` (length-sorted, left-padded batches).
  c      the same in bfloat16 (``load_model(..., dtype=torch.bfloat16)``), ``--batch-size``.

Why: abft-lens claims StaICC-"Normal" numbers, so its predictions must match StaICC's kernel, and its cost
(batching, last-position-only unembedding, bf16) must be known against the reference and against the machine.
The table gives prompts/s, speed ratio against (a), achieved GFLOP/s and its share of the machine's matmul rate
for the method's dtype, peak RSS, argmax agreement with (a) and with (bB, float32), the largest absolute
difference of label probabilities against (a), and accuracy. StaICC scores a label by the LAST token of the
label word, abft-lens by the FIRST: identical when every label word is one token, which is checked and printed.

FLOPs are an evaluation's own count on each prompt's length (:func:`abft_lens.training.step_cost.eval_flops`:
every layer, and the label words' unembedding columns at the last position), the same for every method: work
a method does beyond it (padding, StaICC's full-vocabulary logits at every position) shows as a lower rate.
The machine's matmul rate is measured in the same run at the model's shapes, float32 and bfloat16
(``machine.matmul_rates``), for each ``--threads`` count (default 1 and 2); the CPU's capability (AVX2 /
AVX-512 / AVX512-BF16 / AMX), threads and load are printed.

Timing: each method runs one untimed warm-up pass over all n prompts, then ``--repeats`` timed passes per thread
count, interleaved (the method order reverses every round) so that load from other users hits all methods
alike; the fastest pass is kept, all are written. Prompts are built (tokenized) once, outside the timing;
StaICC's kernel tokenizes inside its call, as it does in the benchmark. Peak RSS: each method alone in a child
process (``--child``, ``VmHWM`` after loading only what it needs and two passes; once, at the first thread
count): (a) imports torch, transformers and StaICC, reading the prompt texts from a file; b, c their model.

    .venv/bin/python bench/eval_throughput.py --n 64 --k 4 --dataset sst2 --batch-size 8 --threads 1,2 \
        --output bench/results/eval_throughput.json
    .venv/bin/python bench/eval_throughput.py --model tiny --n 8 --repeats 1 --threads 1 \
        --output /tmp/eval_tiny.json  # a check that it works, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import machine  # bench/ is the script's own folder, first on sys.path

METHODS = ("a", "b1", "bB", "c")


def label(method: str, batch_size: int) -> str:
    return {"a": "a: StaICC kernel, HF fp32, per prompt", "b1": "b: abft-lens fp32, batch 1",
            "bB": f"b: abft-lens fp32, batch {batch_size}", "c": f"c: abft-lens bf16, batch {batch_size}"}[method]


def lens_methods(args, methods) -> tuple[dict, dict]:
    """(``{method: callable returning [n, label] probabilities}``, context) for abft-lens's methods among
    ``methods``, loading only the models they need (the prompts come from the first one loaded)."""
    from abft_lens.backends.loading import load_model
    from abft_lens.backends.provenance import model_info
    from abft_lens.data.prompts import pad_token_id, prompt_builder, test_prompts
    from abft_lens.data.tasks import load_task
    from abft_lens.evaluation.evaluator import label_probabilities

    task = load_task(args.dataset)
    models = {}
    if {"b1", "bB"} & set(methods):
        models["fp32"] = load_model(args.model, dtype=torch.float32)
    if "c" in methods:
        models["bf16"] = load_model(args.model, dtype=torch.bfloat16)
    first = next(iter(models.values()))
    builder = prompt_builder(first, task)
    prompts = test_prompts(builder, args.k, args.n)
    pad, label_ids = pad_token_id(builder.tokenizer), builder.label_token_ids
    context = {"task": task, "model": first, "prompts": prompts, "label_ids": label_ids,
               "hf_dir": model_info(first).hf_dir}

    def lens(model, batch_size):
        return lambda: label_probabilities(model, prompts, label_ids, pad_id=pad, batch_size=batch_size)

    found = {"b1": lambda: lens(models["fp32"], 1), "bB": lambda: lens(models["fp32"], args.batch_size),
             "c": lambda: lens(models["bf16"], args.batch_size)}
    return {m: found[m]() for m in METHODS if m in methods and m in found}, context


def staicc_method(hf_dir, texts: list[str], label_space: list[str]):
    """(StaICC's kernel over ``texts`` on the Hugging Face model in ``hf_dir``, float32; the model; its tokenizer)."""
    from StaICC.prefabricate_inference.model_kernel import standard_ICL_inference_with_torch_Causal_LM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    run = lambda: torch.tensor([standard_ICL_inference_with_torch_Causal_LM(  # noqa: E731
        prompt=text, model=hf_model, tokenizer=hf_tok, label_space=label_space, cache_empty=None)
        for text in texts], dtype=torch.float32)
    return run, hf_model, hf_tok


def child(args) -> None:
    """Load what one method needs (``a``: the Hugging Face model only, prompts from ``--prompts-file``), run it
    twice; print its peak RSS (VmHWM, load included), MiB."""
    from abft_lens.resources import peak_rss_mib

    torch.set_num_threads(args.child_threads)
    if args.child == "a":
        given = json.loads(Path(args.prompts_file).read_text())
        run = staicc_method(given["hf_dir"], given["texts"], given["label_space"])[0]
    else:
        run = lens_methods(args, [args.child])[0][args.child]
    load_peak = peak_rss_mib()
    for _ in range(2):
        run()
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "load_peak_rss_mib": load_peak}))


def tokenization_report(context) -> dict:
    """StaICC's label tokens and tokenization against abft-lens's (printed; needs the HF tokenizer)."""
    prompts, label_ids, hf_tok = context["prompts"], context["label_ids"], context["hf_tok"]
    label_space = list(context["task"].label_words)
    staicc_ids = [hf_tok(word).input_ids[-1] for word in label_space]
    single = all(len(hf_tok(w, add_special_tokens=False).input_ids) == 1 for w in label_space)
    same = sum(list(hf_tok(p.text).input_ids) == list(p.token_ids) for p in prompts)
    print(f"label words {label_space}: first tokens {list(label_ids)}, StaICC last tokens {staicc_ids}, "
          f"single-token: {single}, identical: {list(label_ids) == staicc_ids}")
    print(f"StaICC's tokenization of the prompt text equals abft-lens's token ids for {same}/{len(prompts)} prompts")
    return {"label_words": label_space, "label_first_tokens": list(label_ids), "staicc_last_tokens": staicc_ids,
            "labels_single_token": single, "same_token_ids_as_staicc": same,
            "hf_attn_implementation": context["hf_model"].config._attn_implementation}


def time_methods(methods: dict, probs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Interleaved timed passes: (seconds, CPU seconds, max |probability difference| to the warm-up pass)."""
    names = list(methods)
    times, cpu = ({name: [] for name in names} for _ in range(2))
    rerun_diff = {name: 0.0 for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            out = methods[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            rerun_diff[name] = max(rerun_diff[name], (out - probs[name]).abs().max().item())
    return times, cpu, rerun_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=machine.parse_threads, default=[1, 2], help="comma list (default 1,2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes (peak RSS)")
    parser.add_argument("--matmul-seconds", type=float, default=0.3, help="time per matmul shape and dtype")
    parser.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("bench/results/eval_throughput.json"))
    args = parser.parse_args()
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (batch 1 is always measured)")
    if args.child:
        return child(args)
    from abft_lens.training.step_cost import Dims, eval_flops

    methods, context = lens_methods(args, METHODS)
    prompts, task = context["prompts"], context["task"]
    staicc_prompts = {"hf_dir": str(context["hf_dir"]), "texts": [p.text for p in prompts],
                      "label_space": list(task.label_words)}
    if context["hf_dir"] is not None:
        methods["a"], context["hf_model"], context["hf_tok"] = staicc_method(
            context["hf_dir"], staicc_prompts["texts"], staicc_prompts["label_space"])
    names = [m for m in METHODS if m in methods]
    tokens_report = tokenization_report(context) if "a" in methods else {}
    mean_tokens = sum(p.n_tokens for p in prompts) / len(prompts)
    flops = sum(eval_flops(Dims.of(context["model"]), p.n_tokens, len(context["label_ids"])) for p in prompts)
    print(f"{args.model}, mean prompt length {mean_tokens:.1f} tokens, {flops / len(prompts) / 1e9:.3f} GFLOP per "
          "prompt (every layer, label columns only)")
    probs = {name: methods[name]() for name in names}  # warm-up; the reference probabilities
    ref, ref_lens = probs[names[0]], probs["bB"]
    gold = torch.tensor([p.query_label for p in prompts])
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        report = machine.cpu_report()
        matmul = machine.matmul_rates(context["model"], round(mean_tokens), seconds=args.matmul_seconds)
        times, cpu, rerun_diff = time_methods(methods, probs, args.repeats)
        rows = []
        for name in names:
            best = min(times[name])
            gflops = flops / best / 1e9
            rows.append({
                "method": label(name, args.batch_size), "key": name,
                "seconds": [round(t, 3) for t in times[name]], "cpu_seconds": [round(t, 3) for t in cpu[name]],
                "prompts_per_s": args.n / best, "ratio_vs_a": min(times[names[0]]) / best, "gflops": gflops,
                "share_of_matmul_rate": gflops / matmul["bfloat16" if name == "c" else "float32"]["gflops"],
                "agree_vs_a": (probs[name].argmax(-1) == ref.argmax(-1)).float().mean().item(),
                "agree_vs_b_fp32": (probs[name].argmax(-1) == ref_lens.argmax(-1)).float().mean().item(),
                "max_abs_prob_diff_vs_a": (probs[name] - ref).abs().max().item(),
                "accuracy": (probs[name].argmax(-1) == gold).float().mean().item(),
                "max_abs_prob_diff_between_passes": rerun_diff[name],
            })
        runs.append({"threads": threads, "machine": report, "load_average_after": list(os.getloadavg()),
                     "matmul": matmul, "methods": rows})
    memory = {}
    if not args.no_memory:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(staicc_prompts, handle)
        try:
            for name in names:
                memory[name] = machine.peak_rss_child(
                    [sys.executable, __file__, "--child", name, "--model", args.model, "--n", str(args.n), "--k",
                     str(args.k), "--dataset", args.dataset, "--batch-size", str(args.batch_size),
                     "--child-threads", str(args.threads[0]), "--prompts-file", handle.name])
        finally:
            os.unlink(handle.name)

    print(f"\n{args.dataset}, k={args.k}, n={args.n}, fastest of {args.repeats} passes; ratios to "
          f"{label(names[0], args.batch_size)}")
    for run in runs:
        print(f"\n{run['threads']} threads ({machine.describe(run['machine'])})")
        print(f"matmul rate at the model's shapes: float32 {run['matmul']['float32']['gflops']:.1f} GFLOP/s, "
              f"bfloat16 {run['matmul']['bfloat16']['gflops']:.1f} GFLOP/s")
        print(f"{'method':42} {'prompts/s':>9} {'vs a':>6} {'GFLOP/s':>8} {'% rate':>7} {'peak RSS':>9} "
              f"{'agree a':>8} {'agree b':>8} {'max|dp| a':>10} {'acc':>6}")
        for r in run["methods"]:
            rss = memory.get(r["key"], {}).get("peak_rss_mib", float("nan"))
            print(f"{r['method']:42} {r['prompts_per_s']:9.2f} {r['ratio_vs_a']:5.2f}x {r['gflops']:8.1f} "
                  f"{100 * r['share_of_matmul_rate']:6.0f}% {rss:9.0f} {r['agree_vs_a']:8.3f} "
                  f"{r['agree_vs_b_fp32']:8.3f} {r['max_abs_prob_diff_vs_a']:10.2e} {r['accuracy']:6.3f}")

    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    result = {
        "model": args.model, "dataset": args.dataset, "k": args.k, "n": args.n, "batch_size": args.batch_size,
        "repeats": args.repeats, "torch": torch.__version__, "nice": os.nice(0), "python": platform.python_version(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "library_uncommitted_changes": bool(git("status", "--porcelain", "abft_lens")),
        "mean_prompt_tokens": mean_tokens, "flops_per_pass": flops, **tokens_report,
        "runs": runs, "memory_mib": memory, "memory_threads": args.threads[0],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(args.output.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
