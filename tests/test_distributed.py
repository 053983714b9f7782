"""Data-parallel training (abft_lens.training.distributed): 2 CPU processes over gloo train the same weights as one
process (up to float summation order), every rank ends bit-identical, a 2-process run interrupted after step 1
resumes to the uninterrupted 2-process run, and docs/scale.md's ``torchrun ... -m abft_lens.cli train`` writes
the same run folder as a single process.

One ``torch.multiprocessing.spawn`` of 2 workers runs every distributed scenario (each worker pays ~20 s of
imports on a shared machine); the single-process references run in the test process.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abft_lens.backends import qk
from safetensors.torch import load_file

from abft_lens.training.distributed import DistributedContext
from abft_lens.run_files import TRAINED_FILE

WORLD = 2
# float tolerance of 2-process vs 1-process weights: gradients are summed in another order
ATOL = 1e-5


def _cases() -> dict[str, dict]:
    return {
        # the brief's configuration: every head passes T = 0, 2 steps of 4 samples (2 per rank)
        "plain": dict(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0),
        "restricted": dict(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0,
                           restricted_gradient=True),
        # some heads pass, uneven shards (pseudo-batches of 3, 3, 2), 6 steps so the PID controller acts
        "restricted-partial-pid": dict(train_samples=8, pseudo_batch_size=3, epochs=2, lr=1e-2, threshold=0.03,
                                       restricted_gradient=True, pid_kp=0.3, pid_ki=0.1, pid_kd=0.1),
    }


RESUME = dict(train_samples=8, pseudo_batch_size=3, epochs=2, lr=1e-2, threshold=0.03, restricted_gradient=True,
              pid_kp=0.3, pid_ki=0.1, pid_kd=0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(cfg_values: dict, dist=None):
    from abft_lens.data.prompts import prompt_builder
    from abft_lens.backends.loading import load_model
    from abft_lens.data.tasks import load_task
    from abft_lens.training.train import TrainConfig, Trainer

    model = load_model("tiny")
    trainer = Trainer(model, prompt_builder(model, load_task("sst2")), TrainConfig(**cfg_values), dist=dist)
    steps = []
    start = time.perf_counter()
    trainer.run([lambda _, result: steps.append(result.to_dict())])
    seconds = time.perf_counter() - start
    return trainer.trainable.state_dict(), steps, seconds


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: every distributed scenario, results saved to ``out/rank{rank}.pt``."""
    import torch.distributed as tdist

    from abft_lens.training.distributed import current
    from abft_lens.backends.loading import load_model
    from abft_lens.training.runs import run_training
    from abft_lens.data.tasks import load_task
    from abft_lens.training.train import TrainConfig

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    dist = current()
    assert dist is not None and dist.rank == rank and dist.world_size == WORLD
    out = Path(out)
    results = {"cases": {}}
    for name, values in _cases().items():
        results["cases"][name] = _train(values, dist)

    # run folders: uninterrupted; stopped after step 1 by rank 1 alone (all ranks must stop), then resumed
    task, cfg = load_task("sst2"), TrainConfig(**RESUME)
    kwargs = dict(n_test=8, progress=False, batch_size=8)

    def stop_on_rank1(trainer, result):
        if result.step == 1 and rank == 1:
            trainer.stop_requested = True

    run_training(load_model("tiny"), task, cfg, run_dir=out / "ref", **kwargs)
    stopped = run_training(load_model("tiny"), task, cfg, run_dir=out / "run", callbacks=[stop_on_rank1], **kwargs)
    results["stopped_steps"] = [s["step"] for s in stopped.steps]
    results["checkpoint_after_stop"] = (out / "run" / "checkpoint.pt").is_file()
    resumed = run_training(load_model("tiny"), task, cfg, run_dir=out / "run", resume=True, **kwargs)
    results["resumed_steps"] = [s["step"] for s in resumed.steps]
    results["resumed_has_post"] = resumed.post is not None
    torch.save(results, out / f"rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Run the 2-process scenarios once; returns (output folder, [rank 0 results, rank 1 results], seconds)."""
    out = tmp_path_factory.mktemp("dist")
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        start = time.perf_counter()
        torch.multiprocessing.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
        seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], seconds


