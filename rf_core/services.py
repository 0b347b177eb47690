"""The services that stay up: `rf up` starts the rf server (dashboard + API) and a Prefect server in the background
for an RF_HOME, `rf down` stops what `rf up` started, `rf status` says what runs. Fits use these services and never
take them down (unless asked to be ephemeral: then they start temporary ones that exit with the fit).

What `rf up` started is recorded in `$RF_HOME/services.json`. Standard library only: the CLI imports this before
anything heavy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rf_core import paths
from rf_core.server_process import (
    SERVER_START_TIMEOUT_S,
    ServerStartError,
    ensure_server,
    find_live_server,
    is_process_alive,
)

RF_PORT_ENV = "RF_PORT"
PREFECT_PORT_ENV = "RF_PREFECT_PORT"
EPHEMERAL_ENV = "RF_EPHEMERAL"
DEFAULT_RF_PORT = 8765
DEFAULT_PREFECT_PORT = 4200
PREFECT_START_TIMEOUT_S = 120.0  # Prefect's server migrates its database at first start: ~15 s on 2 cores
SERVICES_FILE = "services.json"
PREFECT_LOG_NAME = "prefect.log"
DOWN_MARKER = ".services-down"  # left by `rf down`, removed by `rf up`


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says why and what to do."""


def ephemeral_requested(ephemeral: bool | None = None) -> bool:
    """An explicit choice wins; otherwise RF_EPHEMERAL=1 asks for temporary services (the test suite sets it)."""
    if ephemeral is not None:
        return ephemeral
    return os.environ.get(EPHEMERAL_ENV, "").strip().lower() in ("1", "true", "yes")


def rf_port(port: int | None = None) -> int:
    return port if port is not None else _port_from_env(RF_PORT_ENV, DEFAULT_RF_PORT)


def prefect_port(port: int | None = None) -> int:
    return port if port is not None else _port_from_env(PREFECT_PORT_ENV, DEFAULT_PREFECT_PORT)


def _port_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ServiceError(f"{name} must be a port number (1-65535), got {raw!r}")
    return int(raw)


def services_path(home: Path | None = None) -> Path:
    return (home or paths.rf_home()) / SERVICES_FILE


