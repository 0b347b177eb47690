"""`make serve`: a Prefect server, the rf server and one serve process for the deployments in
deployments/prefect.yaml, all bound to 127.0.0.1, in the foreground. Ctrl-C (or SIGTERM) stops all three.

    python deployments/serve.py [--prefect-port 4200] [--rf-home DIR] [--prefect-file deployments/prefect.yaml]

Then, from another terminal (the URLs are printed at start):
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'rf-fit/demo' --param experiment=demo

An already running Prefect server (PREFECT_API_URL answers) or rf server (found for RF_HOME) is used as it is.
The serve process runs each flow run as a subprocess that imports the deployment's entrypoint: no code is
pickled, and no work pool or worker is needed (deployments/prefect.yaml also documents the work-pool way).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
PREFECT_START_TIMEOUT_S = 120.0  # a fresh Prefect home migrates its database first: slow on a loaded 2-core box


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default 4200)")
    parser.add_argument("--rf-home", type=Path, default=None, help="rf store folder (default: $RF_HOME or ~/.rf)")
    parser.add_argument("--prefect-file", type=Path, default=DEFAULT_PREFECT_FILE, help="deployments to serve")
    parser.add_argument("--no-ui", action="store_true", help="start the Prefect server without its web UI")
    args = parser.parse_args(argv)

    # A background job from a non-interactive shell inherits SIGINT ignored, and Prefect turns SIGTERM into
    # SIGINT: restore both, so `kill PID` stops the serve process and the servers it started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.rf_home is not None:
        os.environ["RF_HOME"] = str(args.rf_home.resolve())
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")  # trigger -> start in ~2 s instead of ~10 s

    prefect_server = None
    try:
        api_url = os.environ.get("PREFECT_API_URL")
        if not api_url or not _prefect_healthy(api_url):
            api_url = f"http://127.0.0.1:{args.prefect_port}/api"
            prefect_server = _start_prefect_server(args.prefect_port, args.no_ui)
            _wait_for_prefect(api_url, prefect_server)
        os.environ["PREFECT_API_URL"] = api_url

        from rf_core import paths
        from rf_core.server_process import ensure_server

        home = paths.rf_home()
        rf_url, _ = ensure_server(home)  # one we start exits with this process (--exit-with-pid)
        os.environ["RF_SERVER_URL"] = rf_url

        deployments = load_deployments(args.prefect_file)
        print(f"Prefect API  {api_url}", flush=True)
        print(f"rf server    {rf_url}   (RF_HOME {home})", flush=True)
        for deployment in deployments:
            print(f"serving      {deployment.flow_name}/{deployment.name}{_schedule_note(deployment)}", flush=True)

        from prefect import serve

        serve(*deployments, print_starting_message=False)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        _stop(prefect_server)
    return 0


def load_deployments(prefect_file: Path) -> list[Any]:
    """The deployments declared in a prefect.yaml, as runner deployments of the flows they name.

    An entrypoint `path/to/file.py:function` (relative to the project root) is imported as module
    `path.to.file`; schedules (interval seconds or cron), parameters, description, tags and concurrency_limit
    are honoured; work_pool is ignored (the serve process runs the flows itself).
    """
    import yaml
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    config = yaml.safe_load(Path(prefect_file).read_text())
    deployments = []
    for entry in config.get("deployments") or []:
        flow = _flow_from_entrypoint(entry["entrypoint"])
        schedules = []
        for schedule in entry.get("schedules") or []:
            if "interval" in schedule:
                schedules.append(Interval(float(schedule["interval"])))
            elif "cron" in schedule:
                schedules.append(Cron(str(schedule["cron"])))
            else:
                raise ValueError(f"deployment {entry['name']}: a schedule needs interval or cron, got {schedule}")
        limit = entry.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = ConcurrencyLimitConfig(**limit)
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                parameters=entry.get("parameters") or {},
                tags=entry.get("tags") or [],
                schedules=schedules or None,
                concurrency_limit=limit,
                # Flow runs import `flows.fit` / `flows.policy` by module path: no dependence on the cwd.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def _flow_from_entrypoint(entrypoint: str) -> Any:
    path, _, name = entrypoint.partition(":")
    if not path.endswith(".py") or not name:
        raise ValueError(f"entrypoint must look like 'flows/file.py:function', got {entrypoint!r}")
    module = importlib.import_module(path[: -len(".py")].replace("/", "."))
    return getattr(module, name)


def _schedule_note(deployment: Any) -> str:
    schedules = getattr(deployment, "schedules", None) or []
    described = []
    for schedule in schedules:
        inner = getattr(schedule, "schedule", schedule)
        if getattr(inner, "interval", None) is not None:
            described.append(f"every {inner.interval.total_seconds():g} s")
        elif getattr(inner, "cron", None):
            described.append(f"cron {inner.cron}")
    return f"   ({', '.join(described)})" if described else ""


def _start_prefect_server(port: int, no_ui: bool) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if no_ui:
        env["PREFECT_UI_ENABLED"] = "false"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    print(f"starting the Prefect server on 127.0.0.1:{port}", flush=True)
    # Its own process group, so we stop it (and its children) ourselves, after the serve process has stopped.
    return subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_sigint
    )


def _wait_for_prefect(api_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + PREFECT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the Prefect server exited while starting (code {process.returncode})")
        if _prefect_healthy(api_url):
            return
        time.sleep(0.5)
    raise SystemExit(f"the Prefect server did not answer at {api_url} within {PREFECT_START_TIMEOUT_S:.0f} s")


def _prefect_healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as response:
            return response.status == 200 and json.loads(response.read()) is True
    except (OSError, ValueError):
        return False


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))  # run as a script: the flows package must import without installing
    sys.exit(main())
