"""The deployment path end to end, through real processes: `deployments/serve.py` (what `make serve` runs) starts
a Prefect server, the rf server and a serve process; `prefect deployment run 'rf-fit/...'` starts an experiment
(named by `module:function`), a policy deployment on a short interval schedule stops its worst run, and a budget
policy attached to the fit proposes, at chunk boundaries, stops for a person to approve; then `rf continue` trains the
ended experiment on, with its run ids and metrics intact.

Also: the shipped deployments/prefect.yaml loads into runner deployments with the declared schedules."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rf_core import paths
from rf_core.client import RFClient
from rf_core.errors import InvalidRequest, NotFound
from tests.e2e_experiment import MODEL_CACHE_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVE = PROJECT_ROOT / "deployments" / "serve.py"
EXPERIMENT = "deployed"
POLICY = "stop-worst"  # scheduled: acts
IN_FLOW = "chunk-budget"  # attached to the fit, runs at every chunk boundary: proposes

TEST_DEPLOYMENTS = f"""
deployments:
  - name: e2e
    entrypoint: flows/fit.py:rf_fit
    parameters:
      experiment: {EXPERIMENT}
      entrypoint: tests.e2e_experiment:spec
      cpu_slots: 2
      idle_timeout: 3
      policies:
        - template: budget
          params: {{name: {IN_FLOW}, max_chunks: 6}}
          mode: propose
  - name: e2e-stop-worst
    entrypoint: flows/policy.py:rf_policy
    parameters:
      experiment: {EXPERIMENT}
      template: stop-bottom-fraction
      params: {{fraction: 0.34, after_chunks: 1, name: {POLICY}}}
    schedules:
      - interval: 2
    concurrency_limit: {{limit: 1, collision_strategy: CANCEL_NEW}}