def read_services(home: Path | None = None) -> dict[str, Any]:
    try:
        recorded = json.loads(services_path(home).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def up(
    home: Path | None = None,
    port: int | None = None,
    prefect: bool = True,
    prefect_port_number: int | None = None,
    rf: bool = True,
) -> dict[str, Any]:
    """Make sure the rf server for `home` runs (started on `port` when none does) and, with `prefect`, a Prefect
    server on `prefect_port_number`; returns {"rf": {...} | None, "prefect": {...} | None}, each with its url,
    pid and whether it was started now. Two `up` at once: one starts the services, the other finds them."""
    home = Path(home) if home is not None else paths.rf_home()
    home.mkdir(parents=True, exist_ok=True)
    with _services_lock(home):
        (home / DOWN_MARKER).unlink(missing_ok=True)
        recorded = read_services(home)
        prefect_info = _ensure_prefect(home, prefect_port_number, recorded) if prefect else None
        prefect_url = (prefect_info or recorded.get("prefect") or {}).get("url")
        _write_services(home, {**recorded, "prefect": prefect_info or recorded.get("prefect")})
        # The rf server knows the Prefect server, so the dashboard's Continue can start the fit deployment.
        rf_info = _ensure_rf(home, _rf_port_for(port, recorded), recorded.get("rf") or {}, prefect_url) if rf else None
        _write_services(home, {"rf": rf_info or recorded.get("rf"), "prefect": prefect_info or recorded.get("prefect")})
    return {"rf": rf_info, "prefect": prefect_info}


def describe(services: dict[str, Any]) -> list[str]:
    """Lines for a person: each service's URL and pid, whether it was started now, and how to stop it."""
    lines = []
    for name, title in (("rf", "rf server (dashboard + API)"), ("prefect", "Prefect server")):
        service = services.get(name)
        if not service:
            continue
        url = service["url"] if name == "rf" else str(service["url"]).removesuffix("/api")
        pid = f"pid {service['pid']}" if service.get("pid") else "pid unknown"
        how = "started now" if service.get("started") else "already running"
        lines.append(f"{title}: {url}  ({pid}, {how})")
    if any((services.get(name) or {}).get("started") for name in ("rf", "prefect")):
        lines.append("they stay up after this command: `rf status` shows them, `rf down` stops them")
    return lines


def _rf_port_for(asked: int | None, recorded: dict[str, Any]) -> int:
    """The port asked for; else the one `rf up` last used for this RF_HOME (a server started again comes back where
    its clients look for it); else RF_PORT or the default."""
    if asked is None:
        previous = urllib.parse.urlsplit(str((recorded.get("rf") or {}).get("url") or "")).port
        if previous:
            return previous
    return rf_port(asked)


def revive_rf_server(home: Path | None = None) -> None:
    """Start `rf up`'s rf server again after it died (a fit that uses it calls this when it stops answering); not
    after `rf down`, which the fits ride out until someone runs `rf up`."""
    home = Path(home) if home is not None else paths.rf_home()
    if (home / DOWN_MARKER).exists():
        print("rf: the rf server was stopped with `rf down`; waiting for `rf up`")
        return
    try:
        started = up(home, prefect=False)["rf"]
    except ServiceError as exc:  # e.g. it is alive but slow, still holding its port: the fit keeps waiting
        print(f"rf: could not start the rf server again: {exc}")
        return
    if started and started.get("started"):
        print(f"rf: the rf server stopped answering; started it again at {started['url']} (pid {started['pid']})")


def _ensure_rf(home: Path, port: int, recorded: dict[str, Any], prefect_url: str | None) -> dict[str, Any]:
    live = find_live_server(home)
    if live:
        owned = recorded.get("pid") == live["pid"] and bool(recorded.get("owned"))
        return {"url": live["url"], "pid": live["pid"], "db": live.get("db"), "started": False, "owned": owned}
    if _port_taken(port):
        other = _rf_health(port)
        if other is not None:
            raise ServiceError(
                f"port {port} serves the rf server of another RF_HOME (DB {other.get('db')}); start this one on "
                f"another port with --port or {RF_PORT_ENV}"
            )
        raise ServiceError(
            f"port {port} is taken by another program; start the rf server on another port with --port or {RF_PORT_ENV}"
        )
    try:
        extra_env = {"PREFECT_API_URL": prefect_url} if prefect_url else None
        url, process = ensure_server(
            home, timeout=SERVER_START_TIMEOUT_S, port=port, exit_with_parent=False, extra_env=extra_env
        )
    except ServerStartError as exc:
        raise ServiceError(f"the rf server did not start: {exc}") from None
    pid = process.pid if process is not None else (find_live_server(home) or {}).get("pid")
    return {"url": url, "pid": pid, "db": str(paths.db_path(home)), "started": process is not None, "owned": True}


def _ensure_prefect(home: Path, asked_port: int | None, recorded: dict[str, Any]) -> dict[str, Any]:
    previous = recorded.get("prefect") or {}
    previous_port = urllib.parse.urlsplit(str(previous.get("url") or "")).port
    if asked_port is None and previous_port and _prefect_answers(str(previous["url"])):
        port = previous_port  # the one `rf up` started for this RF_HOME, on whatever port it was given
    else:
        port = prefect_port(asked_port)
    url = f"http://127.0.0.1:{port}/api"
    if _prefect_answers(url):
        same = previous.get("url") == url and is_process_alive(int(previous.get("pid") or 0))
        pid = previous.get("pid") if same else None
        return {"url": url, "pid": pid, "started": False, "owned": same and bool(previous.get("owned"))}
    if _port_taken(port):
        raise ServiceError(
            f"port {port} is taken by a program that is not a Prefect server; start Prefect on another port with "
            f"--prefect-port or {PREFECT_PORT_ENV}"
        )
    log_path = home / PREFECT_LOG_NAME
    prefect_cli = Path(sys.executable).with_name("prefect")
    command = [str(prefect_cli)] if prefect_cli.exists() else [sys.executable, "-m", "prefect"]
    command += ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + PREFECT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if _prefect_answers(url):  # another `up` won the race to its port
                return {"url": url, "pid": None, "started": False, "owned": False}
            raise ServiceError(f"the Prefect server exited while starting (code {process.returncode}); see {log_path}")
        if _prefect_answers(url):
            return {"url": url, "pid": process.pid, "started": True, "owned": True}
        time.sleep(0.25)
    _terminate(process.pid)
    raise ServiceError(f"the Prefect server did not answer within {PREFECT_START_TIMEOUT_S:.0f} s; see {log_path}")


def down(home: Path | None = None, force: bool = False) -> list[str]:
    """Stop the services `rf up` started for `home` (never ones it found running); returns what was stopped.
    Refused while a fit runs on them, unless `force`: the fits then ride out the outage as they do a restart."""
    home = Path(home) if home is not None else paths.rf_home()
    with _services_lock(home):
        recorded = read_services(home)
        rf = recorded.get("rf") or {}
        if not force and rf.get("url") and find_live_server(home):
            live = _live_fits(str(rf["url"]))
            if live:
                raise ServiceError(
                    f"fits are running on these services ({', '.join(live)}); let them end, or `rf down --force` "
                    "(they wait for the rf server to come back)"
                )
        stopped = []
        for name in ("prefect", "rf"):
            service = recorded.get(name) or {}
            pid = int(service.get("pid") or 0)
            if service.get("owned") and pid and is_process_alive(pid) and _is_service_process(pid, name, home, service):
                _terminate(pid)
                stopped.append(f"{name} server (pid {pid}, {service.get('url')})")
        services_path(home).unlink(missing_ok=True)
        (home / DOWN_MARKER).touch()  # fits that ride out the outage must not start the server again
    return stopped


def status(home: Path | None = None) -> dict[str, Any]:
    """What runs for `home`: the rf server and the Prefect server (url, pid, whether `rf up` started it)."""
    home = Path(home) if home is not None else paths.rf_home()
    recorded = read_services(home)
    live = find_live_server(home)
    rf = None
    if live:
        owned = (recorded.get("rf") or {}).get("pid") == live["pid"]
        rf = {"url": live["url"], "pid": live["pid"], "db": live.get("db"), "owned": owned}
    prefect = recorded.get("prefect")
    if prefect and not _prefect_answers(str(prefect.get("url"))):
        prefect = None
    return {"rf": rf, "prefect": prefect}


def dashboard_url(server_url: str, experiment: str) -> str:
    return f"{server_url.rstrip('/')}/?experiment={urllib.parse.quote(experiment)}"


def _live_fits(url: str) -> list[str]:
    from rf_core.client import RFClient

    try:
        return [row["name"] for row in RFClient(url, retries=0).list_experiments() if row["status"] == "running"]
    except Exception:  # noqa: BLE001 - a server that does not answer has no fit to protect
        return []


def _write_services(home: Path, services: dict[str, Any]) -> None:
    target = services_path(home)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(services, indent=1))
    os.replace(temporary, target)


@contextlib.contextmanager
def _services_lock(home: Path) -> Iterator[None]:
    with open(home / ".services.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _rf_health(port: int) -> dict[str, Any] | None:
    reply = _get_json(f"http://127.0.0.1:{port}/api/health")
    return reply if isinstance(reply, dict) and reply.get("ok") and "db" in reply else None


def _prefect_answers(api_url: str) -> bool:
    return _get_json(f"{api_url.rstrip('/')}/health") is True


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _is_service_process(pid: int, name: str, home: Path, service: dict[str, Any]) -> bool:
    """The recorded pid still runs this RF_HOME's service (a pid reused after a reboot, even by another home's
    server, is left alone)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no procfs: trust the record
    if name == "rf":
        return "dash_app.server" in command and f"--rf-home {home}" in command
    port = urllib.parse.urlsplit(str(service.get("url") or "")).port
    return "prefect" in command and "server start" in command and f"--port {port}" in command


def _terminate(pid: int, timeout: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its own session: take its children (uvicorn workers) with it
