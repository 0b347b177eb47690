"""IC Ops and run bookkeeping: the only code that changes a run's status or applies an op.

Ops are validated when submitted, against the state the run will have once its pending ops apply, and
re-checked when applied at the run's chunk boundary (`apply_due_ops`): state may have changed meanwhile, and
the op is then recorded as skipped, with the reason. The server, the CLI, the dashboard and policies all
come through here.

Every function takes a `Store` and runs its reads and writes in one `store.transaction()`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rf_core.config import apply_overrides, architecture_mismatch, normalize_config, varying_knobs
from rf_core.knobs import ConfigError, config_group_from_json
from rf_core.paths import check_name
from rf_core.states import (
    OpKind,
    RunStatus,
    SystemEvent,
    event_result,
    op_rejection,
    op_result,
)

if TYPE_CHECKING:
    from rf_core.store import Store

WARM_START_MODES = ("off", "weights", "weights+optimizer")
CLONE_PAYLOAD_KEYS = frozenset({"config", "overrides", "warm_start"})
MAX_CLONES_PER_OP = 256  # a generator that expands further is almost certainly a typo in a $range/$grid
OP_SOURCES = ("user", "cli")  # plus "policy:<name>"; "initial" is reserved for the experiment's own configs
CHUNK_OUTCOMES = ("ok", "completed", "failed", "interrupted")
ABANDONED = "abandoned"  # the timeline outcome of an attempt whose worker or flow died before it answered
TRAIN_LOSS_METRIC = "train_loss"
MAX_METRIC_ROWS = 100_000

_ALREADY = {OpKind.STOP: "stopped", OpKind.RESUME: "resumed", OpKind.DELETE: "deleted"}


class InvalidRequest(ValueError):
    """The caller's input is wrong; `problems` names every fault found."""

    def __init__(self, problems: Sequence[str], message: str | None = None) -> None:
        self.problems = list(problems)
        super().__init__(message or "; ".join(self.problems))


class OpRejected(InvalidRequest):
    """An IC Op failed validation; nothing was written."""


class ExperimentExists(InvalidRequest):
    pass


class IllegalTransition(InvalidRequest):
    """A system event that the state table does not allow (a fit-loop bookkeeping bug, not user input)."""


class NotFound(LookupError):
    """No such experiment, run or timeline entry."""

    def __init__(self, message: str) -> None:
        self.problems = [message]
        super().__init__(message)


# -- validation (pure) --------------------------------------------------------------------------------------


def validate_op(
    kind: OpKind | str,
    run: Mapping[str, Any] | None,
    pending_ops: Sequence[Mapping[str, Any]] = (),
    payload: Any = None,
    parent_config: Mapping[str, Any] | None = None,
    *,
    experiment: str = "",
    run_id: int | None = None,
) -> list[str]:
    """Every reason the op may not be queued; an empty list means it is valid.

    Args:
        kind: stop, resume, clone or delete.
        run: the run's row, or None when the experiment has no such run (`experiment`/`run_id` name it then).
        pending_ops: the run's ops that are queued but not applied; the op is judged against the state the run
            will have after them.
        payload: for clone, {"config": {...}} or {"overrides": {...}} (either may hold tagged knobs that
            expand to several clones) and "warm_start": off | weights | weights+optimizer.
        parent_config: the run's config (defaults to run["config"]).
    """
    return _check_op(kind, run, pending_ops, payload, parent_config, experiment=experiment, run_id=run_id)[0]


def _check_op(
    kind: OpKind | str,
    run: Mapping[str, Any] | None,
    pending_ops: Sequence[Mapping[str, Any]],
    payload: Any,
    parent_config: Mapping[str, Any] | None,
    *,
    experiment: str,
    run_id: int | None,
) -> tuple[list[str], dict[str, Any]]:
    """Validate an op and return (problems, the payload to store)."""
    try:
        kind = OpKind(kind)
    except ValueError:
        return [f"unknown op kind {kind!r}: use one of {', '.join(op.value for op in OpKind)}"], {}
    if run is None:
        return [f"experiment {experiment} has no run {run_id}"], {}
    rid = int(run["run_id"])
    current = RunStatus(run["status"])
    future, changed_by = fold_pending(current, pending_ops)
    if op_result(future, kind) is None:
        if changed_by is None:
            return [op_rejection(current, kind, rid) or ""], {}
        pending_kind, pending_id = OpKind(changed_by["kind"]), changed_by["op_id"]
        if pending_kind == kind and kind in _ALREADY:
            return [f"run {rid} will already be {_ALREADY[kind]} by op {pending_id}"], {}
        return [
            f"cannot {kind} run {rid}: it will be {future} once pending op {pending_id} ({pending_kind}) "
            "applies"
        ], {}

    if kind != OpKind.CLONE:
        if payload is None:
            return [], {}
        if not isinstance(payload, dict):
            return [f"a {kind} op's payload must be a JSON object or null, got {type(payload).__name__}"], {}
        return [], dict(payload)

    configs, warm, problems = expand_clone(
        payload, parent_config if parent_config is not None else run["config"]
    )
    if warm != "off" and not run.get("checkpoint"):
        if current == RunStatus.FAILED:
            problems.append(
                f"run {rid} failed before saving any checkpoint: there is no good state to warm-start from"
            )
        elif current != RunStatus.ONGOING:
            # An Ongoing run without a checkpoint is training its first chunk: it has state by its boundary,
            # where the op applies (and is re-checked).
            problems.append(
                f"run {rid} has no trained state yet: clone it cold (warm_start off) or after a chunk"
            )
    stored = {"configs": configs, "count": len(configs), "warm_start": warm, "request": payload}
    return problems, stored


