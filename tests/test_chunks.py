"""Deterministic chunking: whole optimizer steps, uneven splits, several epochs, max_steps, and the sample order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rf_core.chunks import (
    ChunkingError,
    epoch_order,
    plan_chunks,
    samples_per_step,
    steps_per_epoch,
    total_steps,
)
from rf_core.config import normalize_config
from rf_core.messages import ChunkSpec

REPO_ROOT = Path(__file__).resolve().parents[1]


def config(**knobs: Any) -> dict[str, Any]:
    return normalize_config(knobs)


def spans(chunks: list[ChunkSpec]) -> list[tuple[int, int, int, int]]:
    """(start_step, end_step, start_sample, end_sample) per chunk: the part of a plan most tests look at."""
    return [(c.start_step, c.end_step, c.start_sample, c.end_sample) for c in chunks]


@pytest.mark.parametrize(
    ("num_samples", "batch", "accumulation", "epochs", "max_steps", "per_step", "per_epoch", "total"),
    [
        (64, 8, 1, 1, -1, 8, 8, 8),
        (70, 8, 1, 1, -1, 8, 8, 8),  # the incomplete last step is dropped
        (600, 8, 16, 1, -1, 128, 4, 4),
        (600, 8, 16, 3, -1, 128, 4, 12),
        (600, 8, 16, 3, 7, 128, 4, 7),
        (600, 8, 16, 3, 50, 128, 4, 50),  # max_steps overrides the epochs, as in HF: the data repeats
        (600, 8, 16, 1, 9, 128, 4, 9),
        (7, 8, 1, 2, -1, 8, 0, 0),
    ],
)
def test_step_arithmetic(
    num_samples: int, batch: int, accumulation: int, epochs: int, max_steps: int,
    per_step: int, per_epoch: int, total: int,
) -> None:  # fmt: skip
    cfg = config(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs,
        max_steps=max_steps,
    )
    assert samples_per_step(cfg) == per_step
    assert steps_per_epoch(num_samples, cfg) == per_epoch
    assert total_steps(num_samples, cfg) == total


def test_even_split_of_one_epoch() -> None:
    chunks = plan_chunks(64, config(per_device_train_batch_size=8), 4)
    assert spans(chunks) == [(0, 2, 0, 16), (2, 4, 16, 32), (4, 6, 32, 48), (6, 8, 48, 64)]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.chunk_in_epoch for c in chunks] == [0, 1, 2, 3]
    assert all(c.epoch == 0 and c.num_chunks == 4 and c.num_steps == 2 for c in chunks)


def test_uneven_split_gives_the_first_chunks_one_more_step() -> None:
    # 10 steps into 4 chunks: 3, 3, 2, 2.
    chunks = plan_chunks(80, config(per_device_train_batch_size=8), 4)
    assert [c.num_steps for c in chunks] == [3, 3, 2, 2]
    assert spans(chunks) == [(0, 3, 0, 24), (3, 6, 24, 48), (6, 8, 48, 64), (8, 10, 64, 80)]


def test_gradient_accumulation_counts_whole_optimizer_steps() -> None:
    # 100 samples at 4 × 3 = 12 per step: 8 steps (96 samples), the last 4 samples dropped.
    chunks = plan_chunks(100, config(per_device_train_batch_size=4, gradient_accumulation_steps=3), 3)
    assert spans(chunks) == [(0, 3, 0, 36), (3, 6, 36, 72), (6, 8, 72, 96)]


def test_several_epochs_are_epoch_major_with_samples_local_to_the_epoch() -> None:
    chunks = plan_chunks(50, config(per_device_train_batch_size=10, num_train_epochs=3), 2)
    # 5 steps per epoch → chunks of 3 and 2 steps in every epoch.
    assert [(c.index, c.epoch, c.chunk_in_epoch) for c in chunks] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 2, 0), (5, 2, 1),
    ]  # fmt: skip
    assert spans(chunks) == [
        (0, 3, 0, 30), (3, 5, 30, 50),
        (5, 8, 0, 30), (8, 10, 30, 50),
        (10, 13, 0, 30), (13, 15, 30, 50),
    ]  # fmt: skip


def test_chunks_tile_the_run_without_gaps() -> None:
    cfg = config(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=4)
    chunks = plan_chunks(1000, cfg, 7)
    assert chunks[0].start_step == 0
    assert all(a.end_step == b.start_step for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[-1].end_step == total_steps(1000, cfg)
    assert all(c.end_sample - c.start_sample == c.num_steps * samples_per_step(cfg) for c in chunks)
    assert max(c.num_steps for c in chunks) - min(c.num_steps for c in chunks) <= 1


@pytest.mark.parametrize(
    ("max_steps", "expected"),
    [
        # 8 steps per epoch in 4 chunks of 2, two epochs; the run ends inside the chunk that reaches max_steps.
        (5, [(0, 2, 0, 16), (2, 4, 16, 32), (4, 5, 32, 40)]),
        (6, [(0, 2, 0, 16), (2, 4, 16, 32), (4, 6, 32, 48)]),
        (1, [(0, 1, 0, 8)]),
        (11, [(0, 2, 0, 16), (2, 4, 16, 32), (4, 6, 32, 48), (6, 8, 48, 64), (8, 10, 0, 16), (10, 11, 16, 24)]),
        (16, [(s, s + 2, (s % 8) * 8, (s % 8 + 2) * 8) for s in range(0, 16, 2)]),
        # Beyond num_train_epochs: max_steps wins (HF semantics), the epochs go on in their own orders.
        (21, [(s, min(s + 2, 21), (s % 8) * 8, (min(s + 2, 21) - s + s % 8) * 8) for s in range(0, 21, 2)]),
    ],
)
def test_max_steps_ends_the_run_inside_its_chunk(max_steps: int, expected: list[tuple[int, int, int, int]]) -> None:
    cfg = config(per_device_train_batch_size=8, num_train_epochs=2, max_steps=max_steps)
    chunks = plan_chunks(64, cfg, 4)
    assert spans(chunks) == expected
    assert chunks[-1].end_step == total_steps(64, cfg)


def test_too_many_chunks_names_the_numbers() -> None:
    cfg = config(per_device_train_batch_size=8, gradient_accumulation_steps=16)
    message = "num_chunks=5 exceeds the 4 optimizer steps in one epoch (600 samples / (batch 8 × accumulation 16))"
    with pytest.raises(ChunkingError) as info:
        plan_chunks(600, cfg, 5)
    assert str(info.value) == message
    assert len(plan_chunks(600, cfg, 4)) == 4


@pytest.mark.parametrize(
    ("num_samples", "num_chunks", "message"),
    [
        (64, 0, "num_chunks must be an integer >= 1, got num_chunks=0"),
        (64, -1, "num_chunks=-1"),
        (64, 2.0, "num_chunks=2.0"),
        (64, True, "num_chunks=True"),
        (7, 1, "an epoch of 7 samples has no whole optimizer step of 8 samples (batch 8 × accumulation 1)"),
        (0, 1, "an epoch of 0 samples"),
        (-5, 1, "num_samples must be an integer >= 0, got num_samples=-5"),
    ],
)
def test_chunking_errors(num_samples: int, num_chunks: Any, message: str) -> None:
    with pytest.raises(ChunkingError) as info:
        plan_chunks(num_samples, config(), num_chunks)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


# -- epoch_order ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "seed", "epoch"), [(0, 0, 0), (1, 0, 0), (100, 42, 0), (257, 7, 3)])
def test_epoch_order_is_a_deterministic_permutation(num_samples: int, seed: int, epoch: int) -> None:
    order = epoch_order(num_samples, seed, epoch)
    assert sorted(order) == list(range(num_samples))
    assert order == epoch_order(num_samples, seed, epoch)


def test_epoch_order_depends_on_seed_and_epoch() -> None:
    base = epoch_order(100, 1, 0)
    assert base != epoch_order(100, 2, 0)
    assert base != epoch_order(100, 1, 1)
    assert base != list(range(100))
    # (seed, epoch) pairs that would collide if simply concatenated.
    assert epoch_order(100, 1, 23) != epoch_order(100, 12, 3)


def test_epoch_order_is_stable_across_processes() -> None:
    script = "from rf_core.chunks import epoch_order; print(epoch_order(50, 42, 1))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True,
            cwd=REPO_ROOT, env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout.strip()
        for hash_seed in ("0", "1")
    }  # fmt: skip
    assert outputs == {str(epoch_order(50, 42, 1))}
