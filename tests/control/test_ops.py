"""rf_core.control on a real DuckDBStore: op validation against pending ops, applying at boundaries, bookkeeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rf_core import errors, states
from rf_core.config import normalize_config
from rf_core.control import experiments, metrics, ops, timeline
from rf_core.control.store import DuckDBStore
from rf_core.states import RunStatus

BASE = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 8, "lora_alpha": 16}


@pytest.fixture
def store(tmp_path: Path):
    opened = DuckDBStore(tmp_path / "rf.duckdb")
    yield opened
    opened.close()


@pytest.fixture
def exp(store: DuckDBStore) -> str:
    """An experiment with three New runs (learning rates 1e-3, 1e-4, 1e-5)."""
    configs = [{**BASE, "learning_rate": lr} for lr in (1e-3, 1e-4, 1e-5)]
    experiments.create_experiment(store, "exp", configs, num_chunks=4, seed=1)
    return "exp"


def train_chunk(store: DuckDBStore, run_id: int, chunk: int, status: str = "ok", **extra: Any) -> dict[str, Any]:
    """Record one chunk of `run_id` as the fit flow would."""
    timeline_id = timeline.record_chunk_start(store, "exp", run_id, chunk, slot=0, total_chunks=4)
    outcome = {
        "run_id": run_id,
        "chunk_index": chunk,
        "status": status,
        "step": 10 * (chunk + 1),
        "epoch": 0,
        "samples": 80 * (chunk + 1),
        "checkpoint": f"/ckpt/run-{run_id}/chunk-{chunk}.pt" if status != "failed" else None,
        **extra,
    }
    return timeline.record_chunk_end(store, "exp", timeline_id, outcome)


def submit(store: DuckDBStore, kind: str, run_id: int, payload: Any = None) -> dict[str, Any]:
    return ops.submit_op(store, "exp", kind, run_id, payload, source="cli", who="tester")


def rejected(store: DuckDBStore, kind: str, run_id: int, payload: Any = None) -> list[str]:
    before = len(store.list_ops("exp"))
    with pytest.raises(errors.OpRejected) as info:
        submit(store, kind, run_id, payload)
    assert len(store.list_ops("exp")) == before, "a rejected op must not write a row"
    return info.value.problems


# -- validation --------------------------------------------------------------------------------------------


def test_a_second_stop_while_one_is_pending_names_the_pending_op(store: DuckDBStore, exp: str) -> None:
    first = submit(store, "stop", 3)
    assert rejected(store, "stop", 3) == [f"run 3 will already be stopped by op {first['op_id']}"]


def test_stop_then_resume_is_allowed_and_a_second_resume_is_not(store: DuckDBStore, exp: str) -> None:
    submit(store, "stop", 1)
    resume = submit(store, "resume", 1)
    assert resume["status"] == "pending"
    assert rejected(store, "resume", 1) == [f"run 1 will already be resumed by op {resume['op_id']}"]


def test_resume_of_a_new_run_is_rejected_naming_its_state(store: DuckDBStore, exp: str) -> None:
    (problem,) = rejected(store, "resume", 2)
    assert "it is New" in problem


def test_ops_on_a_deleted_run_are_rejected_naming_the_state(store: DuckDBStore, exp: str) -> None:
    delete = submit(store, "delete", 2)
    assert rejected(store, "stop", 2) == [
        f"cannot stop run 2: it will be Deleted once pending op {delete['op_id']} (delete) applies"
    ]
    ops.apply_due_ops(store, "exp", [2])
    for kind in ("stop", "resume", "clone", "delete"):
        (problem,) = rejected(store, kind, 2)
        assert "it is Deleted" in problem


def test_unknown_run_and_unknown_experiment(store: DuckDBStore, exp: str) -> None:
    assert rejected(store, "stop", 9) == ["experiment exp has no run 9"]
    with pytest.raises(errors.NotFound, match="no experiment named 'nope'"):
        ops.submit_op(store, "nope", "stop", 1)


@pytest.mark.parametrize(
    ("kind", "run_id", "payload", "source", "expected"),
    [
        ("pause", 1, None, "cli", "unknown op kind 'pause'"),
        ("stop", "1", None, "cli", "run_id must be an integer"),
        ("stop", 1, None, "robot", "source must be 'dashboard', 'cli', 'api' or 'policy:<name>'"),
        ("stop", 1, [1, 2], "cli", "payload must be a JSON object or null"),
        ("clone", 1, "lr=1", "cli", "clone payload must be a JSON object"),
        ("clone", 1, {"overrides": [1]}, "cli", "'overrides' must be a JSON object"),
        ("clone", 1, {"config": BASE, "overrides": {}}, "cli", "either 'config'"),
        ("clone", 1, {"warm_start": "yes"}, "cli", "warm_start must be one of"),
        ("clone", 1, {"overides": {}}, "cli", "unknown clone payload keys ['overides']"),
    ],
)
def test_malformed_ops_are_rejected_clearly(
    store: DuckDBStore, exp: str, kind: str, run_id: Any, payload: Any, source: str, expected: str
) -> None:
    with pytest.raises(errors.OpRejected) as info:
        ops.submit_op(store, "exp", kind, run_id, payload, source=source)
    assert any(expected in problem for problem in info.value.problems), info.value.problems
    assert store.list_ops("exp") == []


def test_clone_with_an_unknown_config_key_names_the_key(store: DuckDBStore, exp: str) -> None:
    problems = rejected(store, "clone", 1, {"overrides": {"learning_rat": 1e-4}})
    assert any("learning_rat" in problem for problem in problems), problems


def test_clone_with_a_range_whose_low_exceeds_high_is_rejected(store: DuckDBStore, exp: str) -> None:
    payload = {"overrides": {"learning_rate": {"$range": {"low": 1e-3, "high": 1e-5}}}}
    assert rejected(store, "clone", 1, payload) == [
        'learning_rate={"$range": {"low": 0.001, "high": 1e-05}}: Range low must be <= high, got low=0.001 > high=1e-05'
    ]  # named by its knob, so the dashboard writes it under that line


def test_a_tagged_list_clone_expands_to_one_config_per_value(store: DuckDBStore, exp: str) -> None:
    op = submit(store, "clone", 1, {"overrides": {"learning_rate": {"$list": [1e-4, 2e-4, 3e-4]}}})
    assert op["payload"]["count"] == 3
    assert [config["learning_rate"] for config in op["payload"]["configs"]] == [1e-4, 2e-4, 3e-4]
    assert all(config["r"] == 8 for config in op["payload"]["configs"])


def test_a_full_config_clone_is_stored_normalised(store: DuckDBStore, exp: str) -> None:
    op = submit(store, "clone", 2, {"config": {**BASE, "learning_rate": 5e-4}})
    (config,) = op["payload"]["configs"]
    assert config["learning_rate"] == 5e-4
    assert config == normalize_config(config)


def test_warm_clone_of_a_new_run_is_rejected(store: DuckDBStore, exp: str) -> None:
    assert rejected(store, "clone", 2, {"warm_start": "weights"}) == [
        "run 2 has no trained state yet: clone it cold (warm_start off) or after a chunk"
    ]
    assert submit(store, "clone", 2, {"warm_start": "off"})["status"] == "pending"


def test_warm_clone_with_another_rank_is_rejected_naming_r(store: DuckDBStore, exp: str) -> None:
    train_chunk(store, 1, 0)
    problems = rejected(store, "clone", 1, {"overrides": {"r": 16}, "warm_start": "weights"})
    assert problems == ["warm start needs the parent's architecture: r differs: parent 8, clone 16"]
    cold = submit(store, "clone", 1, {"overrides": {"r": 16}})
    assert cold["payload"]["configs"][0]["r"] == 16


def test_optimizer_state_does_not_cross_into_or_out_of_deepspeed(store: DuckDBStore, exp: str) -> None:
    train_chunk(store, 1, 0)
    onto_deepspeed = {"overrides": {"strategy": "deepspeed"}, "warm_start": "weights+optimizer"}
    [problem] = rejected(store, "clone", 1, onto_deepspeed)
    assert "DeepSpeed" in problem and "use warm_start 'weights'" in problem
    weights_only = submit(store, "clone", 1, {**onto_deepspeed, "warm_start": "weights"})
    assert weights_only["payload"]["configs"][0]["strategy"] == "deepspeed"
    # Across DDP gangs of any size the state is the same as a single device's: the optimizer comes along.
    wider = submit(store, "clone", 1, {"overrides": {"num_devices": 2}, "warm_start": "weights+optimizer"})
    assert wider["status"] == "pending"


def test_failed_run_warm_clones_from_its_last_good_checkpoint(store: DuckDBStore, exp: str) -> None:
    train_chunk(store, 1, 0)
    train_chunk(store, 1, 1, status="failed", error="CUDA out of memory", traceback="Traceback ...")
    run = store.get_run("exp", 1)
    assert run["status"] == "Failed" and run["error"] == "CUDA out of memory"
    assert run["checkpoint"] == "/ckpt/run-1/chunk-0.pt" and run["chunks_done"] == 1
    op = submit(store, "clone", 1, {"warm_start": "weights+optimizer"})
    (applied,) = ops.apply_due_ops(store, "exp", [1])
    (clone_id,) = applied["result"]["created_run_ids"]
    clone = store.get_run("exp", clone_id)
    assert applied["op_id"] == op["op_id"]
    assert clone["warm_start_checkpoint"] == "/ckpt/run-1/chunk-0.pt" and clone["parent_step"] == 10


def test_a_failed_run_without_checkpoint_cannot_be_warm_cloned(store: DuckDBStore, exp: str) -> None:
    train_chunk(store, 2, 0, status="failed", error="boom")
    (problem,) = rejected(store, "clone", 2, {"warm_start": "weights"})
    assert "failed before saving any checkpoint" in problem


def test_check_op_is_pure_and_folds_pending_ops() -> None:
    def problems(kind, run, pending, experiment="exp", run_id=None):
        return ops.check_op(kind, run, pending, None, None, experiment=experiment, run_id=run_id)[0]

    run = {"run_id": 3, "status": "Ongoing", "config": BASE, "checkpoint": None}
    pending = [{"op_id": 17, "kind": "stop"}, {"op_id": 18, "kind": "resume"}, {"op_id": 19, "kind": "stop"}]
    assert problems("stop", run, pending) == ["run 3 will already be stopped by op 19"]
    assert problems("resume", run, pending) == []
    assert problems("stop", None, [], experiment="X", run_id=9) == ["experiment X has no run 9"]


def test_several_clones_of_one_run_are_never_duplicates(store: DuckDBStore, exp: str) -> None:
    first = submit(store, "clone", 1, {"overrides": {}})
    second = submit(store, "clone", 1, {"overrides": {}})
    applied = ops.apply_due_ops(store, "exp", [1])
    assert [op["op_id"] for op in applied] == [first["op_id"], second["op_id"]]
    assert [op["result"]["created_run_ids"] for op in applied] == [[4], [5]]


# -- applying ----------------------------------------------------------------------------------------------


def test_ops_apply_in_submission_order_only_for_idle_runs(store: DuckDBStore, exp: str) -> None:
    stop = submit(store, "stop", 1)
    resume = submit(store, "resume", 1)
    other = submit(store, "stop", 2)
    applied = ops.apply_due_ops(store, "exp", [1])
    assert [op["op_id"] for op in applied] == [stop["op_id"], resume["op_id"]]
    assert all(op["status"] == "applied" for op in applied)
    assert store.get_run("exp", 1)["status"] == "Ongoing"  # a resumed run goes back to Ongoing
    assert store.get_op(other["op_id"])["status"] == "pending"  # run 2 is busy: its op waits
    assert ops.apply_due_ops(store, "exp", [2])[0]["result"] == {"from": "New", "to": "Stopped"}
    run = store.get_run("exp", 2)
    assert run["status"] == "Stopped" and run["ended_by"] == str(other["op_id"])


def test_boundary_view_applies_ops_of_runs_not_in_flight_and_returns_the_runs_after(
    store: DuckDBStore, exp: str
) -> None:
    stop_busy = submit(store, "stop", 1)
    stop_idle = submit(store, "stop", 2)
    view = ops.boundary_view(store, "exp", [1])
    assert [op["op_id"] for op in view["applied_ops"]] == [stop_idle["op_id"]]
    statuses = {run["run_id"]: run["status"] for run in view["runs"]}
    assert statuses[2] == "Stopped" and statuses[1] == "New"
    assert store.get_op(stop_busy["op_id"])["status"] == "pending"  # run 1 is training: its op waits
    assert ops.boundary_view(store, "exp", [1])["applied_ops"] == []
    with pytest.raises(errors.InvalidRequest, match="busy_run_ids"):
        ops.boundary_view(store, "exp", "1")


def test_a_boundary_records_ends_then_applies_ops_then_starts_the_picks_still_legal(
    store: DuckDBStore, exp: str
) -> None:
    attempt = timeline.record_chunk_start(store, "exp", 1, 0, slot=0, total_chunks=4)
    outcome = {"run_id": 1, "chunk_index": 0, "status": "ok", "step": 10, "epoch": 0, "samples": 80}
    stop = submit(store, "stop", 2)
    picks = [
        {"run_id": 2, "chunk_index": 0, "slot": 0, "total_chunks": 4},  # stopped by the op applied first
        {"run_id": 3, "chunk_index": 1, "slot": 1, "total_chunks": 4},  # has no chunk done
        {"run_id": 1, "chunk_index": 1, "slot": 1, "total_chunks": 4},  # its first chunk counts once recorded
    ]
    view = ops.boundary_view(store, "exp", [], ended=[{"timeline_id": attempt, "outcome": outcome}], starts=picks)

    assert [op["op_id"] for op in view["applied_ops"]] == [stop["op_id"]]
    assert view["refused"] == {2: "run 2 is Stopped now: a chunk cannot start", 3: "run 3 has 0 chunks done, not 1"}
    (started,) = view["started"].items()
    assert started[0] == 1
    entry = store.get_timeline(started[1])
    assert (entry["run_id"], entry["chunk"], entry["slot"], entry["end"]) == (1, 1, 1, None)
    assert store.get_timeline(attempt)["outcome"] == "ok"
    rows = {run["run_id"]: run for run in view["runs"]}
    assert rows[1]["chunks_done"] == 1 and rows[1]["status"] == "Ongoing" and rows[2]["status"] == "Stopped"
    # The same request again (a retry after a lost answer) records nothing twice and starts nothing twice.
    again = ops.boundary_view(store, "exp", [], ended=[{"timeline_id": attempt, "outcome": outcome}], starts=picks[2:])
    assert again["started"] == {} and again["refused"] == {1: "run 1 is training a chunk already"}
    assert len(store.list_timeline("exp")) == 2


def test_a_boundary_since_an_earlier_answer_sends_only_the_runs_changed_since(store: DuckDBStore, exp: str) -> None:
    first = ops.boundary_view(store, "exp", [])
    assert [run["run_id"] for run in first["runs"]] == [1, 2, 3]
    submit(store, "stop", 2)
    later = ops.boundary_view(store, "exp", [], since=first["as_of"])
    assert [(run["run_id"], run["status"]) for run in later["runs"]] == [(2, "Stopped")]
    assert ops.boundary_view(store, "exp", [], since=later["as_of"])["runs"] == []
    with pytest.raises(errors.InvalidRequest, match="since must be a number"):
        ops.boundary_view(store, "exp", [], since="yesterday")  # type: ignore[arg-type]


def test_a_malformed_boundary_request_changes_nothing(store: DuckDBStore, exp: str) -> None:
    submit(store, "stop", 2)
    with pytest.raises(errors.InvalidRequest) as info:
        ops.boundary_view(store, "exp", [], ended=[{"outcome": {}}], starts=[{"run_id": "1", "chunk_index": 0,
                                                                          "slot": 0, "total_chunks": 4}])  # fmt: skip
    assert info.value.problems == [
        "ended[0] lacks timeline_id",
        "starts[0]: run_id, chunk_index, slot, total_chunks must be integers, got "
        "{'run_id': '1', 'chunk_index': 0, 'slot': 0, 'total_chunks': 4}",
    ]
    assert store.get_run("exp", 2)["status"] == "New"  # the op still waits


def test_an_op_no_longer_legal_is_skipped_with_the_reason(store: DuckDBStore, exp: str) -> None:
    train_chunk(store, 1, 0)
    stop = submit(store, "stop", 1)
    train_chunk(store, 1, 1, status="completed")  # the run finished its last chunk before the boundary
    (skipped,) = ops.apply_due_ops(store, "exp", [1])
    assert skipped["op_id"] == stop["op_id"] and skipped["status"] == "skipped"
    assert skipped["reason"] == "run 1 is Completed now: stop no longer applies"
    assert store.get_run("exp", 1)["status"] == "Completed"


def test_clones_are_created_with_parent_and_warm_start_fields(store: DuckDBStore, exp: str) -> None:
    train_chunk(store, 1, 0)
    train_chunk(store, 1, 1)
    payload = {"overrides": {"learning_rate": {"$list": [1e-4, 2e-4]}}, "warm_start": "weights"}
    warm = ops.submit_op(store, "exp", "clone", 1, payload, source="policy:pbt")
    cold = submit(store, "clone", 1, {"overrides": {"learning_rate": 7e-4}})
    applied = ops.apply_due_ops(store, "exp", [1, 2, 3])
    assert [op["op_id"] for op in applied] == [warm["op_id"], cold["op_id"]]
    assert applied[0]["result"] == {"created_run_ids": [4, 5]}
    assert applied[1]["result"] == {"created_run_ids": [6]}
    runs = {run["run_id"]: run for run in experiments.list_runs(store, "exp")}
    for run_id, lr in ((4, 1e-4), (5, 2e-4)):
        clone = runs[run_id]
        assert clone["status"] == "New" and clone["parent_id"] == 1 and clone["source"] == "policy:pbt"
        assert clone["warm_start"] == "weights" and clone["warm_start_checkpoint"] == "/ckpt/run-1/chunk-1.pt"
        assert clone["parent_step"] == 20 and clone["config"]["learning_rate"] == lr
    assert runs[6]["warm_start"] == "off" and runs[6]["warm_start_checkpoint"] is None
    assert runs[6]["source"] == "cli" and runs[6]["parent_step"] == 20


def test_a_warm_clone_of_a_run_in_its_first_chunk_waits_for_its_checkpoint(store: DuckDBStore, exp: str) -> None:
    timeline_id = timeline.record_chunk_start(store, "exp", 1, 0, slot=0, total_chunks=4)
    op = submit(store, "clone", 1, {"warm_start": "weights"})  # Ongoing: it will have state at its boundary
    timeline.record_chunk_end(
        store, "exp", timeline_id,
        {"status": "ok", "step": 10, "epoch": 0, "samples": 80, "checkpoint": "/ckpt/run-1/chunk-0.pt"},
    )  # fmt: skip
    (applied,) = ops.apply_due_ops(store, "exp", [1])
    assert applied["op_id"] == op["op_id"] and applied["status"] == "applied"


# -- bookkeeping -------------------------------------------------------------------------------------------


def test_chunk_bookkeeping_moves_new_to_ongoing_to_completed(store: DuckDBStore, exp: str) -> None:
    run = train_chunk(store, 1, 0)
    assert run["status"] == "Ongoing" and run["chunks_done"] == 1 and run["total_chunks"] == 4
    assert run["step"] == 10 and run["samples"] == 80 and run["checkpoint"] == "/ckpt/run-1/chunk-0.pt"
    run = train_chunk(store, 1, 1, status="completed")
    assert run["status"] == "Completed" and run["ended_by"] == "completed" and run["chunks_done"] == 2
    entries = timeline.timeline(store, "exp")
    assert [(entry["chunk"], entry["outcome"]) for entry in entries] == [(0, "ok"), (1, "completed")]
    with pytest.raises(errors.IllegalTransition):
        timeline.record_chunk_start(store, "exp", 1, 2, slot=0, total_chunks=4)


def test_a_run_that_cannot_train_fails_with_the_reason_and_no_chunk(store: DuckDBStore, exp: str) -> None:
    run = timeline.fail_run(store, "exp", 1, "cannot split run 1 into chunks: num_chunks=4 exceeds 2 steps")
    assert (run["status"], run["ended_by"]) == ("Failed", "failed") and "num_chunks=4" in run["error"]
    assert timeline.fail_run(store, "exp", 1, "a retry")["error"] == run["error"]  # repeating is harmless
    assert timeline.timeline(store, "exp") == []
    ops.submit_op(store, "exp", "delete", 2)
    ops.apply_due_ops(store, "exp", [2])
    with pytest.raises(errors.IllegalTransition, match="run 2 is Deleted"):
        timeline.fail_run(store, "exp", 2, "too late")
    with pytest.raises(errors.InvalidRequest, match="error must be a non-empty string"):
        timeline.fail_run(store, "exp", 3, "  ")
    with pytest.raises(errors.NotFound):
        timeline.fail_run(store, "exp", 9, "no such run")


def test_recording_a_chunk_end_twice_changes_nothing(store: DuckDBStore, exp: str) -> None:
    timeline_id = timeline.record_chunk_start(store, "exp", 2, 0, slot=1, total_chunks=4)
    outcome = {"status": "ok", "step": 5, "epoch": 0, "samples": 40, "checkpoint": "/c.pt"}
    first = timeline.record_chunk_end(store, "exp", timeline_id, outcome)
    again = timeline.record_chunk_end(store, "exp", timeline_id, {**outcome, "step": 999})
    assert again["step"] == first["step"] == 5


def test_bad_chunk_outcomes_are_invalid_requests(store: DuckDBStore, exp: str) -> None:
    timeline_id = timeline.record_chunk_start(store, "exp", 2, 0, slot=1, total_chunks=4)
    with pytest.raises(errors.InvalidRequest, match="outcome status must be one of"):
        timeline.record_chunk_end(store, "exp", timeline_id, {"status": "great", "step": 1, "epoch": 0, "samples": 1})
    with pytest.raises(errors.NotFound):
        timeline.record_chunk_end(store, "exp", 999, {"status": "ok", "step": 1, "epoch": 0, "samples": 1})


# -- experiments, listings, metrics ------------------------------------------------------------------------


def test_create_experiment_validates_every_config_and_refuses_a_used_name(store: DuckDBStore, exp: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        experiments.create_experiment(store, "other", [BASE, {**BASE, "learning_rat": 1}], num_chunks=0)
    assert any("num_chunks" in problem for problem in info.value.problems)
    assert any(problem.startswith("config 2:") for problem in info.value.problems)
    with pytest.raises(errors.ExperimentExists, match="choose another name, e.g. 'exp-2'"):
        experiments.create_experiment(store, "exp", [BASE], num_chunks=2)
    assert store.get_experiment("other") is None


def test_deleted_runs_and_runs_being_deleted_are_hidden_by_default(store: DuckDBStore, exp: str) -> None:
    submit(store, "delete", 2)
    assert [run["run_id"] for run in experiments.list_runs(store, "exp")] == [1, 3]
    ops.apply_due_ops(store, "exp", [2])
    assert [run["run_id"] for run in experiments.list_runs(store, "exp")] == [1, 3]
    assert [run["run_id"] for run in experiments.list_runs(store, "exp", include_deleted=True)] == [1, 2, 3]
    assert store.get_run("exp", 2)["status"] == RunStatus.DELETED


def test_snapshot_has_losses_best_metric_pending_ops_and_varying_knobs(store: DuckDBStore, exp: str) -> None:
    rows = [
        {"experiment": "exp", "run_id": 1, "step": step, "name": name, "value": value, "chunk": 0}
        for step, name, value in [(1, "train_loss", 2.0), (2, "train_loss", 1.5), (2, "eval_loss", 1.8),
                                  (4, "eval_loss", 1.2), (6, "eval_loss", 1.4)]
    ]  # fmt: skip
    assert metrics.log_metrics(store, "batch-a", rows) == {
        "batch_id": "batch-a",
        "inserted": True,
        "rows": 5,
        "dropped": 0,
    }
    assert metrics.log_metrics(store, "batch-a", rows)["inserted"] is False
    submit(store, "stop", 2)
    snapshot = experiments.experiment_snapshot(store, "exp")
    first, second, _ = snapshot["runs"]
    assert (first["train_loss"], first["latest_metric"], first["best_metric"]) == (1.5, 1.4, 1.2)
    assert second["pending_ops"] == 1 and second["pending_op_kinds"] == ["stop"]
    assert second["train_loss"] is None
    assert snapshot["varying_knobs"] == ["learning_rate"]
    assert len(metrics.metrics(store, "exp", run_ids=[1], names=["eval_loss"])) == 3


def test_metric_rows_are_validated(store: DuckDBStore, exp: str) -> None:
    with pytest.raises(errors.InvalidRequest, match="row 0: run_id must be an integer"):
        metrics.log_metrics(store, "b", [{"experiment": "exp", "run_id": "one", "step": 1, "name": "x", "value": 1}])
    with pytest.raises(errors.NotFound):
        metrics.log_metrics(store, "b", [{"experiment": "nope", "run_id": 1, "step": 1, "name": "x", "value": 1}])


def test_a_retried_chunk_closes_the_dead_attempt_and_keeps_each_metric_once(store: DuckDBStore, exp: str) -> None:
    """A worker or the flow died mid-chunk: the next attempt at that chunk replaces the partial one."""

    def log(chunk: int, steps: range, batch: str) -> None:
        rows = [{"experiment": exp, "run_id": 1, "step": step, "name": "train_loss", "value": 1.0 / step,
                 "chunk": chunk, "time": 0.0} for step in steps]  # fmt: skip
        metrics.log_metrics(store, batch, rows)

    train_chunk(store, 1, 0)
    log(0, range(1, 11), "committed")
    dead = timeline.record_chunk_start(store, exp, 1, 1, slot=0, total_chunks=4)
    log(1, range(11, 15), "partial")  # the attempt dies here, without an answer
    retry = timeline.record_chunk_start(store, exp, 1, 1, slot=1, total_chunks=4)
    entries = {entry["id"]: entry for entry in timeline.timeline(store, exp)}
    assert entries[dead]["outcome"] == states.ABANDONED and entries[dead]["end"] is not None
    assert entries[retry]["end"] is None
    log(1, range(11, 21), "retried")
    steps = [row["step"] for row in metrics.metrics(store, exp, run_ids=[1])]
    assert steps == list(range(1, 21))  # each step once: the committed chunk kept, the partial attempt dropped

    late = {"run_id": 1, "chunk_index": 1, "status": "ok", "step": 99, "epoch": 0, "samples": 1, "checkpoint": "/x"}
    assert timeline.record_chunk_end(store, exp, dead, late)["chunks_done"] == 1  # the dead attempt's answer is ignored
    timeline.record_chunk_end(store, exp, retry, {**late, "step": 20, "samples": 160})
    run = experiments.get_run(store, exp, 1)
    assert (run["chunks_done"], run["step"]) == (2, 20)


def test_a_fit_that_starts_abandons_the_chunks_a_dead_fit_left_open(store: DuckDBStore, exp: str) -> None:
    train_chunk(store, 2, 0)
    open_id = timeline.record_chunk_start(store, exp, 2, 1, slot=0, total_chunks=4)
    rows = [{"experiment": exp, "run_id": 2, "step": 11, "name": "train_loss", "value": 0.5, "chunk": 1, "time": 0.0}]
    metrics.log_metrics(store, "partial-of-a-dead-fit", rows)
    assert len(metrics.metrics(store, exp, run_ids=[2])) == 1
    experiments.set_experiment_status(store, exp, "running")  # what `rf continue --force` does first
    (entry,) = [entry for entry in timeline.timeline(store, exp) if entry["id"] == open_id]
    assert entry["outcome"] == states.ABANDONED and entry["end"] is not None
    assert metrics.metrics(store, exp, run_ids=[2]) == []  # chunk 0 logged nothing here; chunk 1's partial row is gone
    assert experiments.get_run(store, exp, 2)["chunks_done"] == 1  # the committed chunk stays


def test_late_metric_rows_of_an_abandoned_attempt_are_dropped(store: DuckDBStore, exp: str) -> None:
    def row(step: int, attempt: int) -> dict[str, Any]:
        return {"experiment": "exp", "run_id": 1, "step": step, "name": "train_loss", "value": 1.0, "chunk": 0,
                "attempt": attempt}  # fmt: skip

    first = timeline.record_chunk_start(store, "exp", 1, 0, slot=0, total_chunks=4)
    metrics.log_metrics(store, "sent-before-the-worker-died", [row(1, first)])
    retry = timeline.record_chunk_start(store, "exp", 1, 0, slot=1, total_chunks=4)  # the first attempt's worker died
    late = metrics.log_metrics(store, "spooled-by-the-dead-worker", [row(1, first), row(2, first)])
    assert (late["inserted"], late["rows"], late["dropped"]) == (True, 0, 2)
    metrics.log_metrics(store, "the-retry", [row(1, retry), row(2, retry)])
    stored = [(r["step"], r["name"]) for r in metrics.metrics(store, "exp", run_ids=[1])]
    assert stored == [(1, "train_loss"), (2, "train_loss")]  # each step once, from the retry
    assert [entry["outcome"] for entry in timeline.timeline(store, "exp")][:1] == ["abandoned"]
    with pytest.raises(errors.InvalidRequest, match="attempt must be an integer"):
        metrics.log_metrics(store, "bad", [{**row(3, retry), "attempt": "x"}])


def test_a_runs_truncated_rows_are_recorded_from_its_chunks(store: DuckDBStore, exp: str) -> None:
    assert experiments.get_run(store, exp, 1)["truncated_rows"] is None  # not known before a chunk trains
    train_chunk(store, 1, 0, truncated_rows=7)
    assert experiments.get_run(store, exp, 1)["truncated_rows"] == 7
    train_chunk(store, 2, 0)  # an outcome from a worker that does not count keeps the field unknown
    assert experiments.get_run(store, exp, 2)["truncated_rows"] is None