def fold_pending(
    status: RunStatus | str, pending_ops: Iterable[Mapping[str, Any]]
) -> tuple[RunStatus, Mapping[str, Any] | None]:
    """The state a run will have once its pending ops apply in order, and the op that last changed it.

    An op that the table rejects by then would be skipped at apply time, so it changes nothing here.
    """
    status = RunStatus(status)
    changed_by = None
    for op in sorted(pending_ops, key=lambda op: int(op["op_id"])):
        target = op_result(status, op["kind"])
        if target is None:
            continue
        if target != status:
            changed_by = op
        status = target
    return status, changed_by


def _clone_base(payload: Mapping[str, Any], parent_config: Mapping[str, Any]) -> dict[str, Any]:
    """The clone's config before tagged knobs expand: the payload's config, or the parent's plus overrides."""
    if "config" in payload and "overrides" in payload:
        raise ValueError("give either 'config' (a full config) or 'overrides', not both")
    if "config" in payload:
        if not isinstance(payload["config"], dict):
            raise ValueError(f"'config' must be a JSON object, got {_type(payload['config'])}")
        return payload["config"]
    if "overrides" in payload:
        if not isinstance(payload["overrides"], dict):
            raise ValueError(f"'overrides' must be a JSON object, got {_type(payload['overrides'])}")
        return apply_overrides(dict(parent_config), payload["overrides"])
    return dict(parent_config)


def expand_clone(
    payload: Any, parent_config: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], str, list[str]]:
    """A clone payload as (normalised configs it creates, warm-start mode, problems)."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        return [], "off", [f"a clone payload must be a JSON object, got {type(payload).__name__}"]
    problems: list[str] = []
    unknown = sorted(set(payload) - CLONE_PAYLOAD_KEYS)
    if unknown:
        problems.append(
            f"unknown clone payload keys {unknown}: use 'config' or 'overrides', and 'warm_start'"
        )
    warm = payload.get("warm_start") or "off"
    if warm not in WARM_START_MODES:
        problems.append(f"warm_start must be one of {', '.join(WARM_START_MODES)}, got {warm!r}")
        warm = "off"

    try:
        expanded = config_group_from_json(_clone_base(payload, parent_config))
    except ConfigError as exc:
        return [], warm, [*problems, *exc.problems]
    except (ValueError, TypeError) as exc:
        return [], warm, [*problems, str(exc)]

    if len(expanded) > MAX_CLONES_PER_OP:
        too_many = f"the clone expands to {len(expanded)} configs; at most {MAX_CLONES_PER_OP}"
        return [], warm, [*problems, too_many]
    if not expanded:
        return [], warm, [*problems, "the clone expands to no config at all"]
    configs = []
    for index, config in enumerate(expanded, start=1):
        prefix = f"clone {index} of {len(expanded)}: " if len(expanded) > 1 else ""
        try:
            normalised = normalize_config(config)
        except ConfigError as exc:
            problems.extend(prefix + problem for problem in exc.problems)
            continue
        if warm != "off":
            problems.extend(
                f"{prefix}warm start needs the parent's architecture: {mismatch}"
                for mismatch in architecture_mismatch(dict(parent_config), normalised)
            )
        if warm == "weights+optimizer" and "deepspeed" in (parent_config.get("strategy"), normalised["strategy"]):
            problems.append(
                f"{prefix}warm_start 'weights+optimizer' cannot carry optimizer state to or from a DeepSpeed run "
                "(ZeRO shards it its own way): use warm_start 'weights'"
            )
        configs.append(normalised)
    return configs, warm, problems


# -- ops ----------------------------------------------------------------------------------------------------


def submit_op(
    store: Store,
    experiment: str,
    kind: OpKind | str,
    run_id: int,
    payload: Any = None,
    source: str = "user",
    who: str | None = None,
    policy_note: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate and queue an op; returns its row. Raises OpRejected (nothing written) when it is not legal.

    A clone's row lists every config it will create (`payload["configs"]`), already expanded and normalised.
    `policy_note` (policy name, reason, boundary, decision id) is stored as the payload's "policy" entry, so the
    ops log shows why a policy queued the op.
    """
    problems = []
    if not _is_int(run_id):
        problems.append(f"run_id must be an integer, got {_type(run_id)}")
    problems += _source_problems(source)
    if who is not None and not isinstance(who, str):
        problems.append(f"who must be a string, got {_type(who)}")
    if problems:
        raise OpRejected(problems)
    with store.transaction():
        _experiment(store, experiment)
        run = store.get_run(experiment, run_id)
        pending = store.list_ops(experiment, run_ids=[run_id], statuses=["pending"]) if run else []
        problems, stored_payload = _check_op(
            kind, run, pending, payload, None, experiment=experiment, run_id=run_id
        )
        if problems:
            raise OpRejected(problems)
        if policy_note is not None:
            stored_payload = {**stored_payload, "policy": dict(policy_note)}
        return store.insert_op(
            {
                "experiment": experiment,
                "run_id": run_id,
                "kind": OpKind(kind).value,
                "payload": stored_payload,
                "source": source,
                "who": who,
                "status": "pending",
                "submitted_at": time.time(),
            }
        )


