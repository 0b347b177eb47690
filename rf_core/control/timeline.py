"""Chunk bookkeeping: which run trained which chunk on which slot, when, and how it ended (system events).

A chunk's start moves a New run to Ongoing; its end records the run's progress and, through the system-event
table, completes or fails it. An attempt that will never answer (its worker or fit died) is closed as abandoned
and what it logged is dropped, so its retry stores each step once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rf_core.control.checks import finite_or_none, is_int, is_json_number, require_experiment, require_run, type_name
from rf_core.errors import IllegalTransition, InvalidRequest, NotFound
from rf_core.states import (
    ABANDONED,
    CHUNK_OUTCOMES,
    FAILED_CHUNK_OUTCOMES,
    OUTCOME_EVENTS,
    RunStatus,
    SystemEvent,
    event_result,
)

if TYPE_CHECKING:
    from rf_core.control.store import Store


def record_chunk_start(
    store: Store, experiment: str, run_id: int, chunk_index: int, slot: int, total_chunks: int
) -> int:
    """A chunk of the run was dispatched to `slot`: New becomes Ongoing. Returns the timeline entry's id."""
    problems = [
        f"{name} must be an integer, got {type_name(value)}"
        for name, value in (
            ("run_id", run_id),
            ("chunk_index", chunk_index),
            ("slot", slot),
            ("total_chunks", total_chunks),
        )
        if not is_int(value)
    ]
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        run, _ = _run_and_status(store, experiment, run_id)
        return start_chunk(store, experiment, run, chunk_index, slot, total_chunks)


