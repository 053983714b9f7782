"""Bad input through the command line: exit status 2, one message (its ``abft-lens: error:`` line and its
``fix:`` line), no traceback, and nothing created or changed on disk. Every case of issue 10, section 3.

Each case builds its input in a fresh folder (``Env``), snapshots every file under it, runs ``main([...])``
in-process and checks the snapshot again. Tiny models only; the cases refused before a model loads take
milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from abft_lens.cli import main

QUICK = ["train", "--model", "tiny", "--dataset", "sst2", "--train-samples", "8", "--pseudo-batch-size", "4",
         "--epochs", "1", "--n-test", "8"]


def cli(argv) -> int:
    """``main`` as the shell sees it: argparse's own errors exit through SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A complete tiny run (2 steps, full W_Q/W_K), copied by the cases that damage a run folder."""
    run_dir = tmp_path_factory.mktemp("pristine") / "run"
    assert cli(QUICK + ["--threshold", "0.03", "--run-dir", run_dir]) == 0
    return run_dir


@dataclass
class Env:
    """The folder one case works in, and what it can put there."""

    tmp: Path
    pristine: Path

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def run(self, name: str = "finished") -> Path:
        """A copy of the finished tiny run."""
        target = self.tmp / name
        if not target.exists():
            shutil.copytree(self.pristine, target)
        return target

    def damaged(self, file: str, data: bytes) -> Path:
        run = self.run("damaged")
        (run / file).write_bytes(data)
        return run

    def non_finite_run(self) -> Path:
        from safetensors.torch import load_file, save_file

        run = self.run("diverged")
        tensors = load_file(run / "trained.safetensors")
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].clone()
        tensors[first].view(-1)[0] = float("nan")
        save_file(tensors, run / "trained.safetensors", metadata={"format": "pt"})
        return run

    def csv(self, text: str | bytes, name: str = "data.csv") -> Path:
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path


def rows(n: int, labels=("good", "bad")) -> str:
    return "text,label\n" + "".join(f"item {i} is fine,{labels[i % len(labels)]}\n" for i in range(n))


def user_folder(env: Env) -> Path:
    folder = env.tmp / "mine"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"mine": true}\n')
    (folder / "log.jsonl").write_text('{"my": "log"}\n')
    return folder


def a_file(env: Env) -> Path:
    path = env.tmp / "notes.txt"
    path.write_text("not a model, not a folder\n")
    return path


Case = tuple[str, Callable[[Env], list], str]

