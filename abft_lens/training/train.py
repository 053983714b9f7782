"""The ABFT and E2E training loop: short, linear, readable top to bottom.

Data: ``train_samples`` prompts of k+1 seeded-random calibration examples (k demonstrations, one query),
reshuffled each epoch with a generator seeded by (seed, epoch). One optimizer step per pseudo-batch; each
sample contributes 1/len(batch) of the step's gradient. The prompts of a pseudo-batch go through the model in
left-padded micro-batches of ``micro_batch_size`` (sorted by length, one forward and one backward each);
everything per sample stays per sample: its own n_t in the threshold, its label positions, filter decision,
loss terms and, with the restricted gradient, its own open heads (:mod:`abft_lens.training.routing`). A
micro-batch of one prompt is exactly the per-sample loop. A step returns a :class:`StepResult`; callbacks
(logging, validation, checkpoints, progress) see every result and run under ``torch.no_grad()``.

``compute_dtype="bfloat16"`` runs the forward pass under ``torch.autocast`` (matmuls in bfloat16, norms, the
residual stream, weights, gradients and Adam state in float32); attention rows are upcast before the loss. The
validation guard's passes run under the same autocast (they steer training); the fore and post tests of a run
(:mod:`abft_lens.training.runs`) evaluate in the weights' float32, so a bfloat16 run's reported numbers are the
trained weights' exact ones, comparable with a float32 run's.

ABFT loss: :func:`abft_lens.training.objectives.abft_loss` on the last attention row of every head; the forward
stops at the last layer's attention pattern (no W_O, MLP, final norm or unembedding after it:
:func:`abft_lens.interp.capture.forward_to_last_pattern`). E2E loss: cross-entropy of the query's gold label
token over the whole vocabulary at the last position. Both log the same quantities (E2E computes the ABFT
terms without gradient), so runs compare step for step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Literal, Sequence

import torch
from abft_lens.interp.capture import capture_attention_rows, forward_to_last_pattern
from abft_lens.backends import cpu
from abft_lens.backends.forward import compute_autocast, forward_residual
from abft_lens.errors import AbftLensError
from abft_lens.interp.induction_filter import induction_threshold
from abft_lens.training.objectives import PenaltyController, abft_loss, e2e_loss
from abft_lens.data.prompts import ICLPrompt, PromptBuilder, collate, pad_token_id, sample_prompts
from abft_lens.data.tasks import ICLTask
from abft_lens.training.adapters import attach, masked_step
from abft_lens.training.checks import check_train_config
from abft_lens.training.presets import contradictions, preset
from abft_lens.training.step_cost import Dims, pick_micro_batch, trained_elements
from abft_lens.training.trainable import Trainable, TrainableConfig

Method = Literal["ABFT", "E2E"]
log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a run; round-trips through JSON (``to_dict`` / ``from_dict``).

    Defaults are the paper's (k=4, 512 samples, pseudo-batch 32, 2 epochs, Adam lr 2e-5, B=1, A0=0.5, PID).
    ``threshold=None`` uses T = k / (k + ln n_tokens) per prompt. ``validation_examples`` calibration
    examples (the last ones of the split) are held out from training and build ``validation_prompts``
    prompts for the validation guard, evaluated every ``validate_every`` steps (0: never); the guard's best
    step is the one with the highest ``select_metric`` (``macro_f1``, the default, or ``accuracy``: accuracy can
    pick a step that answers the majority label everywhere; see docs/results.md, "Selecting on macro-F1").
    ``select_max_p``: when set, a trained step can be kept only if, on the validation prompts, it answers
    significantly more prompts right than step 0 (paired exact McNemar, p < ``select_max_p``, more gained than
    lost); otherwise the base is kept. Ours, not the paper's: a guard on few prompts otherwise keeps noise.
    ``micro_batch_size``: prompts per forward pass (1: the per-sample loop; None: on CPU the largest size whose
    estimated peak memory stays within 1.3x the per-sample step's, :func:`resolve_micro_batch`; on CUDA the whole
    pseudo-batch). ``compute_dtype``: None (the model's dtype) or ``"bfloat16"`` (autocast, see above).
    ``balance_query_labels`` (ours): the training prompts' queries take every label equally often (see
    :func:`abft_lens.data.prompts.sample_prompts`); off, they follow the calibration split's label shares.
    ``preset``: the named regime the config was made from (:meth:`paper`, :meth:`demo`; None: none); a config
    that names a preset holds its values (checked).
    Every value is checked when the config is made (:func:`abft_lens.training.checks.check_train_config`).
    """

    method: Method = "ABFT"
    k: int = 4
    train_samples: int = 512
    epochs: int = 2
    pseudo_batch_size: int = 32
    lr: float = 2e-5
    seed: int = 0
    award: float = 1.0
    penalty: float = 0.5
    penalty_mode: Literal["None", "P", "PID"] = "PID"
    p_gain: float = 0.03
    pid_kp: float = 0.03
    pid_ki: float = 0.005
    pid_kd: float = 0.005
    threshold: float | None = None
    restricted_gradient: bool = False
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    validation_examples: int = 0
    validation_prompts: int = 64
    validate_every: int = 0
    keep_best: bool = False
    select_metric: Literal["accuracy", "macro_f1"] = "macro_f1"
    select_max_p: float | None = None
    micro_batch_size: int | None = None
    compute_dtype: Literal["bfloat16"] | None = None
    balance_query_labels: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        check_train_config(self)  # ranges, finiteness and combinations: abft_lens.training.checks

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """The regime ``name`` (:mod:`abft_lens.training.presets`) with ``overrides`` of the fields it leaves
        free (seed, micro_batch_size, compute_dtype, trainable, ...); overriding a value the preset fixes with
        another value is refused, naming both."""
        chosen = preset(name)
        clash = contradictions(chosen, overrides)
        if clash:
            raise AbftLensError(f"preset {name!r} fixes " + ", ".join(f"{f}={want!r}" for f, _, want in clash)
                                + "; asked for " + ", ".join(f"{f}={got!r}" for f, got, _ in clash) + ".",
                                f"drop those options, or leave out the preset ({chosen.about}).")
        return cls(**{**chosen.train, **overrides, "preset": name})

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """The paper's regime (Cho et al. 2025): see :data:`abft_lens.training.presets.PAPER`."""
        return cls.from_preset("paper", **overrides)

    @classmethod
    def demo(cls, **overrides) -> "TrainConfig":
        """This project's demo regime (``abft-lens demo``): see :data:`abft_lens.training.presets.DEMO`."""
        return cls.from_preset("demo", **overrides)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train_samples // self.pseudo_batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict:
        data = asdict(self)
        data["trainable"] = self.trainable.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AbftLensError(f"unknown training options {unknown}.", f"use only {sorted(known)}.")
        values = dict(data)
        values.setdefault("select_metric", "accuracy")  # written before the field existed: the guard used accuracy
        values["trainable"] = TrainableConfig.from_dict(values.get("trainable") or {})
        return cls(**values)