def start_chunk(
    store: Store,
    experiment: str,
    run: Mapping[str, Any],
    chunk_index: int,
    slot: int,
    total_chunks: int,
    open_entries: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """`record_chunk_start` for a run row already read in the caller's transaction (`open_entries`: the run's open
    timeline entries, when the caller read them too)."""
    run_id = int(run["run_id"])
    status = RunStatus(run["status"])
    target = event_result(status, SystemEvent.START)
    if target is None:
        raise IllegalTransition([f"run {run_id} is {status}: a chunk cannot start"])
    now = time.time()
    if open_entries is None:
        open_entries = store.open_timeline(experiment, run_id)
    # A run trains one chunk at a time, so an entry still open is an attempt that died with its worker.
    abandon_open_chunks(store, experiment, open_entries, now)
    fields: dict[str, Any] = {"status": target.value, "updated_at": now}
    if total_chunks > 0:  # 0 means unknown (a run that failed before it could be split into chunks)
        fields["total_chunks"] = total_chunks
    store.update_run(experiment, run_id, fields)
    entry = store.insert_timeline(
        {"experiment": experiment, "run_id": run_id, "slot": slot, "chunk": chunk_index, "start": now}
    )
    return int(entry["id"])


def record_chunk_end(store: Store, experiment: str, timeline_id: int, outcome: Mapping[str, Any]) -> dict[str, Any]:
    """Record a finished chunk (a `ChunkOutcome.to_dict()`); returns the run's row.

    Progress (epoch, chunks done, step, samples, checkpoint) moves only on "ok" and "completed"; "completed"
    and "failed" change the status through the system-event table. Recording the same timeline entry twice
    changes nothing, so a client may retry.
    """
    with store.transaction():
        require_experiment(store, experiment)
        return end_chunk(store, experiment, timeline_id, outcome)


def end_chunk(store: Store, experiment: str, timeline_id: int, outcome: Mapping[str, Any]) -> dict[str, Any]:
    """`record_chunk_end` inside a caller's transaction that has checked the experiment exists."""
    problems = _outcome_problems(timeline_id, outcome)
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        entry = store.get_timeline(timeline_id)
        if entry is None or entry["experiment"] != experiment:
            raise NotFound(f"experiment {experiment} has no chunk with timeline id {timeline_id}")
        run_id = int(entry["run_id"])
        if outcome.get("run_id") is not None and int(outcome["run_id"]) != run_id:
            raise InvalidRequest([f"timeline entry {timeline_id} is run {run_id}'s, not run {outcome['run_id']}'s"])
        run = require_run(store, experiment, run_id)
        if entry["end"] is not None:
            return dict(run)
        now = time.time()
        chunk_status = outcome["status"]
        fields: dict[str, Any] = {"updated_at": now}
        if chunk_status not in FAILED_CHUNK_OUTCOMES:
            fields.update(
                epoch=int(outcome["epoch"]),
                chunks_done=int(entry["chunk"]) + 1,
                step=int(outcome["step"]),
                samples=int(outcome["samples"]),
            )
            if outcome.get("checkpoint"):
                fields["checkpoint"] = str(outcome["checkpoint"])
            exports = outcome.get("exports") or {}
            fields.update(
                export_latest=exports.get("latest"),
                export_best=exports.get("best"),
                best_step=outcome.get("best_step"),
                best_value=finite_or_none(outcome.get("best_value")),
            )
            if is_int(outcome.get("truncated_rows")):
                fields["truncated_rows"] = int(outcome["truncated_rows"])
        event = OUTCOME_EVENTS.get(chunk_status)
        if event is not None:
            # A status the table does not allow here is left as is: the chunk's progress still counts.
            target = event_result(run["status"], event)
            if target is not None:
                fields.update(status=target.value, ended_by=chunk_status)
        if chunk_status in FAILED_CHUNK_OUTCOMES:
            fields.update(error=str(outcome.get("error") or "the chunk failed"), traceback=outcome.get("traceback"))
        updated = store.update_run(experiment, run_id, fields)
        store.update_timeline(timeline_id, {**_worker_span(entry, outcome, now), "outcome": chunk_status})
        return updated


def _worker_span(entry: Mapping[str, Any], outcome: Mapping[str, Any], now: float) -> dict[str, float]:
    """The entry's start and end as the worker saw them, where they fit inside (planned, recorded]; else as
    recorded. A chunk planned while its slot's previous one evaluated begins only once that one is done."""
    start = float(entry["start"])
    began, finished = outcome.get("started_at"), outcome.get("ended_at")
    if began is not None and start < float(began) <= now:
        start = float(began)
    end = float(finished) if finished is not None and start <= float(finished) <= now else now
    return {"start": start, "end": end}


def _outcome_problems(timeline_id: Any, outcome: Any) -> list[str]:
    if not is_int(timeline_id):
        return [f"timeline_id must be an integer, got {type_name(timeline_id)}"]
    if not isinstance(outcome, Mapping):
        return [f"outcome must be a JSON object (ChunkOutcome.to_dict()), got {type_name(outcome)}"]
    problems = []
    if outcome.get("status") not in CHUNK_OUTCOMES:
        problems.append(f"outcome status must be one of {', '.join(CHUNK_OUTCOMES)}, got {outcome.get('status')!r}")
    if outcome.get("status") not in FAILED_CHUNK_OUTCOMES:
        problems += [
            f"outcome {name} must be an integer, got {type_name(outcome.get(name))}"
            for name in ("step", "epoch", "samples")
            if not is_int(outcome.get(name))
        ]
    for name in ("started_at", "ended_at"):
        if outcome.get(name) is not None and not is_json_number(outcome[name]):
            problems.append(f"outcome {name} must be a number or null, got {type_name(outcome[name])}")
    for name in ("checkpoint", "error", "traceback"):
        if outcome.get(name) is not None and not isinstance(outcome[name], str):
            problems.append(f"outcome {name} must be a string or null, got {type_name(outcome[name])}")
    exports = outcome.get("exports")
    if exports is not None and not (
        isinstance(exports, Mapping) and all(isinstance(path, str) for path in exports.values())
    ):
        problems.append(f"outcome exports must map names to folder paths, got {type_name(exports)}")
    if outcome.get("best_step") is not None and not is_int(outcome["best_step"]):
        problems.append(f"outcome best_step must be an integer or null, got {type_name(outcome['best_step'])}")
    if outcome.get("best_value") is not None and not is_json_number(outcome["best_value"]):
        problems.append(f"outcome best_value must be a number or null, got {type_name(outcome['best_value'])}")
    return problems


def fail_run(store: Store, experiment: str, run_id: int, error: str) -> dict[str, Any]:
    """A run that cannot train at all (its chunks cannot be planned, it needs more devices than the fit has) fails
    with the reason, through the system-event table; returns its row. A run that is Failed already is left as it
    is, so a client may retry."""
    problems = []
    if not is_int(run_id):
        problems.append(f"run_id must be an integer, got {type_name(run_id)}")
    if not isinstance(error, str) or not error.strip():
        problems.append("error must be a non-empty string: a failed run says why")
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        run, status = _run_and_status(store, experiment, run_id)
        if status == RunStatus.FAILED:
            return dict(run)
        target = event_result(status, SystemEvent.FAIL)
        if target is None:
            raise IllegalTransition([f"run {run_id} is {status}: it cannot fail"])
        fields = {
            "status": target.value,
            "ended_by": "failed",
            "error": error,
            "traceback": None,
            "updated_at": time.time(),
        }
        return store.update_run(experiment, run_id, fields)


def _run_and_status(store: Store, experiment: str, run_id: int) -> tuple[dict[str, Any], RunStatus]:
    require_experiment(store, experiment)
    run = require_run(store, experiment, run_id)
    return run, RunStatus(run["status"])


def abandon_open_chunks(store: Store, experiment: str, entries: Sequence[Mapping[str, Any]], now: float) -> None:
    """Close chunk attempts that will never answer, and drop what they logged for a chunk that did not commit:
    the retry logs those steps again, so each is stored once. A late answer finds the entry closed and is ignored."""
    for entry in entries:
        store.update_timeline(int(entry["id"]), {"end": now, "outcome": ABANDONED})
        run = store.get_run(experiment, int(entry["run_id"]))
        if run is not None and int(entry["chunk"]) >= int(run["chunks_done"] or 0):
            store.delete_chunk_metrics(experiment, int(entry["run_id"]), int(entry["chunk"]))


def timeline(store: Store, experiment: str) -> list[dict[str, Any]]:
    require_experiment(store, experiment)
    return store.list_timeline(experiment)
