"""Generation quality of a run before/after: MAUVE (features from the base model's hidden states) and
perplexity, on prefixes cut from the first ``--n`` SST-2 test sentences (first half of the words as prefix,
the rest as the human reference).

    .venv/bin/python bench/generation_demo.py runs/demo-1 --n 48 --output bench/results/generation_demo.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from abft_lens.generation import generation_report
from abft_lens.io import read_json, write_json
from abft_lens.models import load_model
from abft_lens.runs import load_run
from abft_lens.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--output", type=Path, default=Path("bench/results/generation_demo.json"))
    args = parser.parse_args()
    meta = read_json(args.run_dir / "config.json")
    sentences = [example.text.split() for example in load_task(meta["task"]["name"]).test[: args.n]]
    prefixes = [" ".join(words[: max(1, len(words) // 2)]) for words in sentences]
    references = [" " + " ".join(words[max(1, len(words) // 2):]) for words in sentences]
    base = load_model(meta["model"]["name"])
    tuned = load_model(meta["model"]["name"])
    load_run(args.run_dir, tuned)
    report = generation_report(base, tuned, prefixes, references=references, max_new_tokens=args.max_new_tokens)
    write_json(args.output, {"run": str(args.run_dir), "n": args.n, "max_new_tokens": args.max_new_tokens,
                             "report": report.to_dict()})
    print(args.output)


if __name__ == "__main__":
    main()