@dataclass
class StepResult:
    """What one optimizer step did. Losses are means over the pseudo-batch; ``penalty`` is the A used in
    this step and ``next_penalty`` the controller's A for the next one; ``head_counts[l][h]`` counts the
    samples in which head (l, h) passed the filter."""

    step: int
    epoch: int
    loss: float
    award_term: float
    penalty_term: float
    e2e_loss: float | None
    penalty: float
    next_penalty: float
    mean_heads: float
    head_counts: list[list[int]]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


Callback = Callable[["Trainer", StepResult], None]


class Trainer:
    """Holds the model, its trainable set, the optimizer, the penalty controller and the training prompts.

    ``step(batch)`` runs one pseudo-batch; ``run()`` runs every remaining step and calls the callbacks.
    ``state_dict()`` / ``load_state_dict()`` capture everything a resumed run needs.

    ``micro_batch``: ``(size, reason)`` decided elsewhere (a run's ``config.json``); default
    :func:`resolve_micro_batch`, kept as :attr:`micro_batch_size` and :attr:`micro_batch_reason`.

    ``dist`` (a :class:`abft_lens.training.distributed.DistributedContext`, or None for one process): data parallel
    training. Each rank runs its share ``batch[rank::world_size]`` of every pseudo-batch; gradients, loss
    totals and head counts are summed over ranks before the optimizer step, so every rank applies the same
    update and every :class:`StepResult` is the global one.
    """

    def __init__(self, model, builder: PromptBuilder, config: TrainConfig, dist=None,
                 micro_batch: tuple[int, str] | None = None):
        self.model = model
        self.builder = builder
        self.config = config
        self.dist = dist
        self.trainable: Trainable = attach(model, config.trainable)
        if dist is not None:
            dist.broadcast_parameters(self.trainable.parameters())  # identical start on every rank
        self.optimizer = torch.optim.Adam(self.trainable.parameters(), lr=config.lr)
        self.controller = PenaltyController(mode=config.penalty_mode, initial_penalty=config.penalty,
                                            kp=config.pid_kp, ki=config.pid_ki, kd=config.pid_kd,
                                            p_gain=config.p_gain)
        self.prompts: list[ICLPrompt] = training_prompts(builder, config)
        self.label_token_ids = torch.tensor(builder.label_token_ids)
        self.pad_id = pad_token_id(builder.tokenizer)
        self._device = torch.device(model.cfg.device)
        self.micro_batch_size, self.micro_batch_reason = micro_batch or resolve_micro_batch(
            model, config, [prompt.n_tokens for prompt in self.prompts], dist)
        if config.compute_dtype == "bfloat16" and self._device.type == "cpu" and not cpu.native_bf16():
            log.warning("bfloat16 training on a CPU without bfloat16 instructions (no AVX512-BF16 or AMX; torch "
                        "reports %s): its bfloat16 matmuls are emulated, slower than float32 (about 50x on AVX2); "
                        "train in float32", torch.backends.cpu.get_cpu_capability())
        self.completed_steps = 0
        self.train_seconds = 0.0  # steps and their callbacks, summed over every session of a resumed run
        self.stop_requested = False

    # ------------------------------------------------------------------------------------------ data
    def batches(self, epoch: int) -> list[list[ICLPrompt]]:
        """The pseudo-batches of ``epoch``: a permutation seeded by (seed, epoch), cut in order."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.prompts), generator=generator).tolist()
        size = self.config.pseudo_batch_size
        return [[self.prompts[i] for i in order[start:start + size]] for start in range(0, len(order), size)]

    def micro_batches(self, share: Sequence[ICLPrompt]) -> list[list[ICLPrompt]]:
        """``share`` cut into micro-batches of ``micro_batch_size`` prompts, sorted by length (less padding);
        with a micro-batch size of 1 the order is kept: the per-sample loop."""
        size = self.micro_batch_size
        if size == 1:
            return [[prompt] for prompt in share]
        ordered = sorted(share, key=lambda prompt: prompt.n_tokens)
        return [ordered[start:start + size] for start in range(0, len(ordered), size)]

    # ------------------------------------------------------------------------------------------ step
    def step(self, batch: Sequence[ICLPrompt], epoch: int = 0) -> StepResult:
        """One optimizer step over ``batch``: a forward and backward per micro-batch, then a (masked) Adam step."""
        start = time.perf_counter()
        config, n_layers, n_heads = self.config, self.model.cfg.n_layers, self.model.cfg.n_heads
        penalty = self.controller.penalty
        totals = {"loss": 0.0, "award": 0.0, "penalty": 0.0, "e2e": 0.0}
        counts = torch.zeros(n_layers, n_heads, dtype=torch.long)
        self.optimizer.zero_grad(set_to_none=True)
        for chunk in self.micro_batches(batch if self.dist is None else self.dist.shard(batch)):
            samples, participating = self._micro_batch_loss(chunk, penalty)
            loss = sum(e2e if config.method == "E2E" else terms.loss for terms, e2e in samples) / len(batch)
            if config.restricted_gradient:  # one prompt: the weight masks; a batch: routed per prompt
                with self.trainable.restricted(participating if len(chunk) > 1 else participating[0]):
                    loss.backward()
            else:
                loss.backward()
            counts += participating.long().sum(dim=0)
            for terms, e2e in samples:
                totals["loss"] += float((e2e if config.method == "E2E" else terms.loss).detach())
                totals["award"] += float(terms.award_term.detach())
                totals["penalty"] += float(terms.penalty_term.detach())
                totals["e2e"] += float(e2e.detach()) if e2e is not None else 0.0
        if self.dist is not None:
            counts, totals = self._all_reduce(counts, totals)
        if config.restricted_gradient:
            masked_step(self.optimizer, self.trainable, counts > 0)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_heads = float(counts.sum()) / len(batch)
        next_penalty = self.controller.update(mean_heads)
        self.completed_steps += 1
        n = len(batch)
        return StepResult(
            step=self.completed_steps, epoch=epoch, loss=totals["loss"] / n, award_term=totals["award"] / n,
            penalty_term=totals["penalty"] / n, e2e_loss=totals["e2e"] / n if config.method == "E2E" else None,
            penalty=penalty, next_penalty=next_penalty, mean_heads=mean_heads, head_counts=counts.tolist(),
            seconds=time.perf_counter() - start,
        )

    def _all_reduce(self, counts: torch.Tensor, totals: dict[str, float]):
        """Sum the gradients, head counts and loss totals of every rank's share of the pseudo-batch."""
        self.dist.all_reduce_gradients(self.trainable.parameters())
        stats = torch.tensor([*totals.values(), *counts.flatten().tolist()], dtype=torch.float64)
        self.dist.all_reduce_(stats)
        summed = dict(zip(totals, stats[:len(totals)].tolist()))
        return stats[len(totals):].round().long().view_as(counts), summed

    def _micro_batch_loss(self, prompts: Sequence[ICLPrompt], penalty: float):
        """One left-padded forward pass over ``prompts``: per prompt (ABFT terms, E2E loss or None), with graph
        for the trained loss, and the participating heads ``[batch, layer, head]`` (on CPU).

        Each prompt keeps its own threshold (from its unpadded length), label positions (shifted by its
        padding) and query label; the last column is every prompt's prediction position.
        """
        batch = collate(prompts, self.pad_id)
        tokens, mask = batch.tokens.to(self._device), batch.attention_mask.to(self._device)
        e2e = self.config.method == "E2E"
        with compute_autocast(self.model, self.config.compute_dtype):
            with capture_attention_rows(self.model, detach=e2e) as rows:
                if e2e:  # logits at the last position; ABFT stops once the last pattern is captured
                    residual = forward_residual(self.model, tokens, mask)
                else:
                    forward_to_last_pattern(self.model, tokens, mask, rows)
            logits = self.model.unembed(self.model.ln_final(residual[:, -1:, :]))[:, 0] if e2e else None
        last_rows = rows.stacked()  # [batch, layer, head, key]
        if last_rows.dtype not in (torch.float32, torch.float64):  # bfloat16 under autocast
            last_rows = last_rows.float()
        samples, participating = [], []
        for i, prompt in enumerate(prompts):
            threshold = self.config.threshold if self.config.threshold is not None \
                else induction_threshold(prompt.k, prompt.n_tokens)
            # under E2E the rows are detached, so these ABFT terms are measured, not trained
            terms = abft_loss(last_rows[i], batch.label_positions[i], batch.demo_labels[i], prompt.query_label,
                              award=self.config.award, penalty=penalty, threshold=threshold)
            cross_entropy = e2e_loss(logits[i], int(self.label_token_ids[prompt.query_label])) if e2e else None
            samples.append((terms, cross_entropy))
            participating.append(terms.participating.cpu())
        return samples, torch.stack(participating)

    @torch.no_grad()
    def filter_decisions(self, prompts: Sequence[ICLPrompt]) -> torch.Tensor:
        """Bool ``[prompt, layer, head]``: which heads pass the induction filter for each of ``prompts`` under
        the current weights and compute dtype (the decisions a step would make; nothing is trained)."""
        decisions = {}
        for chunk in self.micro_batches(prompts):
            decisions.update(zip(map(id, chunk), self._micro_batch_loss(chunk, self.controller.penalty)[1]))
        return torch.stack([decisions[id(prompt)] for prompt in prompts])

    # ------------------------------------------------------------------------------------------ loop
    def run(self, callbacks: Sequence[Callback] = ()) -> None:
        """Run every step not yet completed (a resumed trainer continues where its state left off)."""
        per_epoch = self.config.steps_per_epoch
        for epoch in range(self.completed_steps // per_epoch, self.config.epochs):
            for index, batch in enumerate(self.batches(epoch)):
                if epoch * per_epoch + index < self.completed_steps:
                    continue
                result = self.step(batch, epoch)
                self.train_seconds += result.seconds  # before the callbacks, so a checkpoint counts the step
                start = time.perf_counter()
                with torch.no_grad():
                    for callback in callbacks:
                        callback(self, result)
                self.train_seconds += time.perf_counter() - start
                if self.dist is not None:  # every rank stops when any rank asked to
                    self.stop_requested = self.dist.any(self.stop_requested)
                if self.stop_requested:
                    return

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "completed_steps": self.completed_steps,
            "train_seconds": self.train_seconds,
            "trainable": self.trainable.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.trainable.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.completed_steps = int(state["completed_steps"])
        self.train_seconds = float(state.get("train_seconds", 0.0))  # absent in checkpoints of earlier versions


def resolve_micro_batch(model, config: TrainConfig, lengths: Sequence[int], dist=None) -> tuple[int, str]:
    """``(micro-batch size, reason)`` of a run whose training prompts are ``lengths`` tokens long: the configured
    size, or :func:`abft_lens.training.step_cost.pick_micro_batch` for this process's share of a pseudo-batch."""
    if config.micro_batch_size is not None:
        return config.micro_batch_size, f"given: micro_batch_size={config.micro_batch_size}"
    share = -(-config.pseudo_batch_size // (dist.world_size if dist is not None else 1))
    dims, trainable = Dims.of(model), config.trainable
    elements = trained_elements(dims, trainable.kind, trainable.targets, bias=trainable.bias, lora_r=trainable.lora_r)
    return pick_micro_batch(model, lengths, share, elements, device=torch.device(model.cfg.device).type,
                            bfloat16=config.compute_dtype == "bfloat16")


def training_pool(task: ICLTask, config: TrainConfig):
    """The calibration examples training may draw from: all but the last ``validation_examples``."""
    pool = task.calibration[: len(task.calibration) - config.validation_examples]
    if len(pool) < config.k + 1:
        raise AbftLensError(f"{task.name}'s calibration split leaves {len(pool)} training examples, "
                            f"fewer than k+1={config.k + 1}.", "hold out fewer validation examples or use a smaller k.")
    return pool


def training_prompts(builder: PromptBuilder, config: TrainConfig) -> list[ICLPrompt]:
    """The run's ``train_samples`` training prompts (every epoch reshuffles these same prompts)."""
    return sample_prompts(builder, training_pool(builder.task, config), config.k, config.train_samples,
                          config.seed, balance_query_labels=config.balance_query_labels)


def query_label_shares(builder: PromptBuilder, config: TrainConfig) -> list[float]:
    """How often each label is the query's gold label in the run's training prompts, in label order (sums to
    1): the label prior that a run trained on these prompts can learn without reading the query."""
    counts = [0] * len(builder.task.label_words)
    for prompt in training_prompts(builder, config):
        counts[prompt.query_label] += 1
    total = sum(counts)
    return [count / total for count in counts]


def validation_prompts(builder: PromptBuilder, config: TrainConfig) -> list[ICLPrompt]:
    """Prompts built only from the held-out end of the calibration split: disjoint from the training prompts
    (which draw from the rest of it) and from the test prompts (test split + demonstration split)."""
    held_out = builder.task.calibration[len(builder.task.calibration) - config.validation_examples:]
    return sample_prompts(builder, held_out, config.k, config.validation_prompts, seed=config.seed + 7919)