TRAIN: list[Case] = [  # QUICK + these + --run-dir RUN
    ("penalty-nan", lambda e: ["--penalty", "nan"], "--penalty nan must be a finite number >= 0"),
    ("penalty-inf", lambda e: ["--penalty", "inf"], "--penalty inf must be a finite number >= 0"),
    ("award-nan", lambda e: ["--award", "nan"], "--award nan must be a finite number >= 0"),
    ("award-inf", lambda e: ["--award", "inf"], "--award inf must be a finite number >= 0"),
    ("pid-kp-nan", lambda e: ["--pid-kp", "nan"], "--pid-kp nan must be a finite number >= 0"),
    ("pid-ki-inf", lambda e: ["--PID_param_I", "inf"], "--pid-ki inf must be a finite number >= 0"),
    ("pid-kd-nan", lambda e: ["--pid-kd", "nan"], "--pid-kd nan must be a finite number >= 0"),
    ("p-gain-inf", lambda e: ["--penalty-mode", "P", "--p-gain", "inf"], "--p-gain inf must be a finite number >= 0"),
    ("lr-inf", lambda e: ["--lr", "inf"], "--lr inf must be a finite number > 0"),
    ("lr-nan", lambda e: ["--lr", "nan"], "--lr nan must be a finite number > 0"),
    ("threshold-2", lambda e: ["--threshold", "2"], "--threshold 2.0 is outside [0, 1)"),
    ("threshold-nan", lambda e: ["--threshold", "nan"], "--threshold nan is outside [0, 1)"),
    ("threshold-inf", lambda e: ["--threshold", "inf"], "--threshold inf is outside [0, 1)"),
    ("threshold-minus-1", lambda e: ["--threshold", "-1"], "--threshold -1.0 is outside [0, 1)"),
    ("seed-negative", lambda e: ["--seed", "-1"], "--seed -1 must be an integer in 0..4294967295"),
    ("k-too-large", lambda e: ["--k", "10000"], "k=10000 is larger than the demonstration split"),
    ("n-test-too-large", lambda e: ["--n-test", "100000"], "n_test=100000 is out of range for sst2"),
    ("validation-examples-too-large", lambda e: ["--validation-examples", "100000", "--validate-every", "1"],
     "--validation-examples 100000 leaves fewer than k+1=5"),
    ("csv-too-small", lambda e: ["--dataset", e.csv(rows(8)), "--k", "2", "--n-test", "2"],
     "calibration split holds 2 examples, fewer than k+1=3"),
    ("validate-every-alone", lambda e: ["--validate-every", "2"], "--validate-every 2 needs held-out validation"),
    ("validation-examples-alone", lambda e: ["--validation-examples", "64"],
     "--validation-examples 64 would be held out of training but never used"),
    ("select-max-p-without-keep-best", lambda e: ["--validation-examples", "64", "--validate-every", "1",
                                                  "--select-max-p", "0.05"], "--keep-best is off"),
    ("select-max-p-2", lambda e: ["--validation-examples", "64", "--validate-every", "1", "--keep-best",
                                  "--select-max-p", "2"], "--select-max-p 2.0 must be a number in (0, 1]"),
    ("validation-prompts-alone", lambda e: ["--validation-prompts", "8"],
     "--validation-prompts is used only with --validation-examples"),
    ("generalization-n-test-alone", lambda e: ["--generalization-n-test", "4"],
     "--generalization-n-test is used only with --generalization-test"),
    ("robustness-queries-with-normal", lambda e: ["--robustness-queries", "3"],
     "--robustness-queries is used only with --test-type"),
    ("p-gain-under-pid", lambda e: ["--p-gain", "0.1"], "--p-gain is used only with --penalty-mode P"),
    ("p-gain-under-none", lambda e: ["--self_adaption_loss", "None", "--loss_adaption_factor_for_P", "0.1"],
     "--p-gain is used only with --penalty-mode P"),
    ("pid-gain-under-none", lambda e: ["--penalty-mode", "None", "--pid-kp", "0.1"],
     "--pid-kp is used only with --penalty-mode PID"),
    ("pid-gain-under-p", lambda e: ["--penalty-mode", "P", "--PID_param_D", "0.1"],
     "--pid-kd is used only with --penalty-mode PID"),
    ("mauve-tokens-without-test", lambda e: ["--MAUVE-max-new-tokens", "8"],
     "--MAUVE-max-new-tokens is used only with --MAUVE-test"),
    ("award-with-e2e", lambda e: ["--method", "E2E", "--award", "1"], "--award is used only with --method ABFT"),
    ("penalty-with-e2e", lambda e: ["--method", "E2E", "--wrong_label_penalty", "0.5"],
     "--penalty is used only with --method ABFT"),
    ("quantized-lora-r-0", lambda e: ["--quantized", "--lora-r", "0"], "--lora-r 0 (full W_Q/W_K) is not possible"),
    ("resume-missing-folder", lambda e: ["--resume"], "holds no run to continue (it does not exist)"),
    ("pseudo-batch-larger-than-samples", lambda e: ["--pseudo-batch-size", "16"],
     "--pseudo-batch-size 16 is larger than --train-samples 8"),
    ("tiny-zero-layers", lambda e: ["--model", "tiny:n_layers=0"], "tiny-model option n_layers=0"),
    ("runaway-train-samples", lambda e: ["--train-samples", "1000000000"],
     "--train-samples 1000000000 must be an integer in 1..100000"),
    ("zero-loss", lambda e: ["--penalty-mode", "None", "--award", "0", "--penalty", "0"],
     "the ABFT loss is 0 at every step"),
    ("latin1-csv", lambda e: ["--dataset", e.csv(rows(40).encode() + "caf\xe9,good\n".encode("latin-1"))],
     "is not UTF-8 text (byte 0xe9"),
    ("one-label-csv", lambda e: ["--dataset", e.csv(rows(40, labels=("good",)))], "has a single label ('good')"),
    ("prompt-longer-than-context", lambda e: ["--model", "tiny:n_ctx=64"], "more than the model's context of 64"),
    ("balanced-queries-label-missing-from-training", lambda e: [
        "--dataset", e.csv(split_rows()), "--k", "2", "--n-test", "4", "--balance-query-labels"],
     "balanced query labels need every label in the training pool; ['bad'] has none among its 10 examples"),
]


