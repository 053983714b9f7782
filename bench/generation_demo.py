"""Generation quality of a run before/after: MAUVE (features from the base model's hidden states) and
perplexity, on prefixes cut from the first ``--n`` SST-2 test sentences of at least ``--min-words`` words (first
half of the words as prefix, the rest as the human reference; StaICC's SST-2 test split holds phrases as short
as one word, 288 of its 512 have 6 or more). The perplexity text is the whole sentence.

First, side by side on the first ``--compare`` prefixes with the base model: the previous generation path
(TransformerLens ``generate`` one prefix at a time, KV cache on) against ``continuations`` one prefix at a
time and in batches of ``--batch-size`` (left-padded, masked, KV cache, last position unembedded), with the
number of prefixes whose greedy continuation is identical. Then the full report on ``--n`` prefixes, and the
same three MAUVE comparisons with 10 other k-means seeds (same features) to show how much of a difference is
quantization noise.

    .venv/bin/python bench/generation_demo.py runs/demo-1 --n 256 --output bench/results/generation_demo.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from abft_lens.studies.generation import _encode, continuations
from abft_lens.studies.mauve import auto_buckets, mauve_score
from abft_lens.studies.generation_report import generation_report
from abft_lens.io import write_json
from abft_lens.run_files import CONFIG_FILE, read_run_json
from abft_lens.backends.loading import load_model
from abft_lens.training.runs import load_run
from abft_lens.data.tasks import load_task


def tl_generate_one_by_one(model, prefixes, max_new_tokens):
    """The previous ``continuations``: TransformerLens ``generate`` on each prefix alone (greedy, KV cache)."""
    out = []
    for prefix in prefixes:
        ids = _encode(model, prefix)
        with torch.inference_mode():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                       stop_at_eos=model.tokenizer.eos_token_id is not None, verbose=False,
                                       return_type="tokens", prepend_bos=False)
        out.append(model.tokenizer.decode(generated[0, len(ids):].tolist(), skip_special_tokens=True))
    return out


def timed_cpu(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process): CPU time is what the work costs even when other
    processes take the cores away (the machine is shared; wall time alone would measure them)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


SPREAD_SEEDS = tuple(range(1, 11))


def mauve_seed_spread(features: dict, seeds) -> dict[str, list[float]]:
    """The same MAUVE comparisons with other k-means seeds (same features): how much of a difference is noise."""
    pairs = {"base_vs_tuned": ("base", "tuned"), "human_vs_base": ("human", "base"), "human_vs_tuned": ("human", "tuned")}
    return {name: [round(mauve_score(features[p], features[q], seed=seed), 4) for seed in seeds]
            for name, (p, q) in pairs.items() if p in features and q in features}


def compare_speed(model, prefixes, max_new_tokens, batch_size) -> dict:
    """The previous path against ``continuations``, interleaved prefix by prefix (old, new batch 1) so both
    see the same load, then ``continuations`` in batches of ``batch_size`` before and after (fastest kept)."""
    seconds = {"tl_generate_one_at_a_time": [0.0, 0.0], "continuations_batch_1": [0.0, 0.0]}
    old, one = [], []
    for prefix in prefixes:
        for name, function, kwargs, sink in (
                ("tl_generate_one_at_a_time", tl_generate_one_by_one, {}, old),
                ("continuations_batch_1", continuations, {"batch_size": 1}, one)):
            result, wall, cpu = timed_cpu(function, model, [prefix], max_new_tokens, **kwargs)
            sink += result
            seconds[name][0] += wall
            seconds[name][1] += cpu
    runs = [timed_cpu(continuations, model, prefixes, max_new_tokens, batch_size=batch_size) for _ in range(2)]
    batched = runs[0][0]
    batch_name = f"continuations_batch_{batch_size}"
    seconds[batch_name] = [min(r[1] for r in runs), min(r[2] for r in runs)]
    reference = seconds["tl_generate_one_at_a_time"]
    result = {
        "prefixes": len(prefixes), "max_new_tokens": max_new_tokens,
        "wall_seconds": {name: round(value[0], 2) for name, value in seconds.items()},
        "cpu_seconds": {name: round(value[1], 2) for name, value in seconds.items()},
        "speed_up_wall": {name: round(reference[0] / value[0], 2) for name, value in seconds.items()},
        "speed_up_cpu": {name: round(reference[1] / value[1], 2) for name, value in seconds.items()},
        "identical_to_tl_generate": {"continuations_batch_1": sum(a == b for a, b in zip(one, old)),
                                     batch_name: sum(a == b for a, b in zip(batched, old))},
        "batched_runs_identical": runs[0][0] == runs[1][0],
    }
    print(f"{len(prefixes)} prefixes x {max_new_tokens} new tokens, greedy, base model (wall s / CPU s / "
          f"speed-up by CPU time / identical continuations):")
    for name, (wall, cpu) in seconds.items():
        same = result["identical_to_tl_generate"].get(name, len(prefixes))
        print(f"  {name:<28} {wall:7.1f} {cpu:7.1f}  {reference[1] / cpu:5.1f}x  {same}/{len(prefixes)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--min-words", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--compare", type=int, default=16, help="prefixes for the old/new speed comparison (0: skip)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/generation_demo.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    meta = read_run_json(args.run_dir, CONFIG_FILE)
    sentences = [words for words in (example.text.split() for example in load_task(meta["task"]["name"]).test)
                 if len(words) >= args.min_words][: args.n]
    if len(sentences) < args.n:
        raise SystemExit(f"only {len(sentences)} test sentences have {args.min_words} or more words")
    prefixes = [" ".join(words[: max(1, len(words) // 2)]) for words in sentences]
    references = [" " + " ".join(words[max(1, len(words) // 2):]) for words in sentences]
    base = load_model(meta["model"]["name"])
    tuned = load_model(meta["model"]["name"])
    load_run(args.run_dir, tuned)

    speed = compare_speed(base, prefixes[: args.compare], args.max_new_tokens, args.batch_size) if args.compare else None

    report, report_s, report_cpu = timed_cpu(generation_report, base, tuned, prefixes, references=references,
                                             max_new_tokens=args.max_new_tokens)
    print(f"report on {args.n} prefixes: {report_s:.0f} s wall, {report_cpu:.0f} s CPU (generation on both sides, "
          f"features, MAUVE, perplexity)")
    for name, value in report.summary_rows():
        print(f"  {name:<24} {value}")
    print(f"  MAUVE buckets            {auto_buckets(args.n)} (round(n / 10))")
    spread = mauve_seed_spread(report.features, SPREAD_SEEDS)
    for name, values in spread.items():
        print(f"  MAUVE {name.replace('_', ' '):<18} k-means seeds {SPREAD_SEEDS[0]}-{SPREAD_SEEDS[-1]}: "
              f"{min(values):.4f} - {max(values):.4f}")
    write_json(args.output, {"run": str(args.run_dir), "n": args.n, "min_words": args.min_words,
                             "max_new_tokens": args.max_new_tokens,
                             "batch_size": args.batch_size, "num_buckets": auto_buckets(args.n),
                             "report_wall_seconds": round(report_s, 1), "report_cpu_seconds": round(report_cpu, 1),
                             "speed": speed, "mauve_seed_spread": {"seeds": list(SPREAD_SEEDS), **spread},
                             "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                         "load_average_start": load_before,
                                         "load_average_end": os.getloadavg(), "python": platform.python_version()},
                             "report": report.to_dict()})
    print(args.output)


if __name__ == "__main__":
    main()
