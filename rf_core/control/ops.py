"""IC Ops: check, submit, preview and apply; the only code that applies an op or changes a run's status by one.

Ops are validated when submitted, against the state the run will have once its pending ops apply, and
re-checked when applied at the run's chunk boundary (`apply_due_ops`): state may have changed meanwhile, and
the op is then recorded as skipped, with the reason. The server, the CLI, the dashboard and policies all
come through here.

Every function takes a `Store` and runs its reads and writes in one `store.transaction()`.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rf_core.config import apply_overrides, architecture_mismatch, normalize_config
from rf_core.control.checks import is_int, is_json_number, registered_functions, require_experiment, type_name
from rf_core.control.metrics import log_metrics
from rf_core.control.timeline import end_chunk, start_chunk
from rf_core.errors import InvalidRequest, OpRejected
from rf_core.functions import unknown_function_problems
from rf_core.knobs import ConfigError, config_group_from_json
from rf_core.states import WARM_START_MODES, OpKind, RunStatus, SystemEvent, event_result, op_rejection, op_result

if TYPE_CHECKING:
    from rf_core.control.store import Store

CLONE_PAYLOAD_KEYS = frozenset({"config", "overrides", "warm_start"})
MAX_CLONES_PER_OP = 256  # a generator that expands further is almost certainly a typo in a $range/$grid
# Where an op came from: the channel (the dashboard, the CLI, the JSON API) or "policy:<name>"; `who` is the person
# where the channel knows one (the CLI's login). "user" is what ops from the page were called before. "initial" is
# reserved for the experiment's own configs.
OP_SOURCES = ("dashboard", "cli", "api", "user")

_ALREADY = {OpKind.STOP: "stopped", OpKind.RESUME: "resumed", OpKind.DELETE: "deleted"}


def check_op(
    kind: OpKind | str,
    run: Mapping[str, Any] | None,
    pending_ops: Sequence[Mapping[str, Any]],
    payload: Any,
    parent_config: Mapping[str, Any] | None,
    *,
    experiment: str,
    run_id: int | None,
    functions: Collection[str] = (),
) -> tuple[list[str], dict[str, Any]]:
    """Validate an op and return (problems, the payload to store); `functions`: the names the experiment
    registers, which a clone's config may name."""
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
            f"cannot {kind} run {rid}: it will be {future} once pending op {pending_id} ({pending_kind}) applies"
        ], {}

    if kind != OpKind.CLONE:
        if payload is None:
            return [], {}
        if not isinstance(payload, dict):
            return [f"a {kind} op's payload must be a JSON object or null, got {type(payload).__name__}"], {}
        return [], dict(payload)

    configs, warm, problems = expand_clone(
        payload, parent_config if parent_config is not None else run["config"], functions
    )
    if warm != "off" and not run.get("checkpoint"):
        if current == RunStatus.FAILED:
            problems.append(f"run {rid} failed before saving any checkpoint: there is no good state to warm-start from")
        elif current != RunStatus.ONGOING:
            # An Ongoing run without a checkpoint is training its first chunk: it has state by its boundary,
            # where the op applies (and is re-checked).
            problems.append(f"run {rid} has no trained state yet: clone it cold (warm_start off) or after a chunk")
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
            raise ValueError(f"'config' must be a JSON object, got {type_name(payload['config'])}")
        return payload["config"]
    if "overrides" in payload:
        if not isinstance(payload["overrides"], dict):
            raise ValueError(f"'overrides' must be a JSON object, got {type_name(payload['overrides'])}")
        return apply_overrides(dict(parent_config), payload["overrides"])
    return dict(parent_config)


