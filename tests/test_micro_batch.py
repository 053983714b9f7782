"""Micro-batched training (``TrainConfig.micro_batch_size``) against its reference, the per-sample loop.

A micro-batch of 1 is the per-sample loop (one forward and backward per prompt, unchanged from earlier
versions); every other size must give the same step: loss terms, head counts, the PID input and every trained
tensor, within float32 noise. The restricted gradient is checked at the gradient itself (float64, before the
optimizer step) and shown to differ from the union-of-heads gradient a naive batch would give.

Tolerances: gradients agree to ~4e-7 relative in float32. Adam's first steps move each entry by about
``lr * g / (|g| + eps)``, which turns that noise into up to ``lr * noise / eps`` on the rare entries whose
gradient is near zero; the E2E case (full-vocabulary cross-entropy, larger gradients) therefore runs at
lr 1e-3 so that "within 1e-5 after 2 steps" measures the batching, not Adam's amplification.
"""

from __future__ import annotations

import pytest
import torch

from abft_lens.backends.bridge import is_bridge

from abft_lens.backends.bridge import load_bridge
from abft_lens.backends.loading import EMBEDDED_NAME, load_model
from abft_lens.data.prompts import prompt_builder
from abft_lens.data.tasks import load_task
from abft_lens.errors import AbftLensError
from abft_lens.run_files import TRAINED_FILE
from abft_lens.training.runs import run_training
from abft_lens.training.train import TrainConfig, Trainer
from abft_lens.training.trainable import TrainableConfig

LORA = TrainableConfig(kind="lora", lora_r=4)


@pytest.fixture(scope="module")
def task():
    return load_task("sst2")


def make_trainer(task, model, micro: int, **overrides) -> Trainer:
    """2 steps of 8 prompts; threshold 0.03 lets some heads of the random tiny models pass and others not."""
    values = dict(train_samples=16, pseudo_batch_size=8, epochs=1, lr=1e-2, threshold=0.03, micro_batch_size=micro)
    values.update(overrides)
    return Trainer(model, prompt_builder(model, task), TrainConfig(**values))


def two_steps(task, model, micro: int, **overrides):
    trainer = make_trainer(task, model, micro, **overrides)
    return [trainer.step(batch) for batch in trainer.batches(0)], trainer.trainable.state_dict()


def captured_gradients(trainer: Trainer, batch):
    """(accumulated gradients, StepResult) of one step over ``batch``; the optimizer's step is replaced by a
    capture for this one step, so the weights do not change."""
    got = {}
    trainer.optimizer.step = lambda: got.update(
        {name: p.grad.detach().clone() for name, p in trainer.trainable.named_parameters()})
    result = trainer.step(batch)
    del trainer.optimizer.step
    return got, result


def assert_same_steps(results, reference) -> None:
    for got, ref in zip(results, reference, strict=True):
        assert got.head_counts == ref.head_counts and got.mean_heads == ref.mean_heads
        for field in ("loss", "award_term", "penalty_term", "penalty", "next_penalty"):
            assert getattr(got, field) == pytest.approx(getattr(ref, field), rel=1e-6, abs=1e-6), field
        assert (got.e2e_loss is None) == (ref.e2e_loss is None)
        if ref.e2e_loss is not None:
            assert got.e2e_loss == pytest.approx(ref.e2e_loss, rel=1e-6)


def assert_close_tensors(state, reference, atol: float = 1e-5) -> None:
    assert state.keys() == reference.keys()
    for name in reference:
        assert (state[name] - reference[name]).abs().max() <= atol, name


