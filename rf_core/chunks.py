"""Deterministic chunking: each epoch's seeded sample order cut into contiguous pieces of whole optimizer steps.

A run's cursor counts samples, so the same order serves every run of an experiment whatever its batch size.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

from rf_core.tasks import ChunkSpec


class ChunkingError(ValueError):
    pass


def samples_per_step(config: Mapping[str, Any]) -> int:
    return int(config["per_device_train_batch_size"]) * int(config["gradient_accumulation_steps"])


def steps_per_epoch(num_samples: int, config: Mapping[str, Any]) -> int:
    """Whole optimizer steps in one epoch; an incomplete last step is dropped."""
    return num_samples // samples_per_step(config)


def total_steps(num_samples: int, config: Mapping[str, Any]) -> int:
    """Optimizer steps of the whole run (the LR schedule spans these), capped by max_steps."""
    steps = steps_per_epoch(num_samples, config) * int(config["num_train_epochs"])
    max_steps = int(config.get("max_steps", -1))
    return min(steps, max_steps) if max_steps > 0 else steps


def plan_chunks(num_samples: int, config: Mapping[str, Any], num_chunks: int) -> list[ChunkSpec]:
    """Every chunk of a run, epoch-major. With max_steps the run ends inside the chunk that reaches it."""
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ChunkingError(f"num_chunks must be an integer >= 1, got {num_chunks!r}")
    per_step = samples_per_step(config)
    steps = steps_per_epoch(num_samples, config)
    batch, accumulation = config["per_device_train_batch_size"], config["gradient_accumulation_steps"]
    if steps == 0:
        raise ChunkingError(
            f"an epoch has no optimizer step: {num_samples} samples < one step of "
            f"{per_step} samples (batch {batch} x accumulation {accumulation})"
        )
    if num_chunks > steps:
        raise ChunkingError(
            f"num_chunks={num_chunks} exceeds the {steps} optimizer steps in one epoch "
            f"({num_samples} samples / (batch {batch} x accumulation {accumulation}))"
        )
    last_step = total_steps(num_samples, config)
    base, extra = divmod(steps, num_chunks)
    chunks: list[ChunkSpec] = []
    for epoch in range(int(config["num_train_epochs"])):
        offset = 0
        for chunk_in_epoch in range(num_chunks):
            size = base + (1 if chunk_in_epoch < extra else 0)
            start = epoch * steps + offset
            end = min(start + size, last_step)
            if start >= last_step:
                return chunks
            chunks.append(
                ChunkSpec(
                    index=len(chunks),
                    epoch=epoch,
                    chunk_in_epoch=chunk_in_epoch,
                    num_chunks=num_chunks,
                    start_step=start,
                    end_step=end,
                    start_sample=offset * per_step,
                    end_sample=(offset + (end - start)) * per_step,
                )
            )
            offset += size
    return chunks


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_samples) fixed by (seed, epoch), identical in every process and Python run."""
    digest = hashlib.sha256(f"rf-epoch-order:{seed}:{epoch}".encode()).digest()
    order = list(range(num_samples))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order