@pytest.fixture(scope="module")
def single():
    """The single-process runs of the same cases (one intra-op thread, like each worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: _train(values) for name, values in _cases().items()}
    finally:
        torch.set_num_threads(threads)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def without_timing(steps: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "seconds"} for s in steps]


# -------------------------------------------------------------------------------------------- unit


def test_shard_is_a_deterministic_strided_split():
    batch = list(range(7))
    shards = [DistributedContext(rank=r, world_size=3, device=torch.device("cpu")).shard(batch) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == batch
    assert DistributedContext(rank=2, world_size=3, device=torch.device("cpu")).shard([0, 1]) == []


def test_init_from_env_is_a_no_op_for_one_process(monkeypatch):
    from abft_lens.training.distributed import current, init_from_env, training_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is None and current() is None and training_device(None) == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is None


# ------------------------------------------------------------------------------------- 2 processes


@pytest.mark.parametrize("case", list(_cases()))
def test_two_processes_train_the_single_process_weights(spawned, single, case):
    _, ranks, _ = spawned
    (w0, steps0, _), (w1, steps1, _) = ranks[0]["cases"][case], ranks[1]["cases"][case]
    w_single, steps_single, _ = single[case]
    # every rank applied the identical update
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert without_timing(steps0) == without_timing(steps1)
    diff = max_abs_diff(w0, w_single)
    print(f"\n{case}: max |2-process - 1-process| = {diff:.3g}")
    assert diff <= ATOL
    # the step statistics are global: identical head counts (hence the same union and PID input) and losses
    assert len(steps0) == len(steps_single)
    for got, want in zip(steps0, steps_single):
        assert got["head_counts"] == want["head_counts"] and got["mean_heads"] == want["mean_heads"]
        assert got["penalty"] == pytest.approx(want["penalty"], abs=1e-9)
        assert got["next_penalty"] == pytest.approx(want["next_penalty"], abs=1e-9)
        for key in ("loss", "award_term", "penalty_term"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)
    # training moved the weights (the comparison is not trivially between two untouched models)
    from abft_lens.backends.loading import load_model

    base = load_model("tiny")
    assert any(not torch.equal(qk.value(base, n).detach(), w_single[n]) for n in w_single)  # TL names, either version


def test_restricted_partial_case_closes_some_heads(single):
    _, steps, _ = single["restricted-partial-pid"]
    counts = torch.tensor([s["head_counts"] for s in steps])
    assert (counts == 0).any() and (counts > 0).any()  # the union is a real restriction in this case
    assert len({s["next_penalty"] for s in steps}) > 1  # the controller moved A


def test_rank0_alone_writes_the_run_folder_and_resume_matches(spawned):
    out, ranks, _ = spawned
    for r in ranks:
        assert r["stopped_steps"] == [1]  # rank 1 asked to stop: both ranks stopped after step 1
        assert r["checkpoint_after_stop"]
        assert r["resumed_steps"] == list(range(2, 7))
    assert ranks[0]["resumed_has_post"] and not ranks[1]["resumed_has_post"]
    ref, run = out / "ref", out / "run"
    assert sorted(p.name for p in ref.iterdir()) == sorted(
        ["config.json", "log.jsonl", "fore_test.json", "post_test.json", "metrics.json", TRAINED_FILE])
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())
    a, b = load_file(ref / TRAINED_FILE), load_file(run / TRAINED_FILE)
    assert all(torch.equal(a[n], b[n]) for n in a), "resumed 2-process run differs from the uninterrupted one"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (ref / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == list(range(1, 7))  # one line per step, written by rank 0 only
    assert without_timing(log) == without_timing(ref_log)
    assert json.loads((run / "post_test.json").read_text()) == json.loads((ref / "post_test.json").read_text())


def test_wall_time_two_processes_vs_one(spawned, single):
    """Reported, not asserted: 2 processes on 2 shared cores are not expected to be faster on a tiny model."""
    _, ranks, _ = spawned
    two = max(r["cases"]["plain"][2] for r in ranks)
    one = single["plain"][2]
    print(f"\nplain run, training loop only: 1 process {one:.3f} s, 2 processes {two:.3f} s, ratio {two / one:.2f}")
    assert two > 0 and one > 0


# ------------------------------------------------------------------------------------------ torchrun


def readme_torchrun_command() -> list[str]:
    """The command of docs/scale.md's "Multi-GPU training" section, split like a shell splits it."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "scale.md").read_text(encoding="utf-8")
    section = readme.split("\n## Multi-GPU training\n", 1)[1].split("\n## ", 1)[0]
    return shlex.split(next(line for line in section.splitlines() if line.startswith("torchrun ")))


def test_the_readme_torchrun_command_matches_a_single_process_cli_run(tmp_path):
    """docs/scale.md's ``torchrun --nproc_per_node 8 -m abft_lens.cli train ...``, with 2 processes and the tiny
    model's sizes: the same run folder as one process."""
    from abft_lens.cli import main

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed next to this Python")
    readme = readme_torchrun_command()
    assert readme[:6] == ["torchrun", "--nproc_per_node", "8", "-m", "abft_lens.cli", "train"], readme
    args = ["train", "--model", "tiny", "--dataset", "sst2", "--train-samples", "8", "--pseudo-batch-size", "4",
            "--epochs", "1", "--lr", "1e-2", "--threshold", "0", "--restricted-gradient", "--n-test", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", str(WORLD), "--master_port", str(free_port()),
                           "-m", readme[4], *args, "--run-dir", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone prints the summary
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--run-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert max_abs_diff(load_file(two / TRAINED_FILE), load_file(one / TRAINED_FILE)) <= ATOL
    assert json.loads((two / "config.json").read_text())["train"] == json.loads((one / "config.json").read_text())["train"]