def split_rows() -> str:
    """A CSV whose calibration split (the training pool) holds only 'good'; both labels occur elsewhere."""
    placed = [("calibration", "good")] * 10 + [("demonstration", "good"), ("demonstration", "bad")] * 10 + \
        [("test", "good"), ("test", "bad")] * 4
    return "text,label,split\n" + "".join(f"item {i} is fine,{label},{split}\n"
                                        for i, (split, label) in enumerate(placed))

RUN_DIRS: list[Case] = [  # QUICK + these (the --run-dir is the case's own)
    ("run-dir-is-a-file", lambda e: ["--run-dir", a_file(e)], "is a file, not a folder"),
    ("run-dir-under-a-file", lambda e: ["--run-dir", a_file(e) / "run"], "which is a file, not a folder"),
    ("run-dir-holds-user-files", lambda e: ["--run-dir", user_folder(e)],
     "is not empty (log.jsonl, metrics.json) and is not an abft-lens run folder"),
    ("run-dir-holds-a-run", lambda e: ["--run-dir", e.run()], "already holds a run"),
    ("resume-complete-run", lambda e: ["--run-dir", e.run(), "--resume"], "is already complete"),
    ("resume-non-run-folder", lambda e: ["--run-dir", user_folder(e), "--resume"],
     "holds no run to continue (no config.json)"),
]

OTHERS: list[Case] = [  # whole command lines
    ("eval-k-too-large", lambda e: ["eval", "--model", "tiny", "--k", "10000"], "k=10000 is larger"),
    ("eval-n-test-too-large", lambda e: ["eval", "--model", "tiny", "--n-test", "100000"],
     "n_test=100000 is out of range"),
    ("eval-robustness-queries-with-normal", lambda e: ["eval", "--model", "tiny", "--robustness-queries", "3"],
     "--robustness-queries is used only with --test-type"),
    ("eval-robustness-queries-too-many", lambda e: ["eval", "--model", "tiny", "--test-type", "DemoSensitivity",
                                                    "--robustness-queries", "5000"], "n_queries=5000 is out of range"),
    ("eval-calibrated-with-test-type", lambda e: ["eval", "--model", "tiny", "--calibrated", "--test-type",
                                                  "TempSensitivity"], "--calibrated applies to the Normal evaluation"),
    ("eval-latin1-csv", lambda e: ["eval", "--model", "tiny", "--dataset",
                                   e.csv(rows(40).encode() + "caf\xe9,good\n".encode("latin-1"))], "is not UTF-8 text"),
    ("eval-one-label-csv", lambda e: ["eval", "--model", "tiny", "--dataset", e.csv(rows(40, labels=("good",)))],
     "has a single label"),
    ("eval-tiny-zero-layers", lambda e: ["eval", "--model", "tiny:n_layers=0"], "tiny-model option n_layers=0"),
    ("model-folder-with-only-config", lambda e: ["eval", "--model", _config_only(e)], "it holds no weights"),
    ("model-is-an-existing-non-model-file", lambda e: ["eval", "--model", a_file(e)],
     "exists but is not a model: neither a .gguf file nor a Hugging Face folder"),
    ("eval-output-is-a-folder", lambda e: ["eval", "--model", "tiny", "--n-test", "2", "--output", e.tmp],
     "is a folder; it must name a file"),
    ("eval-output-under-a-file", lambda e: ["eval", "--model", "tiny", "--n-test", "2", "--output",
                                            a_file(e) / "out.json"], "which is a file"),
    ("heads-output-is-a-folder", lambda e: ["heads", "--model", "tiny", "--n-prompts", "2", "--output", e.tmp],
     "is a folder; it must name a file"),
    ("heads-n-prompts-too-large", lambda e: ["heads", "--model", "tiny", "--n-prompts", "100000"],
     "n_test=100000 is out of range"),
    ("table-output-is-a-folder", lambda e: ["table", e.run(), "--output", e.tmp], "is a folder; it must name a file"),
    ("eval-run-of-another-model", lambda e: ["eval", "--model", "tiny:seed=1", "--n-test", "2", "--run", e.run()],
     "was trained on 'tiny', but the loaded model is 'tiny:seed=1'"),
    ("eval-run-of-another-shape", lambda e: ["eval", "--model", "tiny:n_layers=3", "--n-test", "2", "--run", e.run()],
     "was trained on a model with n_layers=2"),
    ("mix-output-is-a-folder", lambda e: ["mix", e.run("a"), e.run("b"), "--n-test", "2", "--grid-step", "1",
                                          "--output", e.tmp], "is a folder"),
    ("report-output-is-a-folder", lambda e: ["report", e.run(), "--output", e.tmp], "is a folder"),
]

