"""The real rf server as a subprocess, exercised through RFClient: routes, errors, metrics, lifecycle."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rf_core import paths
from rf_core.client import NoServerRunning, RFClient, discover_server_url
from rf_core.errors import FitLive, FitSuperseded, NotFound, OpRejected
from rf_core.metric_writer import MetricWriter
from rf_core.server_process import ensure_server, read_server_info, stop_server

CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 8, "lora_alpha": 16}
START_TIMEOUT_S = 60.0


def start_server(home: Path, *extra: str, port: int = 0) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start `python -m dash_app.server` on `home` and wait until it has written server.json."""
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "test-server.log", "ab")  # noqa: SIM115 - the child keeps writing to it
    process = subprocess.Popen(
        [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = read_server_info(home)
        if info and info["pid"] == process.pid:
            return process, info
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {(home / 'test-server.log').read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("server did not start in time")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RFClient, dict[str, Any], Path]]:
    home = tmp_path_factory.mktemp("rf_home")
    process, info = start_server(home)
    client = RFClient(info["url"])
    client.create_experiment("exp", [CONFIG, {**CONFIG, "learning_rate": 1e-4}], num_chunks=4)
    yield client, info, home
    stop(process)


def raw_post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_json_names_the_url_pid_and_db(server: tuple[RFClient, dict[str, Any], Path]) -> None:
    client, info, home = server
    assert info["db"] == str(paths.db_path(home))
    health = client.health()
    assert health["ok"] is True and health["pid"] == info["pid"]


def test_experiments_are_created_listed_and_read(server: tuple[RFClient, dict[str, Any], Path]) -> None:
    client, _, _ = server
    created = client.create_experiment("second", [CONFIG], num_chunks=2, seed=7, mode="max", metric="accuracy")
    assert [run["run_id"] for run in created["runs"]] == [1]
    assert created["runs"][0]["config"]["learning_rate"] == 1e-3
    assert {row["name"] for row in client.list_experiments()} >= {"exp", "second"}
    assert client.get_experiment("second")["mode"] == "max"
    finished = client.set_experiment_status("second", "finished")
    assert finished["status"] == "finished" and finished["ended_at"] is not None
    with pytest.raises(NotFound, match="no experiment named 'missing'"):
        client.get_experiment("missing")


def test_valid_op_is_queued_and_invalid_op_is_rejected_without_a_row(
    server: tuple[RFClient, dict[str, Any], Path],
) -> None:
    client, _, _ = server
    client.create_experiment("opsexp", [CONFIG], num_chunks=2)
    op = client.submit_op("opsexp", "stop", 1, who="tester")
    assert op["status"] == "pending" and op["source"] == "api" and op["who"] == "tester"
    with pytest.raises(OpRejected) as info:
        client.submit_op("opsexp", "stop", 1)
    assert info.value.problems == [f"run 1 will already be stopped by op {op['op_id']}"]
    with pytest.raises(OpRejected, match="no run 9"):
        client.submit_op("opsexp", "stop", 9)
    with pytest.raises(OpRejected, match="learning_rat"):
        client.submit_op("opsexp", "clone", 1, {"overrides": {"learning_rat": 1}})
    assert [row["op_id"] for row in client.list_ops("opsexp")] == [op["op_id"]]


def test_the_fit_flow_routes(server: tuple[RFClient, dict[str, Any], Path]) -> None:
    client, _, _ = server
    client.create_experiment("flow", [CONFIG, CONFIG], num_chunks=2)
    timeline_id = client.chunk_start("flow", 1, 0, slot=0, total_chunks=2)
    clone = client.submit_op("flow", "clone", 1, {"warm_start": "weights"}, source="policy:pbt")
    outcome = {"run_id": 1, "chunk_index": 0, "status": "ok", "step": 4, "epoch": 0, "samples": 32,
               "checkpoint": "/ckpt/1-0.pt", "eval_metrics": {"eval_loss": 2.0}}  # fmt: skip
    run = client.chunk_end("flow", timeline_id, outcome)
    assert run["status"] == "Ongoing" and run["chunks_done"] == 1
    assert client.chunk_end("flow", timeline_id, outcome)["chunks_done"] == 1  # a retried call is harmless
    view = client.boundary_view("flow", busy_run_ids=[])
    (applied,) = view["applied_ops"]
    assert applied["op_id"] == clone["op_id"] and applied["result"] == {"created_run_ids": [3]}
    assert [run["run_id"] for run in view["runs"]] == [1, 2, 3]
    clone_run = client.get_run("flow", 3)
    assert clone_run["warm_start_checkpoint"] == "/ckpt/1-0.pt" and clone_run["source"] == "policy:pbt"
    assert [run["run_id"] for run in client.list_runs("flow")] == [1, 2, 3]
    assert client.timeline("flow")[0]["outcome"] == "ok"
    failed = client.fail_run("flow", 2, "cannot split run 2 into chunks: too few steps")
    assert (failed["status"], failed["ended_by"], failed["error"]) == ("Failed", "failed", failed["error"])
    assert "too few steps" in failed["error"] and client.fail_run("flow", 2, "again")["error"] == failed["error"]
    assert len(client.timeline("flow")) == 1  # failing a run that never trained records no chunk
    snapshot = client.experiment_snapshot("flow")
    assert snapshot["experiment"]["name"] == "flow" and len(snapshot["runs"]) == 3
    # A continued fit registers its spec's function names; clones may then name them.
    assert client.set_experiment_functions("flow", ["qa", "chat"])["functions"] == ["chat", "qa"]
    client.submit_op("flow", "clone", 1, {"overrides": {"formatting_func": "chat"}})
    with pytest.raises(OpRejected, match=r"formatting_func='instruct'.*\(known: chat, qa\)"):
        client.submit_op("flow", "clone", 1, {"overrides": {"formatting_func": "instruct"}})


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        ("/api/experiments/exp/ops", b"{not json", 400, "not valid JSON"),
        ("/api/experiments/exp/ops", b"[1, 2]", 400, "must be a JSON object"),
        ("/api/experiments/exp/ops", b"", 400, "body is empty"),
        ("/api/experiments/exp/ops", b'{"kind": "stop"}', 400, "missing field 'run_id'"),
        ("/api/experiments/exp/ops", b'{"kind": "stop", "run_id": "x"}', 422, "run_id must be an integer"),
        ("/api/experiments/exp/ops", b'{"kind": 5, "run_id": 1}', 422, "unknown op kind"),
        ("/api/experiments/nope/ops", b'{"kind": "stop", "run_id": 1}', 404, "no experiment named 'nope'"),
        ("/api/experiments", b'{"name": "../etc", "configs": [], "num_chunks": "4"}', 400,
         "invalid experiment"),
        ("/api/experiments/exp/chunk-start",
         b'{"run_id": 1, "chunk_index": "0", "slot": 0, "total_chunks": 4}', 400,
         "chunk_index must be an integer"),
        ("/api/experiments/exp/runs/1/fail", b'{"error": 3}', 400, "error must be a non-empty string"),
        ("/api/experiments/exp/boundary", b'{"busy_run_ids": [1, "x"]}', 400, "busy_run_ids"),
        ("/api/experiments/exp/boundary", b'{}', 400, "busy_run_ids"),
        ("/api/metrics", b'{"batch_id": 7, "rows": []}', 400, "batch_id"),
        ("/api/metrics", b'{"batch_id": "b", "rows": [{"run_id": 1}]}', 400, "row 0"),
        ("/api/no-such-route", b"{}", 404, "no API route"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx_with_json_never_a_5xx(
    server: tuple[RFClient, dict[str, Any], Path], path: str, body: bytes, status: int, expected: str
) -> None:
    client, _, _ = server
    ops_before = len(client.list_ops("exp"))
    code, reply = raw_post(client.url + path, body)
    assert code == status, reply
    assert expected in reply["error"] and isinstance(reply["problems"], list)
    assert len(client.list_ops("exp")) == ops_before


def test_a_huge_body_is_a_413_naming_the_limit_and_writes_nothing(
    server: tuple[RFClient, dict[str, Any], Path],
) -> None:
    client, _, _ = server
    ops_before = len(client.list_ops("exp"))
    payload = {"kind": "clone", "run_id": 1, "payload": {"overrides": {"note": "x" * (17 * 2**20)}}}
    code, reply = raw_post(client.url + "/api/experiments/exp/ops", json.dumps(payload).encode())
    assert code == 413, reply
    assert "exceeds the server's limit of 16,777,216 bytes" in reply["error"]
    assert len(client.list_ops("exp")) == ops_before


def test_a_metric_batch_sent_twice_is_stored_once(server: tuple[RFClient, dict[str, Any], Path]) -> None:
    client, _, _ = server
    rows = [{"experiment": "exp", "run_id": 2, "step": step, "name": "train_loss", "value": 1.0 / step}
            for step in range(1, 101)]  # fmt: skip
    assert client.log_metrics("retried-batch", rows)["inserted"] is True
    assert client.log_metrics("retried-batch", rows)["inserted"] is False
    stored = client.get_metrics("exp", run_ids=[2], names=["train_loss"])
    assert [row["step"] for row in stored] == list(range(1, 101))
    assert client.get_metrics("exp", run_ids=[2], since=max(row["time"] for row in stored)) == []


def test_a_diverged_metric_comes_back_as_null_in_strict_json(server: tuple[RFClient, dict[str, Any], Path]) -> None:
    client, info, _ = server
    client.create_experiment("diverged", [CONFIG], num_chunks=2)
    values = [2.5, float("nan"), float("inf")]
    rows = [
        {"experiment": "diverged", "run_id": 1, "step": step, "name": "train_loss", "value": value}
        for step, value in enumerate(values, start=1)
    ]
    client.log_metrics("diverged-batch", rows)
    with urllib.request.urlopen(info["url"] + "/api/experiments/diverged/metrics?name=train_loss") as response:
        text = response.read().decode()
    assert "NaN" not in text and "Infinity" not in text  # a browser's JSON.parse refuses them
    assert [row["value"] for row in json.loads(text)] == [2.5, None, None]


def test_metric_writer_spools_while_the_server_is_down_and_replays_after_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    process, info = start_server(home)
    port = int(info["url"].rsplit(":", 1)[1])
    RFClient(info["url"]).create_experiment("spool", [CONFIG], num_chunks=2)
    spool_dir = tmp_path / "spool"
    writer = MetricWriter(info["url"], flush_interval=0.1, max_rows=50, spool_dir=spool_dir)

    def rows(start: int, count: int) -> list[dict[str, Any]]:
        return [{"experiment": "spool", "run_id": 1, "step": step, "name": "train_loss", "value": float(step)}
                for step in range(start, start + count)]  # fmt: skip

    writer.add(rows(0, 120))
    writer.flush()
    stop(process)
    writer.add(rows(120, 80))
    writer.flush()  # the server is down: these go to the spool, and training goes on
    time.sleep(0.3)
    writer.add(rows(200, 30))
    assert writer.spooled_batches >= 1
    assert writer.hand_over() == []  # with batches spooled, later rows queue behind them, not beside them
    process, info = start_server(home, port=port)
    try:
        writer.close()
        assert writer.spooled_batches == 0
        stored = RFClient(info["url"]).get_metrics("spool", names=["train_loss"])
        assert [row["step"] for row in stored] == list(range(230))
    finally:
        stop(process)


def test_a_chunk_s_last_metric_rows_are_handed_over_to_travel_with_its_record(
    server: tuple[RFClient, dict[str, Any], Path], tmp_path: Path
) -> None:
    client, info, _ = server
    client.create_experiment("hand", [CONFIG], num_chunks=2)
    writer = MetricWriter(info["url"], flush_interval=60, spool_dir=tmp_path / "spool")  # sends nothing itself
    writer.add([{"experiment": "hand", "run_id": 1, "step": step, "name": "train_loss", "value": 1.0}
                for step in range(120)])  # fmt: skip
    batches = writer.hand_over()
    try:
        assert [row["step"] for batch in batches for row in batch["rows"]] == list(range(120))
        assert client.get_metrics("hand", names=["train_loss"]) == []  # handed over, not sent
        attempt = client.chunk_start("hand", 1, 0, 0, 2)
        outcome = {"run_id": 1, "chunk_index": 0, "status": "ok", "step": 120, "epoch": 0, "samples": 120}
        client.boundary_view("hand", [], ended=[{"timeline_id": attempt, "outcome": outcome, "metrics": batches}])
        assert [row["step"] for row in client.get_metrics("hand", names=["train_loss"])] == list(range(120))
        assert client.get_run("hand", 1)["chunks_done"] == 1
    finally:
        writer.close()


def test_a_second_server_on_the_same_home_fails_fast_and_clearly(
    server: tuple[RFClient, dict[str, Any], Path],
) -> None:
    client, info, home = server
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "locked by process" in result.stderr
    assert str(paths.db_path(home)) in result.stderr
    assert time.monotonic() - started < 30
    assert read_server_info(home) == info  # the running server's file is untouched
    assert client.health()["ok"]


def test_a_temporary_server_exits_with_the_process_it_watches(tmp_path: Path) -> None:
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    home = tmp_path / "home"
    process, info = start_server(home, "--exit-with-pid", str(watched.pid))
    try:
        assert RFClient(info["url"]).health()["ok"]
        watched.kill()
        watched.wait()
        assert process.wait(timeout=20) == 0
        assert not paths.server_info_path(home).exists()
    finally:
        watched.kill()
        stop(process)


def test_ensure_server_starts_one_then_reuses_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    url, process = ensure_server(home)
    try:
        assert process is not None and RFClient(url).health()["pid"] == process.pid
        again_url, again = ensure_server(home)
        assert again is None and again_url == url
    finally:
        assert stop_server(process) == 0
    assert not paths.server_info_path(home).exists()
    with pytest.raises(NoServerRunning, match=f"no rf server is running for RF_HOME={home}"):
        discover_server_url(home)


def test_the_dashboard_page_serves_every_asset_locally(server: tuple[RFClient, dict[str, Any], Path]) -> None:
    client, _, _ = server
    with urllib.request.urlopen(client.url + "/", timeout=10) as response:
        page = response.read().decode()
    scripts = re.findall(r'<script src="([^"]+)"', page)
    assert scripts and all(src.startswith("/") for src in scripts), scripts  # no CDN
    grid = next(src for src in scripts if "dash_ag_grid" in src)
    with urllib.request.urlopen(client.url + grid, timeout=10) as response:
        assert response.status == 200


def test_the_runs_grid_data(tmp_path: Path) -> None:
    from dash_app import data
    from rf_core.control import experiments
    from rf_core.control.store import DuckDBStore

    store = DuckDBStore(tmp_path / "rf.duckdb")
    try:
        experiments.create_experiment(store, "grid", [CONFIG, {**CONFIG, "learning_rate": 1e-4}], num_chunks=2)
        assert data.experiment_options(store) == [{"label": "grid (running)", "value": "grid"}]
        rows, columns = data.runs_table(store, "grid")
        assert [row["run"] for row in rows] == [1, 2]
        assert rows[1]["knob:learning_rate"] == 1e-4 and rows[0]["progress"] == "not started"
        assert "knob:learning_rate" in [column["field"] for column in columns]
        assert data.runs_table(store, None) == ([], []) and data.runs_table(store, "missing") == ([], [])
    finally:
        store.close()


def test_a_fit_taken_over_is_refused_before_it_writes(server: tuple[RFClient, dict[str, Any], Path]) -> None:
    client, info, _ = server
    client.create_experiment("leased", [CONFIG], num_chunks=2)
    old_fit = RFClient(info["url"])
    taken = old_fit.acquire_fit("leased", owner="host:1", flow_run=None)
    old_fit.fit_epoch = taken["epoch"]
    old_fit.chunk_start("leased", 1, 0, slot=0, total_chunks=2)  # the holder writes
    with pytest.raises(FitLive, match="live fit"):
        client.acquire_fit("leased", owner="host:2")
    new_fit = RFClient(info["url"])
    new_fit.fit_epoch = new_fit.acquire_fit("leased", owner="host:2", force=True)["epoch"]
    before = client.timeline("leased")
    with pytest.raises(FitSuperseded, match="another fit took it over"):
        old_fit.chunk_start("leased", 1, 0, slot=0, total_chunks=2)
    with pytest.raises(FitSuperseded):
        old_fit.renew_fit("leased", taken["epoch"])
    assert client.timeline("leased") == before, "the superseded fit wrote nothing"
    new_fit.chunk_start("leased", 1, 0, slot=0, total_chunks=2)
    assert client.end_fit("leased", new_fit.fit_epoch)["status"] == "finished"
    request = urllib.request.Request(
        f"{info['url']}/api/experiments/leased/runs", headers={"X-RF-Fit-Epoch": "one"}, method="GET"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and "X-RF-Fit-Epoch must be an integer" in refused.value.read().decode()
