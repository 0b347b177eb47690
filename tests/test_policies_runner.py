"""The policy runner and the fit flow's boundary hook with a fake rf client (plain data, no server, no Prefect
run): what is sent, what a dry run reports, what an illegal or repeated op becomes, and that a failing policy
does not stop the others."""

from __future__ import annotations

from typing import Any

import pytest

from flows.policy import boundary_policies, build_policies
from rf_core.policies import ExperimentSnapshot, Policy, PolicyOp, Resume, Stop, StopBottomFraction
from rf_core.policies_runner import PolicySpec, apply_policy, format_outcomes


class FakeClient:
    """The few RFClient calls the runner makes, over in-memory rows; decisions keyed like the store's."""

    def __init__(self, losses: dict[int, float], statuses: dict[int, str] | None = None) -> None:
        statuses = statuses or {}
        self.runs = [
            {"run_id": run_id, "status": statuses.get(run_id, "Ongoing"), "config": {"learning_rate": 1e-3},
             "chunks_done": 1, "total_chunks": 4, "checkpoint": f"/c/{run_id}", "pending_op_kinds": []}
            for run_id in losses
        ]  # fmt: skip
        self.metrics = [
            {"run_id": run_id, "name": "eval_loss", "step": 3, "value": loss, "chunk": 0}
            for run_id, loss in losses.items()
        ]
        self.decisions: list[dict[str, Any]] = []

    def experiment_snapshot(self, experiment: str, include_deleted: bool = False) -> dict[str, Any]:
        experiment_row = {"name": experiment, "metric": "eval_loss", "mode": "min", "num_chunks": 4, "created_at": 0}
        return {"experiment": experiment_row, "runs": self.runs}

    def get_metrics(self, experiment: str, names: list[str] | None = None) -> list[dict[str, Any]]:
        return [row for row in self.metrics if names is None or row["name"] in names]

    def list_policy_decisions(self, experiment: str, policy: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.decisions if policy is None or d["policy"] == policy]

    def record_policy_decision(self, experiment, policy, run_id, boundary, kind, payload, reason, mode, who):
        for decision in self.decisions:
            if (decision["policy"], decision["run_id"], decision["boundary"]) == (policy, run_id, boundary):
                return {"decision": decision, "op": None, "duplicate": True}
        decision = {
            "decision_id": len(self.decisions) + 1, "policy": policy, "run_id": run_id, "boundary": boundary,
            "kind": kind, "reason": reason, "who": who, "status": "submitted" if mode == "act" else "proposed",
            "op_id": 100 + len(self.decisions) if mode == "act" else None, "problems": None,
        }  # fmt: skip
        self.decisions.append(decision)
        return {"decision": decision, "op": None, "duplicate": False}


class Explodes(Policy):
    name = "explodes"

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        raise RuntimeError("a bug in a user policy")


class ResumesEverything(Policy):
    """Wants illegal ops (Resume on Ongoing runs): the runner must not send them."""

    name = "resumes"

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        return [Resume(run.run_id, "why not") for run in snapshot.runs]


def test_apply_records_each_op_once_and_says_why() -> None:
    client = FakeClient({1: 1.0, 2: 3.0, 3: 2.0, 4: 4.0})
    policy = StopBottomFraction(0.5)
    outcomes = apply_policy(client, "exp", policy, who="me")
    assert [(o.op.run_id, o.status, o.op_id) for o in outcomes] == [(2, "submitted", 100), (4, "submitted", 101)]
    assert [d["who"] for d in client.decisions] == ["me", "me"]
    again = apply_policy(client, "exp", policy)
    assert [o.status for o in again] == ["duplicate", "duplicate"] and len(client.decisions) == 2
    # A person resumes the runs it stopped and they train on: the verdict was about chunk 1, so it is not repeated.
    for row in client.runs:
        row["chunks_done"] = 2
    later = apply_policy(client, "exp", policy)
    assert [(o.op.run_id, o.boundary, o.status) for o in later] == [(2, 1, "duplicate"), (4, 1, "duplicate")]
    text = format_outcomes(policy.name, outcomes)
    assert text.splitlines()[0] == "policy stop-bottom-fraction: 2 op(s)"
    assert "op 100 queued: stop run 2" in text and "why: eval_loss 3 at chunk 1 ranks 3 of 4" in text


def test_a_dry_run_sends_nothing_and_marks_what_was_decided_before() -> None:
    client = FakeClient({1: 1.0, 2: 3.0, 3: 2.0, 4: 4.0})
    policy = StopBottomFraction(0.5)
    client.record_policy_decision("exp", policy.name, 4, 1, "stop", None, "earlier", "act", None)
    outcomes = apply_policy(client, "exp", policy, dry_run=True, mode="propose")
    assert [(o.op.run_id, o.status) for o in outcomes] == [(2, "would-propose"), (4, "already-decided")]
    assert len(client.decisions) == 1
    quiet = format_outcomes(policy.name, [], dry_run=True)
    assert quiet == "dry run, nothing sent: policy stop-bottom-fraction wants no op now"


def test_illegal_ops_are_reported_and_never_sent() -> None:
    client = FakeClient({1: 1.0, 2: 2.0}, statuses={2: "Stopped"})
    outcomes = apply_policy(client, "exp", ResumesEverything())
    assert [(o.op.run_id, o.status) for o in outcomes] == [(1, "invalid"), (2, "submitted")]
    assert outcomes[0].problems == ("cannot resume run 1: it is Ongoing",)
    assert [d["run_id"] for d in client.decisions] == [2]


def test_a_policy_must_return_policy_ops() -> None:
    class Wrong(Policy):
        def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
            return [("stop", 1)]  # type: ignore[list-item]

    with pytest.raises(TypeError, match="must return a list of PolicyOp"):
        apply_policy(FakeClient({1: 1.0}), "exp", Wrong())


def test_the_boundary_hook_skips_a_failing_policy_and_runs_the_others(capsys: pytest.CaptureFixture[str]) -> None:
    client = FakeClient({1: 1.0, 2: 3.0})
    outcomes = boundary_policies(client, "exp", [(Explodes(), "act"), (StopBottomFraction(0.5), "propose")], 7)
    assert [(o.op.run_id, o.status) for o in outcomes] == [(2, "proposed")]
    printed = capsys.readouterr().out
    assert "policy explodes failed at tick 7" in printed and "a bug in a user policy" in printed
    assert client.decisions[0]["who"] == "flow:rf-fit"


def test_policies_attached_to_a_fit_are_built_before_it_starts() -> None:
    built = build_policies(["noop", {"template": "asha", "params": {"eta": 3}, "mode": "propose"}])
    assert [(policy.name, mode) for policy, mode in built] == [("noop", "act"), ("asha", "propose")]
    with pytest.raises(ValueError, match="unknown policy keys"):
        build_policies([{"template": "asha", "parms": {}}])
    with pytest.raises(ValueError, match="mode must be one of act, propose"):
        PolicySpec("asha", {}, "maybe")
    assert Stop(1, "r").describe() == "stop run 1"