CASES = {
    "gqa-abft": ("tiny", dict()),
    "mha-abft": ("tiny-mha", dict()),
    "gqa-restricted": ("tiny", dict(restricted_gradient=True)),
    "mha-restricted": ("tiny-mha", dict(restricted_gradient=True)),
    "gqa-restricted-fixed-heads": ("tiny", dict(restricted_gradient=True,
                                                trainable=TrainableConfig(heads=frozenset({(0, 1), (1, 2)})))),
    "gqa-e2e": ("tiny", dict(method="E2E", lr=1e-3)),
    "mha-e2e-restricted-bias": ("tiny-mha", dict(method="E2E", lr=1e-3, restricted_gradient=True,
                                                 trainable=TrainableConfig(bias=True))),
    "gqa-lora-restricted": ("tiny", dict(restricted_gradient=True, trainable=LORA)),
    "gqa-q-only-restricted": ("tiny", dict(restricted_gradient=True, trainable=TrainableConfig(targets=("q",)))),
    "mha-lora": ("tiny-mha", dict(trainable=LORA)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_equal_the_per_sample_loop(task, case):
    spec, overrides = CASES[case]
    reference, ref_state = two_steps(task, load_model(spec), 1, **overrides)
    counts = torch.tensor(reference[0].head_counts)
    assert 0 < counts.sum() < counts.numel() * 8 and (counts < 8).any()  # some heads closed in some prompts
    for micro in (4, 8):
        model = load_model(spec)
        results, state = two_steps(task, model, micro, **overrides)
        assert_same_steps(results, reference)
        # a bridge (Hugging Face's float32 RMSNorm/softmax on left-padded batches): measured 1.8e-5 after 2 steps
        assert_close_tensors(state, ref_state, atol=5e-5 if is_bridge(model) else 1e-5)


def test_micro_batch_of_one_is_the_per_sample_loop_bit_for_bit(task):
    """Size 1 keeps the prompt order and the weight-side masks: bit-identical to itself and to the loop."""
    a, state_a = two_steps(task, load_model("tiny"), 1, restricted_gradient=True)
    b, state_b = two_steps(task, load_model("tiny"), 1, restricted_gradient=True)
    assert [r.loss for r in a] == [r.loss for r in b]
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)


@pytest.mark.parametrize("spec", ["tiny", "tiny-mha"])
def test_batched_restricted_gradient_is_exactly_the_per_sample_sum(task, spec):
    """float64: one micro-batch of 8 gives the per-sample loop's gradient to 1e-12, and the union-of-heads
    gradient (one mask for the whole batch, what a naive batched restriction computes) is clearly different."""
    model = load_model(spec, dtype=torch.float64)
    reference_trainer = make_trainer(task, model, 1, restricted_gradient=True)
    prompts = reference_trainer.prompts[:8]
    reference, _ = captured_gradients(reference_trainer, prompts)
    reference_trainer.trainable.merge()
    trainer = make_trainer(task, model, 8, restricted_gradient=True)
    batched, _ = captured_gradients(trainer, prompts)
    # a bridge runs Hugging Face's Llama, whose RMSNorm and attention softmax are float32 in every dtype: a
    # left-padded batch then differs from the prompt alone at float32 precision (measured up to 1.2e-11 on gradients of 1e-2; equal-length prompts: 6e-17)
    tolerance = dict(rtol=1e-9, atol=1e-10) if is_bridge(model) else dict(rtol=1e-12, atol=1e-14)
    for name in reference:
        torch.testing.assert_close(batched[name], reference[name], **tolerance, msg=name)
    samples, participating = trainer._micro_batch_loss(prompts, trainer.controller.penalty)
    trainer.optimizer.zero_grad(set_to_none=True)
    with trainer.trainable.restricted(participating.any(0)):
        (sum(terms.loss for terms, _ in samples) / len(prompts)).backward()
    union = {name: p.grad for name, p in trainer.trainable.named_parameters()}
    assert max(float((union[n] - reference[n]).norm() / reference[n].norm()) for n in reference) > 1e-3


def test_restricted_masks_must_fit_the_batch(task):
    model = load_model("tiny")
    trainer = make_trainer(task, model, 4, restricted_gradient=True)
    samples, participating = trainer._micro_batch_loss(trainer.prompts[:4], 0.5)
    with pytest.raises(ValueError, match="per-sample head masks"):
        with trainer.trainable.restricted(participating[:3]):
            sum(terms.loss for terms, _ in samples).backward()


def test_bridge_lora_micro_batches_equal_the_per_sample_loop(task, hf_llama_dir):
    """PEFT LoRA on a (full-precision) TransformerBridge routes each prompt by its own heads too."""
    def bridge():
        return load_bridge(hf_llama_dir, name="t", source="hf-folder", quantize=False)

    overrides = dict(restricted_gradient=True, trainable=LORA, threshold=0.2)
    reference, ref_state = two_steps(task, bridge(), 1, **overrides)
    counts = torch.tensor(reference[0].head_counts)
    assert 0 < counts.sum() < counts.numel() * 8
    results, state = two_steps(task, bridge(), 4, **overrides)
    assert_same_steps(results, reference)
    assert_close_tensors(state, ref_state)


def test_4bit_bridge_trains_in_micro_batches_and_keeps_closed_heads(task, hf_llama_dir):
    model = load_model(str(hf_llama_dir), quantized=True)
    trainer = make_trainer(task, model, 4, restricted_gradient=True, trainable=LORA, threshold=0.2,
                           train_samples=8)
    result = trainer.step(trainer.prompts)
    state = trainer.trainable.state_dict()
    counts = torch.tensor(result.head_counts)
    for layer in range(2):
        rows = state[f"blocks.{layer}.attn.W_Q.lora_B"].view(4, 8, -1).abs().sum((1, 2))
        assert torch.equal(rows > 0, counts[layer] > 0)  # B rows move exactly for heads open in some prompt


# ---------------------------------------------------------------------------------------------- resume


def test_resume_mid_pseudo_batch_is_bit_identical(task, tmp_path, monkeypatch):
    """A crash inside step 2's second micro-batch resumes from step 1's checkpoint to the same weights."""
    config = TrainConfig(train_samples=16, pseudo_batch_size=8, epochs=2, lr=1e-2, threshold=0.03,
                         restricted_gradient=True, micro_batch_size=4)

    def train(run_dir):
        return run_training(load_model("tiny"), task, config, run_dir=run_dir, n_test=4, progress=False)

    train(tmp_path / "ref")
    original, calls = Trainer._micro_batch_loss, []

    def crash_in_step_2(self, prompts, penalty):
        calls.append(len(prompts))
        if len(calls) == 4:  # step 1: calls 1-2; step 2: call 3, then this one
            raise KeyboardInterrupt
        return original(self, prompts, penalty)

    monkeypatch.setattr(Trainer, "_micro_batch_loss", crash_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run")
    monkeypatch.setattr(Trainer, "_micro_batch_loss", original)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    resumed = run_training(load_model("tiny"), task, config, run_dir=tmp_path / "run", n_test=4, progress=False,
                           resume=True)
    assert [s["step"] for s in resumed.steps] == [2, 3, 4]
    from safetensors.torch import load_file

    got, ref = load_file(tmp_path / "run" / TRAINED_FILE), load_file(tmp_path / "ref" / TRAINED_FILE)
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)


# ---------------------------------------------------------------------------------------------- bfloat16


def test_bfloat16_autocast_trains_float32_master_weights(task):
    """bfloat16 compute: the trained tensors, their gradients and Adam's state stay float32; the loss and the
    filter agree with float32 on the same prompts up to bfloat16 rounding."""
    reference = make_trainer(task, load_model("tiny"), 8, restricted_gradient=True)
    ref_grads, _ = captured_gradients(reference, reference.prompts[:8])
    trainer = make_trainer(task, load_model("tiny"), 8, restricted_gradient=True, compute_dtype="bfloat16")
    grads, _ = captured_gradients(trainer, trainer.prompts[:8])
    assert all(g.dtype == torch.float32 for g in grads.values())
    for name in ref_grads:
        assert float((grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()) < 0.1, name
    result = trainer.step(trainer.prompts[8:])
    assert all(p.dtype == torch.float32 for p in trainer.trainable.parameters())
    assert all(v.dtype == torch.float32 for state in trainer.optimizer.state.values() for k, v in state.items()
               if k != "step")
    ref_result = make_trainer(task, load_model("tiny"), 8, restricted_gradient=True).step(reference.prompts[8:])
    assert result.loss == pytest.approx(ref_result.loss, rel=0.05)
    agree = (torch.tensor(result.head_counts) == torch.tensor(ref_result.head_counts)).float().mean()
    assert agree >= 0.75


def test_bfloat16_evaluation_is_autocast_and_close_to_float32(task):
    """``label_probabilities(compute_dtype="bfloat16")`` really computes in bfloat16 (its probabilities differ
    from float32's) and stays close to float32 (bfloat16 rounding only)."""
    from abft_lens.data.prompts import pad_token_id, test_prompts
    from abft_lens.evaluation.evaluator import label_probabilities

    model = load_model("tiny")
    builder = prompt_builder(model, task)
    prompts = test_prompts(builder, 4, 16)
    probs = {dtype: label_probabilities(model, prompts, builder.label_token_ids, pad_id=pad_token_id(builder.tokenizer),
                                        batch_size=8, compute_dtype=dtype) for dtype in (None, "bfloat16")}
    difference = float((probs["bfloat16"] - probs[None]).abs().max())
    assert probs["bfloat16"].dtype == torch.float32 and 0 < difference < 0.05


def test_bfloat16_run_validates_under_autocast_and_tests_in_float32(task, monkeypatch):
    """A bfloat16 run's validation passes (which steer training) run under bfloat16 autocast; its fore and post
    tests (the reported numbers) run in the weights' float32."""
    from abft_lens.evaluation import evaluator

    seen, forward = [], evaluator.forward_residual

    def recording(model, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(evaluator, "forward_residual", recording)
    config = TrainConfig(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-3, micro_batch_size=4,
                         compute_dtype="bfloat16", validation_examples=64, validation_prompts=4,
                         validate_every=1)
    run_training(load_model("tiny"), task, config, n_test=4, batch_size=4, progress=False)
    # fore test, validation at steps 0, 1, 2, post test: one batch of 4 prompts each
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("bad", [dict(micro_batch_size=0), dict(micro_batch_size=2.5),
                                 dict(compute_dtype="float16")])
def test_bad_micro_batch_or_compute_dtype_is_an_abft_lens_error(bad):
    with pytest.raises(AbftLensError):
        TrainConfig(**bad)


def test_default_micro_batch_and_round_trips(task):
    """The default follows the memory budget (abft_lens.training.step_cost, tests/test_step_cost.py): on tiny,
    whose activations are small, the whole pseudo-batch of 8."""
    trainer = make_trainer(task, load_model("tiny"), None)
    assert trainer.micro_batch_size == 8 and "memory budget" in trainer.micro_batch_reason
    config = TrainConfig(micro_batch_size=4, compute_dtype="bfloat16")
    assert TrainConfig.from_dict(config.to_dict()) == config
    sizes = [len(chunk) for chunk in trainer.micro_batches(trainer.prompts[:11])]
    assert sizes == [8, 3]
    lengths = [p.n_tokens for chunk in trainer.micro_batches(trainer.prompts[:11]) for p in chunk]
    assert lengths == sorted(lengths)


# ---------------------------------------------------------------------------------------------- embedded


@pytest.mark.embedded
def test_embedded_micro_batch_gradients_equal_the_per_sample_loop(task):
    """SmolLM2-135M, 4 prompts, restricted ABFT: loss, head counts and every W_Q/W_K gradient of one step."""
    model = load_model(EMBEDDED_NAME)
    results = {}
    for micro in (1, 4):
        trainer = make_trainer(task, model, micro, restricted_gradient=True, threshold=None, train_samples=4,
                               pseudo_batch_size=4)
        results[micro] = captured_gradients(trainer, trainer.prompts)
        trainer.trainable.merge()
    (ref, ref_result), (got, result) = results[1], results[4]
    assert_same_steps([result], [ref_result])
    for name in ref:
        denominator = ref[name].norm()
        assert float((got[name] - ref[name]).norm() / max(denominator, 1e-12)) < 1e-5, name
    assert any(ref[name].abs().sum() > 0 for name in ref)


# ---------------------------------------------------------------------------------------------- command line


def test_cli_micro_batch_and_bfloat16_train_end_to_end(tmp_path, capsys):
    import json

    from abft_lens.cli import main

    run_dir = tmp_path / "run"
    code = main(["train", "--model", "tiny", "--dataset", "sst2", "--train-samples", "8", "--pseudo-batch-size", "4",
                 "--epochs", "1", "--n-test", "4", "--micro-batch-size", "4", "--dtype", "bfloat16",
                 "--restricted-gradient", "--run-dir", str(run_dir)])
    assert code == 0 and (run_dir / TRAINED_FILE).is_file()
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["train"]["micro_batch_size"] == 4 and meta["train"]["compute_dtype"] == "bfloat16"
    assert meta["model"]["dtype"] == "float32"  # float32 master weights; bfloat16 is the compute dtype


def test_cli_refuses_bfloat16_with_a_4bit_base(capsys):
    from abft_lens.cli import main

    assert main(["train", "--model", "tiny", "--quantized", "--dtype", "bfloat16", "--n-test", "4"]) == 2
    assert "--quantized" in capsys.readouterr().err