def apply_due_ops(store: Store, experiment: str, idle_run_ids: Iterable[int]) -> list[dict[str, Any]]:
    """Apply the pending ops of runs that are at a chunk boundary or not training; returns the ops' rows.

    Ops apply in submission order, each re-checked against the run's current state: an op that is no longer
    legal is marked skipped with the reason. Clones submitted before this call are all created here.
    """
    if isinstance(idle_run_ids, str | bytes | Mapping) or not isinstance(idle_run_ids, Iterable):
        raise InvalidRequest([f"idle_run_ids must be a list of run ids, got {_type(idle_run_ids)}"])
    idle_list = list(idle_run_ids)
    if not all(_is_int(run_id) for run_id in idle_list):
        raise InvalidRequest([f"idle_run_ids must be a list of integers, got {idle_list!r}"])
    idle = sorted(set(idle_list))
    with store.transaction():
        _experiment(store, experiment)
        if not idle:
            return []
        now = time.time()
        return [
            _apply_one(store, op, store.get_run(experiment, op["run_id"]), now)
            for op in store.list_ops(experiment, run_ids=idle, statuses=["pending"])
        ]


def boundary_view(store: Store, experiment: str, busy_run_ids: Iterable[int]) -> dict[str, Any]:
    """The fit loop's planning read, in one transaction: apply the due ops of every run not in flight, then
    return them with the runs table as it is afterwards (deleted runs included).

    `{"applied_ops": [...], "runs": [...]}`. One request per planning step instead of two or three.
    """
    if isinstance(busy_run_ids, str | bytes | Mapping) or not isinstance(busy_run_ids, Iterable):
        raise InvalidRequest([f"busy_run_ids must be a list of run ids, got {_type(busy_run_ids)}"])
    busy = list(busy_run_ids)
    if not all(_is_int(run_id) for run_id in busy):
        raise InvalidRequest([f"busy_run_ids must be a list of integers, got {busy!r}"])
    with store.transaction():
        runs = list_runs(store, experiment, include_deleted=True)
        idle = [int(run["run_id"]) for run in runs if int(run["run_id"]) not in set(busy)]
        applied = apply_due_ops(store, experiment, idle)
        if applied:
            runs = list_runs(store, experiment, include_deleted=True)
    return {"applied_ops": applied, "runs": runs}


def _apply_one(
    store: Store, op: Mapping[str, Any], run: Mapping[str, Any] | None, now: float
) -> dict[str, Any]:
    op_id, kind = int(op["op_id"]), OpKind(op["kind"])
    if run is None:
        return _skip(store, op_id, f"run {op['run_id']} no longer exists", now)
    rid, status = int(run["run_id"]), RunStatus(run["status"])
    target = op_result(status, kind)
    if target is None:
        return _skip(store, op_id, f"run {rid} is {status} now: {kind} no longer applies", now)

    if kind == OpKind.CLONE:
        payload = op["payload"]
        warm = payload.get("warm_start", "off")
        if warm != "off" and not run.get("checkpoint"):
            return _skip(store, op_id, f"run {rid} has no checkpoint to warm-start from", now)
        created = store.insert_runs(
            run["experiment"],
            [
                {
                    "status": RunStatus.NEW.value,
                    "config": config,
                    "source": op["source"],
                    "parent_id": rid,
                    "warm_start": warm,
                    # Cold clones keep only the lineage (parent and its step), not a checkpoint to load.
                    "warm_start_checkpoint": run.get("checkpoint") if warm != "off" else None,
                    "parent_step": int(run.get("step") or 0),
                    "created_at": now,
                    "updated_at": now,
                }
                for config in payload["configs"]
            ],
        )
        result: dict[str, Any] = {"created_run_ids": [int(new["run_id"]) for new in created]}
    else:
        fields: dict[str, Any] = {"status": target.value, "updated_at": now}
        if kind in (OpKind.STOP, OpKind.DELETE):
            fields["ended_by"] = str(op_id)
        elif kind == OpKind.RESUME:
            fields["ended_by"] = None
        store.update_run(run["experiment"], rid, fields)
        result = {"from": status.value, "to": target.value}
    return store.update_op(op_id, {"status": "applied", "applied_at": now, "result": result})


