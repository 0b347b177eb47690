"""A synthetic experiment written straight through rf_core.control: runs, metric curves, chunks on slots, a clone.

For the dashboard's tests and benchmark (no training involved): `seed_experiment(store, "demo", runs=8,
points=20_000)` gives every run `points` minibatch-loss and learning-rate points and one eval loss per chunk.
"""

from __future__ import annotations

import uuid

import numpy as np

from rf_core.control import experiments, metrics, timeline
from rf_core.control.store import Store

BATCH_ROWS = 50_000  # the API's per-batch limit is 100k rows
SAMPLE_START = 1_790_000_000.0  # when the sample runs started logging (epoch seconds)


def seed_experiment(
    store: Store,
    name: str,
    runs: int = 4,
    points: int = 200,
    num_chunks: int = 4,
    chunks_done: int = 2,
    seed: int = 0,
    ranks: tuple[int, ...] = (4,),
) -> dict[str, object]:
    """Create experiment `name` with `runs` runs (learning rates differ; ranks cycle through `ranks`) that have
    trained `chunks_done` chunks (`points` steps in all) on two slots, with their curves. Returns what
    `experiments.create_experiment` returns."""
    rng = np.random.default_rng(seed)
    rates = np.geomspace(1e-4, 1e-2, runs)
    configs = [
        {"learning_rate": float(rate), "r": ranks[index % len(ranks)], "lora_alpha": 8}
        for index, rate in enumerate(rates)
    ]
    experiment = experiments.create_experiment(store, name, configs, num_chunks, seed=seed)
    steps = np.arange(1, points + 1)
    for run_id in range(1, runs + 1):
        for chunk in range(chunks_done):
            timeline_id = timeline.record_chunk_start(store, name, run_id, chunk, (run_id + chunk) % 2, num_chunks)
            step = points * (chunk + 1) // max(chunks_done, 1)
            outcome = {"status": "ok", "step": int(step), "epoch": 0, "samples": int(step) * 8}
            timeline.record_chunk_end(store, name, timeline_id, outcome)
        decay = 2.0 + 3.0 * np.exp(-steps * rates[run_id - 1] * 20 / max(points, 1) * 50)
        loss = decay + rng.normal(0, 0.15, points)
        learning_rate = rates[run_id - 1] * (1 - steps / (points + 1))
        rows = [
            *_rows(name, run_id, "train_loss", steps, loss, chunks_done, points),
            *_rows(name, run_id, "learning_rate", steps, learning_rate, chunks_done, points),
        ]
        eval_steps = np.array([points * (chunk + 1) // max(chunks_done, 1) for chunk in range(chunks_done)])
        rows += _rows(name, run_id, "eval_loss", eval_steps, loss[eval_steps - 1], chunks_done, points)
        for start in range(0, len(rows), BATCH_ROWS):
            metrics.log_metrics(store, uuid.uuid4().hex, rows[start : start + BATCH_ROWS])
    return experiment


def _rows(
    experiment: str, run_id: int, name: str, steps: np.ndarray, values: np.ndarray, chunks: int, points: int
) -> list[dict[str, object]]:
    chunk_of = (steps - 1) * max(chunks, 1) // max(points, 1)
    # Logged as training would: a step every half second from a fixed start, each run a minute after the last.
    times = SAMPLE_START + 60.0 * run_id + 0.5 * steps
    return [
        {"experiment": experiment, "run_id": run_id, "step": int(step), "name": name, "value": float(value),
         "chunk": int(chunk), "time": float(at)}
        for step, value, chunk, at in zip(steps.tolist(), values.tolist(), chunk_of.tolist(), times.tolist(),
                                          strict=True)
    ]  # fmt: skip


def append_points(store: Store, name: str, run_id: int, steps: np.ndarray, seed: int = 0) -> None:
    """Log more minibatch-loss and learning-rate points for a run, as its training goes on."""
    metrics.log_metrics(store, uuid.uuid4().hex, more_points(name, run_id, steps, seed))


def more_points(name: str, run_id: int, steps: np.ndarray, seed: int = 0) -> list[dict[str, object]]:
    """The metric rows of `append_points` (to send through the API when a server owns the store)."""
    values = 2.0 + np.random.default_rng(seed + int(steps[0])).normal(0, 0.15, len(steps))
    return [*_rows(name, run_id, "train_loss", steps, values, 1, int(steps[-1])),
            *_rows(name, run_id, "learning_rate", steps, np.full(len(steps), 1e-4), 1, int(steps[-1]))]  # fmt: skip
