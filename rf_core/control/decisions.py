"""Policy decisions: what a policy decided about a run at a boundary, acted on (an op queued) or proposed for a
person to approve or dismiss; each (policy, run, boundary, decision family) is decided once."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rf_core.control.checks import is_int, registered_functions, require_experiment, type_name
from rf_core.control.leases import with_fit_state
from rf_core.control.ops import check_op, submit_op
from rf_core.errors import InvalidRequest, NotFound, OpRejected
from rf_core.paths import check_name
from rf_core.states import DECISION_KINDS, DECISION_MODES, DECISION_STATUSES, PROMOTE, decision_family

if TYPE_CHECKING:
    from rf_core.control.store import Store


def record_policy_decision(
    store: Store,
    experiment: str,
    policy: str,
    run_id: int,
    boundary: int,
    kind: str,
    payload: Any = None,
    reason: str = "",
    mode: str = "act",
    who: str | None = None,
) -> dict[str, Any]:
    """Record a policy's decision about a run at a chunk boundary; in "act" mode also queue its op.

    A promotion (`kind` "promote") queues nothing in either mode: it is noted, so that it is final.

    A policy decides at most once per (policy, run, boundary, decision family): when that key is already recorded,
    nothing is written and the earlier decision comes back with `duplicate` set (a stop and a promotion are one
    family, the run's verdict; a clone, a resume and a delete are each their own). An op that is not legal is
    recorded as rejected, with its problems, rather than raised: the policy did decide, and the audit log keeps it.

    Returns {"decision": row, "op": the queued op's row or None, "duplicate": bool}.
    """
    problems = []
    try:
        check_name("policy", policy)
    except ValueError as exc:
        problems.append(str(exc))
    for name, value in (("run_id", run_id), ("boundary", boundary)):
        if not is_int(value) or value < 0:
            problems.append(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(kind, str) or kind not in DECISION_KINDS:
        problems.append(f"unknown decision kind {kind!r}: use one of {', '.join(DECISION_KINDS)}")
    if not isinstance(reason, str) or not reason.strip():
        problems.append("reason must be a non-empty string: every policy decision says why")
    if mode not in DECISION_MODES:
        problems.append(f"mode must be one of {', '.join(DECISION_MODES)}, got {mode!r}")
    if who is not None and not isinstance(who, str):
        problems.append(f"who must be a string, got {type_name(who)}")
    if payload is not None and not isinstance(payload, dict):
        problems.append(f"payload must be a JSON object or null, got {type_name(payload)}")
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        require_experiment(store, experiment)
        earlier = [
            row
            for row in store.list_policy_decisions(experiment, policies=[policy], run_ids=[run_id])
            if int(row["boundary"]) == boundary and decision_family(row["kind"]) == decision_family(str(kind))
        ]
        if earlier:
            op = store.get_op(int(earlier[0]["op_id"])) if earlier[0]["op_id"] is not None else None
            return {"decision": earlier[0], "op": op, "duplicate": True}
        row: dict[str, Any] = {
            "experiment": experiment,
            "policy": policy,
            "run_id": run_id,
            "boundary": boundary,
            "kind": str(kind),
            "payload": payload,
            "reason": reason.strip(),
            "decided_at": time.time(),
        }
        note = {"name": policy, "reason": row["reason"], "boundary": boundary}
        op = None
        if kind == PROMOTE:
            row["status"] = "noted" if store.get_run(experiment, run_id) else "rejected"
            if row["status"] == "rejected":
                row["problems"] = [f"experiment {experiment} has no run {run_id}"]
        elif mode == "act":
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
            functions = registered_functions(store, experiment)
            rejected, _ = check_op(
                kind, run, pending, payload, None, experiment=experiment, run_id=run_id, functions=functions
            )
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
    require_experiment(store, experiment)
    return store.list_policy_decisions(
        experiment,
        policies=None if policy is None else [policy],
        statuses=None if status is None else [status],
    )


def resolve_proposal(store: Store, experiment: str, decision_id: int, approve: bool, who: str) -> dict[str, Any]:
    """Approve (queue the proposed op, with `who` as its submitter) or dismiss a policy's proposal.

    Approval validates the op against the run's state now: an op that is no longer legal raises OpRejected and
    leaves the proposal waiting (dismiss it). Returns {"decision": row, "op": the queued op's row or None}.
    """
    problems = []
    if not is_int(decision_id):
        problems.append(f"decision_id must be an integer, got {type_name(decision_id)}")
    if not isinstance(who, str) or not who.strip():
        problems.append("who must name the person approving or dismissing the proposal")
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        require_experiment(store, experiment)
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


def policy_view(
    store: Store,
    experiment: str,
    policy: str,
    metric_names: list[str],
    since: float | None = None,
    after_row: int = -1,
    after_decision: int = 0,
) -> dict[str, Any]:
    """What a policy reads at a chunk boundary, in one transaction, from where its reader's last view left off.

    Returns the experiment; the runs updated since `since` (every run without it), Deleted included; the queued op
    kinds of every run that has some; the rows of `metric_names`: every row of the runs returned, and the rows of the
    others stored after row number `after_row` (rows are only dropped with an update of their run: a retried
    chunk's abandoned attempt); the last row number read; the policy's decisions after `after_decision`; and
    `as_of`, the time the view was taken (`rf_core.policies_runner.PolicyReader` keeps the rest, so a boundary costs
    what changed, not the experiment).
    """
    problems = []
    if not isinstance(policy, str) or not policy:
        problems.append(f"policy must be a policy's name, got {policy!r}")
    if not isinstance(metric_names, list) or not all(isinstance(name, str) and name for name in metric_names):
        problems.append(f"metric names must be a list of names, got {metric_names!r}")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
        problems.append(f"since must be a time in epoch seconds, got {since!r}")
    for label, value in (("after_row", after_row), ("after_decision", after_decision)):
        if not is_int(value):
            problems.append(f"{label} must be an integer, got {value!r}")
    if problems:
        raise InvalidRequest(problems)
    as_of = time.time()
    with store.transaction():
        row = with_fit_state(store, require_experiment(store, experiment))
        runs = store.list_runs(experiment, updated_since=since)
        pending = store.list_ops(experiment, statuses=["pending"])
        rows, last_row = store.metric_rows_after(experiment, metric_names, after_row)
        if since is not None and runs:
            changed = {int(run["run_id"]) for run in runs}
            rows = [row for row in rows if int(row["run_id"]) not in changed]
            rows += store.query_metrics(experiment, run_ids=sorted(changed), names=metric_names)
        decided = store.list_policy_decisions(experiment, policies=[policy], after_id=after_decision)
    pending_kinds: dict[int, list[str]] = {}
    for op in pending:
        pending_kinds.setdefault(int(op["run_id"]), []).append(str(op["kind"]))
    return {
        "experiment": row,
        "runs": runs,
        "pending_op_kinds": {str(run_id): kinds for run_id, kinds in pending_kinds.items()},
        "metrics": rows,
        "last_row": last_row,
        "decisions": decided,
        "as_of": as_of,
    }