def _skip(store: Store, op_id: int, reason: str, now: float) -> dict[str, Any]:
    return store.update_op(op_id, {"status": "skipped", "reason": reason, "applied_at": now})


def list_ops(
    store: Store, experiment: str, run_id: int | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    _experiment(store, experiment)
    return store.list_ops(
        experiment,
        run_ids=None if run_id is None else [run_id],
        statuses=None if status is None else [status],
    )


# -- chunk bookkeeping (system events) ----------------------------------------------------------------------


def record_chunk_start(
    store: Store, experiment: str, run_id: int, chunk_index: int, slot: int, total_chunks: int
) -> int:
    """A chunk of the run was dispatched to `slot`: New becomes Ongoing. Returns the timeline entry's id."""
    problems = [
        f"{name} must be an integer, got {_type(value)}"
        for name, value in (
            ("run_id", run_id),
            ("chunk_index", chunk_index),
            ("slot", slot),
            ("total_chunks", total_chunks),
        )
        if not _is_int(value)
    ]
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        _experiment(store, experiment)
        run = _run(store, experiment, run_id)
        status = RunStatus(run["status"])
        target = event_result(status, SystemEvent.START)
        if target is None:
            raise IllegalTransition([f"run {run_id} is {status}: a chunk cannot start"])
        now = time.time()
        # A run trains one chunk at a time, so an entry still open is an attempt that died with its worker.
        _abandon(store, experiment, store.open_timeline(experiment, run_id), now)
        fields: dict[str, Any] = {"status": target.value, "updated_at": now}
        if total_chunks > 0:  # 0 means unknown (a run that failed before it could be split into chunks)
            fields["total_chunks"] = total_chunks
        store.update_run(experiment, run_id, fields)
        entry = store.insert_timeline(
            {"experiment": experiment, "run_id": run_id, "slot": slot, "chunk": chunk_index, "start": now}
        )
        return int(entry["id"])


def record_chunk_end(
    store: Store, experiment: str, timeline_id: int, outcome: Mapping[str, Any]
) -> dict[str, Any]:
    """Record a finished chunk (a `ChunkOutcome.to_dict()`); returns the run's row.

    Progress (epoch, chunks done, step, samples, checkpoint) moves only on "ok" and "completed"; "completed"
    and "failed" change the status through the system-event table. Recording the same timeline entry twice
    changes nothing, so a client may retry.
    """
    problems = _outcome_problems(timeline_id, outcome)
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        _experiment(store, experiment)
        entry = store.get_timeline(timeline_id)
        if entry is None or entry["experiment"] != experiment:
            raise NotFound(f"experiment {experiment} has no chunk with timeline id {timeline_id}")
        run_id = int(entry["run_id"])
        if outcome.get("run_id") is not None and int(outcome["run_id"]) != run_id:
            raise InvalidRequest(
                [f"timeline entry {timeline_id} is run {run_id}'s, not run {outcome['run_id']}'s"]
            )
        run = _run(store, experiment, run_id)
        if entry["end"] is not None:
            return dict(run)
        now = time.time()
        chunk_status = outcome["status"]
        fields: dict[str, Any] = {"updated_at": now}
        if chunk_status in ("ok", "completed"):
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
                best_value=_finite(outcome.get("best_value")),
            )
        event = {
            "completed": SystemEvent.COMPLETE,
            "failed": SystemEvent.FAIL,
            "interrupted": SystemEvent.INTERRUPT,
        }.get(chunk_status)
        if event is not None:
            # A status the table does not allow here is left as is: the chunk's progress still counts.
            target = event_result(run["status"], event)
            if target is not None:
                fields.update(status=target.value, ended_by=chunk_status)
        if chunk_status in ("failed", "interrupted"):
            fields.update(
                error=str(outcome.get("error") or "the chunk failed"), traceback=outcome.get("traceback")
            )
        updated = store.update_run(experiment, run_id, fields)
        store.update_timeline(timeline_id, {"end": now, "outcome": chunk_status})
        return updated