DAMAGE = {  # file -> bytes, and the words of the refusal
    "config-truncated": ("config.json", b'{"train": {"method": "AB', "config.json is damaged: not readable as JSON"),
    "config-empty": ("config.json", b"", "config.json is damaged: not readable as JSON"),
    "config-not-a-run": ("config.json", b'{"hello": 1}\n', "config.json is damaged: it lacks 'train'"),
    "trained-garbage": ("trained.safetensors", b"\x00garbage" * 10, "trained.safetensors is damaged"),
}
RUN_COMMANDS = {  # command -> argv for a run folder R
    "eval-run": lambda r, e: ["eval", "--model", "tiny", "--n-test", "2", "--run", r],
    "report": lambda r, e: ["report", r],
    "export": lambda r, e: ["export", r, "--output", e.tmp / "exported"],
    "mix": lambda r, e: ["mix", r, e.run(), "--n-test", "2", "--grid-step", "1"],
    "table": lambda r, e: ["table", r],
}
BROKEN: list[Case] = [
    (f"{command}-{damage}", lambda e, c=command, d=damage: RUN_COMMANDS[c](e.damaged(*DAMAGE[d][:2]), e), DAMAGE[damage][2])
    for command in RUN_COMMANDS for damage in DAMAGE
    if not (command == "table" and damage == "trained-garbage")  # table reads only the JSON files
] + [
    (f"{command}-nan-tensors", lambda e, c=command: RUN_COMMANDS[c](e.non_finite_run(), e),
     "holds NaN or infinite values")
    for command in ("eval-run", "report", "export", "mix")
] + [
    ("table-post-test-truncated", lambda e: ["table", e.damaged("post_test.json", b'{"task": "sst')],
     "post_test.json is damaged: not readable as JSON"),
    ("export-export-no-run", lambda e: ["export", e.tmp, "--output", e.tmp / "exported"],
     "is not an abft-lens run folder"),
]


def _config_only(env: Env) -> Path:
    folder = env.tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}\n')
    return folder


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar


def stderr_messages(err: str, progress: bool = False) -> list[str]:
    """The non-empty lines of stderr; ``progress``: without the progress bars of work done before the error."""
    return [line for line in err.splitlines() if line.strip()
            and not (progress and PROGRESS.search(line) and not line.startswith(("abft-lens", "  fix")))]


def refused(argv: list, words: str, env: Env, capsys, progress: bool = False) -> None:
    """Exit 2 with exactly one message (error line + fix line), no traceback, no file created or changed.
    ``progress``: the command may show progress bars before it fails (they are not counted)."""
    before = snapshot(env.tmp)
    capsys.readouterr()
    code = cli(argv)
    err = capsys.readouterr().err
    messages = stderr_messages(err, progress)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(messages) == 2 and messages[0].startswith("abft-lens: error: ") and messages[1].startswith("  fix: "), err
    assert words in messages[0], err
    assert snapshot(env.tmp) == before, "the refused command changed the folder"


@pytest.fixture
def env(tmp_path, finished_run, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)  # a default runs/... folder would land here, inside the snapshot
    return Env(tmp_path, finished_run)


@pytest.mark.parametrize("name, build, words", TRAIN, ids=[case[0] for case in TRAIN])
def test_train_refuses_bad_options_before_anything_is_written(name, build, words, env, capsys):
    refused(QUICK + build(env) + ["--run-dir", env.run_dir], words, env, capsys)
    assert not env.run_dir.exists()


