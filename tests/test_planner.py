"""The fit loop's planning step with a fake store client: no Prefect, no training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rf_core.config import normalize_config
from rf_core.experiment import ExperimentSpec
from rf_core.messages import ChunkOutcome
from rf_core.planner import EndedChunk, FitLoop


class FakeClient:
    def __init__(self, runs: list[dict[str, Any]], due_ops: dict[int, list[dict[str, Any]]] | None = None):
        self.runs = {run["run_id"]: run for run in runs}
        self.due_ops = due_ops or {}
        self.apply_calls: list[list[int]] = []
        self.boundary_calls: list[dict[str, Any]] = []
        self.chunk_end_calls: list[int] = []
        self.next_timeline_id = 100

    def list_runs(self, experiment: str, include_deleted: bool = False) -> list[dict[str, Any]]:
        return [dict(run) for run in self.runs.values()]

    def apply_due_ops(self, experiment: str, idle_run_ids: list[int]) -> list[dict[str, Any]]:
        self.apply_calls.append(list(idle_run_ids))
        applied = []
        for run_id in idle_run_ids:
            for op in self.due_ops.pop(run_id, []):
                self.runs[run_id]["status"] = op["new_status"]
                applied.append(op)
        return applied

    def boundary_view(
        self,
        experiment: str,
        busy_run_ids: list[int],
        ended: list[dict[str, Any]] = (),  # type: ignore[assignment]
        starts: list[dict[str, Any]] = (),  # type: ignore[assignment]
        since: float | None = None,
    ) -> dict[str, Any]:
        self.boundary_calls.append({"busy": list(busy_run_ids), "ended": list(ended), "starts": list(starts)})
        for chunk in ended:
            outcome = chunk["outcome"]
            run = self.runs[outcome["run_id"]]
            if outcome["status"] == "ok":
                run["chunks_done"] = outcome["chunk_index"] + 1
        idle = [run_id for run_id in self.runs if run_id not in set(busy_run_ids)]
        applied = self.apply_due_ops(experiment, idle) if idle else []
        started, refused = {}, {}
        for start in starts:
            run = self.runs[start["run_id"]]
            if run["status"] in ("New", "Ongoing") and run["chunks_done"] == start["chunk_index"]:
                run["status"] = "Ongoing"
                self.next_timeline_id += 1
                started[start["run_id"]] = self.next_timeline_id
            else:
                refused[start["run_id"]] = "no longer legal"
        runs = self.list_runs(experiment, include_deleted=True)
        return {"applied_ops": applied, "runs": runs, "started": started, "refused": refused}

    def log_metrics(self, batch_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"inserted": True}

    def chunk_end(self, experiment: str, timeline_id: int, outcome: dict[str, Any]) -> dict[str, Any]:
        self.chunk_end_calls.append(timeline_id)
        run = self.runs[outcome["run_id"]]
        if outcome["status"] == "ok":
            run["chunks_done"] = outcome["chunk_index"] + 1
        return dict(run)


def make_run(run_id: int, status: str = "New", done: int = 0, **extra: Any) -> dict[str, Any]:
    config = normalize_config({"per_device_train_batch_size": 4})
    return {"run_id": run_id, "status": status, "chunks_done": done, "config": config, **extra}


def make_spec(samples: int = 32, **fields: Any) -> ExperimentSpec:
    fields = {"config_group": {}, **fields}
    return ExperimentSpec(
        create_model_fn=lambda cfg: (None, None),
        train_dataset=[{"text": "x"}] * samples,
        eval_dataset=[{"text": "y"}],
        num_chunks=4,
        seed=5,
        **fields,
    )


def make_loop(client: FakeClient, slots: int = 2, samples: int = 32, cuda: bool = False) -> FitLoop:
    spec = make_spec(samples)
    return FitLoop(client, "exp", spec, slots, Path("/tmp/rf-home"), cuda=cuda)


def test_ops_are_applied_only_to_runs_not_in_flight():
    client = FakeClient([make_run(1, "Ongoing", 1), make_run(2, "Ongoing", 1), make_run(3)])
    loop = make_loop(client)
    loop.plan(in_flight={0: 1})
    assert client.apply_calls == [[2, 3]]


def test_least_progress_first_and_chunk_specs():
    client = FakeClient([make_run(1, "Ongoing", 2), make_run(2, "Ongoing", 1), make_run(3)])
    plan = make_loop(client).plan(in_flight={})
    assert [(slot, task.run_id, task.chunk.index) for slot, task in plan.tasks] == [(0, 3, 0), (1, 2, 1)]
    task = plan.tasks[0][1]
    assert (task.chunk.start_step, task.chunk.end_step, task.seed) == (0, 2, 5)  # 8 steps / 4 chunks
    assert task.run_dir.endswith("experiments/exp/runs/run-3")


@pytest.mark.parametrize("status", ["Stopped", "Completed", "Failed", "Deleted"])
def test_runs_that_cannot_train_are_not_scheduled(status):
    plan = make_loop(FakeClient([make_run(1, status, 1)])).plan(in_flight={})
    assert plan.tasks == []


def test_a_stop_applied_at_the_boundary_releases_the_warm_state():
    client = FakeClient([make_run(1, "Ongoing", 0)])
    loop = make_loop(client)
    first = loop.plan(in_flight={})
    assert [slot for slot, _ in first.tasks] == [0]
    client.runs[1]["chunks_done"] = 1
    client.due_ops[1] = [{"op_id": 7, "kind": "stop", "new_status": "Stopped"}]
    second = loop.plan(in_flight={})
    assert second.tasks == [] and second.releases == {0: [1]}
    assert [run["status"] for run in second.runs] == ["Stopped"] and not second.all_final


def test_warm_clone_gets_its_parents_checkpoint_on_its_first_chunk_only():
    clone = make_run(
        4, "New", 0, parent_id=2, warm_start="weights", warm_start_checkpoint="/ckpt/step-6.pt", parent_step=6
    )
    plan = make_loop(FakeClient([clone])).plan(in_flight={})
    warm = plan.tasks[0][1].warm_start
    assert warm is not None and (warm.parent_run_id, warm.parent_checkpoint, warm.parent_step) == (
        2,
        "/ckpt/step-6.pt",
        6,
    )
    clone.update(status="Ongoing", chunks_done=1)
    assert make_loop(FakeClient([clone])).plan(in_flight={}).tasks[0][1].warm_start is None


def test_a_run_that_cannot_be_chunked_is_reported_not_scheduled():
    plan = make_loop(FakeClient([make_run(1)]), samples=8).plan(in_flight={})  # 2 steps < 4 chunks
    assert plan.tasks == []
    assert list(plan.unplannable) == [1] and "num_chunks=4 exceeds" in plan.unplannable[1]


def test_all_final_when_every_run_is_done():
    plan = make_loop(FakeClient([make_run(1, "Completed", 4), make_run(2, "Deleted", 1)])).plan(in_flight={})
    assert plan.all_final and plan.tasks == []


def make_gang_run(run_id: int, devices: int, done: int = 0, **config: Any) -> dict[str, Any]:
    run = make_run(run_id, "Ongoing" if done else "New", done)
    run["config"] = normalize_config({"per_device_train_batch_size": 2, "num_devices": devices, **config})
    return run


def test_a_multi_device_run_trains_as_a_gang_on_several_slots():
    client = FakeClient([make_gang_run(1, 2), make_run(2)])
    loop = make_loop(client, slots=3)
    plan = loop.plan(in_flight={})
    [(gang_slot, gang_task), (single_slot, single_task)] = plan.tasks
    assert gang_task.gang is not None and gang_task.gang.slots == (0, 1) and gang_task.gang.world_size == 2
    assert gang_task.gang.strategy == "ddp" and gang_task.gang.rank == 0 and gang_slot == 0
    assert (single_slot, single_task.gang) == (2, None)
    # 32 samples, 2 per device × 2 devices a step: 8 steps in 4 chunks.
    assert (gang_task.chunk.start_step, gang_task.chunk.end_step, gang_task.chunk.end_sample) == (0, 2, 8)


def test_deepspeed_trains_through_a_gang_even_on_one_device():
    plan = make_loop(FakeClient([make_gang_run(1, 1, strategy="deepspeed")])).plan(in_flight={})
    gang = plan.tasks[0][1].gang
    assert gang is not None and (gang.world_size, gang.strategy) == (1, "deepspeed")


def test_a_gang_waits_for_enough_slots_and_a_single_run_does_not_take_them():
    client = FakeClient([make_gang_run(1, 2), make_run(2, "Ongoing", 1)])
    loop = make_loop(client, slots=2)
    # Run 3 trains on slot 1; run 1 (first in line, 0 chunks done) needs both slots: slot 0 is held for it,
    # since nothing is known yet about how long run 2's chunk would take.
    plan = loop.plan(in_flight={1: 3})
    assert plan.tasks == []


def test_a_run_needing_more_devices_than_slots_fails_with_the_reason():
    plan = make_loop(FakeClient([make_gang_run(1, 3)]), slots=2).plan(in_flight={})
    assert plan.tasks == []
    assert list(plan.unplannable) == [1]
    assert "needs 3 devices" in plan.unplannable[1] and "2 slots" in plan.unplannable[1]


def test_an_fp16_run_fails_with_the_reason_on_cpu_slots_and_trains_on_cuda_slots():
    fp16 = make_run(1)
    fp16["config"] = normalize_config({"per_device_train_batch_size": 4, "fp16": True})
    plan = make_loop(FakeClient([fp16, make_run(2)])).plan(in_flight={})
    assert list(plan.unplannable) == [1] and [task.run_id for _, task in plan.tasks] == [2]
    assert "fp16=true but this fit's slots are CPUs" in plan.unplannable[1] and "bf16=true" in plan.unplannable[1]
    plan = make_loop(FakeClient([fp16]), cuda=True).plan(in_flight={})
    assert plan.unplannable == {} and [task.run_id for _, task in plan.tasks] == [1]


def test_a_spec_refuses_remote_code_unless_the_experiment_opts_in():
    remote = {"model_kwargs": {"trust_remote_code": True}}
    with pytest.raises(ValueError, match=r"config 2: model_kwargs.trust_remote_code=true runs code .* opt this"):
        make_spec(config_group=[{}, remote])
    assert make_spec(config_group=[{}, remote], trust_remote_code=True).trust_remote_code


def test_a_clone_asking_for_remote_code_fails_with_the_reason_unless_the_experiment_opted_in():
    clone = make_run(1)
    clone["config"] = normalize_config({"per_device_train_batch_size": 4, "model_kwargs": {"trust_remote_code": True}})
    plan = make_loop(FakeClient([clone, make_run(2)])).plan(in_flight={})
    assert list(plan.unplannable) == [1] and "did not opt in" in plan.unplannable[1]
    trusting = make_loop(FakeClient([clone]))
    trusting.spec.trust_remote_code = True
    assert trusting.plan(in_flight={}).unplannable == {}


def test_a_run_allowed_more_devices_takes_idle_slots_as_a_gang():
    # 1 device, accumulation 2: a step of 2 micro-batches can be shared by 2 processes with the same result.
    elastic = make_gang_run(1, 1, gradient_accumulation_steps=2, max_devices=4)
    plan = make_loop(FakeClient([elastic]), slots=4).plan(in_flight={})
    [(slot, task)] = plan.tasks
    assert task.gang is not None and task.gang.slots == (0, 1) and slot == 0  # 4 would not divide 2 micro-batches
    # With another run to train, each gets one slot of two.
    plan = make_loop(FakeClient([elastic, make_run(2)]), slots=2).plan(in_flight={})
    assert [(slot, task.run_id, task.gang) for slot, task in plan.tasks] == [(0, 1, None), (1, 2, None)]


def test_a_run_stored_before_a_knob_existed_trains_with_its_default():
    run = make_run(1)
    for newer_knob in ("bf16", "gradient_checkpointing", "warmup_ratio", "bias", "task_type"):
        del run["config"][newer_knob]
    [(_, task)] = make_loop(FakeClient([run]), slots=1).plan(in_flight={}).tasks
    assert (task.config["bf16"], task.config["gradient_checkpointing"], task.config["warmup_ratio"]) == (
        False,
        False,
        0.0,
    )
    assert (task.config["bias"], task.config["task_type"]) == ("none", "CAUSAL_LM")


def ended_chunk(task: Any, attempt: int, status: str = "ok") -> EndedChunk:
    outcome = ChunkOutcome(task.run_id, task.chunk.index, status, task.chunk.end_step, 0, task.chunk.end_sample)  # type: ignore[arg-type]
    return EndedChunk(task.run_id, task.chunk.index, attempt, outcome)


def test_a_boundary_records_the_ended_chunk_and_starts_the_run_picked_for_its_slot_in_one_request():
    client = FakeClient([make_run(1), make_run(2)])
    loop = make_loop(client, slots=1)
    first = loop.plan(in_flight={})
    (slot, task) = first.tasks[0]
    assert task.run_id == 1 and task.attempt is None  # no table yet: its start is recorded when dispatched

    second = loop.plan(in_flight={}, ended=[ended_chunk(task, attempt=7)])

    call = client.boundary_calls[-1]
    assert [chunk["timeline_id"] for chunk in call["ended"]] == [7]
    # Run 2 has less progress now that run 1 has a chunk done: picked, and started by the same request.
    assert call["starts"] == [{"run_id": 2, "chunk_index": 0, "slot": slot, "total_chunks": 4}]
    assert len(client.boundary_calls) == 2
    ((_, picked),) = second.tasks
    assert picked.run_id == 2 and picked.attempt == 101 and picked.chunk.index == 0


def test_a_chunk_recorded_apart_for_the_policies_moves_the_next_pick_on():
    client = FakeClient([make_run(1)])
    loop = make_loop(client, slots=1)
    (_, task) = loop.plan(in_flight={}).tasks[0]

    loop.record([ended_chunk(task, attempt=7)])  # policies read the table now, then the step plans
    plan = loop.plan(in_flight={})

    assert client.chunk_end_calls == [7] and client.boundary_calls[-1]["ended"] == []
    # The pick is the run's next chunk, so the boundary's request starts it (no chunk-start of its own).
    assert client.boundary_calls[-1]["starts"] == [{"run_id": 1, "chunk_index": 1, "slot": 0, "total_chunks": 4}]
    ((_, picked),) = plan.tasks
    assert (picked.run_id, picked.chunk.index, picked.attempt) == (1, 1, 101)


def test_a_pick_that_an_op_made_illegal_at_the_boundary_is_planned_again():
    client = FakeClient([make_run(1), make_run(2)])
    loop = make_loop(client, slots=1)
    (_, task) = loop.plan(in_flight={}).tasks[0]
    client.due_ops[2] = [{"op_id": 7, "kind": "stop", "new_status": "Stopped"}]

    plan = loop.plan(in_flight={}, ended=[ended_chunk(task, attempt=7)])

    assert client.boundary_calls[-1]["starts"][0]["run_id"] == 2
    ((_, replanned),) = plan.tasks
    # Run 2 was stopped by the op applied first; run 1 trains its second chunk, its start recorded on dispatch.
    assert (replanned.run_id, replanned.chunk.index, replanned.attempt) == (1, 1, None)


def test_a_run_whose_chunk_failed_or_completed_it_is_not_picked():
    client = FakeClient([make_run(1)])
    loop = make_loop(client, slots=1)
    (_, task) = loop.plan(in_flight={}).tasks[0]
    loop.plan(in_flight={}, ended=[ended_chunk(task, attempt=7, status="failed")])
    assert client.boundary_calls[-1]["starts"] == []


def test_a_run_still_evaluating_on_a_slot_free_to_plan_is_neither_picked_nor_planned():
    client = FakeClient([make_run(1, "Ongoing", 1), make_run(2, "Completed", 4)])
    loop = make_loop(client, slots=1)
    loop.plan(in_flight={0: 1})  # the table
    # Slot 0's chunk of run 1 has done its steps and evaluates: the slot may be planned, run 1 may not.
    plan = loop.plan(in_flight={}, finishing={1})
    assert plan.tasks == [] and client.boundary_calls[-1]["starts"] == []
    assert client.boundary_calls[-1]["busy"] == [1]  # its ops wait until its chunk is recorded
