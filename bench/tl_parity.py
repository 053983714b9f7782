"""TransformerLens 3.9 (HookedTransformer) against 4.x (TransformerBridge) on the same real models.

For each model, two worker processes, one per environment (``.venv`` and ``.venv-tl4``; or the pythons given by
``ABFT_LENS_TL3_PYTHON`` / ``ABFT_LENS_TL4_PYTHON``), load the same converted Hugging Face folder and answer
the same requests:

- label probabilities on ``--n-test`` SST-2 test prompts (k = 4): the largest difference, predictions equal;
- one ABFT step's gradient (restricted gradient, ``--grad-prompts`` prompts, demo settings otherwise): the
  relative difference ``||g4 - g3|| / ||g3||`` over every trained tensor, in TransformerLens layout;
- a 4-step demo-size run (4 steps of ``--step-prompts`` prompts, lr 5e-4, restricted gradient, no guard): the
  trained tensors' relative difference and their largest absolute difference;
- ABFT step time (one ``Trainer.step`` of ``--step-prompts`` prompts, optimizer included), the two workers
  called alternately ``--timing-reps`` times, so that a change of machine load hits both alike: the ratio
  bridge / hooked of the medians.

Results go to ``--out`` (JSON). Timings on a loaded machine are marked so in the file (``load_average``).

    .venv/bin/python bench/tl_parity.py --models smollm2-135m,gemma3-270m --out bench/results/tl_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVS = {"3": ("ABFT_LENS_TL3_PYTHON", ".venv"), "4": ("ABFT_LENS_TL4_PYTHON", ".venv-tl4")}


# ------------------------------------------------------------------------------------------------ worker


def _worker(model_spec: str) -> None:
    """Load the model once; answer one JSON request per stdin line with one JSON line on stdout."""
    import torch
    from safetensors.torch import save_file

    import abft_lens
    from abft_lens.backends import qk
    from abft_lens.backends.tl import TL_VERSION
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.training.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    model = abft_lens.load_model(model_spec)
    task = abft_lens.load_task("sst2")
    base = qk.snapshot(model)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the protocol stream

    def trainer(n_prompts: int, steps: int = 1) -> Trainer:
        config = TrainConfig(lr=5e-4, train_samples=n_prompts * steps, pseudo_batch_size=n_prompts, epochs=1,
                             restricted_gradient=True, micro_batch_size=n_prompts)
        return Trainer(model, prompt_builder(model, task), config)

    def end(tr: Trainer) -> None:
        tr.trainable.merge()
        qk.restore(model, base, prune=True)

    print(json.dumps({"ready": TL_VERSION, "type": type(model).__name__}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op, reply = request["op"], {}
        if op == "eval":
            result = abft_lens.evaluate(model, task, k=4, n_test=request["n"])
            reply = {"probs": [list(map(float, r)) for r in result.probs],
                     "predictions": list(map(int, result.predictions)), "accuracy": result.accuracy}
        elif op == "grad":
            tr = trainer(request["n"])
            got = {}
            names = list(tr.trainable.state_dict())
            tr.optimizer.step = lambda: got.update({n: qk.grad(model, n).detach().float().clone() for n in names})
            tr.step(tr.batches(0)[0])
            end(tr)
            save_file({n: g.contiguous() for n, g in got.items()}, request["path"])
        elif op == "train":
            tr = trainer(request["n"], steps=request["steps"])
            losses = [tr.step(batch).loss for batch in tr.batches(0)]
            save_file(tr.trainable.state_dict(), request["path"])
            end(tr)
            reply = {"losses": losses}
        elif op == "time":
            tr = trainer(request["n"])
            batch = tr.batches(0)[0]
            start = time.perf_counter()
            tr.step(batch)
            reply = {"seconds": time.perf_counter() - start}
            end(tr)
        print(json.dumps(reply), file=out, flush=True)


# ------------------------------------------------------------------------------------------------ driver


class Worker:
    def __init__(self, major: str, model_spec: str):
        variable, venv = ENVS[major]
        python = os.environ.get(variable) or str(ROOT / venv / "bin" / "python")
        if not os.access(python, os.X_OK):
            sys.exit(f"the TransformerLens {major}.x environment is missing ({python}): "
                     f"build it with {'ABFT_LENS_TL=4 ' if major == '4' else ''}scripts/setup.sh")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
        self.process = subprocess.Popen([python, __file__, "--worker", model_spec], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"worker {self.process.args} ended: {self.process.wait()}")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _relative(a: dict, b: dict) -> tuple[float, float]:
    import torch

    num = sum(float((b[n] - a[n]).norm() ** 2) for n in a) ** 0.5
    den = sum(float(a[n].norm() ** 2) for n in a) ** 0.5
    return num / den, max(float((b[n] - a[n]).abs().max()) for n in a) if a else 0.0


def compare(model_spec: str, args, scratch: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    workers = {major: Worker(major, model_spec) for major in ("3", "4")}
    row = {"model": model_spec, "versions": {m: w.hello["ready"] for m, w in workers.items()},
           "types": {m: w.hello["type"] for m, w in workers.items()}}
    evals = {m: w.ask(op="eval", n=args.n_test) for m, w in workers.items()}
    probs = {m: torch.tensor(e["probs"]) for m, e in evals.items()}
    row["label_probs"] = {"n_prompts": args.n_test, "max_abs_difference": float((probs["4"] - probs["3"]).abs().max()),
                          "predictions_equal": evals["3"]["predictions"] == evals["4"]["predictions"],
                          "accuracy": {m: e["accuracy"] for m, e in evals.items()}}
    grads = {}
    for m, w in workers.items():
        w.ask(op="grad", n=args.grad_prompts, path=str(scratch / f"grad{m}.safetensors"))
        grads[m] = load_file(scratch / f"grad{m}.safetensors")
    relative, largest = _relative(grads["3"], grads["4"])
    row["abft_step_gradient"] = {"n_prompts": args.grad_prompts, "relative_difference": relative,
                                 "max_abs_difference": largest}
    trained, losses = {}, {}
    for m, w in workers.items():
        losses[m] = w.ask(op="train", n=args.step_prompts, steps=4, path=str(scratch / f"run{m}.safetensors"))["losses"]
        trained[m] = load_file(scratch / f"run{m}.safetensors")
    relative, largest = _relative(trained["3"], trained["4"])
    row["four_step_run"] = {"steps": 4, "prompts_per_step": args.step_prompts, "trained_relative_difference": relative,
                            "trained_max_abs_difference": largest, "losses": losses}
    seconds = {"3": [], "4": []}
    for rep in range(args.timing_reps):
        for m in (("3", "4") if rep % 2 == 0 else ("4", "3")):  # interleaved, alternating who goes first
            seconds[m].append(workers[m].ask(op="time", n=args.step_prompts)["seconds"])
    row["step_time"] = {"prompts": args.step_prompts, "seconds": seconds,
                        "ratio_bridge_over_hooked": statistics.median(seconds["4"]) / statistics.median(seconds["3"]),
                        "load_average": os.getloadavg()}
    for w in workers.values():
        w.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--grad-prompts", type=int, default=4)
    parser.add_argument("--step-prompts", type=int, default=4)
    parser.add_argument("--timing-reps", type=int, default=4)
    parser.add_argument("--out", default="bench/results/tl_parity.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="abft-tl-parity-") as scratch:
        for spec in args.models.split(","):
            start = time.perf_counter()
            rows.append(compare(spec, args, Path(scratch)))
            rows[-1]["wall_seconds"] = round(time.perf_counter() - start, 1)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"rows": rows, "note": "timings measured under load (2 cores "
                                                  "shared with other jobs): see load_average"}, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