def _outcome_problems(timeline_id: Any, outcome: Any) -> list[str]:
    if not _is_int(timeline_id):
        return [f"timeline_id must be an integer, got {_type(timeline_id)}"]
    if not isinstance(outcome, Mapping):
        return [f"outcome must be a JSON object (ChunkOutcome.to_dict()), got {_type(outcome)}"]
    problems = []
    if outcome.get("status") not in CHUNK_OUTCOMES:
        problems.append(
            f"outcome status must be one of {', '.join(CHUNK_OUTCOMES)}, got {outcome.get('status')!r}"
        )
    if outcome.get("status") not in ("failed", "interrupted"):
        problems += [
            f"outcome {name} must be an integer, got {_type(outcome.get(name))}"
            for name in ("step", "epoch", "samples")
            if not _is_int(outcome.get(name))
        ]
    for name in ("checkpoint", "error", "traceback"):
        if outcome.get(name) is not None and not isinstance(outcome[name], str):
            problems.append(f"outcome {name} must be a string or null, got {_type(outcome[name])}")
    exports = outcome.get("exports")
    if exports is not None and not (
        isinstance(exports, Mapping) and all(isinstance(path, str) for path in exports.values())
    ):
        problems.append(f"outcome exports must map names to folder paths, got {_type(exports)}")
    if outcome.get("best_step") is not None and not _is_int(outcome["best_step"]):
        problems.append(f"outcome best_step must be an integer or null, got {_type(outcome['best_step'])}")
    if outcome.get("best_value") is not None and not _is_number(outcome["best_value"]):
        problems.append(f"outcome best_value must be a number or null, got {_type(outcome['best_value'])}")
    return problems


# -- experiments and runs -----------------------------------------------------------------------------------


def create_experiment(
    store: Store,
    name: str,
    configs: Sequence[Mapping[str, Any]],
    num_chunks: int,
    seed: int = 42,
    metric: str = "eval_loss",
    mode: str = "min",
    spec_ref: str | None = None,
) -> dict[str, Any]:
    """Create an experiment and one New run per config; returns {"experiment": row, "runs": [rows]}.

    Configs are validated and stored normalised (defaults filled in). Raises InvalidRequest listing every
    problem, or ExperimentExists when the name is taken.
    """
    problems = []
    try:
        check_name("experiment", name)
    except ValueError as exc:
        problems.append(str(exc))
    if not _is_int(num_chunks) or num_chunks < 1:
        problems.append(f"num_chunks must be an integer >= 1, got {num_chunks!r}")
    if not _is_int(seed):
        problems.append(f"seed must be an integer, got {seed!r}")
    if not isinstance(metric, str) or not metric:
        problems.append(f"metric must be a metric name, got {metric!r}")
    if mode not in ("min", "max"):
        problems.append(f"mode must be 'min' or 'max', got {mode!r}")
    if spec_ref is not None and (not isinstance(spec_ref, str) or ":" not in spec_ref):
        problems.append(f"spec_ref must look like 'package.module:function', got {spec_ref!r}")
    normalised: list[dict[str, Any]] = []
    if (
        isinstance(configs, Mapping)
        or not isinstance(configs, Sequence)
        or isinstance(configs, str)
        or not configs
    ):
        problems.append("configs must be a non-empty list of config objects")
    else:
        for index, config in enumerate(configs, start=1):
            try:
                normalised.append(normalize_config(config))
            except ConfigError as exc:
                problems.extend(f"config {index}: {problem}" for problem in exc.problems)
            except (TypeError, ValueError) as exc:
                problems.append(f"config {index}: {exc}")
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        existing = store.get_experiment(name)
        if existing is not None:
            created = datetime.fromtimestamp(existing["created_at"]).strftime("%Y-%m-%d %H:%M")
            raise ExperimentExists(
                [
                    f"experiment {name!r} already exists (created {created}); "
                    f"choose another name, e.g. {_free_name(store, name)!r}"
                ]
            )
        now = time.time()
        row = store.insert_experiment(
            {
                "name": name,
                "status": "running",
                "num_chunks": num_chunks,
                "seed": seed,
                "metric": metric,
                "mode": mode,
                "spec_ref": spec_ref,
                "created_at": now,
            }
        )
        runs = store.insert_runs(
            name,
            [
                {
                    "status": RunStatus.NEW.value,
                    "config": config,
                    "source": "initial",
                    "created_at": now,
                    "updated_at": now,
                }
                for config in normalised
            ],
        )
    return {"experiment": row, "runs": runs}


def _free_name(store: Store, name: str) -> str:
    for suffix in range(2, 1000):
        candidate = f"{name}-{suffix}"
        if store.get_experiment(candidate) is None:
            return candidate
    return f"{name}-{int(time.time())}"


def get_experiment(store: Store, name: str) -> dict[str, Any]:
    return _experiment(store, name)


def set_experiment_status(store: Store, name: str, status: str) -> dict[str, Any]:
    """A fit sets "running" when it starts and "finished" when it ends. A fit that starts owns every chunk of
    the experiment: one still open was left by a fit that died (`rf continue --force`), and is abandoned."""
    if status not in ("running", "finished"):
        raise InvalidRequest([f"experiment status must be 'running' or 'finished', got {status!r}"])
    with store.transaction():
        _experiment(store, name)
        now = time.time()
        if status == "running":
            _abandon(store, name, store.open_timeline(name), now)
        ended_at = now if status == "finished" else None
        return store.update_experiment(name, {"status": status, "ended_at": ended_at})


