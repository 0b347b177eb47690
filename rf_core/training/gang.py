"""One chunk of a multi-process run: the process group its gang forms for the chunk, and how each member trains.

A gang is formed per chunk by the slot workers the scheduler chose and torn down at the chunk's end, so the same
persistent workers serve single-device runs and gangs of any size in turn. Every member computes the same global
step: the step's micro-batches are dealt out by rank (member r takes micro-batches r, r + w, ...), DDP averages
the gradients, and each member applies the same update to its own replica. Since the loss of a step is the mean
of its micro-batches' losses, a w-process step equals a 1-process step over the same micro-batches, to float
rounding.

Only rank 0 evaluates and writes the checkpoint; what the others need of it (the eval metrics that decide the
run's best chunk) is broadcast before the group is torn down, so any member can lead the next chunk.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rf_core.messages import Gang

GANG_TIMEOUT_ENV = "RF_GANG_TIMEOUT_S"
DEFAULT_GANG_TIMEOUT_S = 180.0  # a member that never arrives (or died) fails the chunk instead of hanging it


def free_address(host: str = "127.0.0.1") -> str:
    """A host:port for a gang's rendezvous store, on a port free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return f"{host}:{probe.getsockname()[1]}"


def gang_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(GANG_TIMEOUT_ENV, DEFAULT_GANG_TIMEOUT_S)))


class GangSession:
    """What differs for a member of a gang: its share of a step, gradient averaging, agreeing on numbers."""

    def __init__(self, gang: Gang, device: torch.device) -> None:
        self.gang = gang
        self.device = device

    @property
    def rank(self) -> int:
        return self.gang.rank

    @property
    def world_size(self) -> int:
        return self.gang.world_size

    @property
    def is_leader(self) -> bool:
        return self.gang.rank == 0

    def my_micro_batches(self, micro_batches: Sequence[list[int]]) -> list[list[int]]:
        if len(micro_batches) % self.world_size:
            raise ValueError(
                f"{len(micro_batches)} micro-batches cannot be shared evenly by {self.world_size} processes"
            )
        return list(micro_batches[self.rank :: self.world_size])

    def wrap_ddp(self, model: torch.nn.Module, trainable: Sequence[torch.nn.Parameter]) -> DDPStep:
        """DDP over the run's trainable parameters only.

        The model may be a LoRA host holding other runs' adapters, which differ between members: DDP must neither
        compare nor broadcast them, so everything but this run's parameters is ignored and nothing is synced at
        construction (every member restored the same state, so there is nothing to sync).
        """
        trainable_ids = {id(parameter) for parameter in trainable}
        ignored = [name for name, parameter in model.named_parameters() if id(parameter) not in trainable_ids]
        ignored += [name for name, _ in model.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DDPStep(torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, init_sync=False))

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the gang's members."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def from_leader(self, value: Any) -> Any:
        """Rank 0's value of a picklable object, on every member."""
        box = [value if self.is_leader else None]
        dist.broadcast_object_list(box, src=0, device=self._collective_device)
        return box[0]

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


class PlainStep:
    """One process computes the whole step: mean of the micro-batch losses, clipping, the optimizer's update.

    With fp16 a `scaler` scales the loss before backward and unscales the gradients before clipping; a step whose
    gradients overflowed is skipped and the scale backs off, as torch's GradScaler (and so HF's Trainer) does."""

    scaler: torch.amp.GradScaler | None = None

    def __init__(self, model: Any) -> None:
        self.model = model

    def micro_batch(self, position: int, count: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch, use_cache=False).loss

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits for a batch (an objective other than the causal-LM loss computes its own loss)."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def backward(self, loss: torch.Tensor, position: int, count: int) -> None:
        scaled = loss / count
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()

    def update(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor], max_norm: float) -> bool:
        """Update the parameters; False when fp16's scaler skipped the step (its gradients were not finite)."""
        if self.scaler is None:
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            optimizer.step()
            return True
        self.scaler.unscale_(optimizer)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped


class DDPStep(PlainStep):
    """As PlainStep, with DDP averaging the gradients across the gang once per step, on its last micro-batch."""

    def micro_batch(self, position: int, count: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if position == count - 1 else self.model.no_sync()


class DeepSpeedStep(PlainStep):
    """The engine scales by the accumulation, averages across the gang, clips and steps at the step's end."""

    def backward(self, loss: torch.Tensor, position: int, count: int) -> None:
        self.model.backward(loss)
        if position < count - 1:
            self.model.step()  # counts the micro-batch; the engine updates only at the accumulation boundary

    def update(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor], max_norm: float) -> bool:
        self.model.step()
        return True


@contextlib.contextmanager
def gang_session(gang: Gang | None, device: torch.device) -> Iterator[GangSession | None]:
    """Form the gang's process group for one chunk (None for a single-process run), and always tear it down."""
    if gang is None:
        yield None
        return
    if dist.is_initialized():
        _destroy_group()  # a previous chunk that failed half-way left its group behind
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{gang.address}",
        rank=gang.rank,
        world_size=gang.world_size,
        timeout=gang_timeout(),
    )
    try:
        yield GangSession(gang, device)
    finally:
        _destroy_group()


def _destroy_group() -> None:
    """Tear down the chunk's process group, through DeepSpeed when it ran: it caches groups derived from it."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and getattr(deepspeed_comm.comm, "cdb", None) is not None:
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