@pytest.mark.parametrize("name, build, words", RUN_DIRS, ids=[case[0] for case in RUN_DIRS])
def test_train_refuses_run_dirs_that_cannot_take_the_run(name, build, words, env, capsys):
    refused(QUICK + build(env), words, env, capsys)


@pytest.mark.parametrize("name, build, words", OTHERS + BROKEN, ids=[case[0] for case in OTHERS + BROKEN])
def test_other_commands_refuse_bad_input(name, build, words, env, capsys):
    refused(build(env), words, env, capsys)


# ------------------------------------------------------------------------------------ what must still work


def test_a_corrected_command_runs_where_a_refused_one_was(env, capsys):
    """The refused command left no folder behind, so the corrected command needs no clean-up."""
    refused(QUICK + ["--penalty", "nan", "--run-dir", env.run_dir], "--penalty nan", env, capsys)
    assert cli(QUICK + ["--penalty", "0.5", "--run-dir", env.run_dir]) == 0
    assert (env.run_dir / "metrics.json").is_file() and not (env.run_dir / "run.lock").exists()


def test_a_fresh_run_refused_after_the_model_loaded_leaves_no_folder(env, capsys):
    """The prompt-length check needs the tokenizer: the empty folder the user made is emptied again, and a
    folder abft-lens made is removed."""
    made = env.tmp / "made"
    made.mkdir()
    for run_dir in (made, env.run_dir):
        refused(QUICK + ["--model", "tiny:n_ctx=64", "--run-dir", run_dir], "context of 64", env, capsys)
    assert list(made.iterdir()) == [] and not env.run_dir.exists()


def test_csv_with_a_byte_order_mark_works(env, capsys):
    path = env.csv(b"\xef\xbb\xbf" + rows(40).encode())
    output = env.tmp / "out.json"
    assert cli(["eval", "--model", "tiny", "--dataset", path, "--k", "2", "--n-test", "4", "--output", output]) == 0
    assert json.loads(output.read_text())["label_words"] == [" bad", " good"]


def test_training_that_diverges_stops_with_one_message(env, capsys):
    """A loss weight near float32's maximum makes the loss infinite at step 1 (an lr above 1, the old way to
    diverge, is now refused up front): the step is refused before it is logged or checkpointed, and nothing
    reports success (no metrics.json, no trained tensors)."""
    code = cli(QUICK + ["--award", "3e38", "--penalty", "3e38", "--threshold", "0.0", "--run-dir", env.run_dir])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "abft-lens: error:" in line]
    assert len(errors) == 1 and "training diverged at step 1" in errors[0] and "(lr=2e-05)" in errors[0]
    assert not (env.run_dir / "metrics.json").exists() and not (env.run_dir / "trained.safetensors").exists()
    log_path = env.run_dir / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    assert all(json.dumps(line).count("NaN") == 0 and line["loss"] == line["loss"] for line in log)


def test_resume_while_another_process_trains_is_refused_and_a_stale_lock_is_taken_over(env, capsys):
    from abft_lens.run_files import LOCK_FILE
    from abft_lens.training.run_folder import RunLock

    run = env.run("interrupted")
    for name in ("metrics.json", "post_test.json", "trained.safetensors"):
        (run / name).unlink()  # an interrupted run, without a checkpoint: resuming restarts its training
    with RunLock(run):  # "the first process", still training
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
        refused(QUICK + ["--threshold", "0.03", "--run-dir", run, "--resume"],
                f"is in use by another abft-lens process (pid {os.getpid()}", env, capsys)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_FILE).write_text(dead.stdout)  # the lock file of a process that has ended
    assert cli(QUICK + ["--threshold", "0.03", "--run-dir", run, "--resume"]) == 0
    assert (run / "metrics.json").is_file() and not (run / LOCK_FILE).exists()


def test_python_m_abft_lens_prints_one_message_without_a_traceback(tmp_path):
    """The real process: ``python -m abft_lens`` exits 2 with two lines on stderr and writes nothing."""
    process = subprocess.run([sys.executable, "-m", "abft_lens", *QUICK, "--penalty", "nan", "--run-dir",
                              str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert process.returncode == 2
    assert process.stderr.splitlines() == ["abft-lens: error: --penalty nan must be a finite number >= 0.",
                                           "  fix: pass --penalty >= 0."]
    assert process.stdout == "" and list(tmp_path.iterdir()) == []
