"""Export of a run as a Hugging Face folder (and PEFT adapter): the exported model computes the tuned hooked
model's logits. Tiny runs go through a tiny random HF Llama folder (tiny hooked models have no HF folder)."""

from __future__ import annotations

import json

import pytest
import torch

from abft_lens.errors import AbftLensError
from abft_lens.reporting.export import ADAPTER_DIR, export_run
from abft_lens.backends.loading import load_model
from abft_lens.backends.provenance import model_info
from abft_lens.training.runs import run_training
from abft_lens.data.tasks import load_task
from abft_lens.training.train import TrainConfig
from abft_lens.training.trainable import TrainableConfig

PROMPTS = ["Review: a fine film\nSentiment: positive\nReview: dull\nSentiment:", "the cat sat on the mat"]
TOL = 1e-4


def _train(folder, run_dir, trainable=TrainableConfig()):
    model = load_model(str(folder))
    config = TrainConfig(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0, trainable=trainable)
    run = run_training(model, load_task("sst2"), config, run_dir=run_dir, n_test=8, progress=False)
    run.apply_to(model)  # run_training gives the model back untouched
    return model


def _max_logit_diff(model, hf_model) -> float:
    worst = 0.0
    for text in PROMPTS:
        ids = model.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            hooked, hf = model(ids), hf_model(ids).logits
        worst = max(worst, (hooked - hf).abs().max().item())
    return worst


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _changed(base, exported, name) -> bool:
    return not torch.equal(base.get_parameter(name), exported.get_parameter(name))


@pytest.mark.parametrize("trainable", [TrainableConfig(), TrainableConfig(bias=True)], ids=["full", "full+bias"])
def test_full_round_trip(hf_llama_dir, tmp_path, no_network, trainable):
    loaded = _train(hf_llama_dir, tmp_path / "run", trainable)
    result = export_run(tmp_path / "run", tmp_path / "out")
    exported, base = _hf(tmp_path / "out"), _hf(hf_llama_dir)
    diff = _max_logit_diff(loaded, exported)
    print(f"export round trip ({'+'.join(filter(None, ['full', 'bias' * trainable.bias]))}): max |logit diff| {diff:.2e}")
    assert diff < TOL
    # the run changed the weights (else the comparison proves nothing), and only q_proj/k_proj (+ their biases)
    assert _changed(base, exported, "model.layers.0.self_attn.q_proj.weight")
    assert _changed(base, exported, "model.layers.1.self_attn.k_proj.weight")
    assert _max_logit_diff(load_model(str(hf_llama_dir)), base) < TOL  # the base itself agrees too
    for name, p in base.named_parameters():
        if not name.endswith(("q_proj.weight", "k_proj.weight")):
            assert torch.equal(p, exported.get_parameter(name)), name
    assert sorted(result.changed) == sorted(
        f"model.layers.{l}.self_attn.{p}.{w}" for l in range(2) for p in ("q_proj", "k_proj")
        for w in (("weight", "bias") if trainable.bias else ("weight",)))
    assert result.attention_bias_added == trainable.bias and exported.config.attention_bias == trainable.bias
    if trainable.bias:
        assert exported.model.layers[0].self_attn.q_proj.bias.abs().max() > 0
        assert torch.equal(exported.model.layers[0].self_attn.v_proj.bias, torch.zeros(16))
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_lora_round_trip_and_peft_adapter(hf_llama_dir, tmp_path, no_network):
    trainable = TrainableConfig(kind="lora", lora_r=4, lora_alpha=8.0)
    loaded = _train(hf_llama_dir, tmp_path / "run", trainable)
    result = export_run(tmp_path / "run", tmp_path / "out", peft=True)
    diff = _max_logit_diff(loaded, _hf(tmp_path / "out"))
    print(f"export round trip (lora merged): max |logit diff| {diff:.2e}")
    assert diff < TOL

    adapter = tmp_path / "out" / ADAPTER_DIR
    assert result.adapter_dir == adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["k_proj", "q_proj"]
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"
    assert set(tensors) == {key.format(l, p, ab) for l in range(2) for p in ("q_proj", "k_proj") for ab in "AB"}
    assert tensors[key.format(0, "q_proj", "A")].shape == (4, 32)
    assert tensors[key.format(0, "q_proj", "B")].shape == (32, 4)  # 4 query heads x d_head 8
    assert tensors[key.format(0, "k_proj", "B")].shape == (16, 4)  # 2 kv heads x d_head 8
    assert tensors[key.format(1, "k_proj", "B")].abs().max() > 0

    peft = pytest.importorskip("peft")
    with_adapter = peft.PeftModel.from_pretrained(_hf(hf_llama_dir), adapter).eval()
    diff = _max_logit_diff(loaded, with_adapter)
    print(f"PEFT adapter on the base: max |logit diff| {diff:.2e}")
    assert diff < TOL