"""


def test_the_shipped_prefect_yaml_loads_with_its_schedules() -> None:
    sys.path.insert(0, str(SERVE.parent))
    try:
        import serve  # deployments/serve.py
    finally:
        sys.path.remove(str(SERVE.parent))
    deployments = {f"{d.flow_name}/{d.name}": d for d in serve.load_deployments(serve.DEFAULT_PREFECT_FILE)}
    assert set(deployments) == {"rf-fit/demo", "rf-policy/demo-stop-bottom-half", "rf-policy/demo-pbt-proposals"}
    fit = deployments["rf-fit/demo"]
    assert fit.entrypoint == "flows.fit.rf_fit" and fit.parameters["entrypoint"] == "rf_core.demo:demo_experiment"
    stop_half = deployments["rf-policy/demo-stop-bottom-half"]
    assert stop_half.schedules[0].schedule.interval.total_seconds() == 10
    assert deployments["rf-policy/demo-pbt-proposals"].schedules[0].schedule.cron == "* * * * *"
    assert deployments["rf-policy/demo-pbt-proposals"].parameters["mode"] == "propose"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(what: str, condition, timeout: float, process: subprocess.Popen[bytes], log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"serve exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _flow_runs(api_url: str, flow_run_name: str) -> list[dict]:
    body = json.dumps({"flow_runs": {"name": {"any_": [flow_run_name]}}}).encode()
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _timeline(client: RFClient) -> list[tuple]:
    return [(row["run_id"], row["chunk"], row["start"], row["end"], row["outcome"])
            for row in client.timeline(EXPERIMENT)]  # fmt: skip


def test_a_deployed_fit_steered_by_a_scheduled_policy(tmp_path: Path) -> None:
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(TEST_DEPLOYMENTS)
    home, port = tmp_path / "rf_home", _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API", "RF_SERVER"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect_home"),
        PYTHONPATH=str(PROJECT_ROOT),
        # Chunks of ~7.5 s: on a loaded 2-core machine a policy tick (a fresh flow-run process) can take 10-15 s,
        # and its stop must still land while the worst run has chunks left to train.
        RF_TEST_STEP_DELAY_S="2.5",
    )
    env[MODEL_CACHE_ENV] = str(tmp_path / "models")
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        serve = subprocess.Popen(
            [sys.executable, str(SERVE), "--prefect-port", str(port), "--rf-home", str(home),
             "--prefect-file", str(prefect_file), "--no-ui"],
            cwd=PROJECT_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait("the serve process", lambda: "serving      rf-policy/e2e-stop-worst" in log.read_text(), 180, serve, log)
        client = RFClient(json.loads(paths.server_info_path(home).read_text())["url"])

        trigger = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "rf-fit/e2e"],
            env=dict(env, PREFECT_API_URL=api_url), capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
        )  # fmt: skip
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr

        def finished() -> bool:
            try:
                return client.get_experiment(EXPERIMENT)["status"] == "finished"
            except NotFound:
                return False

        _wait("the deployed fit to finish", finished, 300, serve, log)

        runs = {run["run_id"]: run for run in client.list_runs(EXPERIMENT, include_deleted=True)}
        policy_ops = [op for op in client.list_ops(EXPERIMENT) if op["source"] == f"policy:{POLICY}"]
        assert len(policy_ops) == 1, client.list_ops(EXPERIMENT)
        (stop,) = policy_ops
        assert (stop["kind"], stop["status"], stop["reason"]) == ("stop", "applied", None), (
            stop,
            client.list_policy_decisions(EXPERIMENT, policy=POLICY),
            _timeline(client),
        )
        assert "ranks 3 of 3" in stop["payload"]["policy"]["reason"]
        assert stop["who"] == f"flow:rf-policy/{POLICY}"

        # The stopped run is the worst by eval_loss at chunk 1; the others trained to the end.
        at_chunk_1 = {
            row["run_id"]: row["value"]
            for row in client.get_metrics(EXPERIMENT, names=["eval_loss"])
            if row["chunk"] == 0
        }
        assert stop["run_id"] == max(at_chunk_1, key=lambda run_id: (at_chunk_1[run_id], -run_id))
        assert {run_id: run["status"] for run_id, run in runs.items()} == {
            run_id: "Stopped" if run_id == stop["run_id"] else "Completed" for run_id in runs
        }
        assert runs[stop["run_id"]]["chunks_done"] < 4

        # The schedule ticked many times, yet the policy decided once.
        decisions = client.list_policy_decisions(EXPERIMENT, policy=POLICY)
        assert [(d["run_id"], d["status"]) for d in decisions] == [(stop["run_id"], "submitted")]
        ticks = [run for run in _flow_runs(api_url, f"policy-stop-bottom-fraction-{EXPERIMENT}")
                 if run["state_type"] == "COMPLETED"]  # fmt: skip
        assert len(ticks) >= 2
        (fit_run,) = _flow_runs(api_url, f"fit-{EXPERIMENT}")
        assert fit_run["state_type"] == "COMPLETED"

        # The policy attached to the fit proposed, once per (run, boundary), and queued nothing by itself.
        proposals = client.list_policy_decisions(EXPERIMENT, policy=IN_FLOW)
        assert proposals and {d["status"] for d in proposals} == {"proposed"}
        keys = [(d["run_id"], d["boundary"]) for d in proposals]
        assert len(keys) == len(set(keys)) and all(boundary >= 1 for _, boundary in keys)
        assert {d["kind"] for d in proposals} == {"stop"}
        assert all(d["reason"].startswith("budget: ") for d in proposals)
        assert not [op for op in client.list_ops(EXPERIMENT) if op["source"] == f"policy:{IN_FLOW}"]

        # The experiment outlives its flow: resume the stopped run, and `rf continue` trains it on.
        stopped_id, total = stop["run_id"], runs[stop["run_id"]]["total_chunks"]
        metrics_before = {(r["run_id"], r["name"], r["step"], r["value"]) for r in client.get_metrics(EXPERIMENT)}
        cli_env = dict(env, PREFECT_API_URL=api_url, RF_HOME=str(home))
        # Without a Prefect server configured, the CLI says how to continue the experiment.
        no_prefect_env = {key: value for key, value in cli_env.items() if key != "PREFECT_API_URL"}
        resumed = subprocess.run([sys.executable, "-m", "rf_cli.main", "resume", EXPERIMENT, str(stopped_id)],
                                 env=no_prefect_env, capture_output=True, text=True, timeout=60,
                                 cwd=PROJECT_ROOT)  # fmt: skip
        assert resumed.returncode == 0 and f"`rf continue {EXPERIMENT}` starts one" in resumed.stdout
        continued = subprocess.run(
            [sys.executable, "-m", "rf_cli.main", "continue", EXPERIMENT, "--cpu-slots", "2", "--idle-timeout", "3"],
            env=cli_env, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
        )  # fmt: skip
        assert continued.returncode == 0, continued.stdout[-3000:] + continued.stderr[-3000:]
        assert f"experiment {EXPERIMENT!r} continues" in continued.stdout + continued.stderr

        after = {run["run_id"]: run for run in client.list_runs(EXPERIMENT, include_deleted=True)}
        assert set(after) == set(runs) and {run["status"] for run in after.values()} == {"Completed"}
        assert after[stopped_id]["chunks_done"] == total
        metrics_after = {(r["run_id"], r["name"], r["step"], r["value"]) for r in client.get_metrics(EXPERIMENT)}
        assert metrics_before < metrics_after
        trained = sorted(
            entry["chunk"]
            for entry in client.timeline(EXPERIMENT)
            if entry["run_id"] == stopped_id and entry["outcome"] in ("ok", "completed")
        )
        assert trained == list(range(total))  # on from where it stopped: no chunk trained twice
        # The scheduled policy kept ticking, but its verdict about chunk 1 was not repeated on the resumed run.
        assert [op["source"] for op in client.list_ops(EXPERIMENT)].count(f"policy:{POLICY}") == 1

        # With the Prefect server configured, a Clone-Modify on the ended experiment starts the fit deployment,
        # which trains the clone next to the kept history.
        cloned = subprocess.run(
            [sys.executable, "-m", "rf_cli.main", "clone", EXPERIMENT, "1", "--set", "learning_rate=2e-3"],
            env=cli_env, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
        )  # fmt: skip
        assert cloned.returncode == 0, cloned.stdout + cloned.stderr
        assert "continuing it through deployment rf-fit/e2e" in cloned.stdout, cloned.stdout + cloned.stderr
        _wait("the continued fit to finish", finished, 300, serve, log)
        final = {run["run_id"]: run for run in client.list_runs(EXPERIMENT, include_deleted=True)}
        clone_id = max(final)
        assert set(final) == set(runs) | {clone_id} and clone_id not in runs
        assert final[clone_id]["parent_id"] == 1 and final[clone_id]["status"] == "Completed"
        assert all(final[run_id]["chunks_done"] == after[run_id]["chunks_done"] for run_id in runs)

        # The dashboard's Continue experiment (POST /continue: the same function) starts the deployment as well,
        # since the rf server knows the Prefect server; a second click starts nothing.
        second = client.submit_op(EXPERIMENT, "clone", 1, {"overrides": {"learning_rate": 5e-4}}, who="tester")
        started = client.continue_experiment(EXPERIMENT)
        assert started["deployment"] == "rf-fit/e2e", started
        with pytest.raises(InvalidRequest, match="has a fit running already"):
            client.continue_experiment(EXPERIMENT)
        _wait("the fit the dashboard continued to finish", finished, 300, serve, log)
        (applied,) = [op for op in client.list_ops(EXPERIMENT) if op["op_id"] == second["op_id"]]
        (second_clone,) = applied["result"]["created_run_ids"]
        trained = client.get_run(EXPERIMENT, second_clone)
        # It trained in the fit the deployment started (the scheduled policy may stop it as the worst run).
        assert trained["chunks_done"] >= 1 and trained["status"] in ("Completed", "Stopped"), trained

        # Fit flow runs: the first deployment run, `rf continue` (in the CLI's process), and the deployment runs
        # the clone and the dashboard started.
        def fit_runs_completed() -> bool:  # the flow marks the experiment finished just before it returns
            return all(run["state_type"] == "COMPLETED" for run in _flow_runs(api_url, f"fit-{EXPERIMENT}"))

        _wait("the continued fit's flow run to complete", fit_runs_completed, 60, serve, log)
        fit_runs = _flow_runs(api_url, f"fit-{EXPERIMENT}")
        deployed = [run for run in fit_runs if run.get("deployment_id")]
        assert len(fit_runs) == 4 and len(deployed) == 3
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
            pytest.fail(f"serve did not stop on SIGTERM:\n{log.read_text()[-3000:]}")
