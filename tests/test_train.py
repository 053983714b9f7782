"""The training loop (abft_lens.training.train): what one ABFT/E2E step changes and logs, the direction training
moves attention, reproducibility, and the training/validation data split.

Every expectation is recomputed independently of the Trainer: attention rows come from TransformerLens's own
``run_with_cache`` (not the training hooks), logits from a full forward pass, head counts by hand.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from abft_lens.backends import qk
from conftest import named_tensors
import torch.nn.functional as F

from abft_lens.interp.capture import capture_attention_rows
from abft_lens.backends.forward import forward_residual
from abft_lens.errors import AbftLensError
from abft_lens.data.prompts import prompt_builder
from abft_lens.backends.loading import load_model
from abft_lens.training.objectives import PenaltyController, abft_loss
from abft_lens.data.prompts import ICLPrompt, PromptBuilder
from abft_lens.data.tasks import Example, load_task
from abft_lens.training.train import TrainConfig, Trainer, training_pool, validation_prompts
from abft_lens.training.trainable import TrainableConfig



@pytest.fixture(scope="module")
def task():
    return load_task("sst2")


def make_trainer(task, spec: str = "tiny", **overrides) -> Trainer:
    """A Trainer on a fresh tiny model (same seed -> same weights) with small, fast settings."""
    values = dict(train_samples=8, pseudo_batch_size=4, epochs=1, lr=1e-2, threshold=0.0)
    values.update(overrides)
    loaded = load_model(spec)
    return Trainer(loaded, prompt_builder(loaded, task), TrainConfig(**values))


def params(model) -> dict[str, torch.Tensor]:
    return named_tensors(model)  # the Q/K tensors by TransformerLens name and layout on either version


def k_name(model) -> str:
    return "_W_K" if model.cfg.n_key_value_heads else "W_K"


def last_rows(model, prompt: ICLPrompt) -> torch.Tensor:
    """[layer, head, key] last attention rows from run_with_cache (independent of the training hooks)."""
    tokens = torch.tensor([prompt.token_ids])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=torch.ones_like(tokens),
                                        names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1, :] for l in range(model.cfg.n_layers)])


def label_mass(model, prompt: ICLPrompt) -> torch.Tensor:
    """[layer, head] S = attention mass of the last token on the demonstration label positions."""
    return last_rows(model, prompt)[:, :, list(prompt.label_positions)].sum(-1)


def gold_cross_entropy(model, builder: PromptBuilder, prompt: ICLPrompt) -> float:
    tokens = torch.tensor([prompt.token_ids])
    with torch.no_grad():
        logits = model(tokens, attention_mask=torch.ones_like(tokens))[0, -1]
    return float(-F.log_softmax(logits.double(), -1)[builder.label_token_ids[prompt.query_label]])


def expected_terms(model, prompt: ICLPrompt, config: TrainConfig, penalty: float):
    return abft_loss(last_rows(model, prompt), torch.tensor(prompt.label_positions),
                     torch.tensor(prompt.demo_labels), prompt.query_label,
                     award=config.award, penalty=penalty, threshold=config.threshold)


def split_threshold(masses: torch.Tensor, min_gap: float = 1e-4) -> float:
    """A threshold between the per-head maxima over ``masses`` [sample, layer, head] such that half of the
    heads pass in some sample and the other half in none; checked to sit well away from every value."""
    top = masses.amax(0).flatten().sort().values
    middle = len(top) // 2
    threshold = float(top[middle - 1] + top[middle]) / 2
    assert float((masses - threshold).abs().min()) > min_gap, "threshold too close to a measured mass"
    return threshold


# ----------------------------------------------------------------------------------------------- step


@pytest.mark.parametrize("method", ["ABFT", "E2E"])
def test_step_changes_only_w_q_and_w_k(task, method):
    trainer = make_trainer(task, method=method)
    model = trainer.model
    before = params(model)
    trainer.step(trainer.prompts[:4])
    after = params(model)
    trained = {name for name, _ in trainer.trainable.named_parameters()}
    assert trained == {f"blocks.{l}.attn.{w}" for l in range(2) for w in ("W_Q", k_name(model))}
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} did not move"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed but is not trainable"


def test_step_logs_independently_recomputed_loss_heads_and_penalty(task):
    """Four ABFT steps with a penalty that moves: every step's loss, terms and head counts match abft_loss
    on run_with_cache rows with the controller's A before the step; the controller matches a reference."""
    trainer = make_trainer(task, pseudo_batch_size=2, penalty_mode="PID", pid_kp=0.5, pid_ki=0.3, pid_kd=0.1,
                           lr=5e-3)
    model, config = trainer.model, trainer.config
    all_masses = torch.stack([label_mass(model, p) for p in trainer.prompts])
    # a threshold between the median masses: the number of passing heads varies from batch to batch
    config.threshold = float(all_masses.flatten().median()) + 1e-5
    reference = PenaltyController("PID", initial_penalty=config.penalty, kp=0.5, ki=0.3, kd=0.1)
    penalties = []
    for index, batch in enumerate(trainer.batches(0)):
        penalty = trainer.controller.penalty
        masses = torch.stack([label_mass(model, p) for p in batch])
        assert float((masses - config.threshold).abs().min()) > 1e-6
        terms = [expected_terms(model, p, config, penalty) for p in batch]
        counts = (masses > config.threshold).long().sum(0)
        result = trainer.step(batch)
        assert result.step == index + 1
        assert result.penalty == penalty
        assert result.loss == pytest.approx(sum(float(t.loss) for t in terms) / len(batch), rel=1e-5, abs=1e-7)
        assert result.award_term == pytest.approx(sum(float(t.award_term) for t in terms) / len(batch), rel=1e-5)
        assert result.penalty_term == pytest.approx(sum(float(t.penalty_term) for t in terms) / len(batch),
                                                    rel=1e-5, abs=1e-7)
        assert result.e2e_loss is None
        assert result.head_counts == counts.tolist()
        assert result.mean_heads == float(counts.sum()) / len(batch)
        assert result.next_penalty == reference.update(result.mean_heads)
        assert trainer.controller.penalty == result.next_penalty
        penalties.append(result.penalty)
    assert trainer.controller.history == reference.history
    assert len({r[1] for r in reference.history}) > 1, "head counts never varied: the check is too weak"
    assert len(set(penalties)) > 1, "the penalty never moved: the loss check did not test which A is used"


