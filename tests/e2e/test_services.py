"""`rf up`, `rf status`, `rf down` as a person runs them: a real rf server and a real Prefect server in the
background, two `rf up` at once, a port another program holds, a fit that uses the services and leaves them up,
and `rf down` refused while a fit lives."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rf_core.client import RFClient
from rf_core.errors import NotFound
from rf_core.server_process import is_process_alive
from rf_core.services import read_services
from rf_core.training.worker import STEP_DELAY_ENV
from tests.e2e_experiment import MODEL_CACHE_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 8, "lora_alpha": 16}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def environment(root: Path, rf_port: int, prefect_port: int) -> dict[str, str]:
    dropped = ("RF_EPHEMERAL", "RF_SERVER_URL", "PREFECT_API_URL")
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    (root / "prefect").mkdir(parents=True, exist_ok=True)
    env.update(
        RF_HOME=str(root / "home"),
        PREFECT_HOME=str(root / "prefect"),
        RF_PORT=str(rf_port),
        RF_PREFECT_PORT=str(prefect_port),
        PYTHONPATH=str(PROJECT_ROOT),
        PREFECT_LOGGING_LEVEL="INFO",
        **{MODEL_CACHE_ENV: str(root / "models")},
    )
    return env


def rf(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rf_cli.main", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_services_stay_up_for_fits_and_stop_with_rf_down(tmp_path: Path) -> None:
    rf_port, prefect_port = free_port(), free_port()
    env = environment(tmp_path, rf_port, prefect_port)
    home = Path(env["RF_HOME"])
    try:
        # Two `rf up` at once: one starts the services, the other finds them.
        racing = [
            subprocess.Popen(
                [sys.executable, "-m", "rf_cli.main", "up"],
                cwd=PROJECT_ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=240)[0] for process in racing]
        assert [process.returncode for process in racing] == [0, 0], outputs
        # The first to take the lock starts both; the other finds both running.
        assert sorted(output.count("started now") for output in outputs) == [0, 2], outputs
        assert sorted(output.count("already running") for output in outputs) == [0, 2], outputs
        recorded = read_services(home)
        assert recorded["rf"]["url"] == f"http://127.0.0.1:{rf_port}"
        assert recorded["prefect"]["url"] == f"http://127.0.0.1:{prefect_port}/api"
        pids = [int(recorded["rf"]["pid"]), int(recorded["prefect"]["pid"])]
        assert all(is_process_alive(pid) for pid in pids)

        status = json.loads(rf(env, "status", "--json").stdout)
        assert status["rf"]["pid"] == pids[0] and status["prefect"]["pid"] == pids[1]
        shown = rf(env, "status").stdout
        assert f"http://127.0.0.1:{rf_port}" in shown and f"http://127.0.0.1:{prefect_port}" in shown

        # A fit uses them, prints its dashboard URL, and leaves them up.
        fit = rf(env, "fit", "uses-services", "--entrypoint", "tests.e2e_experiment:spec", "--cpu-slots", "1",
                 "--chunks", "2", "--max-configs", "1", "--idle-timeout", "1", timeout=400)  # fmt: skip
        output = fit.stdout + fit.stderr
        assert fit.returncode == 0, output[-4000:]
        assert "rf server (dashboard + API)" in output and "already running" in output, output[-4000:]
        assert f"dashboard: http://127.0.0.1:{rf_port}/?experiment=uses-services" in output, output[-4000:]
        assert f"127.0.0.1:{prefect_port}/runs/flow-run/" in output, "the flow ran on rf up's Prefect server"
        assert all(is_process_alive(pid) for pid in pids), "a fit never takes the services down"
        client = RFClient(f"http://127.0.0.1:{rf_port}")
        assert client.get_experiment("uses-services")["status"] == "finished"

        # A fit killed on rf up's Prefect server: `rf continue` takes it over and marks its flow run Crashed there.
        killed = _fit_training(env, client, "killed", stdout=subprocess.DEVNULL, start_new_session=True)
        flow_run = client.get_experiment("killed")["fit_flow_run"]
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(30)
        deadline = time.monotonic() + 30
        while client.get_experiment("killed")["status"] != "crashed":
            assert time.monotonic() < deadline, "the killed fit still looks alive after 30 s"
            time.sleep(0.5)
        taken = rf(env, "continue", "killed", "--cpu-slots", "1", "--idle-timeout", "0", timeout=400)
        output = taken.stdout + taken.stderr
        assert taken.returncode == 0, output[-4000:]
        assert "took over from a crashed fit" in output and f"flow run {flow_run} is marked Crashed" in output
        assert _flow_run_state(f"http://127.0.0.1:{prefect_port}/api", flow_run) == "CRASHED"
        assert client.get_experiment("killed")["status"] == "finished"

        # rf up's rf server killed under a fit: the fit starts it again where it was, and nothing is lost.
        riding = _fit_training(env, client, "rides-out", stdout=subprocess.PIPE)
        epoch = client.get_experiment("rides-out")["fit_epoch"]
        old_pid = int(read_services(home)["rf"]["pid"])
        os.kill(old_pid, signal.SIGKILL)
        output = riding.communicate(timeout=400)[0]
        assert riding.returncode == 0, output[-4000:]
        assert f"started it again at http://127.0.0.1:{rf_port}" in output, output[-4000:]
        revived = read_services(home)["rf"]
        assert revived["url"] == f"http://127.0.0.1:{rf_port}" and int(revived["pid"]) != old_pid
        pids[0] = int(revived["pid"])
        steps = [(row["name"], row["step"]) for row in client.get_metrics("rides-out")]
        assert len(steps) == len(set(steps)), "a metric step was stored twice"
        assert client.get_experiment("rides-out")["status"] == "finished"
        assert client.get_experiment("rides-out")["fit_epoch"] == epoch, "the fit rode it out: nobody took it over"

        # `rf down` is refused while a fit lives on the services; --force stops them anyway.
        client.create_experiment("live", [CONFIG], num_chunks=2)
        client.acquire_fit("live", owner="elsewhere:1")
        refused = rf(env, "down")
        assert refused.returncode == 1 and "fits are running on these services (live)" in refused.stderr
        assert all(is_process_alive(pid) for pid in pids)
        stopped = rf(env, "down", "--force")
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped the rf server" in stopped.stdout and "stopped the prefect server" in stopped.stdout
        deadline = time.monotonic() + 20
        while any(is_process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(is_process_alive(pid) for pid in pids)
        assert read_services(home) == {}
        assert "not running" in rf(env, "status").stdout
    finally:
        for pid in [int((read_services(home).get(name) or {}).get("pid") or 0) for name in ("rf", "prefect")]:
            if pid and is_process_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def _fit_training(env: dict[str, str], client: RFClient, experiment: str, **popen: Any) -> subprocess.Popen[str]:
    """`rf fit EXPERIMENT` in the background (slow steps), returned once its first chunk has started."""
    fit = subprocess.Popen(
        [sys.executable, "-m", "rf_cli.main", "fit", experiment, "--entrypoint", "tests.e2e_experiment:spec",
         "--cpu-slots", "1", "--chunks", "4", "--max-configs", "1", "--idle-timeout", "0"],
        cwd=PROJECT_ROOT, env={**env, STEP_DELAY_ENV: "0.5"}, stderr=subprocess.STDOUT, text=True, **popen,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not _has_started_a_chunk(client, experiment):
        assert fit.poll() is None and time.monotonic() < deadline, f"the fit of {experiment} never trained"
        time.sleep(0.2)
    return fit


def _has_started_a_chunk(client: RFClient, experiment: str) -> bool:
    try:
        return bool(client.timeline(experiment))
    except NotFound:
        return False


def _flow_run_state(api_url: str, flow_run: str) -> str:
    with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run}", timeout=10) as response:
        return str(json.loads(response.read())["state"]["type"])


def test_rf_up_names_a_port_another_program_holds(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = int(holder.getsockname()[1])
        env = environment(tmp_path, taken, free_port())
        refused = rf(env, "up", "--no-prefect")
        assert refused.returncode == 1
        assert f"port {taken} is taken by another program" in refused.stderr and "--port or RF_PORT" in refused.stderr
        env = environment(tmp_path, free_port(), taken)
        refused = rf(env, "up")
        assert refused.returncode == 1
        assert f"port {taken} is taken by a program that is not a Prefect server" in refused.stderr
        assert "--prefect-port or RF_PREFECT_PORT" in refused.stderr
    rf(env, "down", "--force")  # the rf server the second `up` started before Prefect's port was refused
    with pytest.raises(FileNotFoundError):
        (Path(env["RF_HOME"]) / "services.json").read_text()
