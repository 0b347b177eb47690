"""Running a policy against a live experiment: read the snapshot through the rf server, decide, and record each
decision — queueing its op ("act") or leaving it for a person to approve ("propose").

Shared by the fit flow's chunk-boundary hook, the scheduled Prefect policy flow (flows/policy.py) and
`rf policy apply`. Standard library plus rf_core only, so the CLI stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rf_core.client import RFClient
from rf_core.policies import (
    ExperimentSnapshot,
    Policy,
    PolicyOp,
    Promote,
    build_policy,
    frozen,
    illegal_op_problems,
)
from rf_core.states import DECISION_MODES, decision_family


@dataclass(frozen=True)
class PolicySpec:
    """A policy named as data (a template or `module:attr`, its parameters, act or propose): what travels in
    Prefect parameters and deployment files, never code."""

    template: str
    params: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "act"

    def __post_init__(self) -> None:
        if self.mode not in DECISION_MODES:
            raise ValueError(f"mode must be one of {', '.join(DECISION_MODES)}, got {self.mode=}")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"params must be a JSON object, got {self.params=}")

    @classmethod
    def from_json(cls, data: Any) -> PolicySpec:
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping) or not isinstance(data.get("template"), str):
            raise ValueError(f'a policy is {{"template": NAME, "params": {{...}}, "mode": "act"}}, got {data!r}')
        unknown = sorted(set(data) - {"template", "params", "mode"})
        if unknown:
            raise ValueError(f"unknown policy keys {unknown}: use template, params and mode")
        return cls(data["template"], dict(data.get("params") or {}), data.get("mode") or "act")

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "params": dict(self.params), "mode": self.mode}

    def build(self) -> Policy:
        return build_policy(self.template, self.params)


@dataclass(frozen=True)
class DecisionOutcome:
    """What became of one op a policy returned.

    status: submitted (op queued), proposed (waits for approval), noted (a promotion: recorded, nothing queued),
    rejected (the server refused the op), duplicate (the policy already acted on this run at this boundary),
    invalid (illegal on the snapshot, not sent), or for a dry run: would-submit, would-propose, would-note,
    already-decided.
    """

    op: PolicyOp
    boundary: int
    status: str
    op_id: int | None = None
    decision_id: int | None = None
    problems: tuple[str, ...] = ()

    def line(self) -> str:
        what = self.op.describe()
        if self.status == "submitted":
            head = f"op {self.op_id} queued: {what}"
        elif self.status == "proposed":
            head = f"proposal {self.decision_id}: {what} (waits for `rf policy approve`)"
        elif self.status == "noted":
            head = f"noted: {what}"
        elif self.status in ("rejected", "invalid"):
            head = f"{self.status}: {what} ({'; '.join(self.problems)})"
        elif self.status in ("duplicate", "already-decided"):
            head = f"already decided at chunk boundary {self.boundary}: {what}"
        else:
            head = f"{self.status.replace('-', ' ')}: {what}"
        return f"{head}\n    why: {self.op.reason}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.op.kind.value,
            "run_id": self.op.run_id,
            "payload": self.op.payload(),
            "reason": self.op.reason,
            "boundary": self.boundary,
            "status": self.status,
            "op_id": self.op_id,
            "decision_id": self.decision_id,
            "problems": list(self.problems),
        }


def read_snapshot(client: RFClient, experiment: str, policy: Policy, now: float | None = None) -> ExperimentSnapshot:
    """The experiment as `policy` needs it: every run (Deleted included) and the metric histories it reads."""
    raw = client.experiment_snapshot(experiment, include_deleted=True)
    names = sorted(policy.metric_names(str(raw["experiment"]["metric"])))
    rows = client.get_metrics(experiment, names=names) if names else []
    decided = client.list_policy_decisions(experiment, policy=policy.name)
    return ExperimentSnapshot.from_api(raw, rows, time.time() if now is None else now, decided)


READ_ALL_EVERY_S = 60.0  # a reader takes a whole view this often, whatever it merged meanwhile
CHANGES_MARGIN_S = 2.0  # a run updated just before a view may commit just after it: ask again for a while


class PolicyReader:
    """A policy's view of a live experiment kept across chunk boundaries.

    `read` gives what `read_snapshot` gives, but asks the rf server only for what changed since its last read (runs
    updated, metric rows stored, decisions made) and merges it, so a boundary of a thousand-run fit costs what changed
    rather than the whole experiment. Every READ_ALL_EVERY_S it takes a whole view again.
    """

    def __init__(self, client: RFClient, experiment: str, policy: Policy) -> None:
        self._client, self._experiment, self._policy = client, experiment, policy
        self._names: list[str] | None = None
        self._runs: dict[int, dict[str, Any]] = {}
        self._rows: dict[int, list[dict[str, Any]]] = {}  # run -> its metric rows, in the order they were stored
        self._decisions: list[dict[str, Any]] = []
        self._as_of: float | None = None
        self._whole_at = 0.0
        self._last_row = -1

    def read(self, now: float | None = None) -> ExperimentSnapshot:
        if self._names is None:
            metric = str(self._client.get_experiment(self._experiment)["metric"])
            self._names = sorted(self._policy.metric_names(metric))
        started = time.time()
        whole = self._as_of is None or started - self._whole_at >= READ_ALL_EVERY_S
        if whole:
            self._runs, self._rows, self._decisions, self._last_row = {}, {}, [], -1
            self._whole_at = started
        view = self._client.policy_view(
            self._experiment,
            self._policy.name,
            self._names,
            since=None if whole or self._as_of is None else self._as_of - CHANGES_MARGIN_S,
            after_row=self._last_row,
            after_decision=int(self._decisions[-1]["decision_id"]) if self._decisions else 0,
        )
        for run in view["runs"]:  # a run that changed comes with all its rows (some may have been dropped)
            run["config"] = frozen(run["config"])
            self._runs[int(run["run_id"])] = run
            self._rows[int(run["run_id"])] = []
        for row in view["metrics"]:
            self._rows.setdefault(int(row["run_id"]), []).append(row)
        pending = view["pending_op_kinds"]
        for run_id, run in self._runs.items():
            run["pending_op_kinds"] = pending.get(str(run_id), [])
        self._decisions.extend(view["decisions"])
        self._last_row, self._as_of = int(view["last_row"]), float(view["as_of"])
        raw = {"experiment": view["experiment"], "runs": [self._runs[run_id] for run_id in sorted(self._runs)]}
        rows = (row for run_rows in self._rows.values() for row in run_rows)
        return ExperimentSnapshot.from_api(raw, rows, time.time() if now is None else now, self._decisions)


def decide(policy: Policy, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
    ops = policy.decisions(snapshot)
    if not isinstance(ops, list) or not all(isinstance(op, PolicyOp) for op in ops):
        raise TypeError(f"policy {policy.name!r} must return a list of PolicyOp (Stop, Resume, CloneModify, Delete)")
    return ops


def submit_decisions(
    client: RFClient,
    experiment: str,
    policy: Policy,
    snapshot: ExperimentSnapshot,
    ops: Sequence[PolicyOp],
    *,
    mode: str = "act",
    dry_run: bool = False,
    who: str | None = None,
) -> list[DecisionOutcome]:
    """Record each op as the policy's decision about its run at the run's current chunk boundary.

    Ops that are illegal on the snapshot are not sent. A dry run sends nothing and says what would happen.
    """
    if mode not in DECISION_MODES:
        raise ValueError(f"mode must be one of {', '.join(DECISION_MODES)}, got {mode=}")
    decided: set[tuple[int, int]] = set()
    if dry_run:
        decided = {
            (int(row["run_id"]), int(row["boundary"]), decision_family(row["kind"]))
            for row in client.list_policy_decisions(experiment, policy=policy.name)
        }
    outcomes = []
    for op in ops:
        run = snapshot.run(op.run_id)
        boundary = op.boundary if op.boundary is not None else (run.chunks_done if run is not None else 0)
        problems = illegal_op_problems(snapshot, op)
        if problems:
            outcomes.append(DecisionOutcome(op, boundary, "invalid", problems=tuple(problems)))
        elif dry_run:
            verb = "note" if isinstance(op, Promote) else _verb(mode)
            key = (op.run_id, boundary, decision_family(op.kind.value))
            status = "already-decided" if key in decided else f"would-{verb}"
            decided.add(key)
            outcomes.append(DecisionOutcome(op, boundary, status))
        else:
            outcomes.append(_record(client, experiment, policy, op, boundary, mode, who))
    return outcomes


def apply_policy(
    client: RFClient,
    experiment: str,
    policy: Policy,
    *,
    mode: str = "act",
    dry_run: bool = False,
    who: str | None = None,
    reader: PolicyReader | None = None,
) -> list[DecisionOutcome]:
    """Read the snapshot (through `reader` when given), decide, and record the decisions (nothing is written in a
    dry run)."""
    snapshot = reader.read() if reader is not None else read_snapshot(client, experiment, policy)
    return submit_decisions(
        client, experiment, policy, snapshot, decide(policy, snapshot), mode=mode, dry_run=dry_run, who=who
    )


def _record(
    client: RFClient, experiment: str, policy: Policy, op: PolicyOp, boundary: int, mode: str, who: str | None
) -> DecisionOutcome:
    answer = client.record_policy_decision(
        experiment, policy.name, op.run_id, boundary, op.kind.value, op.payload(), op.reason, mode=mode, who=who
    )
    decision = answer["decision"]
    status = "duplicate" if answer["duplicate"] else str(decision["status"])
    return DecisionOutcome(
        op,
        boundary,
        status,
        op_id=None if decision.get("op_id") is None else int(decision["op_id"]),
        decision_id=int(decision["decision_id"]),
        problems=tuple(decision.get("problems") or ()),
    )


def _verb(mode: str) -> str:
    return "submit" if mode == "act" else "propose"


def format_outcomes(policy_name: str, outcomes: Sequence[DecisionOutcome], dry_run: bool = False) -> str:
    prefix = "dry run, nothing sent: " if dry_run else ""
    if not outcomes:
        return f"{prefix}policy {policy_name} wants no op now"
    return "\n".join([f"{prefix}policy {policy_name}: {len(outcomes)} op(s)", *(o.line() for o in outcomes)])
