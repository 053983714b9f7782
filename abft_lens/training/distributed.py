"""Data-parallel ABFT training over ``torch.distributed`` (one process per device, launched by ``torchrun``).

Scheme (plain data parallelism, no DDP wrapper: the trainer already accumulates per-sample gradients):

- every rank holds the full model and the same training prompts (seeded, so identical on every rank);
- :meth:`DistributedContext.shard` gives rank r the samples ``batch[r::world_size]`` of each pseudo-batch;
  each sample's loss is still scaled by ``1 / len(full pseudo-batch)``;
- before the optimizer step the gradients of the trainable tensors and the step statistics (loss terms,
  per-head participation counts) are summed over ranks (``all_reduce``, SUM), so every rank applies the
  identical update, the restricted-gradient union of open heads is the global union and the penalty (PID)
  controller sees the global mean head count;
- only rank 0 evaluates, writes the run folder and prints; every rank loads the checkpoint on resume.

Backends: gloo on CPU, NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). The result equals a
single-process run up to float summation order (the per-sample gradients are added in another order).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as tdist

from abft_lens.errors import AbftLensError

T = TypeVar("T")

#: seconds a collective waits for the other ranks (rank 0 alone runs the fore/post tests meanwhile)
DEFAULT_TIMEOUT_S = int(os.environ.get("ABFT_LENS_DIST_TIMEOUT", "7200"))


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in an initialized process group, and the few collectives training needs."""

    rank: int
    world_size: int
    device: torch.device
    group: Any = None  # None: the default process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------------------------------- data
    def shard(self, batch: Sequence[T]) -> list[T]:
        """This rank's share of a pseudo-batch: ``batch[rank::world_size]`` (may be empty)."""
        return list(batch[self.rank::self.world_size])

    # ----------------------------------------------------------------------------------- collectives
    def all_reduce_(self, tensor: torch.Tensor, op=tdist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce of ``tensor`` (moved to this rank's device for the collective)."""
        if tensor.device != self.device:
            moved = tensor.to(self.device)
            tdist.all_reduce(moved, op=op, group=self.group)
            tensor.copy_(moved)
        else:
            tdist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=self.device)
        return bool(self.all_reduce_(value, tdist.ReduceOp.MAX).item() > 0)

    def all_reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` of ``parameters`` over ranks, one flat buffer per (device, dtype).

        A parameter without a gradient on some rank (an empty shard) counts as zero there; one without a
        gradient on every rank keeps ``grad=None`` everywhere, so the optimizer skips it as it would in a
        single process.
        """
        params = list(parameters)
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        self.all_reduce_(has, tdist.ReduceOp.MAX)
        live = [p for p, flag in zip(params, has.tolist()) if flag > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in live:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p)
        for bucket in buckets.values():
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            self.all_reduce_(flat)
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def broadcast_parameters(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``parameters`` to every rank (start, and after keep-best on rank 0)."""
        with torch.no_grad():
            for p in parameters:
                data = p.detach().to(self.device)
                tdist.broadcast(data, src=0, group=self.group)
                if data.data_ptr() != p.data_ptr():
                    p.copy_(data)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.group,
                                    device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank; an :class:`AbftLensError` it raises
        is raised on every rank, any other exception as a RuntimeError (no rank is left waiting)."""
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except AbftLensError as error:
                self.broadcast_object(("error", error))
                raise
            except Exception as error:
                self.broadcast_object(("failed", f"{type(error).__name__}: {error}"))
                raise
        outcome = self.broadcast_object(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        if outcome[0] == "failed":
            raise RuntimeError(f"rank 0 failed: {outcome[1]}")
        return outcome[1]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            tdist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            tdist.barrier(group=self.group)


def current() -> DistributedContext | None:
    """The context of the initialized default process group, or None (not initialized, or one process)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return None
    if tdist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistributedContext(rank=tdist.get_rank(), world_size=tdist.get_world_size(), device=device)


def init_from_env(backend: str | None = None) -> DistributedContext | None:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); None when not launched with more than one process.

    Backend: NCCL when CUDA is available (this process takes ``cuda:LOCAL_RANK``), gloo otherwise.
    The group is destroyed at exit.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    if not tdist.is_available():
        raise AbftLensError("this torch build has no torch.distributed.", "run a single process (plain abft-lens).")
    if not tdist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))
        atexit.register(_destroy)
    return current()


def training_device(context: DistributedContext | None, default: str = "cpu") -> str:
    """The device a rank should load its model on (``cuda:LOCAL_RANK`` under NCCL)."""
    if context is not None and context.device.type == "cuda":
        return str(context.device)
    return default


def _destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


__all__ = ["DistributedContext", "current", "init_from_env", "training_device"]