def _abandon(store: Store, experiment: str, entries: Sequence[Mapping[str, Any]], now: float) -> None:
    """Close chunk attempts that will never answer, and drop what they logged for a chunk that did not commit:
    the retry logs those steps again, so each is stored once. A late answer finds the entry closed and is ignored."""
    for entry in entries:
        store.update_timeline(int(entry["id"]), {"end": now, "outcome": ABANDONED})
        run = store.get_run(experiment, int(entry["run_id"]))
        if run is not None and int(entry["chunk"]) >= int(run["chunks_done"] or 0):
            store.delete_chunk_metrics(experiment, int(entry["run_id"]), int(entry["chunk"]))


def list_experiments(store: Store) -> list[dict[str, Any]]:
    return store.list_experiments()


def get_run(store: Store, experiment: str, run_id: int) -> dict[str, Any]:
    _experiment(store, experiment)
    return _run(store, experiment, run_id)


def list_runs(store: Store, experiment: str, include_deleted: bool = False) -> list[dict[str, Any]]:
    """The experiment's runs by id. Deleted runs, and runs whose Delete is queued, are hidden by default."""
    with store.transaction():
        _experiment(store, experiment)
        runs = store.list_runs(experiment)
        if include_deleted:
            return runs
        pending = store.list_ops(experiment, statuses=["pending"])
    return _visible(runs, pending)


