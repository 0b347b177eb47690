"""Slot worker processes for real (spawned, importing the experiment by entrypoint): a worker killed in the middle
of a chunk is restarted, the chunk is retried from the run's last saved state, and the result is the one an
uninterrupted worker gets. The store server is left unreachable on purpose: metric rows spool to disk.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rf_core.chunks import plan_chunks
from rf_core.config import normalize_config
from rf_core.messages import ChunkOutcome, TrainTask
from rf_core.training.checkpoints import load_checkpoint
from rf_core.training.worker import STEP_DELAY_ENV, SlotWorker, SpecSource, train_with_retry
from tests import e2e_experiment
from tests.e2e_experiment import MODEL_CACHE_ENV

UNREACHABLE_SERVER = "http://127.0.0.1:9"  # the discard port: nothing listens


@pytest.fixture
def worker_env(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.setenv(STEP_DELAY_ENV, "0.5")  # so the kill lands mid-chunk
    monkeypatch.setenv("RF_STAGING_DIR", str(tmp_path / "staging"))
    return tmp_path


def start_worker(slot: int, spool: Path) -> SlotWorker:
    worker = SlotWorker(slot, SpecSource(entrypoint="tests.e2e_experiment:spec"), UNREACHABLE_SERVER, spool, 1)
    worker.start()
    worker.wait_ready()
    return worker


def test_a_worker_killed_mid_chunk_is_restarted_and_the_chunk_retried_exactly(worker_env) -> None:
    spec = e2e_experiment.spec()
    config = normalize_config({**spec.config_group, "learning_rate": 3e-3})
    plan = plan_chunks(len(spec.train_dataset), config, spec.num_chunks)

    def task(chunk_index: int, folder: str) -> TrainTask:
        return TrainTask("worker-test", 1, config, plan[chunk_index], str(worker_env / folder), seed=spec.seed)

    steady, victim = start_worker(0, worker_env / "spool-0"), start_worker(1, worker_env / "spool-1")
    try:
        expected = [train_with_retry([steady], task(index, "steady")) for index in (0, 1)]
        assert [outcome.status for outcome in expected] == ["ok", "ok"]

        assert train_with_retry([victim], task(0, "victim")).status == "ok"
        killer = threading.Thread(target=lambda: (time.sleep(0.8), victim._process.kill()))
        killer.start()
        retried = train_with_retry([victim], task(1, "victim"))  # the worker dies under this call
        killer.join()
    finally:
        steady.close()
        victim.close()
    assert victim.restarts == 1
    assert retried.status == "ok", retried.error
    assert (retried.step, retried.samples) == (expected[1].step, expected[1].samples)
    assert retried.last_train_loss == expected[1].last_train_loss
    got, want = load_checkpoint(retried.checkpoint)["trainable"], load_checkpoint(expected[1].checkpoint)["trainable"]
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
    # Metric rows were kept on disk while the server was unreachable, not dropped.
    assert any((worker_env / "spool-1").iterdir())


def test_chunks_sent_before_the_last_is_answered_are_answered_in_order_and_one_death_restarts_once(worker_env) -> None:
    """A worker that evaluates beside training: the next chunk, sent while the last one is still unanswered, trains
    while that one's boundary is evaluated, and the answers keep their order. A worker killed with two chunks out is
    restarted once, and both chunks are trained again."""
    spec = e2e_experiment.spec()
    rates = {1: 1e-3, 2: 3e-3}
    configs = {run_id: normalize_config({**spec.config_group, "learning_rate": rate}) for run_id, rate in rates.items()}

    def task(run_id: int, chunk_index: int) -> TrainTask:
        config = configs[run_id]
        chunk = plan_chunks(len(spec.train_dataset), config, spec.num_chunks)[chunk_index]
        folder = str(worker_env / f"run{run_id}")
        return replace(
            TrainTask("worker-test", run_id, config, chunk, folder, seed=spec.seed), evaluation_may_wait=True
        )

    worker = SlotWorker(
        0, SpecSource(entrypoint="tests.e2e_experiment:spec"), UNREACHABLE_SERVER, worker_env / "spool", 1,
        evaluates_beside=True,
    )  # fmt: skip
    worker.start()
    worker.wait_ready()
    outcomes: dict[tuple[int, int], ChunkOutcome] = {}

    def both(chunk_index: int, kill_after: float | None = None) -> None:
        def train(run_id: int) -> None:
            outcomes[(run_id, chunk_index)] = train_with_retry([worker], task(run_id, chunk_index))

        callers = [threading.Thread(target=train, args=(run_id,)) for run_id in (1, 2)]
        callers[0].start()
        time.sleep(0.2)  # the second is sent while the first trains
        callers[1].start()
        if kill_after is not None:
            time.sleep(kill_after)
            worker._process.kill()
        for caller in callers:
            caller.join()

    try:
        both(0)
        both(1, kill_after=0.6)
    finally:
        worker.close()
    assert all(outcome.status == "ok" for outcome in outcomes.values()), [o.error for o in outcomes.values()]
    first, second = outcomes[(1, 0)], outcomes[(2, 0)]
    assert "eval_loss" in first.eval_metrics
    assert first.ended_at > second.started_at  # run 1's boundary was evaluated while run 2's chunk trained
    assert first.ended_at <= second.ended_at
    assert worker.restarts == 1
