"""`rf policy ...` and the policy API routes against a real server process: dry runs, acting once per boundary,
proposals approved or dismissed by a named person, user policies by `module:attr`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rf_core.client import RFClient
from rf_core.errors import InvalidRequest
from tests.test_server_api import CONFIG, start_server, stop

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EVAL_LOSS_AT_CHUNK_1 = {1: 2.0, 2: 1.0, 3: 4.0, 4: 3.0}  # run 3 is the worst, then run 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RFClient, Path]]:
    home = tmp_path_factory.mktemp("rf_home")
    process, info = start_server(home)
    client = RFClient(info["url"])
    try:
        yield client, home
    finally:
        stop(process)


def make_experiment(client: RFClient, name: str) -> None:
    """Four runs that have each trained one chunk of four and logged an eval loss there."""
    configs = [{**CONFIG, "learning_rate": 10.0**-exponent} for exponent in range(2, 6)]
    client.create_experiment(name, configs, num_chunks=4)
    for run_id, loss in EVAL_LOSS_AT_CHUNK_1.items():
        timeline_id = client.chunk_start(name, run_id, 0, 0, 4)
        outcome = {"status": "ok", "step": 3, "epoch": 0, "samples": 24, "checkpoint": f"/ckpt/{run_id}"}
        client.chunk_end(name, timeline_id, outcome)
        row = {"experiment": name, "run_id": run_id, "step": 3, "name": "eval_loss", "value": loss, "chunk": 0}
        client.log_metrics(f"{name}-{run_id}", [row])


def rf(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "RF_SERVER_URL"}
    environment.update(RF_HOME=str(home), USER="tester")
    return subprocess.run(
        [sys.executable, "-m", "rf_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=PROJECT_ROOT,
    )


def test_dry_run_prints_the_ops_and_why_and_sends_nothing(served: tuple[RFClient, Path]) -> None:
    client, home = served
    make_experiment(client, "dry")
    result = rf(home, "policy", "apply", "dry", "--template", "stop-bottom-fraction", "--param", "fraction=0.5",
                "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "dry run, nothing sent: policy stop-bottom-fraction: 2 op(s)"
    assert lines[1] == "would submit: stop run 4"
    assert "eval_loss 3 at chunk 1 ranks 3 of 4" in lines[2] and lines[2].lstrip().startswith("why:")
    assert lines[3] == "would submit: stop run 3"
    assert client.list_ops("dry") == [] and client.list_policy_decisions("dry") == []


def test_apply_queues_audited_ops_once_per_boundary(served: tuple[RFClient, Path]) -> None:
    client, home = served
    make_experiment(client, "act")
    args = ("policy", "apply", "act", "--template", "stop-bottom-fraction", "--param", "fraction=0.5", "--json")
    first = rf(home, *args)
    assert first.returncode == 0, first.stderr
    assert [(o["run_id"], o["status"]) for o in json.loads(first.stdout)] == [(4, "submitted"), (3, "submitted")]
    ops = client.list_ops("act")
    assert [(op["run_id"], op["kind"], op["source"], op["who"]) for op in ops] == [
        (4, "stop", "policy:stop-bottom-fraction", "tester"),
        (3, "stop", "policy:stop-bottom-fraction", "tester"),
    ]
    assert "ranks 4 of 4" in ops[1]["payload"]["policy"]["reason"]

    # A second tick at the same boundary decides nothing new (the runs have stops queued: no op at all).
    again = rf(home, *args)
    assert again.returncode == 0 and json.loads(again.stdout) == []
    assert len(client.list_ops("act")) == 2

    # The ops log shows the policy's reason.
    log = rf(home, "ops", "act")
    assert log.returncode == 0 and "in the bottom 50%" in log.stdout and "policy:stop-bottom-fraction" in log.stdout
    decisions = rf(home, "policy", "decisions", "act")
    assert decisions.returncode == 0 and decisions.stdout.count("submitted") == 2


def test_the_same_decision_twice_is_a_duplicate_through_the_api(served: tuple[RFClient, Path]) -> None:
    client, _ = served
    make_experiment(client, "dup")
    first = client.record_policy_decision("dup", "p", 1, 1, "stop", None, "why")
    second = client.record_policy_decision("dup", "p", 1, 1, "stop", None, "why")
    assert not first["duplicate"] and second["duplicate"]
    assert second["decision"]["decision_id"] == first["decision"]["decision_id"]
    assert len(client.list_ops("dup")) == 1
    with pytest.raises(InvalidRequest, match="reason must be a non-empty string"):
        client.record_policy_decision("dup", "p", 2, 1, "stop", None, "")
    with pytest.raises(InvalidRequest, match="unknown decision kind"):  # found by tests/test_api_fuzz.py: was a 500
        client.record_policy_decision("dup", "p", 2, 1, ["stop"], None, "why")  # type: ignore[arg-type]


def test_a_promotion_is_noted_once_and_queues_no_op(served: tuple[RFClient, Path]) -> None:
    client, _ = served
    make_experiment(client, "promo")
    for mode in ("act", "propose"):
        answer = client.record_policy_decision(
            "promo", f"sha-{mode}", 1, 2, "promote", None, "top of rung 2", mode=mode
        )
        assert answer["decision"]["status"] == "noted" and answer["op"] is None
    again = client.record_policy_decision("promo", "sha-act", 1, 2, "promote", None, "top of rung 2")
    assert again["duplicate"]
    # A stop at the same (policy, run, boundary) after the promotion is a duplicate: the promotion is final.
    assert client.record_policy_decision("promo", "sha-act", 1, 2, "stop", None, "late")["duplicate"]
    assert client.list_ops("promo") == []
    # A clone is another kind of decision: it may replace the run at the same boundary.
    clone = client.record_policy_decision("promo", "sha-act", 1, 2, "clone", {"overrides": {}}, "replace it")
    assert not clone["duplicate"] and clone["decision"]["status"] == "submitted"
    missing = client.record_policy_decision("promo", "sha-act", 99, 1, "promote", None, "no such run")
    assert missing["decision"]["status"] == "rejected" and "no run 99" in missing["decision"]["problems"][0]
    assert [row["status"] for row in client.list_policy_decisions("promo", status="noted")] == ["noted", "noted"]


def test_proposals_are_approved_or_dismissed_by_a_named_person(served: tuple[RFClient, Path]) -> None:
    client, home = served
    make_experiment(client, "semi")
    proposed = rf(home, "policy", "apply", "semi", "--template", "median-stopping", "--propose")
    assert proposed.returncode == 0, proposed.stderr
    waiting = client.list_policy_decisions("semi", status="proposed")
    assert [row["run_id"] for row in waiting] == [3, 4]
    assert f"proposal {waiting[0]['decision_id']}: stop run 3 (waits for `rf policy approve`)" in proposed.stdout
    assert client.list_ops("semi") == []

    approved = rf(home, "policy", "approve", "semi", str(waiting[0]["decision_id"]), "--who", "alice")
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.startswith(f"proposal {waiting[0]['decision_id']} approved by alice: op ")
    dismissed = rf(home, "policy", "dismiss", "semi", str(waiting[1]["decision_id"]))
    assert dismissed.returncode == 0 and "dismissed by tester" in dismissed.stdout
    (op,) = client.list_ops("semi")
    assert (op["run_id"], op["who"], op["source"]) == (3, "alice", "policy:median-stopping")

    twice = rf(home, "policy", "approve", "semi", str(waiting[1]["decision_id"]))
    assert twice.returncode == 1 and "is dismissed by tester" in twice.stderr


def test_a_user_policy_by_module_attr_and_bad_parameters(served: tuple[RFClient, Path]) -> None:
    client, home = served
    make_experiment(client, "user")
    result = rf(home, "policy", "apply", "user", "--template", "tests.test_policies:KeepBest", "--param", "name=mine")
    assert result.returncode == 0, result.stderr
    assert sorted(op["run_id"] for op in client.list_ops("user")) == [1, 3, 4]
    assert {op["source"] for op in client.list_ops("user")} == {"policy:mine"}

    bad = rf(home, "policy", "apply", "user", "--template", "asha", "--param", "etta=3")
    assert bad.returncode == 1 and "AsyncSuccessiveHalving has no parameter etta" in bad.stderr
    missing = rf(home, "policy", "apply", "nope", "--template", "noop")
    assert missing.returncode == 1 and "no experiment named 'nope'" in missing.stderr


def test_continue_explains_what_it_cannot_continue(served: tuple[RFClient, Path]) -> None:
    client, home = served
    make_experiment(client, "in-memory")
    result = rf(home, "continue", "in-memory")
    assert result.returncode == 1 and "started from in-memory functions and no spec of it is kept" in result.stderr
    client.create_experiment("running", [CONFIG], num_chunks=4, spec_ref="tests.e2e_experiment:spec")
    result = rf(home, "continue", "running")
    assert result.returncode == 1 and "has a live fit" in result.stderr and "--force" in result.stderr
    typo = rf(home, "continue", "running", "--policy", '{"template": "ash"}')
    assert typo.returncode == 1 and "unknown policy template 'ash'" in typo.stderr
