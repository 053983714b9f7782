"""Evaluation throughput: StaICC's reference kernel against abft-lens's batched evaluator, same prompts.

What is compared, on the embedded SmolLM2-135M and the first ``--n`` fixed StaICC test prompts (k demos):

  a      StaICC's own per-prompt kernel ``standard_ICL_inference_with_torch_Causal_LM`` on the Hugging Face model
         read from ``model_info(model).hf_dir`` (float32). This is what the paper's harness runs: one unpadded prompt per
         forward, full-vocabulary logits at every position, hidden states returned.
  b1     abft-lens ``label_probabilities`` (HookedTransformer, float32), batch size 1.
  bB     the same with ``--batch-size`` (length-sorted, left-padded batches).
  c      the same in bfloat16 (``load_model(..., dtype=torch.bfloat16)``), ``--batch-size``.

Why: abft-lens claims StaICC-"Normal" numbers, so its predictions must match StaICC's kernel, and its cost
(batching, last-position-only unembedding, bf16) must be known against the reference. The table gives
prompts/s, speed ratio against (a), argmax agreement with (a) and with (bB, float32), the largest absolute
difference of label probabilities against (a), and accuracy. StaICC scores a label by the LAST token of the
label word, abft-lens by the FIRST: identical when every label word is one token, which is checked and printed.

Timing: each method runs one untimed warm-up pass over all n prompts, then ``--repeats`` timed passes,
interleaved (the method order reverses every round) so that load from other users hits all methods alike;
the fastest pass is kept, all are written. Prompts are built (tokenized) once, outside the timing; StaICC's
kernel tokenizes inside its call, as it does in the benchmark.

    .venv/bin/python bench/eval_throughput.py --n 64 --k 4 --dataset sst2 --batch-size 8 \
        --output bench/results/eval_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from StaICC.prefabricate_inference.model_kernel import standard_ICL_inference_with_torch_Causal_LM
from transformers import AutoModelForCausalLM, AutoTokenizer

from abft_lens.evaluation.evaluator import label_probabilities
from abft_lens.data.prompts import prompt_builder
from abft_lens.backends.loading import load_model
from abft_lens.backends.provenance import model_info
from abft_lens.data.prompts import pad_token_id, test_prompts
from abft_lens.data.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/eval_throughput.json"))
    args = parser.parse_args()
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (batch 1 is always measured)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    task = load_task(args.dataset)
    fp32 = load_model("smollm2-135m", dtype=torch.float32)
    bf16 = load_model("smollm2-135m", dtype=torch.bfloat16)
    hf_dir = model_info(fp32).hf_dir
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    builder = prompt_builder(fp32, task)
    prompts = test_prompts(builder, args.k, args.n)
    pad, label_ids = pad_token_id(builder.tokenizer), builder.label_token_ids
    label_space = list(task.label_words)

    # StaICC scores the last token of each label word (tokenized with special tokens), abft-lens the first.
    staicc_ids = [hf_tok(word).input_ids[-1] for word in label_space]
    single_token = all(len(hf_tok(w, add_special_tokens=False).input_ids) == 1 for w in label_space)
    same_tokens = [list(hf_tok(p.text).input_ids) == list(p.token_ids) for p in prompts]
    mean_tokens = sum(p.n_tokens for p in prompts) / len(prompts)
    print(f"label words {label_space}: first tokens {list(label_ids)}, StaICC last tokens {staicc_ids}, "
          f"single-token: {single_token}, identical: {list(label_ids) == staicc_ids}")
    print(f"StaICC's tokenization of the prompt text equals abft-lens's token ids for "
          f"{sum(same_tokens)}/{len(prompts)} prompts; mean length {mean_tokens:.1f} tokens")

    def staicc() -> torch.Tensor:
        return torch.tensor([standard_ICL_inference_with_torch_Causal_LM(
            prompt=p.text, model=hf_model, tokenizer=hf_tok, label_space=label_space, cache_empty=None)
            for p in prompts], dtype=torch.float32)

    def lens(model, batch_size):
        return lambda: label_probabilities(model, prompts, label_ids, pad_id=pad, batch_size=batch_size)

    methods = {
        "a: StaICC kernel, HF fp32, per prompt": staicc,
        "b: abft-lens fp32, batch 1": lens(fp32, 1),
        f"b: abft-lens fp32, batch {args.batch_size}": lens(fp32, args.batch_size),
        f"c: abft-lens bf16, batch {args.batch_size}": lens(bf16, args.batch_size),
    }
    names = list(methods)
    times, cpu, loads = ({name: [] for name in names} for _ in range(3))
    probs, rerun_diff = {}, {name: 0.0 for name in names}
    for name in names:  # warm-up
        probs[name] = methods[name]()
    for round_ in range(args.repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            out = methods[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            loads[name].append(round(os.getloadavg()[0], 2))
            rerun_diff[name] = max(rerun_diff[name], (out - probs[name]).abs().max().item())
    load_after = os.getloadavg()

    ref, ref_lens = probs[names[0]], probs[names[2]]
    gold = torch.tensor([p.query_label for p in prompts])
    rows = []
    for name in names:
        best = min(times[name])
        rows.append({
            "method": name,
            "seconds": [round(t, 3) for t in times[name]],
            "cpu_seconds": [round(t, 3) for t in cpu[name]],
            "load_average_1min_after_each_pass": loads[name],
            "prompts_per_s": args.n / best,
            "ratio_vs_a": min(times[names[0]]) / best,
            "agree_vs_a": (probs[name].argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "agree_vs_b_fp32": (probs[name].argmax(-1) == ref_lens.argmax(-1)).float().mean().item(),
            "max_abs_prob_diff_vs_a": (probs[name] - ref).abs().max().item(),
            "accuracy": (probs[name].argmax(-1) == gold).float().mean().item(),
            "max_abs_prob_diff_between_passes": rerun_diff[name],
        })

    print(f"\n{args.dataset}, k={args.k}, n={args.n}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"nice {os.nice(0)}, load average {load_before[0]:.2f} -> {load_after[0]:.2f}; "
          f"fastest of {args.repeats} passes")
    print(f"{'method':42} {'prompts/s':>9} {'vs a':>6} {'agree a':>8} {'agree b':>8} {'max|dp| a':>10} {'acc':>6}")
    for r in rows:
        print(f"{r['method']:42} {r['prompts_per_s']:9.2f} {r['ratio_vs_a']:5.2f}x {r['agree_vs_a']:8.3f} "
              f"{r['agree_vs_b_fp32']:8.3f} {r['max_abs_prob_diff_vs_a']:10.2e} {r['accuracy']:6.3f}")

    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    result = {
        "dataset": args.dataset, "k": args.k, "n": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "nice": os.nice(0), "cpu": _cpu_name(),
        "python": platform.python_version(), "git_commit": git("rev-parse", "--short", "HEAD"),
        "library_uncommitted_changes": bool(git("status", "--porcelain", "abft_lens")),
        "hf_attn_implementation": hf_model.config._attn_implementation,
        "load_average_before": load_before, "load_average_after": load_after,
        "label_words": label_space, "label_first_tokens": list(label_ids), "staicc_last_tokens": staicc_ids,
        "labels_single_token": single_token, "same_token_ids_as_staicc": sum(same_tokens),
        "mean_prompt_tokens": mean_tokens,
        "methods": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(args.output.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