def test_e2e_step_trains_cross_entropy_and_measures_abft_terms(task):
    trainer = make_trainer(task, method="E2E", threshold=0.03)
    model, config, builder = trainer.model, trainer.config, trainer.builder
    batch = trainer.prompts[:4]
    ce = [gold_cross_entropy(model, builder, p) for p in batch]
    terms = [expected_terms(model, p, config, config.penalty) for p in batch]
    counts = (torch.stack([label_mass(model, p) for p in batch]) > config.threshold).long().sum(0)
    result = trainer.step(batch)
    assert result.e2e_loss == pytest.approx(sum(ce) / 4, rel=1e-5)
    assert result.loss == pytest.approx(result.e2e_loss, rel=1e-6)
    # the ABFT terms are measured (logged) although they are not trained
    assert result.award_term == pytest.approx(sum(float(t.award_term) for t in terms) / 4, rel=1e-5)
    assert result.penalty_term == pytest.approx(sum(float(t.penalty_term) for t in terms) / 4, rel=1e-5)
    assert result.head_counts == counts.tolist()
    assert 0 < result.mean_heads < 8


def test_e2e_loss_decreases_on_fixed_prompts(task):
    trainer = make_trainer(task, method="E2E")
    model, builder = trainer.model, trainer.builder
    batch = trainer.prompts[:4]
    before = sum(gold_cross_entropy(model, builder, p) for p in batch) / 4
    logged = [trainer.step(batch).loss for _ in range(5)]
    after = sum(gold_cross_entropy(model, builder, p) for p in batch) / 4
    assert logged[0] == pytest.approx(before, rel=1e-5)
    assert logged[-1] < logged[0]
    assert after < before - 0.05


def test_abft_steps_raise_attention_on_correct_labels(task):
    trainer = make_trainer(task, train_samples=16, penalty_mode="None")
    model, config = trainer.model, trainer.config
    batch = [p for p in trainer.prompts if p.query_label in p.demo_labels][:4]
    assert len(batch) == 4

    def correct_mass() -> float:
        """Mean over prompts and participating heads (threshold 0: every head) of the mass on I+."""
        values = []
        for p in batch:
            rows = last_rows(model, p)
            positions = [pos for pos, label in zip(p.label_positions, p.demo_labels) if label == p.query_label]
            participating = rows[:, :, list(p.label_positions)].sum(-1) > config.threshold
            values.append(rows[:, :, positions].sum(-1)[participating])
        return float(torch.cat(values).mean())

    def loss() -> float:
        return sum(float(expected_terms(model, p, config, config.penalty).loss) for p in batch)

    mass_before, loss_before = correct_mass(), loss()
    for _ in range(4):
        trainer.step(batch)
    # also measured with the training capture, detached, on the same prompts
    with capture_attention_rows(model, detach=True) as rows:
        forward_residual(model, torch.tensor([batch[0].token_ids]))
    assert not rows.stacked().requires_grad
    assert torch.allclose(rows.stacked()[0], last_rows(model, batch[0]), atol=1e-6)
    assert correct_mass() > mass_before * 1.2
    assert loss() < loss_before


