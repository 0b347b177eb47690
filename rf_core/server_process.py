"""Finding, starting and stopping the rf server process (the single owner of the DuckDB file).

Standard library only: the CLI and the fit flow import this before anything heavy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from rf_core import paths

SERVER_START_TIMEOUT_S = 60.0  # a loaded 2-core machine can take several seconds to import Dash
SERVER_LOG_NAME = "server.log"
TOKEN_ENV = "RF_API_TOKEN"  # when set, every request to the server carries it (dash_app.auth)
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    pass


def is_process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: trust kill()
    return state != "Z"


def read_server_info(home: Path | None = None) -> dict[str, Any] | None:
    """server.json's {"url", "pid", "db"}, or None when absent or unreadable."""
    try:
        info = json.loads(paths.server_info_path(home).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "url" in info and "pid" in info else None


def write_server_info(info: dict[str, Any], home: Path | None = None) -> Path:
    """Write server.json atomically: a reader never sees half a file."""
    target = paths.server_info_path(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(info))
    os.replace(temporary, target)
    return target


def health_ok(url: str, timeout: float = 2.0) -> bool:
    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url.rstrip('/')}/api/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200 and bool(json.loads(response.read()).get("ok"))
    except (OSError, ValueError):
        return False


def find_live_server(home: Path | None = None) -> dict[str, Any] | None:
    """The server.json of a server that runs and answers for this RF_HOME, or None."""
    info = read_server_info(home)
    if info and is_process_alive(int(info["pid"])) and health_ok(str(info["url"])):
        return info
    return None


def ensure_server(
    home: Path | None = None,
    timeout: float = SERVER_START_TIMEOUT_S,
    port: int = 0,
    exit_with_parent: bool = True,
    extra_env: dict[str, str] | None = None,
) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The URL of the rf server for `home`, starting one if none runs (on `port`; 0: any free one).

    Returns (url, process): process is None when an existing server was found; otherwise it is the server we
    started, which exits by itself when this process exits (`--exit-with-pid`; unless not `exit_with_parent`,
    as `rf up` starts it) and which the caller may stop earlier with `stop_server`. Its output goes to
    `home/server.log`.
    """
    home = Path(home) if home is not None else paths.rf_home()
    home.mkdir(parents=True, exist_ok=True)
    live = find_live_server(home)
    if live:
        return str(live["url"]), None

    log_path = home / SERVER_LOG_NAME
    command = [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", str(port)]
    if exit_with_parent:
        command += ["--exit-with-pid", str(os.getpid())]
    env = dict(os.environ, RF_HOME=str(home), **(extra_env or {}))
    # The server must import dash_app even when the project is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log:
        # Its own session: a Ctrl-C meant for the flow must not kill the server before the flow's last writes.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            live = find_live_server(home)  # another process won the race to start one: use it
            if live:
                return str(live["url"]), None
            raise ServerStartError(f"the rf server exited while starting (code {code}): {_log_tail(log_path)}")
        info = read_server_info(home)
        if info and info.get("pid") == process.pid and health_ok(str(info["url"]), timeout=1.0):
            return str(info["url"]), process
        time.sleep(0.1)
    stop_server(process)
    raise ServerStartError(f"the rf server did not answer within {timeout:.0f} s; see {log_path}")


def stop_server(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """Stop a server started by `ensure_server` (SIGTERM: it closes the DB cleanly); returns its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    return process.returncode


class TemporaryServer:
    """The rf server this fit started for itself: if it dies mid-fit, it is started again on the same port (its
    store is the DuckDB file, so nothing committed is lost) while the fit's calls wait for it."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, home: Path) -> None:
        self.process: subprocess.Popen[bytes] | None = process
        self.url = url
        self.home = home
        self._lock = threading.Lock()

    def revive(self) -> None:
        with self._lock:
            if self.process is None or self.process.poll() is None:
                return  # still running (slow, not dead), or not ours any more: wait for it
            port = urllib.parse.urlsplit(self.url).port or 0
            print(f"rf: the temporary rf server exited (code {self.process.returncode}); starting it again on "
                  f"port {port}")  # fmt: skip
            try:
                url, self.process = ensure_server(self.home, port=port)
            except Exception as exc:  # the calls waiting for it give up in their own time, with the reason
                print(f"rf: could not restart the rf server: {exc}")
                return
            if url != self.url:
                print(f"rf: another rf server answers for this RF_HOME at {url}; the fit keeps using {self.url}")


def _log_tail(log_path: Path, lines: int = 5) -> str:
    try:
        text = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log at {log_path})"
    return " | ".join(text[-lines:]) or f"(empty log {log_path})"
