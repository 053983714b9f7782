"""Bad files and folders through the command line (issue 18, section 4): damaged run and study files, file-system
errors, outputs that would overwrite a run or a study, two studies in one folder, a study whose files are gone,
and weight mixing with non-finite weights.

The house style of ``test_cli_input_checks``: each case builds its input in a fresh folder (``Env``), snapshots
every file under it, runs ``main([...])`` in-process, and checks exit status 2, exactly one message (its
``abft-lens: error:`` line and its ``fix:`` line), no traceback, and the snapshot unchanged. Tiny models only.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from test_cli_input_checks import QUICK, cli, refused, snapshot, stderr_messages

REPO = Path(__file__).resolve().parent.parent
STUDY = ["study", "--models", "tiny", "--datasets", "sst2", "--methods", "vanilla,cc,prior,ABFT", "--train-samples",
         "8", "--pseudo-batch-size", "4", "--epochs", "1", "--n-test", "8", "--threshold", "0.03",
         "--generalization-test", "--generalization-n-test", "2"]
RUN_IN_STUDY = Path("tiny/sst2/ABFT/seed-0")
BASELINES = {"vanilla": Path("tiny/sst2/vanilla/k4-n8.json"), "cc": Path("tiny/sst2/cc/k4-n8.json"),
             "prior": Path("tiny/sst2/prior/seed-0/k4-n8.json")}
RESUME = QUICK + ["--threshold", "0.03", "--resume", "--run-dir"]


@dataclass
class Pristine:
    study: Path  # a finished tiny study (vanilla, cc, prior, ABFT; generalization test)
    interrupted: Path  # a QUICK run stopped after its first step: config, fore test, one log line, checkpoint.pt


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    from abft_lens.training import runs
    from abft_lens.training.callbacks import Checkpointer

    root = tmp_path_factory.mktemp("pristine")
    assert cli(STUDY + ["--out", root / "study"]) == 0
    assert not (root / "study" / "study.lock").exists()

    class StopAfterFirstStep(Checkpointer):
        def __call__(self, trainer, result) -> None:
            super().__call__(trainer, result)
            if result.step == 1:
                raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "Checkpointer", StopAfterFirstStep)
        assert cli(QUICK + ["--threshold", "0.03", "--run-dir", root / "interrupted"]) == 130
    assert (root / "interrupted" / "checkpoint.pt").is_file()
    return Pristine(root / "study", root / "interrupted")


@dataclass
class Env:
    """The folder one case works in, and what it can put there."""

    tmp: Path
    pristine: Pristine
    frozen: list = field(default_factory=list)

    def _copy(self, source: Path, name: str) -> Path:
        target = self.tmp / name
        if not target.exists():
            shutil.copytree(source, target)
        return target

    def study(self) -> Path:
        return self._copy(self.pristine.study, "study")

    def run(self, name: str = "run") -> Path:
        """A copy of the study's finished ABFT run (an ordinary run folder, with generalization.json)."""
        return self._copy(self.pristine.study / RUN_IN_STUDY, name)

    def interrupted(self) -> Path:
        return self._copy(self.pristine.interrupted, "interrupted")

    def folder(self, name: str = "out") -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    def a_file(self) -> Path:
        path = self.tmp / "notes.txt"
        path.write_text("a file, not a folder\n")
        return path

    def loop(self) -> Path:
        """A symbolic link to itself."""
        path = self.tmp / "loop"
        if not path.is_symlink():
            path.symlink_to("loop")
        return path

    def read_only(self, path: Path) -> Path:
        """``path`` made unwritable: ``chattr +i`` as root (who ignores permissions), else ``chmod a-w``."""
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        else:
            path.chmod(0o555)
            done = True
        self.frozen.append(path)
        if not done or os.access(path, os.W_OK):
            pytest.skip("cannot make a folder read-only here")
        return path

    def thaw(self) -> None:
        for path in self.frozen:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(path)], capture_output=True)
            else:
                path.chmod(0o755)


