"""A policy's incremental view against the whole one, on the real rf server and its DuckDB store: through a fit's
life (chunks started and ended, metric rows mid-chunk and at the end, an attempt abandoned and retried, ops queued
and applied, a run failed, the policy's own decisions), what `PolicyReader.read` merges equals what
`read_snapshot` reads whole, and the views after the first carry only what changed."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rf_core import policies_runner
from rf_core.client import RFClient
from rf_core.errors import InvalidRequest
from rf_core.policies import AsyncSuccessiveHalving, RunView
from rf_core.policies_runner import PolicyReader, apply_policy, read_snapshot
from tests.test_server_api import CONFIG, start_server, stop

NOW = 1_000_000.0
RUN_FIELDS = [
    field.name for field in dataclasses.fields(RunView)
]  # a fixed clock for both views, so they compare equal


@pytest.fixture
def client(tmp_path: Path) -> Iterator[RFClient]:
    process, info = start_server(tmp_path / "home")
    yield RFClient(info["url"])
    stop(process)


class CountingClient:
    """The real client, noting how many runs and metric rows each policy view carried."""

    def __init__(self, client: RFClient) -> None:
        self._client = client
        self.views: list[tuple[int, int]] = []

    def policy_view(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        view = self._client.policy_view(*args, **kwargs)
        self.views.append((len(view["runs"]), len(view["metrics"])))
        return view

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def rows_for(run_id: int, chunk: int, steps: range, loss: float, attempt: int) -> list[dict[str, Any]]:
    return [
        {"experiment": "x", "run_id": run_id, "step": step, "name": name, "value": loss + step / 100, "chunk": chunk,
         "attempt": attempt}
        for step in steps
        for name in ("train_loss", "eval_loss")
    ]  # fmt: skip


def test_the_incremental_view_equals_the_whole_one_through_a_fit(client: RFClient, monkeypatch) -> None:
    # No safety margin and no periodic whole read: every merge is tested as it is.
    monkeypatch.setattr(policies_runner, "CHANGES_MARGIN_S", 0.0)
    monkeypatch.setattr(policies_runner, "READ_ALL_EVERY_S", 1e9)
    rng = random.Random(5)
    num_runs, num_chunks, steps_per_chunk = 12, 3, 4
    client.create_experiment(
        "x", [{**CONFIG, "learning_rate": 10 ** -rng.uniform(3, 5)} for _ in range(num_runs)], num_chunks=num_chunks
    )
    policy = AsyncSuccessiveHalving(eta=3, min_chunks=1)
    counting = CountingClient(client)
    reader = PolicyReader(counting, "x", policy)
    batches = 0

    def log(rows: list[dict[str, Any]]) -> None:
        nonlocal batches
        batches += 1
        client.log_metrics(f"batch-{batches}", rows)

    def check() -> None:
        merged, whole = reader.read(now=NOW), read_snapshot(client, "x", policy, now=NOW)
        assert [run.run_id for run in merged.runs] == [run.run_id for run in whole.runs]
        for mine, theirs in zip(merged.runs, whole.runs, strict=True):
            differing = [name for name in RUN_FIELDS if getattr(mine, name) != getattr(theirs, name)]
            assert not differing, (
                mine.run_id,
                {name: (getattr(mine, name), getattr(theirs, name)) for name in differing},
            )
        assert merged == whole

    check()
    for chunk in range(num_chunks):
        for run_id in range(1, num_runs + 1):
            run = client.get_run("x", run_id)
            if run["status"] not in ("New", "Ongoing") or run["chunks_done"] != chunk:
                continue
            steps = range(chunk * steps_per_chunk + 1, (chunk + 1) * steps_per_chunk + 1)
            attempt = client.chunk_start("x", run_id, chunk, 0, num_chunks)
            log(rows_for(run_id, chunk, steps[:2], 3.0, attempt))  # mid-chunk rows
            check()
            if run_id == 3 and chunk == 1:  # the worker dies; the retry drops what the attempt logged
                attempt = client.chunk_start("x", run_id, chunk, 1, num_chunks)
                check()
                log(rows_for(run_id, chunk, steps[:2], 3.0, attempt))
            if run_id == 5 and chunk == 1:
                client.fail_run("x", run_id, "out of memory")
                check()
                continue
            loss = 1.0 + rng.random()
            log(rows_for(run_id, chunk, steps[2:], loss, attempt))
            outcome = {"run_id": run_id, "chunk_index": chunk, "status": "ok" if chunk + 1 < num_chunks else
                       "completed", "step": steps[-1], "epoch": 0, "samples": 32, "checkpoint": f"/c/{run_id}",
                       "eval_metrics": {"eval_loss": loss}}  # fmt: skip
            client.chunk_end("x", attempt, outcome)
            check()
            decided = apply_policy(client, "x", policy, reader=reader)  # its decisions land in the next view
            check()
            if decided:
                client.boundary_view("x", busy_run_ids=[])  # the policy's stops apply
                check()
        if chunk == 0:
            client.submit_op("x", "stop", 2)  # queued: the run's kinds change though the run does not
            check()
            client.submit_op("x", "clone", 1, {"overrides": {"learning_rate": 1e-3}})
            client.boundary_view("x", busy_run_ids=[])  # the clone is a new run; the stop applies
            check()
            num_runs += 1
    assert counting.views[0][0] == 12  # the first view is whole
    # After the first, views carry the runs that changed, not all of them.
    assert max(runs for runs, _ in counting.views[1:]) < num_runs
    assert sum(runs for runs, _ in counting.views[1:]) < len(counting.views[1:]) * num_runs / 4


def test_a_policy_view_refuses_bad_arguments(client: RFClient) -> None:
    client.create_experiment("y", [CONFIG], num_chunks=2)
    with pytest.raises(InvalidRequest, match="after_row must be a row number"):
        client.policy_view("y", "asha", ["eval_loss"], after_row="1.5")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="since must be a time"):
        client.policy_view("y", "asha", ["eval_loss"], since="soon")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="policy must be"):
        client.policy_view("y", "", ["eval_loss"])
    view = client.policy_view("y", "asha", ["eval_loss"])
    assert [run["run_id"] for run in view["runs"]] == [1] and view["metrics"] == [] and view["last_row"] >= -1
