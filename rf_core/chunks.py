"""Deterministic chunking: each epoch's seeded sample order cut into contiguous pieces of whole optimizer steps.

An optimizer step consumes `per_device_train_batch_size * gradient_accumulation_steps * num_devices` samples (the
global batch: a multi-device run splits each step's micro-batches across its devices); an epoch's
incomplete last step is dropped. Each epoch's S steps are split into `num_chunks` contiguous pieces whose sizes
differ by at most one (the first S % num_chunks pieces get the extra step). Steps are global over the run, sample
offsets are local to the epoch's order (`epoch_order`), and the LR schedule spans `total_steps` — the whole run.
As in Hugging Face's Trainer, `max_steps` > 0 overrides `num_train_epochs`: the run takes as many epochs (each in
its own seeded order) as its steps need, and ends inside the chunk that reaches them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

from rf_core.messages import ChunkSpec


class ChunkingError(ValueError):
    """A run cannot be split as asked; the message names the numbers involved."""


def samples_per_step(config: Mapping[str, Any]) -> int:
    """Rows consumed by one optimizer step (batch × gradient accumulation × devices); `config` is normalised. A GRPO
    run's batch counts completions, `num_generations` per prompt (TRL's), so it consumes that many times fewer rows."""
    samples = micro_batches_per_step(config) * int(config["per_device_train_batch_size"])
    if config.get("trainer_type") == "grpo":
        return samples // int(config["num_generations"])
    return samples


def micro_batches_per_step(config: Mapping[str, Any]) -> int:
    """Micro-batches in one optimizer step over all of the run's devices."""
    return int(config["gradient_accumulation_steps"]) * int(config.get("num_devices", 1))


def elastic_device_counts(config: Mapping[str, Any], num_slots: int) -> tuple[int, ...]:
    """Slot counts above num_devices a DDP run may train a chunk on with the same result: up to max_devices, and
    dividing the step's micro-batches evenly (each process then takes an equal share of the same step)."""
    devices, most = int(config.get("num_devices", 1)), config.get("max_devices")
    if most is None or config.get("strategy", "ddp") != "ddp":
        return ()
    micro = micro_batches_per_step(config)
    return tuple(count for count in range(devices + 1, min(int(most), num_slots) + 1) if micro % count == 0)


def steps_per_epoch(num_samples: int, config: Mapping[str, Any]) -> int:
    """Whole optimizer steps in one epoch; an incomplete last step is dropped."""
    return max(0, num_samples) // samples_per_step(config)


def total_steps(num_samples: int, config: Mapping[str, Any]) -> int:
    """Optimizer steps of the whole run (the LR schedule spans these): max_steps when set (it overrides the epochs,
    as in Hugging Face's Trainer), else epochs × steps per epoch."""
    max_steps = int(config["max_steps"])
    if max_steps > 0:
        return max_steps if steps_per_epoch(num_samples, config) > 0 else 0
    return steps_per_epoch(num_samples, config) * int(config["num_train_epochs"])


def num_epochs(num_samples: int, config: Mapping[str, Any]) -> int:
    """Epochs the run takes: num_train_epochs, or as many as max_steps needs when it is set (the data repeats)."""
    steps = steps_per_epoch(num_samples, config)
    max_steps = int(config["max_steps"])
    if max_steps > 0:
        return -(-max_steps // steps) if steps else 0
    return int(config["num_train_epochs"])


def plan_chunks(num_samples: int, config: Mapping[str, Any], num_chunks: int) -> list[ChunkSpec]:
    """Every chunk of a run, epoch-major; `config` is normalised.

    With max_steps > 0 the run takes as many epochs as it needs and ends inside the chunk where the global step
    reaches max_steps: that chunk ends at max_steps and later chunks are dropped.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ChunkingError(f"num_chunks must be an integer >= 1, got {num_chunks=}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ChunkingError(f"num_samples must be an integer >= 0, got {num_samples=}")
    per_step = samples_per_step(config)
    steps = steps_per_epoch(num_samples, config)
    step_shape = (
        f"batch {config['per_device_train_batch_size']} × accumulation {config['gradient_accumulation_steps']}"
        + (f" × devices {config['num_devices']}" if int(config.get("num_devices", 1)) > 1 else "")
    )
    if steps == 0:
        raise ChunkingError(
            f"an epoch of {num_samples} samples has no whole optimizer step of {per_step} samples ({step_shape})"
        )
    if num_chunks > steps:
        raise ChunkingError(
            f"num_chunks={num_chunks} exceeds the {steps} optimizer steps in one epoch "
            f"({num_samples} samples / ({step_shape}))"
        )

    run_end = total_steps(num_samples, config)
    base_size, extra = divmod(steps, num_chunks)
    chunks: list[ChunkSpec] = []
    for epoch in range(num_epochs(num_samples, config)):
        step_in_epoch = 0
        for chunk_in_epoch in range(num_chunks):
            size = base_size + (1 if chunk_in_epoch < extra else 0)
            start = epoch * steps + step_in_epoch
            if start >= run_end:
                return chunks
            end = min(start + size, run_end)
            chunks.append(
                ChunkSpec(
                    index=len(chunks),
                    epoch=epoch,
                    chunk_in_epoch=chunk_in_epoch,
                    num_chunks=num_chunks,
                    start_step=start,
                    end_step=end,
                    start_sample=step_in_epoch * per_step,
                    end_sample=(step_in_epoch + end - start) * per_step,
                )
            )
            step_in_epoch += size
    return chunks


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_samples) fixed by (seed, epoch), the same in every process and Python run."""
    # hash() is salted per process for str; a digest of both numbers is stable and keeps (1, 23) apart from (12, 3).
    digest = hashlib.sha256(f"rf-epoch-order:{seed}:{epoch}".encode()).digest()
    order = list(range(num_samples))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order