def expand_clone(
    payload: Any, parent_config: Mapping[str, Any], functions: Collection[str] = ()
) -> tuple[list[dict[str, Any]], str, list[str]]:
    """A clone payload as (normalised configs it creates, warm-start mode, problems)."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        return [], "off", [f"a clone payload must be a JSON object, got {type(payload).__name__}"]
    problems: list[str] = []
    unknown = sorted(set(payload) - CLONE_PAYLOAD_KEYS)
    if unknown:
        problems.append(f"unknown clone payload keys {unknown}: use 'config' or 'overrides', and 'warm_start'")
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
        problems.extend(prefix + problem for problem in unknown_function_problems(normalised, functions))
        if warm != "off":
            problems.extend(
                f"{prefix}warm start needs the parent's architecture: {mismatch}"
                for mismatch in architecture_mismatch(dict(parent_config), normalised)
            )
        parent_type = parent_config.get("trainer_type", "sft")
        if warm == "weights+optimizer" and parent_type != normalised["trainer_type"]:
            problems.append(
                f"{prefix}warm_start 'weights+optimizer' cannot carry a {parent_type} run's optimizer state into a "
                f"{normalised['trainer_type']} run (its moments are another objective's): use warm_start 'weights'"
            )
        if warm == "weights+optimizer" and "deepspeed" in (parent_config.get("strategy"), normalised["strategy"]):
            problems.append(
                f"{prefix}warm_start 'weights+optimizer' cannot carry optimizer state to or from a DeepSpeed run "
                "(ZeRO shards it its own way): use warm_start 'weights'"
            )
        configs.append(normalised)
    return configs, warm, problems


def submit_op(
    store: Store,
    experiment: str,
    kind: OpKind | str,
    run_id: int,
    payload: Any = None,
    source: str = "api",
    who: str | None = None,
    policy_note: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate and queue an op; returns its row. Raises OpRejected (nothing written) when it is not legal.

    A clone's row lists every config it will create (`payload["configs"]`), already expanded and normalised.
    `policy_note` (policy name, reason, boundary, decision id) is stored as the payload's "policy" entry, so the
    ops log shows why a policy queued the op.
    """
    problems = []
    if not is_int(run_id):
        problems.append(f"run_id must be an integer, got {type_name(run_id)}")
    problems += _source_problems(source)
    if who is not None and not isinstance(who, str):
        problems.append(f"who must be a string, got {type_name(who)}")
    if problems:
        raise OpRejected(problems)
    with store.transaction():
        require_experiment(store, experiment)
        run = store.get_run(experiment, run_id)
        pending = store.list_ops(experiment, run_ids=[run_id], statuses=["pending"]) if run else []
        functions = registered_functions(store, experiment)
        problems, stored_payload = check_op(
            kind, run, pending, payload, None, experiment=experiment, run_id=run_id, functions=functions
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


def preview_op(store: Store, experiment: str, kind: OpKind | str, run_id: int, payload: Any = None) -> dict[str, Any]:
    """What `submit_op` would decide now, without queuing anything: {"problems", "count"}.

    `count` is the number of runs a clone would create (0 for other ops or when the payload does not expand).
    """
    with store.transaction():
        require_experiment(store, experiment)
        run = store.get_run(experiment, run_id)
        pending = store.list_ops(experiment, run_ids=[run_id], statuses=["pending"]) if run else []
        functions = registered_functions(store, experiment)
        problems, stored = check_op(
            kind, run, pending, payload, None, experiment=experiment, run_id=run_id, functions=functions
        )
    return {"problems": problems, "count": int(stored.get("count", 0)) if kind == OpKind.CLONE else 0}


def apply_due_ops(store: Store, experiment: str, idle_run_ids: Iterable[int]) -> list[dict[str, Any]]:
    """Apply the pending ops of runs that are at a chunk boundary or not training; returns the ops' rows.

    Ops apply in submission order, each re-checked against the run's current state: an op that is no longer
    legal is marked skipped with the reason. Clones submitted before this call are all created here.
    """
    if isinstance(idle_run_ids, str | bytes | Mapping) or not isinstance(idle_run_ids, Iterable):
        raise InvalidRequest([f"idle_run_ids must be a list of run ids, got {type_name(idle_run_ids)}"])
    idle_list = list(idle_run_ids)
    if not all(is_int(run_id) for run_id in idle_list):
        raise InvalidRequest([f"idle_run_ids must be a list of integers, got {idle_list!r}"])
    idle = sorted(set(idle_list))
    with store.transaction():
        require_experiment(store, experiment)
        if not idle:
            return []
        now = time.time()
        return [
            _apply_one(store, op, store.get_run(experiment, op["run_id"]), now)
            for op in store.list_ops(experiment, run_ids=idle, statuses=["pending"])
        ]


def boundary_view(
    store: Store,
    experiment: str,
    busy_run_ids: Iterable[int],
    ended: Sequence[Mapping[str, Any]] = (),
    starts: Sequence[Mapping[str, Any]] = (),
    since: float | None = None,
) -> dict[str, Any]:
    """The fit loop's whole chunk boundary, in one transaction: record the chunks that `ended`, apply the due ops of
    every run not in flight, start the chunks the loop picked in advance (`starts`) that are still legal, and return
    the runs table as it is afterwards (deleted runs included).

    `ended`: [{"timeline_id", "outcome", "metrics"}]: an attempt and its outcome as `timeline.record_chunk_end`
    takes them, and the chunk's last metric batches ([{"batch_id", "rows"}], stored first, as `log_metrics`).
    `starts`: [{"run_id", "chunk_index", "slot", "total_chunks"}]; a start is made only if, once the ops applied,
    the run may start a chunk, is not in flight and has exactly `chunk_index` chunks done; otherwise it is refused
    with the reason and the loop plans that slot again.

    Returns `{"applied_ops": [...], "runs": [...], "started": {run_id: timeline_id}, "refused": {run_id: why},
    "as_of": time}`: one request per boundary instead of four. With `since` (an earlier answer's `as_of`), `runs`
    holds only the rows changed from then on, so a boundary of a thousand-run experiment does not carry them all.
    """
    if isinstance(busy_run_ids, str | bytes | Mapping) or not isinstance(busy_run_ids, Iterable):
        raise InvalidRequest([f"busy_run_ids must be a list of run ids, got {type_name(busy_run_ids)}"])
    busy = list(busy_run_ids)
    if not all(is_int(run_id) for run_id in busy):
        raise InvalidRequest([f"busy_run_ids must be a list of integers, got {busy!r}"])
    problems = _list_of_objects_problems("ended", ended, ("timeline_id", "outcome"))
    problems += _list_of_objects_problems("starts", starts, ("run_id", "chunk_index", "slot", "total_chunks"))
    if problems:
        raise InvalidRequest(problems)
    if since is not None and not is_json_number(since):
        raise InvalidRequest([f"since must be a number (a previous answer's as_of), got {type_name(since)}"])
    started: dict[int, int] = {}
    refused: dict[int, str] = {}
    with store.transaction():
        require_experiment(store, experiment)
        for chunk in ended:
            for batch in chunk.get("metrics") or []:  # the chunk's last rows, stored before it counts as done
                log_metrics(store, batch["batch_id"], batch["rows"])
            end_chunk(store, experiment, chunk["timeline_id"], chunk["outcome"])
        now, in_flight = time.time(), set(busy)
        applied = [
            _apply_one(store, op, store.get_run(experiment, op["run_id"]), now)
            for op in store.list_ops(experiment, statuses=["pending"])
            if int(op["run_id"]) not in in_flight
        ]
        for start in starts:
            run_id = int(start["run_id"])
            run = store.get_run(experiment, run_id)
            open_entries = store.open_timeline(experiment, run_id) if run is not None else []
            why_not = _start_refusal(run_id, run, open_entries, start, busy)
            if why_not is not None:
                refused[run_id] = why_not
                continue
            assert run is not None
            started[run_id] = start_chunk(
                store, experiment, run, start["chunk_index"], start["slot"], start["total_chunks"], open_entries
            )
            busy.append(run_id)
        as_of = time.time()
        runs = store.list_runs(experiment, updated_since=None if since is None else float(since))
    return {"applied_ops": applied, "runs": runs, "started": started, "refused": refused, "as_of": as_of}


def _list_of_objects_problems(name: str, value: Any, keys: Sequence[str]) -> list[str]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        return [f"{name} must be a list of objects, got {type_name(value)}"]
    problems = []
    for position, item in enumerate(value):
        if not isinstance(item, Mapping):
            problems.append(f"{name}[{position}] must be an object, got {type_name(item)}")
        elif missing := [key for key in keys if key not in item]:
            problems.append(f"{name}[{position}] lacks {', '.join(missing)}")
        elif name == "starts" and not all(is_int(item[key]) for key in keys):
            problems.append(f"{name}[{position}]: {', '.join(keys)} must be integers, got {dict(item)!r}")
        elif name == "ended" and not _are_metric_batches(item.get("metrics") or []):
            problems.append(f"{name}[{position}].metrics must be a list of {{batch_id, rows}} objects")
    return problems


def _are_metric_batches(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(batch, Mapping) and "batch_id" in batch and "rows" in batch for batch in value
    )


def _start_refusal(
    run_id: int,
    run: Mapping[str, Any] | None,
    open_entries: Sequence[Mapping[str, Any]],
    start: Mapping[str, Any],
    busy: Collection[int],
) -> str | None:
    """Why a chunk picked before the boundary may not start now; None when it may."""
    if run is None:
        return f"run {run_id} no longer exists"
    status = RunStatus(run["status"])
    if run_id in busy or open_entries:
        return f"run {run_id} is training a chunk already"
    if event_result(status, SystemEvent.START) is None:
        return f"run {run_id} is {status} now: a chunk cannot start"
    done = int(run.get("chunks_done") or 0)
    if done != int(start["chunk_index"]):
        return f"run {run_id} has {done} chunks done, not {int(start['chunk_index'])}"
    return None


def _apply_one(store: Store, op: Mapping[str, Any], run: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
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
    require_experiment(store, experiment)
    return store.list_ops(
        experiment,
        run_ids=None if run_id is None else [run_id],
        statuses=None if status is None else [status],
    )


def _source_problems(source: Any) -> list[str]:
    if isinstance(source, str) and (source in OP_SOURCES or (source.startswith("policy:") and len(source) > 7)):
        return []
    return [f"source must be 'dashboard', 'cli', 'api' or 'policy:<name>', got {source!r}"]
