"""Policy decisions in the real store (DuckDB, in process): at most one per (policy, run, boundary), rejected ops
kept in the audit log, proposals approved or dismissed by a named person; and the migration that adds them,
applied to a database created before it."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from rf_core import errors
from rf_core.control import decisions, experiments, ops
from rf_core.control.store import DuckDBStore, migration_files

CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 4}


@pytest.fixture
def store(tmp_path: Path):
    opened = DuckDBStore(tmp_path / "rf.duckdb")
    experiments.create_experiment(opened, "exp", [CONFIG, {**CONFIG, "learning_rate": 1e-4}, {**CONFIG, "r": 8}], 4)
    yield opened
    opened.close()


def test_a_policy_acts_on_a_run_at_most_once_per_boundary(store: DuckDBStore) -> None:
    first = decisions.record_policy_decision(
        store, "exp", "pbt", 1, 2, "stop", reason="bottom quarter", who="scheduler"
    )
    assert not first["duplicate"] and first["decision"]["status"] == "submitted"
    op = first["op"]
    assert op["source"] == "policy:pbt" and op["who"] == "scheduler" and op["status"] == "pending"
    assert op["payload"]["policy"] == {"name": "pbt", "reason": "bottom quarter", "boundary": 2}

    again = decisions.record_policy_decision(store, "exp", "pbt", 1, 2, "stop", reason="again")
    assert again["duplicate"] and again["decision"]["decision_id"] == first["decision"]["decision_id"]
    # A promotion is the same kind of decision as a stop (the run's verdict there): a duplicate too.
    assert decisions.record_policy_decision(store, "exp", "pbt", 1, 2, "promote", reason="again")["duplicate"]
    assert len(ops.list_ops(store, "exp")) == 1

    # Another boundary, another run, another policy or another kind of decision is a new decision.
    assert not decisions.record_policy_decision(store, "exp", "pbt", 2, 2, "stop", reason="r")["duplicate"]
    assert not decisions.record_policy_decision(store, "exp", "asha", 3, 2, "stop", reason="r")["duplicate"]
    assert not decisions.record_policy_decision(store, "exp", "pbt", 1, 3, "delete", reason="r")["duplicate"]
    replace = decisions.record_policy_decision(store, "exp", "pbt", 1, 2, "clone", {"overrides": {"r": 16}}, "r")
    assert not replace["duplicate"]
    assert decisions.record_policy_decision(store, "exp", "pbt", 1, 2, "clone", {"overrides": {}}, "r")["duplicate"]
    assert [d["run_id"] for d in decisions.list_policy_decisions(store, "exp", policy="pbt")] == [1, 2, 1, 1]


def test_an_illegal_op_is_recorded_as_rejected_with_its_problems_and_queues_nothing(store: DuckDBStore) -> None:
    ops.submit_op(store, "exp", "stop", 1)
    result = decisions.record_policy_decision(store, "exp", "budget", 1, 0, "stop", reason="over budget")
    assert result["op"] is None and result["decision"]["status"] == "rejected"
    assert result["decision"]["problems"] == ["run 1 will already be stopped by op 1"]
    assert [op["source"] for op in ops.list_ops(store, "exp")] == ["api"]


def test_a_clone_decision_stores_its_configs_and_the_policy_note(store: DuckDBStore) -> None:
    payload = {"overrides": {"learning_rate": 2e-3}, "warm_start": "off"}
    op = decisions.record_policy_decision(store, "exp", "pbt", 2, 0, "clone", payload, reason="exploit run 2")["op"]
    assert op["payload"]["configs"][0]["learning_rate"] == 2e-3
    assert op["payload"]["policy"]["reason"] == "exploit run 2"
    applied = ops.apply_due_ops(store, "exp", [2])
    assert applied[0]["result"] == {"created_run_ids": [4]}
    assert experiments.get_run(store, "exp", 4)["source"] == "policy:pbt"


def test_proposals_wait_until_a_person_approves_or_dismisses_them(store: DuckDBStore) -> None:
    proposed = decisions.record_policy_decision(
        store, "exp", "median", 2, 1, "stop", reason="below median", mode="propose"
    )
    assert proposed["op"] is None and proposed["decision"]["status"] == "proposed"
    assert ops.list_ops(store, "exp") == []
    decision_id = proposed["decision"]["decision_id"]

    approved = decisions.resolve_proposal(store, "exp", decision_id, approve=True, who="alice")
    assert approved["decision"]["status"] == "approved" and approved["decision"]["resolved_by"] == "alice"
    op = approved["op"]
    assert op["who"] == "alice" and op["source"] == "policy:median" and op["kind"] == "stop"
    assert op["payload"]["policy"]["approved_by"] == "alice"
    with pytest.raises(errors.InvalidRequest, match="is approved by alice"):
        decisions.resolve_proposal(store, "exp", decision_id, approve=False, who="bob")

    other = decisions.record_policy_decision(store, "exp", "median", 3, 1, "stop", reason="r", mode="propose")[
        "decision"
    ]
    dismissed = decisions.resolve_proposal(store, "exp", other["decision_id"], approve=False, who="bob")
    assert dismissed["op"] is None and dismissed["decision"]["status"] == "dismissed"
    assert [op["run_id"] for op in ops.list_ops(store, "exp")] == [2]


def test_approving_a_proposal_that_is_no_longer_legal_is_rejected_and_it_keeps_waiting(store: DuckDBStore) -> None:
    decision = decisions.record_policy_decision(store, "exp", "m", 1, 0, "stop", reason="r", mode="propose")["decision"]
    ops.submit_op(store, "exp", "delete", 1)
    with pytest.raises(errors.OpRejected, match="run 1"):
        decisions.resolve_proposal(store, "exp", decision["decision_id"], approve=True, who="alice")
    assert decisions.list_policy_decisions(store, "exp", status="proposed")[0]["decision_id"] == decision["decision_id"]


def test_a_proposal_that_is_illegal_already_is_recorded_as_rejected(store: DuckDBStore) -> None:
    decision = decisions.record_policy_decision(store, "exp", "m", 1, 0, "resume", reason="r", mode="propose")[
        "decision"
    ]
    assert decision["status"] == "rejected" and "cannot resume run 1" in decision["problems"][0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"policy": "a b"}, "invalid policy name"),
        ({"boundary": -1}, "boundary must be an integer >= 0"),
        ({"kind": "pause"}, "unknown decision kind 'pause'"),
        ({"reason": " "}, "every policy decision says why"),
        ({"mode": "maybe"}, "mode must be one of act, propose"),
        ({"payload": [1]}, "payload must be a JSON object"),
    ],
)
def test_bad_decisions_are_refused_with_every_problem(store: DuckDBStore, arguments: dict, message: str) -> None:
    good = {"policy": "p", "run_id": 1, "boundary": 0, "kind": "stop", "payload": None, "reason": "r", "mode": "act"}
    with pytest.raises(errors.InvalidRequest, match=message):
        decisions.record_policy_decision(store, "exp", **{**good, **arguments})
    assert decisions.list_policy_decisions(store, "exp") == []


def test_resolving_needs_a_person_and_a_known_proposal(store: DuckDBStore) -> None:
    with pytest.raises(errors.InvalidRequest, match="who must name the person"):
        decisions.resolve_proposal(store, "exp", 1, approve=True, who="")
    with pytest.raises(errors.NotFound, match="no policy proposal 99"):
        decisions.resolve_proposal(store, "exp", 99, approve=True, who="alice")


def test_the_policy_migration_upgrades_a_database_made_before_it(tmp_path: Path) -> None:
    """A store created with every earlier migration, holding data, is upgraded in place: nothing is lost."""
    path = tmp_path / "old.duckdb"
    (policy_version, policy_file), *_ = [
        (version, file) for version, file in migration_files() if "policy_decisions" in file.name
    ]
    connection = duckdb.connect(str(path))
    connection.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at DOUBLE NOT NULL)"
    )
    for version, file in migration_files():
        if version < policy_version:
            connection.execute(file.read_text())
            connection.execute("INSERT INTO schema_version VALUES (?, ?, 0)", [version, file.name])
    connection.execute(
        "INSERT INTO experiments (name, num_chunks, seed, created_at) VALUES ('old', 2, 1, 0);"
        "INSERT INTO runs (experiment, run_id, status, config, source, created_at, updated_at) "
        "VALUES ('old', 1, 'Ongoing', '{\"lr\": 0.1}', 'initial', 0, 0);"
        "INSERT INTO ops (experiment, run_id, kind, payload, source, submitted_at) "
        "VALUES ('old', 1, 'stop', '{}', 'cli', 0)"
    )
    tables = {row[0] for row in connection.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "policy_decisions" not in tables
    connection.close()

    upgraded = DuckDBStore(path)
    try:
        assert upgraded.schema_version() == len(migration_files()) >= policy_version
        assert experiments.get_run(upgraded, "old", 1)["config"] == {"lr": 0.1}
        assert [op["kind"] for op in ops.list_ops(upgraded, "old")] == ["stop"]
        decision = decisions.record_policy_decision(upgraded, "old", "p", 1, 0, "delete", reason="upgrade works")
        assert decision["decision"]["status"] == "submitted" and policy_file.name.endswith(".sql")
    finally:
        upgraded.close()
