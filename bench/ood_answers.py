"""Add the per-prompt answers (``correct``) to the ``generalization.json`` of study cells written before it kept
them, so that Table 2's paired out-of-domain tests (:func:`abft_lens.reporting.study_generalization.ood_tests`)
cover them.

For every finished trained cell of the study folder whose ``generalization.json`` lacks them and whose trained
tensors are still there: the base model with the run's tensors applied (:func:`abft_lens.training.runs.load_run`)
is evaluated again on every dataset of the file, on the same test prompts (``n_test`` of the file); "fore" comes
from the study's shared vanilla files (their ``per_prompt``); a run resumed on newer code may hold "post"'s answers
already, and only "fore" is added. Each recomputed accuracy must equal the stored one
(to 1e-9), or the file is left alone and the script stops: the answers added are the answers the file's
accuracies were computed from. The file is rewritten atomically.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ood_answers.py bench/results/study-paper-smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from abft_lens.backends.loading import load_model
from abft_lens.data.tasks import load_task
from abft_lens.evaluation.evaluator import EvalResult, evaluate
from abft_lens.evaluation.generalization import dataset_entry
from abft_lens.io import write_json
from abft_lens.reporting.study_folder import baseline_path, read_baseline, read_study
from abft_lens.run_files import GENERALIZATION_FILE, has_trained, is_finished
from abft_lens.training.runs import load_run


def backfill(study: Path, record: dict, model_name: str) -> str:
    run_dir = study / record["path"]
    path = run_dir / GENERALIZATION_FILE
    if not path.is_file() or not is_finished(run_dir):
        return "no generalization.json"
    general = json.loads(path.read_text())
    if all("correct" in entry for phase in ("fore", "post") for entry in general.get(phase, {}).values()):
        return "has its answers"
    if not has_trained(run_dir):
        return "no trained tensors (not kept)"
    k, n_test = general["k"], general["n_test"]
    for name, entry in general["fore"].items():
        vanilla = EvalResult.from_dict(read_baseline(baseline_path(study, model_name, name, "vanilla", k=k,
                                                                   n_test=n_test)))
        _check(entry, vanilla, f"{path} fore {name}")
        general["fore"][name] = dataset_entry(vanilla)
    if any("correct" not in entry for entry in general["post"].values()):  # a run resumed on newer code has them
        _add_post_answers(general["post"], run_dir, model_name, k=k, n_test=n_test, where=f"{path} post")
    write_json(path, general)
    return "answers added"


def _add_post_answers(post: dict, run_dir: Path, model_name: str, *, k: int, n_test: int, where: str) -> None:
    """Re-evaluate the trained run on every dataset of ``post`` and put its answers there (accuracies checked)."""
    model = load_model(model_name)
    load_run(run_dir, model)
    for name, entry in post.items():
        result = evaluate(model, load_task(name), k=k, n_test=n_test)
        _check(entry, result, f"{where} {name}")
        post[name] = dataset_entry(result)


def _check(entry: dict, result: EvalResult, where: str) -> None:
    if abs(entry["accuracy"] - result.accuracy) > 1e-9:
        raise SystemExit(f"{where}: recomputed accuracy {result.accuracy} differs from the stored {entry['accuracy']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--datasets", default=None, help="comma list: only the cells trained on these")
    args = parser.parse_args()
    data = read_study(args.study)
    wanted = None if args.datasets is None else set(args.datasets.split(","))
    for key, record in data["cells"].items():
        if record["kind"] in ("ABFT", "E2E") and record["state"] == "done" \
                and (wanted is None or record["dataset"] in wanted):
            print(f"{key}: {backfill(args.study, record, record['model'])}", flush=True)


if __name__ == "__main__":
    main()
