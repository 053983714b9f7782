"""The train/demo command line: the original prototype flag spellings, skipped stages, options that are not
supported yet, bad values (exit 2, one message, no traceback) and ``eval --run`` reproducing a run."""

from __future__ import annotations

import json

import pytest

from abft_lens.cli import build_parser, main
from abft_lens.training.presets import preset

PROTOTYPE = [
    "train", "--ICL_model_name", "tiny", "--ICL_dataset_index", "0", "--method", "ABFT", "--ICL_k", "4",
    "--correct_label_award", "1.0", "--wrong_label_penalty", "0.5", "--train_sample_num", "8", "--lr", "1e-3",
    "--pseudo_batch_size", "4", "--epoch", "1", "--random_seed", "0", "--self_adaption_loss", "PID",
    "--PID_param_P", "0.03", "--PID_param_I", "0.005", "--PID_param_D", "0.005", "--restricted_gradient",
    "--lora_r", "4",
]
QUICK = ["train", "--model", "tiny", "--dataset", "sst2", "--train-samples", "8", "--pseudo-batch-size", "4",
         "--epochs", "1", "--n-test", "8"]



def cli(argv: list[str]) -> int:
    """``main`` as the shell sees it: argparse's own errors exit through SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture(scope="module")
def prototype_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "prototype"
    code = cli(PROTOTYPE + ["--run-dir", run_dir, "--n-test", "8"])
    return code, run_dir


def test_prototype_spellings_train_and_write_the_run_folder(prototype_run):
    code, run_dir = prototype_run
    assert code == 0
    for name in ("config.json", "log.jsonl", "fore_test.json", "post_test.json", "metrics.json",
                 "trained.safetensors"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint.pt").exists()
    meta = json.loads((run_dir / "config.json").read_text())
    train = meta["train"]
    assert meta["model"]["name"] == "tiny" and meta["task"]["name"] == "sst2" and meta["n_test"] == 8
    assert train["method"] == "ABFT" and train["k"] == 4
    assert (train["award"], train["penalty"]) == (1.0, 0.5)
    assert (train["train_samples"], train["pseudo_batch_size"], train["epochs"], train["seed"]) == (8, 4, 1, 0)
    assert train["lr"] == 1e-3
    assert (train["penalty_mode"], train["pid_kp"], train["pid_ki"], train["pid_kd"]) == ("PID", 0.03, 0.005, 0.005)
    assert train["restricted_gradient"] is True
    assert train["trainable"]["kind"] == "lora" and train["trainable"]["lora_r"] == 4
    assert [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2]
    from safetensors.torch import load_file

    assert {name.rsplit(".", 1)[1] for name in load_file(run_dir / "trained.safetensors")} == {"lora_A", "lora_B"}


def test_eval_with_run_reproduces_the_post_test(prototype_run, tmp_path, capsys):
    _, run_dir = prototype_run
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", "tiny", "--dataset", "0", "--n-test", "8", "--run", run_dir,
                "--output", out]) == 0
    post = json.loads((run_dir / "post_test.json").read_text())
    again = json.loads(out.read_text())
    assert again["metrics"] == post["metrics"]
    assert again["per_prompt"] == post["per_prompt"]
    assert again["run"] == str(run_dir)
    assert f"{post['metrics']['accuracy']:.4f}" in capsys.readouterr().out


def test_p_mode_gain_and_skipped_stages_reach_the_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli(QUICK + ["--self_adaption_loss", "P", "--loss_adaption_factor_for_P", "0.07", "--ICL_k", "3",
                        "--no_fore_test", "--no_post_test", "--dont_save_model", "--run-dir", run_dir])
    assert code == 0
    train = json.loads((run_dir / "config.json").read_text())["train"]
    assert (train["penalty_mode"], train["p_gain"], train["k"]) == ("P", 0.07, 3)
    assert train["lr"] == 2e-5 and train["trainable"]["kind"] == "full"  # defaults without LoRA
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "log.jsonl", "metrics.json"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["fore"] is None and metrics["post"] is None and metrics["steps"] == 2
    assert f"run folder: {run_dir}" in capsys.readouterr().out


def test_existing_and_complete_run_dirs_are_refused(prototype_run, capsys):
    _, run_dir = prototype_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    capsys.readouterr()
    assert cli(PROTOTYPE + ["--run-dir", run_dir, "--n-test", "8"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli(PROTOTYPE + ["--run-dir", run_dir, "--n-test", "8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "already complete" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("option, words", [
    (["--quantized"], "needs a Hugging Face model behind the model spec"),  # tiny hooked models have no HF folder
    (["--quantized", "--train-bias"], "--train-bias cannot be combined with --quantized"),
    (["--quantized", "--dtype", "bfloat16"], "drop --dtype with --quantized"),
    (["--quantized", "--MAUVE_test", "--MAUVE_prefix", __file__], "--MAUVE-test cannot run on a 4-bit"),
])
def test_quantized_refusals_exit_2_with_one_message(tmp_path, capsys, option, words):
    run_dir = tmp_path / "run"
    assert cli(QUICK + option + ["--run-dir", run_dir]) == 2
    captured = capsys.readouterr()
    assert words in captured.err
    assert captured.err.count("error:") == 1 and "Traceback" not in captured.err
    assert not run_dir.exists()


def test_quantized_train_and_eval_through_the_cli(hf_llama_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [hf_llama_dir if a == "tiny" else a for a in QUICK]  # a tiny Llama folder instead of the hooked tiny
    assert cli(argv + ["--quantized", "--run-dir", run_dir]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["quantized"] is True
    assert config["train"]["trainable"]["kind"] == "lora" and config["train"]["trainable"]["lora_r"] == 16
    assert config["train"]["lr"] == 1e-4  # the LoRA default
    post = json.loads((run_dir / "post_test.json").read_text())
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", hf_llama_dir, "--quantized", "--run", run_dir, "--n-test", "8",
                "--output", out]) == 0
    assert json.loads(out.read_text())["metrics"] == post["metrics"]


@pytest.mark.parametrize("bad, words", [
    (["--lr", "-1"], "lr"),
    (["--lr", "0"], "lr"),
    (["--epoch", "0"], "must be a positive integer"),
    (["--train_sample_num", "0"], "must be a positive integer"),
    (["--keep-best"], "--keep-best needs a validation set"),
    (["--wrong_label_penalty", "-1"], "--penalty -1.0 must be a finite number >= 0"),
    (["--method", "SFT"], "invalid choice"),
    (["--lora_r", "-1"], "--lora-r -1 must be >= 0"),
    (["--validation-examples", "32", "--validate-every", "-1"], "--validate-every -1"),
])
def test_bad_values_exit_2_with_one_message(tmp_path, capsys, bad, words):
    run_dir = tmp_path / "run"
    assert cli(QUICK + bad + ["--run-dir", run_dir]) == 2
    err = capsys.readouterr().err
    assert words in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not run_dir.exists()


def test_resume_without_run_dir_is_refused(capsys):
    assert cli(QUICK + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume needs the --run-dir" in err and err.count("error:") == 1


def test_learning_rate_defaults_follow_the_trainable_set():
    from abft_lens.cli.train_command import train_config_from_args

    parse = build_parser().parse_args
    assert train_config_from_args(parse(QUICK)).lr == 2e-5
    lora = train_config_from_args(parse(QUICK + ["--lora_r", "4"]))
    assert lora.lr == 1e-4 and lora.trainable.kind == "lora" and lora.trainable.lora_r == 4
    assert train_config_from_args(parse(QUICK + ["--lora_r", "4", "--lr", "3e-3"])).lr == 3e-3


def test_demo_defaults_and_a_tiny_demo_run(tmp_path, capsys):
    from abft_lens.cli.train_command import train_config_from_args

    args = build_parser().parse_args(["demo"])
    config = train_config_from_args(args)
    for name, value in preset("demo").train.items():
        assert getattr(config, name) == value, name
    assert config.preset == "demo" and args.n_test == preset("demo").n_test == 256
    assert args.model == "smollm2-135m" and args.dataset == "sst2" and args.k == 4

    run_dir = tmp_path / "demo"
    code = cli(["demo", "--model", "tiny", "--train-samples", "8", "--pseudo-batch-size", "4",
                "--validation-prompts", "8", "--n-test", "8", "--threshold", "0.03", "--run-dir", run_dir])
    assert code == 0
    train = json.loads((run_dir / "config.json").read_text())["train"]
    assert train["keep_best"] is True and train["validation_examples"] == 256 and train["lr"] == 5e-4
    assert train["threshold"] == 0.03
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["kept_best"] is True and metrics["best_validation_step"] in (0, 1, 2)
    validations = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations if v["event"] == "validation"] == [0, 2]
    assert "best validation step" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- --dtype auto


@pytest.mark.parametrize("native, picked", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_picks_bfloat16_where_it_is_native_and_says_why(native, picked, tmp_path, monkeypatch):
    """``--dtype auto`` follows :func:`abft_lens.backends.cpu.native_bf16` (monkeypatched: the test does not
    depend on this CPU); config.json records the pick and its reason; the weights stay float32."""
    from abft_lens.backends import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    run_dir = tmp_path / "run"
    assert cli(QUICK + ["--dtype", "auto", "--device", "cpu", "--run-dir", run_dir]) == 0
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["train"]["compute_dtype"] == ("bfloat16" if native else None)
    assert meta["model"]["dtype"] == "float32"
    resolved = meta["resolved"]["compute_dtype"]
    assert resolved["value"] == picked and resolved["reason"].startswith("--dtype auto: ")
    assert ("this CPU has native bfloat16" in resolved["reason"]) is native
    assert "memory budget" in meta["resolved"]["micro_batch_size"]["reason"]


def test_dtype_auto_on_cuda_and_with_a_4bit_base(monkeypatch):
    from abft_lens.cli import common
    from abft_lens.backends import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    parse = build_parser().parse_args
    args = parse(QUICK + ["--dtype", "auto"])
    monkeypatch.setattr(common, "resolve_device", lambda name: "cuda")
    assert common.resolve_dtype(args) == "--dtype auto: bfloat16 on CUDA" and args.dtype == "bfloat16"
    args = parse(QUICK + ["--dtype", "auto", "--quantized"])
    assert common.resolve_dtype(args).startswith("--dtype auto with --quantized: float32") and args.dtype == "float32"
    args = parse(QUICK + ["--dtype", "float32"])
    assert common.resolve_dtype(args) is None and args.dtype == "float32"


def test_demo_stays_float32_and_eval_records_the_auto_pick(tmp_path, monkeypatch):
    from abft_lens.backends import cpu
    from abft_lens.cli.train_command import train_config_from_args

    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert train_config_from_args(build_parser().parse_args(["demo"])).compute_dtype is None
    output = tmp_path / "eval.json"
    assert cli(["eval", "--model", "tiny", "--n-test", "4", "--dtype", "auto", "--device", "cpu",
                "--output", output]) == 0
    info = json.loads(output.read_text())
    assert info["dtype"] == "bfloat16" and info["dtype_reason"].startswith("--dtype auto: this CPU has native")


def test_study_dtype_auto_is_resolved_once_for_its_settings_and_runs(monkeypatch, tmp_path):
    """A study records the dtype ``auto`` picked (its settings name a real dtype), and its trained cells'
    recipes carry the reason to their config.json."""
    from abft_lens.backends import cpu
    from abft_lens.cli.study_command import study_config_from_args
    from abft_lens.studies.study_plan import parse_methods

    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    args = build_parser().parse_args(["study", "--out", str(tmp_path / "s"), "--dtype", "auto", "--device", "cpu",
                                      "--methods", "ABFT", "--models", "tiny", "--datasets", "sst2"])
    config = study_config_from_args(args)
    settings = config.settings()
    assert settings["dtype"] == "bfloat16" and "dtype_reason" not in settings
    recipe = config.recipe_for(parse_methods(["ABFT"])[0])
    assert recipe.config.compute_dtype == "bfloat16" and recipe.dtype_reason.startswith("--dtype auto: this CPU")


def test_train_runs_its_pre_flight_checks_once(tmp_path, monkeypatch):
    """``abft-lens train`` checks the folder and the task's sizes before it loads the model; run_training then
    does not check them again."""
    from abft_lens.training import runs

    calls = []
    real = runs.check_run

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "check_run", counting)
    assert cli(QUICK + ["--run-dir", tmp_path / "run"]) == 0
    assert len(calls) == 1