def test_model_card_names_settings_metrics_and_licence(hf_llama_dir, tmp_path):
    _train(hf_llama_dir, tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for text in ("| method | ABFT |", "| dataset | sst2 |", "| k (demonstrations) | 4 |", "| learning rate | 0.01 |",
                 "| steps | 2 |", "| seed | 0 |", "| trainable | full |", "license: other",
                 f"| accuracy | {metrics['fore']['accuracy']:.4f} | {metrics['post']['accuracy']:.4f} |"):
        assert text in card, text
    info = json.loads((tmp_path / "out" / "abft_lens_run.json").read_text())
    assert info["metrics"] == metrics and info["config"]["train"]["lr"] == 0.01


def test_model_card_licence_lines():
    from abft_lens.reporting.export import model_card

    meta = {"train": TrainConfig().to_dict(), "model": {"name": "smollm2-135m", "source": "embedded"},
            "task": {"name": "sst2"}, "n_test": 8}
    card = model_card(meta, None)
    assert "license: apache-2.0" in card and "Apache-2.0" in card and "HuggingFaceTB/SmolLM2-135M-Instruct" in card
    meta["model"]["name"] = "gemma3-270m"
    card = model_card(meta, None)
    assert "license: gemma" in card and "Gemma Terms of Use" in card and "google/gemma-3-270m" in card


def test_refusals(hf_llama_dir, tmp_path):
    _train(hf_llama_dir, tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(AbftLensError, match="never overwrites"):
        export_run(tmp_path / "run", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(AbftLensError, match="--peft needs a LoRA run"):
        export_run(tmp_path / "run", tmp_path / "new", peft=True)
    assert not (tmp_path / "new").exists()
    with pytest.raises(AbftLensError, match="not an abft-lens run"):
        export_run(tmp_path, tmp_path / "new")
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    export_run(tmp_path / "run", tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_tiny_hooked_run_has_no_hf_folder(tmp_path):
    model = load_model("tiny")
    config = TrainConfig(train_samples=4, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0)
    run_training(model, load_task("sst2"), config, run_dir=tmp_path / "run", n_test=4, progress=False,
                 fore_test=False, post_test=False)
    with pytest.raises(AbftLensError, match="no Hugging Face folder"):
        export_run(tmp_path / "run", tmp_path / "out")


def test_cli_export(hf_llama_dir, tmp_path, capsys):
    from abft_lens.cli import main

    _train(hf_llama_dir, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 2
    assert "never overwrites" in capsys.readouterr().err


@pytest.mark.embedded
def test_embedded_export_round_trip(tmp_path, no_network):
    """SmolLM2-135M, a one-step run (lr 1e-3 so the weights move), exported and reloaded with transformers."""
    config = TrainConfig(train_samples=2, pseudo_batch_size=2, epochs=1, lr=1e-3, threshold=0.0)
    loaded = load_model("smollm2-135m")  # a fresh copy: the run's tensors are applied to it below
    run = run_training(loaded, load_task("sst2"), config, run_dir=tmp_path / "run", n_test=2, progress=False)
    run.apply_to(loaded)
    export_run(tmp_path / "run", tmp_path / "out")
    exported = _hf(tmp_path / "out")
    diff = _max_logit_diff(loaded, exported)
    print(f"embedded export round trip: max |logit diff| {diff:.2e}")
    assert diff < TOL
    assert not torch.equal(exported.model.layers[0].self_attn.q_proj.weight,
                           _hf(model_info(loaded).hf_dir).model.layers[0].self_attn.q_proj.weight)
    assert "license: apache-2.0" in (tmp_path / "out" / "README.md").read_text()