@pytest.fixture
def env(tmp_path, pristine, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = Env(tmp_path, pristine)
    yield made
    made.thaw()


def study_command(out: Path) -> list:
    return STUDY + ["--out", out]


Case = tuple[str, Callable[[Env], list], str]

# ------------------------------------------------------------------------------- 1. damaged files

BINARY = bytes(range(128, 256)) * 2


def damage(path: Path, how: str) -> Path:
    """Damage a JSON file: cut in half, emptied, binary, a list, or one of the wrong shapes in SHAPES."""
    data = path.read_bytes()
    raw = {"truncated": data[: len(data) // 2], "empty": b"", "binary": BINARY, "a-list": b"[1, 2]\n"}
    if how in raw:
        path.write_bytes(raw[how])
    else:
        content = json.loads(data)
        SHAPES[how](content)
        path.write_text(json.dumps(content))
    return path


def _first_cell(data: dict) -> None:
    data["cells"][next(iter(data["cells"]))] = "done"


SHAPES: dict[str, Callable[[dict], None]] = {
    "plan-not-an-object": lambda d: d.update(plan=5),
    "a-cell-not-a-record": _first_cell,
    "seeds-not-a-list": lambda d: d["plan"].update(seeds="0"),
    "rows-not-records": lambda d: d.update(per_prompt=[1, 2]),
    "no-metrics": lambda d: d.pop("metrics"),
    "metrics-not-an-object": lambda d: d.update(metrics=5),
    "post-not-an-object": lambda d: d.update(post=5),
    "summary-not-numbers": lambda d: d.update(post_summary={"in_domain": "high", "out_of_domain": None}),
}
RAW = ("truncated", "empty", "binary", "a-list")
STUDY_FILES = {  # label -> (file in the study folder, its wrong shapes, the commands that read it)
    "study.json": (Path("study.json"), ("plan-not-an-object", "a-cell-not-a-record", "seeds-not-a-list"),
                   ("study-resume", "table-study")),
    "vanilla-baseline": (BASELINES["vanilla"], ("rows-not-records", "no-metrics"), ("study-resume", "table-study")),
    "prior-baseline": (BASELINES["prior"], ("rows-not-records",), ("study-resume", "table-study")),
    "post_test.json": (RUN_IN_STUDY / "post_test.json", ("metrics-not-an-object", "rows-not-records"),
                       ("study-resume", "table-study")),
    "generalization.json": (RUN_IN_STUDY / "generalization.json", ("post-not-an-object", "summary-not-numbers"),
                            ("study-resume",)),  # table STUDY prints Table 1, which does not read it
    "metrics.json": (RUN_IN_STUDY / "metrics.json", ("post-not-an-object",), ("study-resume", "table-study")),
}
STUDY_COMMANDS = {
    "study-resume": lambda s, e: study_command(s),
    "table-study": lambda s, e: ["table", s],
}
RUN_FILES = {  # file in the run folder -> (wrong shapes, commands that read it)
    "post_test.json": (("metrics-not-an-object", "rows-not-records"), ("table-run", "mix", "report")),
    "fore_test.json": (("no-metrics", "rows-not-records"), ("table-run", "report")),
    "generalization.json": (("post-not-an-object", "summary-not-numbers"), ("table-run",)),
    "metrics.json": (("post-not-an-object",), ("export",)),
}
RUN_COMMANDS = {
    "table-run": lambda r, e: ["table", r],
    "mix": lambda r, e: ["mix", r, e.run("other"), "--n-test", "2", "--grid-step", "1"],
    "report": lambda r, e: ["report", r],
    "export": lambda r, e: ["export", r, "--output", e.tmp / "exported"],
}


def in_study(env: Env, file: Path, how: str) -> Path:
    damage(env.study() / file, how)
    return env.study()


DAMAGED: list[Case] = [
    (f"{command}-{label}-{how}", lambda e, c=command, f=file, h=how: STUDY_COMMANDS[c](in_study(e, f, h), e),
     f"{file.name} is damaged")
    for label, (file, shapes, commands) in STUDY_FILES.items() for command in commands for how in RAW + shapes
] + [
    (f"{command}-{file}-{how}", lambda e, c=command, f=file, h=how: RUN_COMMANDS[c](damage(e.run() / f, h).parent, e),
     f"{file} is damaged")
    for file, (shapes, commands) in RUN_FILES.items() for command in commands for how in RAW + shapes
] + [
    (f"train-resume-fore_test.json-{how}", lambda e, h=how: RESUME + [damage(e.interrupted() / "fore_test.json", h)
                                                                       .parent], "fore_test.json is damaged")
    for how in RAW + ("rows-not-records",)
]


def append(path: Path, data: bytes) -> Path:
    with open(path, "ab") as file:
        file.write(data)
    return path


def garbage_checkpoint(how: str):
    def build(env: Env) -> list:
        path = env.interrupted() / "checkpoint.pt"
        if how == "garbage":
            path.write_bytes(b"PK\x03\x04 not a checkpoint" * 4)
        elif how == "empty":
            path.write_bytes(b"")
        else:
            torch.save({"trainer": 5, "guard": None} if how == "wrong-shape" else [1, 2], path)
        return RESUME + [path.parent]
    return build


LOGS_AND_CHECKPOINTS: list[Case] = [
    ("train-resume-log-garbage-line", lambda e: RESUME + [append(e.interrupted() / "log.jsonl", b"garbage\n").parent],
     "log.jsonl is damaged: line 2 is not JSON"),
    ("train-resume-log-line-not-an-object", lambda e: RESUME + [append(e.interrupted() / "log.jsonl", b"[1]\n").parent],
     "log.jsonl is damaged: line 2 is not a JSON object"),
    ("train-resume-log-binary", lambda e: RESUME + [append(e.interrupted() / "log.jsonl", BINARY + b"\n").parent],
     "log.jsonl is damaged: line 2 is not JSON"),
    ("report-log-garbage-line", lambda e: ["report", append(e.run() / "log.jsonl", b"garbage\n").parent],
     "log.jsonl is damaged: line 3 is not JSON"),
] + [(f"train-resume-checkpoint-{how}", garbage_checkpoint(how), "checkpoint.pt is damaged")
     for how in ("garbage", "empty", "wrong-shape", "a-list")]


def interrupted_study_cell(env: Env, checkpoint: bytes | None = None, log_tail: bytes = b"") -> Path:
    """The study with its ABFT cell as if killed mid-training (study.json: interrupted; no metrics, no tensors)."""
    study = env.study()
    run = study / RUN_IN_STUDY
    for name in ("metrics.json", "post_test.json", "trained.safetensors", "generalization.json"):
        (run / name).unlink()
    data = json.loads((study / "study.json").read_text())
    data["cells"][str(RUN_IN_STUDY)]["state"] = "interrupted"
    (study / "study.json").write_text(json.dumps(data))
    if checkpoint is not None:
        (run / "checkpoint.pt").write_bytes(checkpoint)
    append(run / "log.jsonl", log_tail)
    return study


DAMAGED += [("study-resume-checkpoint-garbage", lambda e: study_command(interrupted_study_cell(e, b"garbage")),
             "checkpoint.pt is damaged"),
            ("study-resume-log-garbage-line", lambda e: study_command(interrupted_study_cell(e, None, b"garbage\n")),
             "log.jsonl is damaged")]


@pytest.mark.parametrize("name, build, words", DAMAGED + LOGS_AND_CHECKPOINTS,
                         ids=[case[0] for case in DAMAGED + LOGS_AND_CHECKPOINTS])
def test_a_damaged_file_is_one_message_naming_it(name, build, words, env, capsys):
    refused(build(env), words, env, capsys)


def test_resume_drops_a_half_written_last_log_line_and_continues(env, capsys):
    """A crash while appending leaves a last line without its newline that does not parse: the resume drops
    it and ends with the log of an uninterrupted run (one line per step)."""
    run = env.interrupted()
    append(run / "log.jsonl", b'{"event": "step", "step": 2, "lo')
    assert cli(RESUME + [run]) == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and (run / "metrics.json").is_file()


def test_a_complete_last_line_without_its_newline_is_kept(env, capsys):
    from abft_lens.run_files import read_log

    run = env.run()
    text = (run / "log.jsonl").read_text()
    (run / "log.jsonl").write_text(text.rstrip("\n"))
    assert read_log(run) == [json.loads(line) for line in text.splitlines()]


def test_a_study_resumes_a_cell_whose_log_ends_half_written(env, capsys):
    study = interrupted_study_cell(env, None, b'{"event": "step", "st')
    assert cli(study_command(study)) == 0, capsys.readouterr().err
    assert json.loads((study / "study.json").read_text())["cells"][str(RUN_IN_STUDY)]["state"] == "done"


# ------------------------------------------------------------------------------- 2. file-system errors

EVAL = ["eval", "--model", "tiny", "--n-test", "2"]
HEADS = ["heads", "--model", "tiny", "--n-prompts", "2"]


def mix(env: Env, *extra) -> list:
    return ["mix", env.run("a"), env.run("b"), "--n-test", "2", "--grid-step", "1", *extra]


def read_only_run(env: Env) -> Path:
    return env.read_only(env.run())


WRITES: dict[str, Callable[[Env, Path], list]] = {  # command -> argv writing into the folder (or path) given
    "train": lambda e, p: QUICK + ["--run-dir", p / "run"],
    "eval": lambda e, p: EVAL + ["--output", p / "out.json"],
    "heads": lambda e, p: HEADS + ["--output", p / "heads.json"],
    "table": lambda e, p: ["table", e.run(), "--output", p / "table.md"],
    "mix-output": lambda e, p: mix(e, "--output", p / "mix.json"),
    "mix-html": lambda e, p: mix(e, "--html", p / "mix.html"),
    "report-output": lambda e, p: ["report", e.run(), "--output", p / "report.html"],
    "export": lambda e, p: ["export", e.run(), "--output", p / "exported"],
    "study": lambda e, p: study_command(p / "study"),
}
FILE_SYSTEM: list[Case] = [
    (f"{command}-into-a-read-only-folder", lambda e, c=command: WRITES[c](e, e.read_only(e.folder())),
     "is not writable") for command in WRITES
] + [
    ("train-resume-read-only-run", lambda e: RESUME + [e.read_only(e.interrupted())], "is not writable"),
    ("report-read-only-run", lambda e: ["report", read_only_run(e)], "is not writable"),
    ("study-resume-read-only-study", lambda e: study_command(e.read_only(e.study())), "is not writable"),
] + [
    (f"{command}-under-a-file", lambda e, c=command: WRITES[c](e, e.a_file()), "which is a file")
    for command in ("heads", "export", "study")
] + [
    (f"{command}-in-a-symlink-loop", lambda e, c=command: WRITES[c](e, e.loop()), "Too many levels of symbolic links")
    for command in WRITES
] + [
    ("train-run-dir-is-a-symlink-loop", lambda e: QUICK + ["--run-dir", e.loop()], "Too many levels of symbolic links"),
    ("study-out-is-a-symlink-loop", lambda e: STUDY + ["--out", e.loop()], "Too many levels of symbolic links"),
]


@pytest.mark.parametrize("name, build, words", FILE_SYSTEM, ids=[case[0] for case in FILE_SYSTEM])
def test_unusable_folders_are_refused_before_the_model_loads(name, build, words, env, capsys, monkeypatch):
    from abft_lens.backends import loading
    from abft_lens.studies import study

    argv = build(env)
    for module, name in ((loading, "load_model"), (loading, "load_model_like"), (study, "load_model")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the model loaded"))
    refused(argv, words, env, capsys)


def full_disk(monkeypatch, after: int = 0) -> None:
    """Every durable write fails with ENOSPC (the first ``after`` succeed), as on a full disk."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


FULL_DISK: list[Case] = [
    (f"{command}-on-a-full-disk", lambda e, c=command: WRITES[c](e, e.folder()), "No space left on device")
    for command in ("train", "eval", "heads", "table", "mix-output", "report-output", "study")
] + [("report-into-the-run-on-a-full-disk", lambda e: ["report", e.run()], "No space left on device")]


@pytest.mark.parametrize("name, build, words", FULL_DISK, ids=[case[0] for case in FULL_DISK])
def test_a_full_disk_is_one_message_and_leaves_nothing_half_written(name, build, words, env, capsys, monkeypatch):
    argv = build(env)
    full_disk(monkeypatch)
    refused(argv, words, env, capsys, progress=True)


def test_a_disk_that_fills_during_training_loses_nothing(env, capsys, monkeypatch):
    """ENOSPC at the second step's log line: one message; the folder holds the first step's checkpoint, and
    once there is space again the resumed run completes."""
    run = env.tmp / "run"
    with monkeypatch.context() as patch:
        full_disk(patch, after=3)  # config.json, fore_test.json, step 1's log line; then step 1's checkpoint fails
        assert cli(QUICK + ["--threshold", "0.03", "--run-dir", run]) == 2
    err = stderr_messages(capsys.readouterr().err, progress=True)
    assert len(err) == 2 and "No space left on device" in err[0] and "checkpoint.pt" in err[0], err
    assert err[1].startswith("  fix: ")
    assert not list(run.glob(".*")) and not (run / "metrics.json").exists()
    assert cli(QUICK + ["--threshold", "0.03", "--run-dir", run, "--resume"]) == 0
    assert (run / "metrics.json").is_file()


def test_a_real_file_size_limit_is_one_message(tmp_path):
    """``ulimit -f 1`` (1 KiB) in a real process: writing the output fails with EFBIG; one message, no file."""
    command = (f"ulimit -f 1; exec {sys.executable} -m abft_lens eval --model tiny --n-test 2 "
               f"--output {tmp_path / 'out.json'}")
    process = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in process.stderr.splitlines() if line.startswith(("abft-lens", "  fix"))]
    assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr
    assert len(lines) == 2 and "File too large" in lines[0] and "out.json" in lines[0], process.stderr
    assert list(tmp_path.iterdir()) == []


def test_programming_errors_still_give_tracebacks(env, monkeypatch):
    from abft_lens.cli import eval_command

    monkeypatch.setattr(eval_command, "check_eval_args", lambda args: {}["bug"])
    with pytest.raises(KeyError):
        cli(EVAL)


# ------------------------------------------------------------------------------- 3. overwrites

OVERWRITES: list[Case] = [
    ("report-over-config", lambda e: ["report", e.run(), "--output", e.run() / "config.json"], "run folder's own"),
    ("report-over-metrics", lambda e: ["report", e.run(), "--output", e.run() / "metrics.json"], "run folder's own"),
    ("table-over-metrics", lambda e: ["table", e.run(), "--output", e.run() / "metrics.json"], "run folder's own"),
    ("table-over-post-test", lambda e: ["table", e.run(), "--output", e.run() / "post_test.json"], "run folder's own"),
    ("table-over-trained", lambda e: ["table", e.run(), "--output", e.run("b") / "trained.safetensors"],
     "run folder's own"),
    ("table-over-study-json", lambda e: ["table", e.study(), "--output", e.study() / "study.json"],
     "study folder's own"),
    ("table-over-a-baseline", lambda e: ["table", e.study(), "--output", e.study() / BASELINES["vanilla"]],
     "study folder's own"),
    ("eval-over-post-test", lambda e: EVAL + ["--output", e.run() / "post_test.json"], "run folder's own"),
    ("eval-over-fore-test", lambda e: EVAL + ["--output", e.run() / "fore_test.json"], "run folder's own"),
    ("eval-over-config-by-dotdot", lambda e: EVAL + ["--output", e.run() / ".." / "run" / "config.json"],
     "run folder's own"),
    ("eval-over-post-test-by-a-link", lambda e: EVAL + ["--output", link(e, e.run()) / "post_test.json"],
     "run folder's own"),
    ("eval-over-study-json", lambda e: EVAL + ["--output", e.study() / "study.json"], "study folder's own"),
    ("eval-over-the-prior-baseline", lambda e: EVAL + ["--output", e.study() / BASELINES["prior"]],
     "study folder's own"),
    ("heads-over-log", lambda e: HEADS + ["--output", e.run() / "log.jsonl"], "run folder's own"),
    ("heads-over-a-study-run", lambda e: HEADS + ["--output", e.study() / RUN_IN_STUDY / "metrics.json"],
     "run folder's own"),
    ("mix-over-metrics", lambda e: mix(e, "--output", e.run("a") / "metrics.json"), "run folder's own"),
    ("mix-html-over-config", lambda e: mix(e, "--html", e.run("b") / "config.json"), "run folder's own"),
    ("mix-over-the-cc-baseline", lambda e: mix(e, "--output", e.study() / BASELINES["cc"]), "study folder's own"),
    ("report-over-study-json", lambda e: ["report", e.run(), "--output", e.study() / "study.json"],
     "study folder's own"),
]


def link(env: Env, target: Path) -> Path:
    path = env.tmp / "alias"
    path.symlink_to(target)
    return path


@pytest.mark.parametrize("name, build, words", OVERWRITES, ids=[case[0] for case in OVERWRITES])
def test_an_output_over_a_run_or_study_file_is_refused(name, build, words, env, capsys):
    refused(build(env), words, env, capsys)


def test_other_outputs_inside_run_and_study_folders_still_work(env, capsys):
    run, study = env.run(), env.study()
    assert cli(["table", run, "--output", run / "table.md"]) == 0
    assert cli(["table", study, "--output", study / "table1.md"]) == 0  # the study rewrites its tables anyway
    assert (run / "table.md").is_file() and "Table 1" in (study / "table1.md").read_text()


# ------------------------------------------------------------------------------- 4. one study per folder


def hold_study_lock(folder: Path):
    """A second process holding the study's lock (as a running study does); it prints once it holds it."""
    code = ("import sys, time; from abft_lens.training.run_folder import RunLock; "
            "from abft_lens.reporting.study_folder import STUDY_LOCK_FILE\n"
            "with RunLock(sys.argv[1], STUDY_LOCK_FILE):\n    print('locked', flush=True); time.sleep(300)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "new-folder"])
def test_a_second_study_in_the_same_folder_is_refused(fresh, env, capsys):
    out = env.folder("new") if fresh else env.study()
    holder = hold_study_lock(out)
    try:
        refused(study_command(out), f"is in use by another abft-lens process (pid {holder.pid}", env, capsys)
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_study_that_died_is_taken_over(env, capsys):
    from abft_lens.reporting.study_folder import STUDY_LOCK_FILE

    study = env.study()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (study / STUDY_LOCK_FILE).write_text(dead.stdout)
    assert cli(study_command(study)) == 0
    assert not (study / STUDY_LOCK_FILE).exists()


# ------------------------------------------------------------------------------- 5. a study whose files are gone

GONE = {
    "run-folder": lambda s: shutil.rmtree(s / RUN_IN_STUDY),
    "run-metrics": lambda s: (s / RUN_IN_STUDY / "metrics.json").unlink(),
    **{f"{kind}-baseline": (lambda s, k=kind: (s / BASELINES[k]).unlink()) for kind in BASELINES},
}
GONE_KEYS = {"run-folder": "tiny/sst2/ABFT/seed-0", "run-metrics": "tiny/sst2/ABFT/seed-0",
             "vanilla-baseline": "tiny/sst2/vanilla", "cc-baseline": "tiny/sst2/cc",
             "prior-baseline": "tiny/sst2/prior/seed-0"}
MISSING_WORDS = "done in study.json but its files are gone: run the study again to redo it"


@pytest.mark.parametrize("fmt", ["markdown", "html", "csv"])
@pytest.mark.parametrize("gone", list(GONE))
def test_table_shows_done_cells_whose_files_are_gone(gone, fmt, env, capsys):
    study = env.study()
    GONE[gone](study)
    capsys.readouterr()
    assert cli(["table", study, "--format", fmt]) == 0
    out, err = capsys.readouterr()
    if fmt != "csv":
        assert "Missing cells" in out and f"{GONE_KEYS[gone]}: {MISSING_WORDS}" in out
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "1 cell" in warnings[0] and "Missing cells" in warnings[0], err


def test_the_study_redoes_the_missing_cells(env, capsys):
    study = env.study()
    GONE["run-folder"](study)
    GONE["vanilla-baseline"](study)
    assert cli(study_command(study)) == 0
    capsys.readouterr()
    assert cli(["table", study]) == 0
    out, err = capsys.readouterr()
    assert "Missing cells" not in out and err == ""


# ------------------------------------------------------------------------------- 6. mixing non-finite weights

MIX_GRIDS: list[Case] = [
    ("grid-1e300", lambda e: mix(e, "--grid-min", "1e300", "--grid-max", "1e300", "--output", e.tmp / "m.json"),
     "not finite"),
    ("grid-span-overflows", lambda e: mix(e, "--grid-min", "-1e308", "--grid-max", "1e308"), "overflow"),
    ("grid-min-nan", lambda e: mix(e, "--grid-min", "nan"), "is invalid"),
    ("grid-max-inf", lambda e: mix(e, "--grid-max", "inf"), "is invalid"),
    ("grid-step-inf", lambda e: mix(e, "--grid-step", "inf"), "is invalid"),
]


@pytest.mark.parametrize("name, build, words", MIX_GRIDS, ids=[case[0] for case in MIX_GRIDS])
def test_mix_refuses_grids_with_non_finite_weights(name, build, words, env, capsys, monkeypatch):
    from abft_lens.studies import mixing

    monkeypatch.setattr(mixing, "evaluate_prompts", lambda *a, **k: pytest.fail("evaluated non-finite weights"))
    refused(build(env), words, env, capsys, progress=True)


@pytest.mark.parametrize("lambdas, words", [
    (dict(lambdas_e2e=[math.nan]), "λ_E nan is not a finite number"),
    (dict(lambdas_abft=[0.0, math.inf]), "λ_A inf is not a finite number"),
    (dict(lambdas_e2e=[-math.inf]), "λ_E -inf is not a finite number"),
    (dict(lambdas_e2e=[True]), "λ_E True is not a finite number"),
    (dict(lambdas_abft=["1"]), "λ_A '1' is not a finite number"),
    (dict(lambdas_e2e=[1e300]), "not finite"),
    (dict(lambdas_abft=[0.0, -1e45]), "not finite"),
], ids=["nan", "inf", "minus-inf", "bool", "text", "overflow-e2e", "overflow-abft"])
def test_mix_runs_never_evaluates_non_finite_weights(lambdas, words, env, monkeypatch, tiny_loaded):
    from abft_lens.errors import AbftLensError
    from abft_lens.studies import mixing

    before = {name: tensor.clone() for name, tensor in tiny_loaded.state_dict().items()}
    monkeypatch.setattr(mixing, "evaluate_prompts", lambda *a, **k: pytest.fail("evaluated non-finite weights"))
    with pytest.raises(AbftLensError, match=words):
        mixing.mix_runs(tiny_loaded, env.run("a"), env.run("b"), n_test=2, progress=False,
                        **{"lambdas_e2e": [0.0], "lambdas_abft": [0.0], **lambdas})
    assert all(torch.equal(before[name], tensor) for name, tensor in tiny_loaded.state_dict().items())