def _tl(trainer, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like trained parameter ``name`` (e.g. its Adam moment) in TransformerLens layout."""
    rows = qk.leaf(trainer.model, name)[1]
    return tensor if rows == 1 else qk.tl_layout(tensor, rows)


@pytest.mark.parametrize("spec", ["tiny", "tiny-mha"])
def test_restricted_gradient_leaves_non_participating_heads_bit_identical(task, spec):
    """Step 1 opens every head (threshold 0) so Adam has moments everywhere; step 2 on other prompts with a
    threshold that only half of the heads pass: the others keep bit-identical W_Q (and K when no query head
    of their kv group passed), in the parameters and in Adam's state. Without restriction they move."""
    moved_without_restriction = []
    for restricted in (True, False):
        trainer = make_trainer(task, spec, restricted_gradient=restricted)
        model, config = trainer.model, trainer.config
        trainer.step(trainer.prompts[:4])
        batch = trainer.prompts[4:]
        config.threshold = split_threshold(torch.stack([label_mass(model, p) for p in batch]))
        participated = torch.stack([label_mass(model, p) > config.threshold for p in batch]).any(0)
        assert 0 < int(participated.sum()) < participated.numel()
        group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
        kv_open = participated.reshape(participated.shape[0], -1, group).any(-1)
        before = params(model)
        moments = {name: _tl(trainer, name, trainer.optimizer.state[p]["exp_avg"]).clone()
                   for name, p in trainer.trainable.named_parameters()}
        result = trainer.step(batch)
        assert (torch.tensor(result.head_counts) > 0).equal(participated)
        after = params(model)
        for layer in range(model.cfg.n_layers):
            for weight, open_ in (("W_Q", participated[layer]), (k_name(model), kv_open[layer])):
                name = f"blocks.{layer}.attn.{weight}"
                p = dict(trainer.trainable.named_parameters())[name]
                for head, is_open in enumerate(open_.tolist()):
                    same = torch.equal(before[name][head], after[name][head])
                    if is_open:
                        assert not same, f"{name}[{head}] participated but did not move"
                    elif restricted:
                        assert same, f"{name}[{head}] never participated but moved"
                        moment = _tl(trainer, name, trainer.optimizer.state[p]["exp_avg"])
                        assert torch.equal(moment[head], moments[name][head])
                    else:
                        moved_without_restriction.append(not same)
        assert all(torch.equal(before[n], after[n]) for n in before if ".W_Q" not in n and "W_K" not in n)
    assert any(moved_without_restriction), "the unrestricted control moved no closed head: test has no teeth"


# ------------------------------------------------------------------------------------------ the loop


def test_same_seed_reproduces_bit_identical_weights_and_other_seed_other_prompts(task):
    first = make_trainer(task, epochs=2)
    first.run()
    second = make_trainer(task, epochs=2)
    second.run()
    assert first.completed_steps == second.completed_steps == 4
    state1, state2 = first.trainable.state_dict(), second.trainable.state_dict()
    assert state1.keys() == state2.keys()
    assert all(torch.equal(state1[n], state2[n]) for n in state1)
    assert [p.text for p in first.prompts] == [p.text for p in second.prompts]

    other = make_trainer(task, seed=1)
    assert [p.text for p in other.prompts] != [p.text for p in first.prompts]
    assert not set(p.text for p in other.prompts) & set(p.text for p in first.prompts)
    other.run()
    state3 = other.trainable.state_dict()
    assert not all(torch.equal(state1[n], state3[n]) for n in state1)


def test_batches_are_seeded_permutations_per_epoch(task):
    trainer = make_trainer(task, train_samples=10, pseudo_batch_size=4, epochs=2)
    assert trainer.config.steps_per_epoch == 3 and trainer.config.total_steps == 6
    epoch0, epoch1 = trainer.batches(0), trainer.batches(1)
    assert [len(b) for b in epoch0] == [4, 4, 2]
    texts = sorted(p.text for p in trainer.prompts)
    assert sorted(p.text for b in epoch0 for p in b) == texts == sorted(p.text for b in epoch1 for p in b)
    assert [p.text for b in epoch0 for p in b] != [p.text for b in epoch1 for p in b]
    assert [p.text for b in trainer.batches(0) for p in b] == [p.text for b in epoch0 for p in b]


def test_run_calls_callbacks_every_step_and_stops_on_request(task):
    trainer = make_trainer(task, epochs=2)
    seen = []

    def stop_after_three(t, result):
        assert not torch.is_grad_enabled()
        seen.append((result.step, result.epoch))
        if result.step == 3:
            t.stop_requested = True

    trainer.run([stop_after_three])
    assert seen == [(1, 0), (2, 0), (3, 1)]
    assert trainer.completed_steps == 3
    trainer.stop_requested = False
    trainer.run([stop_after_three])
    assert seen[-1] == (4, 1) and trainer.completed_steps == 4


# ------------------------------------------------------------------------------------------- data


def parse_prompt(task, builder: PromptBuilder, prompt: ICLPrompt) -> list[str]:
    """The example texts of ``prompt`` (demonstrations, then the query), verified by rebuilding it."""
    t = task.template
    pattern = re.escape(t.input_prefix) + r"(.*?)" + re.escape(t.input_affix + t.label_prefix)
    texts = re.findall(pattern, prompt.text, flags=re.S)
    assert len(texts) == prompt.k + 1
    demos = [Example(text, label) for text, label in zip(texts, prompt.demo_labels)]
    assert builder.build(demos, Example(texts[-1], prompt.query_label)).text == prompt.text
    return texts


def test_validation_prompts_are_disjoint_from_training_and_never_use_test(task):
    model = load_model("tiny")
    builder = prompt_builder(model, task)
    config = TrainConfig(train_samples=64, validation_examples=40, validation_prompts=16, validate_every=1)
    pool = training_pool(task, config)
    held_out = task.calibration[-40:]
    assert len(pool) == len(task.calibration) - 40
    held_texts = {e.text for e in held_out} - {e.text for e in pool}
    assert len(held_texts) >= 38
    other_splits = {e.text for e in task.test + task.demonstration} - {e.text for e in held_out}

    trainer = Trainer(model, builder, config)
    for prompt in trainer.prompts:
        assert not set(parse_prompt(task, builder, prompt)) & held_texts
    # 64 prompts x 5 examples from 1024: without the hold-out ~12 would come from the last 40
    validation = validation_prompts(builder, config)
    assert len(validation) == 16
    for prompt in validation:
        texts = parse_prompt(task, builder, prompt)
        assert set(texts) <= {e.text for e in held_out}
        assert not set(texts) & other_splits
    assert validation_prompts(builder, config)[0].text == validation[0].text
    # a different seed draws other validation prompts, from the same held-out examples
    other = validation_prompts(builder, dataclasses.replace(config, seed=1))
    assert [p.text for p in other] != [p.text for p in validation]


def test_balance_query_labels_balances_only_the_training_queries():
    """fp's calibration split is ~60 % neutral: balanced training queries take each of its 3 labels 8 times in
    24 prompts, drawn from the training pool only; validation prompts keep the split's label shares."""
    task = load_task("fp")
    model = load_model("tiny")
    builder = prompt_builder(model, task)
    config = TrainConfig(train_samples=24, pseudo_batch_size=8, validation_examples=40, validation_prompts=16,
                         validate_every=1, balance_query_labels=True)
    trainer = Trainer(model, builder, config)
    assert [sum(p.query_label == c for p in trainer.prompts) for c in range(3)] == [8, 8, 8]
    held_texts = {e.text for e in task.calibration[-40:]} - {e.text for e in training_pool(task, config)}
    for prompt in trainer.prompts:
        assert not set(parse_prompt(task, builder, prompt)) & held_texts
    plain = validation_prompts(builder, dataclasses.replace(config, balance_query_labels=False))
    assert [p.text for p in validation_prompts(builder, config)] == [p.text for p in plain]


@pytest.mark.parametrize("bad", [
    dict(lr=-1.0), dict(lr=0.0), dict(epochs=0), dict(train_samples=0), dict(pseudo_batch_size=0), dict(k=0),
    dict(penalty=-0.1), dict(award=-1.0), dict(method="SFT"), dict(keep_best=True),
    dict(keep_best=True, validation_examples=64), dict(validation_examples=4), dict(validate_every=-1),
])
def test_bad_config_is_an_abft_lens_error(bad):
    with pytest.raises(AbftLensError):
        TrainConfig(**bad)


def test_config_round_trips_through_dict():
    config = TrainConfig(method="E2E", lr=1e-3, threshold=0.1, restricted_gradient=True,
                         trainable=TrainableConfig(kind="lora", lora_r=4), validation_examples=32, validate_every=2,
                         keep_best=True, balance_query_labels=True)
    import json

    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(AbftLensError):
        TrainConfig.from_dict({**config.to_dict(), "learning_rate": 1.0})


def test_training_pool_too_small_is_an_error(task):
    small = dataclasses.replace(task, calibration=task.calibration[:10])
    with pytest.raises(AbftLensError):
        training_pool(small, TrainConfig(validation_examples=6, validate_every=1))