def _visible(runs: list[dict[str, Any]], pending: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    being_deleted = {int(op["run_id"]) for op in pending if op["kind"] == OpKind.DELETE.value}
    return [
        run
        for run in runs
        if run["status"] != RunStatus.DELETED.value and int(run["run_id"]) not in being_deleted
    ]


def experiment_snapshot(store: Store, name: str, include_deleted: bool = False) -> dict[str, Any]:
    """The experiment and its runs, each with progress, latest train loss, latest and best value of the
    experiment's metric, and its queued ops; plus the config keys whose values differ between runs."""
    with store.transaction():
        experiment = _experiment(store, name)
        runs = store.list_runs(name)
        pending = store.list_ops(name, statuses=["pending"])
        summary = store.metric_summary(name, TRAIN_LOSS_METRIC, experiment["metric"], experiment["mode"])
    if not include_deleted:
        runs = _visible(runs, pending)
    for run in runs:
        rid = int(run["run_id"])
        metrics = summary.get(rid, {})
        queued = [op for op in pending if int(op["run_id"]) == rid]
        run.update(
            train_loss=_finite(metrics.get("train_loss")),
            latest_metric=_finite(metrics.get("latest_metric")),
            best_metric=_finite(metrics.get("best_metric")),
            pending_ops=len(queued),
            pending_op_kinds=[op["kind"] for op in queued],
        )
    return {
        "experiment": experiment,
        "runs": runs,
        "varying_knobs": varying_knobs([run["config"] for run in runs]) if runs else [],
    }


def timeline(store: Store, experiment: str) -> list[dict[str, Any]]:
    _experiment(store, experiment)
    return store.list_timeline(experiment)


# -- metrics ------------------------------------------------------------------------------------------------


def log_metrics(store: Store, batch_id: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Store a batch of metric rows exactly once per `batch_id` (a client may retry or replay it).

    Each row: experiment, run_id, step, name, value (number or null), optional chunk and time (epoch seconds;
    the server's clock when missing), and optional attempt (the timeline id of the chunk attempt that logged it):
    rows of an attempt that was abandoned meanwhile are dropped, since its retry logs those steps again.
    """
    if not isinstance(batch_id, str) or not 0 < len(batch_id) <= 200:
        raise InvalidRequest(
            [f"batch_id must be a non-empty string of at most 200 characters, got {batch_id!r}"]
        )
    if not isinstance(rows, list):
        raise InvalidRequest([f"rows must be a list of metric objects, got {_type(rows)}"])
    if len(rows) > MAX_METRIC_ROWS:
        raise InvalidRequest([f"a batch holds at most {MAX_METRIC_ROWS} rows, got {len(rows)}: split it"])
    now = time.time()
    clean, problems = [], []
    for index, row in enumerate(rows):
        row_problems = _metric_row_problems(row)
        if row_problems:
            problems.extend(f"row {index}: {problem}" for problem in row_problems)
            if len(problems) >= 10:
                break
            continue
        value = row.get("value")
        clean.append(
            {
                "experiment": row["experiment"],
                "run_id": int(row["run_id"]),
                "step": int(row["step"]),
                "name": row["name"],
                "value": None if value is None else float(value),
                "chunk": row.get("chunk"),
                "time": float(row["time"]) if row.get("time") is not None else now,
                "attempt": row.get("attempt"),
            }
        )
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        for experiment in sorted({row["experiment"] for row in clean}):
            _experiment(store, experiment)
        abandoned = _abandoned_attempts(store, {row["attempt"] for row in clean if row["attempt"] is not None})
        kept = [row for row in clean if row.pop("attempt") not in abandoned]
        inserted = store.insert_metric_batch(batch_id, kept, now)
    dropped = len(clean) - len(kept)
    return {"batch_id": batch_id, "inserted": inserted, "rows": len(kept) if inserted else 0, "dropped": dropped}


def _abandoned_attempts(store: Store, attempts: set[int]) -> set[int]:
    """Which of these chunk attempts (timeline ids) were abandoned: their late metric rows are not stored."""
    found = set()
    for attempt in attempts:
        entry = store.get_timeline(attempt)
        if entry is not None and entry["outcome"] == ABANDONED:
            found.add(attempt)
    return found


def _metric_row_problems(row: Any) -> list[str]:
    if not isinstance(row, Mapping):
        return [f"must be an object, got {_type(row)}"]
    problems = []
    for name in ("experiment", "name"):
        if not isinstance(row.get(name), str) or not row.get(name):
            problems.append(f"{name} must be a non-empty string, got {row.get(name)!r}")
    for name in ("run_id", "step"):
        if not _is_int(row.get(name)):
            problems.append(f"{name} must be an integer, got {row.get(name)!r}")
    for name in ("chunk", "attempt"):
        if row.get(name) is not None and not _is_int(row[name]):
            problems.append(f"{name} must be an integer or null, got {row[name]!r}")
    for name in ("value", "time"):
        if row.get(name) is not None and not _is_number(row[name]):
            problems.append(f"{name} must be a number or null, got {row[name]!r}")
    return problems


def metrics(
    store: Store,
    experiment: str,
    run_ids: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    since_time: float | None = None,
) -> list[dict[str, Any]]:
    """Metric rows (run_id, step, name, value, chunk, time) ordered by run, name and step."""
    _experiment(store, experiment)
    return store.query_metrics(experiment, run_ids=run_ids, names=names, since_time=since_time)



def metric_names(store: Store, experiment: str) -> list[str]:
    """The metric names the experiment's runs have logged, sorted."""
    _experiment(store, experiment)
    return store.metric_names(experiment)


def max_metric_step(store: Store, experiment: str) -> int | None:
    """The highest step any metric of the experiment has reached; None before the first point."""
    _experiment(store, experiment)
    return store.max_metric_step(experiment)


def metric_buckets(
    store: Store, experiment: str, width: int, after_row: int = -1
) -> tuple[dict[str, Any], int]:
    """M4 aggregates of the experiment's metric points stored after row `after_row` (see `Store.metric_buckets`)."""
    _experiment(store, experiment)
    return store.metric_buckets(experiment, width, after_row)


def preview_op(
    store: Store, experiment: str, kind: OpKind | str, run_id: int, payload: Any = None
) -> dict[str, Any]:
    """What `submit_op` would decide now, without queuing anything: {"problems", "count"}.

    `count` is the number of runs a clone would create (0 for other ops or when the payload does not expand).
    """
    with store.transaction():
        _experiment(store, experiment)
        run = store.get_run(experiment, run_id)
        pending = store.list_ops(experiment, run_ids=[run_id], statuses=["pending"]) if run else []
        problems, stored = _check_op(kind, run, pending, payload, None, experiment=experiment, run_id=run_id)
    return {"problems": problems, "count": int(stored.get("count", 0)) if kind == OpKind.CLONE else 0}

# -- policy decisions ---------------------------------------------------------------------------------------

DECISION_MODES = ("act", "propose")
DECISION_STATUSES = ("submitted", "rejected", "proposed", "approved", "dismissed")


def record_policy_decision(
    store: Store,
    experiment: str,
    policy: str,
    run_id: int,
    boundary: int,
    kind: OpKind | str,
    payload: Any = None,
    reason: str = "",
    mode: str = "act",
    who: str | None = None,
) -> dict[str, Any]:
    """Record a policy's decision about a run at a chunk boundary; in "act" mode also queue its op.

    A policy decides at most once per (policy, run, boundary): when that key is already recorded, nothing is
    written and the earlier decision comes back with `duplicate` set. An op that is not legal is recorded as
    rejected, with its problems, rather than raised: the policy did decide, and the audit log keeps it.

    Returns {"decision": row, "op": the queued op's row or None, "duplicate": bool}.
    """
    problems = []
    try:
        check_name("policy", policy)
    except ValueError as exc:
        problems.append(str(exc))
    for name, value in (("run_id", run_id), ("boundary", boundary)):
        if not _is_int(value) or value < 0:
            problems.append(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(kind, str) or kind not in {op.value for op in OpKind}:
        problems.append(f"unknown op kind {kind!r}: use one of {', '.join(op.value for op in OpKind)}")
    if not isinstance(reason, str) or not reason.strip():
        problems.append("reason must be a non-empty string: every policy decision says why")
    if mode not in DECISION_MODES:
        problems.append(f"mode must be one of {', '.join(DECISION_MODES)}, got {mode!r}")
    if who is not None and not isinstance(who, str):
        problems.append(f"who must be a string, got {_type(who)}")
    if payload is not None and not isinstance(payload, dict):
        problems.append(f"payload must be a JSON object or null, got {_type(payload)}")
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        _experiment(store, experiment)
        earlier = [
            row
            for row in store.list_policy_decisions(experiment, policies=[policy], run_ids=[run_id])
            if int(row["boundary"]) == boundary
        ]
        if earlier:
            op = store.get_op(int(earlier[0]["op_id"])) if earlier[0]["op_id"] is not None else None
            return {"decision": earlier[0], "op": op, "duplicate": True}
        row: dict[str, Any] = {
            "experiment": experiment,
            "policy": policy,
            "run_id": run_id,
            "boundary": boundary,
            "kind": OpKind(kind).value,
            "payload": payload,
            "reason": reason.strip(),
            "decided_at": time.time(),
        }
        note = {"name": policy, "reason": row["reason"], "boundary": boundary}
        op = None
        if mode == "act":
            try:
                op = submit_op(
                    store, experiment, kind, run_id, payload, source=f"policy:{policy}", who=who, policy_note=note
                )
            except OpRejected as exc:
                row.update(status="rejected", problems=exc.problems)
            else:
                row.update(status="submitted", op_id=int(op["op_id"]))
        else:
            run = store.get_run(experiment, run_id)
            pending = store.list_ops(experiment, run_ids=[run_id], statuses=["pending"]) if run else []
            rejected, _ = _check_op(kind, run, pending, payload, None, experiment=experiment, run_id=run_id)
            if rejected:
                row.update(status="rejected", problems=rejected)
            else:
                row["status"] = "proposed"
        decision = store.insert_policy_decision(row)
    return {"decision": decision, "op": op, "duplicate": False}


def list_policy_decisions(
    store: Store, experiment: str, policy: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    if status is not None and status not in DECISION_STATUSES:
        raise InvalidRequest([f"status must be one of {', '.join(DECISION_STATUSES)}, got {status!r}"])
    _experiment(store, experiment)
    return store.list_policy_decisions(
        experiment,
        policies=None if policy is None else [policy],
        statuses=None if status is None else [status],
    )


def resolve_proposal(
    store: Store, experiment: str, decision_id: int, approve: bool, who: str
) -> dict[str, Any]:
    """Approve (queue the proposed op, with `who` as its submitter) or dismiss a policy's proposal.

    Approval validates the op against the run's state now: an op that is no longer legal raises OpRejected and
    leaves the proposal waiting (dismiss it). Returns {"decision": row, "op": the queued op's row or None}.
    """
    problems = []
    if not _is_int(decision_id):
        problems.append(f"decision_id must be an integer, got {_type(decision_id)}")
    if not isinstance(who, str) or not who.strip():
        problems.append("who must name the person approving or dismissing the proposal")
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        _experiment(store, experiment)
        decision = store.get_policy_decision(decision_id)
        if decision is None or decision["experiment"] != experiment:
            raise NotFound(f"experiment {experiment} has no policy proposal {decision_id}")
        if decision["status"] != "proposed":
            by = f" by {decision['resolved_by']}" if decision.get("resolved_by") else ""
            raise InvalidRequest([f"proposal {decision_id} is {decision['status']}{by}: only a waiting one can be"])
        now = time.time()
        op = None
        fields: dict[str, Any] = {"resolved_by": who, "resolved_at": now, "status": "dismissed"}
        if approve:
            note = {
                "name": decision["policy"],
                "reason": decision["reason"],
                "boundary": int(decision["boundary"]),
                "decision_id": decision_id,
                "approved_by": who,
            }
            op = submit_op(
                store,
                experiment,
                decision["kind"],
                int(decision["run_id"]),
                decision["payload"],
                source=f"policy:{decision['policy']}",
                who=who,
                policy_note=note,
            )
            fields.update(status="approved", op_id=int(op["op_id"]))
        return {"decision": store.update_policy_decision(decision_id, fields), "op": op}


# -- helpers ------------------------------------------------------------------------------------------------


def _experiment(store: Store, name: str) -> dict[str, Any]:
    experiment = store.get_experiment(name) if isinstance(name, str) else None
    if experiment is None:
        raise NotFound(f"no experiment named {name!r}")
    return experiment


def _run(store: Store, experiment: str, run_id: int) -> dict[str, Any]:
    run = store.get_run(experiment, run_id) if _is_int(run_id) else None
    if run is None:
        raise NotFound(f"experiment {experiment} has no run {run_id}")
    return run


def _source_problems(source: Any) -> list[str]:
    if isinstance(source, str) and (
        source in OP_SOURCES or (source.startswith("policy:") and len(source) > 7)
    ):
        return []
    return [f"source must be 'user', 'cli' or 'policy:<name>', got {source!r}"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
