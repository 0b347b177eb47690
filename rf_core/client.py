"""The HTTP client of the rf server, used by the fit flow, slot workers, policies and the CLI.

Standard library only (urllib), so `rf runs` and friends start fast. `MetricWriter` batches metric rows in
the background and spools them to disk while the server is unreachable, so training never waits on, or dies
of, the server.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any

from rf_core import paths
from rf_core.ops import ExperimentExists, IllegalTransition, InvalidRequest, NotFound, OpRejected
from rf_core.server_process import TOKEN_ENV, is_process_alive, read_server_info

RETRY_DELAYS_S = (0.1, 0.3, 1.0)
OUTAGE_POLL_S = 1.0

__all__ = [
    "ExperimentExists",
    "IllegalTransition",
    "InvalidRequest",
    "MetricWriter",
    "NoServerRunning",
    "NotFound",
    "OpRejected",
    "RFClient",
    "ServerError",
    "ServerUnavailable",
    "discover_server_url",
]


class ServerError(RuntimeError):
    """The server answered with an error that is not about the request's content (or is not one we know)."""

    def __init__(self, message: str, status: int | None = None, problems: Sequence[str] = ()) -> None:
        self.status = status
        self.problems = list(problems)
        super().__init__(message)


class ServerUnavailable(ServerError):
    """No answer: the server is down, unreachable or too slow."""


class NoServerRunning(ServerUnavailable):
    pass


# The server names the exception class in its error body; the client raises the same class.
_ERROR_TYPES: dict[str, type[InvalidRequest]] = {
    "InvalidRequest": InvalidRequest,
    "OpRejected": OpRejected,
    "ExperimentExists": ExperimentExists,
    "IllegalTransition": IllegalTransition,
}


def discover_server_url(home: Path | None = None) -> str:
    """The URL in RF_HOME's server.json, if the server process that wrote it still runs."""
    home = home or paths.rf_home()
    info = read_server_info(home)
    hint = "start one with `rf server start`, or point RF_SERVER_URL / --server at one"
    if info is None:
        raise NoServerRunning(f"no rf server is running for RF_HOME={home}; {hint}")
    if not is_process_alive(int(info["pid"])):
        raise NoServerRunning(
            f"no rf server is running for RF_HOME={home} (server.json names pid {info['pid']}, which has "
            f"exited); {hint}"
        )
    return str(info["url"])


class RFClient:
    """Calls the rf server's JSON API. Safe to share between threads (each call is its own request).

    Errors: InvalidRequest / OpRejected / ExperimentExists / IllegalTransition (4xx about the input, with
    `.problems`), NotFound (unknown experiment/run), ServerUnavailable (no answer), ServerError (anything
    else).
    """

    def __init__(
        self,
        url: str | None = None,
        timeout: float = 10.0,
        retries: int = len(RETRY_DELAYS_S),
        token: str | None = None,
        outage_wait_s: float = 0.0,
        on_outage: Callable[[], None] | None = None,
    ) -> None:
        """`outage_wait_s`: how long a call that gets no answer keeps trying (warning once on stderr) before it
        raises ServerUnavailable, so a server restart is ridden out; `on_outage` runs when an outage begins (the
        fit uses it to restart a server it started itself)."""
        self.url = (url or os.environ.get("RF_SERVER_URL") or discover_server_url()).rstrip("/")
        self._token = token or os.environ.get(TOKEN_ENV) or None
        self.timeout = timeout
        self.retries = retries
        self.outage_wait_s = outage_wait_s
        self.on_outage = on_outage
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None

    def __repr__(self) -> str:
        return f"RFClient({self.url!r})"

    # -- plumbing -------------------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        idempotent: bool = False,
    ) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(
                [(key, item) for key, value in query.items() if value is not None for item in _as_list(value)]
            )
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        attempts = 1 + max(0, self.retries)
        attempt, waiting_until = 0, None
        while True:
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                self._outage_over()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                raise _error_from_response(exc, method, path) from None
            except (urllib.error.URLError, HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                # A refused connection never reached the server, so even a non-idempotent call may be retried.
                retryable = idempotent or isinstance(reason, ConnectionRefusedError)
                if retryable and attempt + 1 < attempts:
                    time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
                    attempt += 1
                    continue
                if retryable and self.outage_wait_s > 0:
                    now = time.monotonic()
                    waiting_until = waiting_until or now + self.outage_wait_s
                    if now < waiting_until:
                        self._outage_begins(reason)
                        time.sleep(min(OUTAGE_POLL_S, waiting_until - now))
                        continue
                raise ServerUnavailable(
                    f"the rf server at {self.url} did not answer {method} {path}: {reason}"
                ) from None

    def _outage_begins(self, reason: Any) -> None:
        with self._outage_lock:
            if self._outage_since is not None:
                return
            self._outage_since = time.monotonic()
        print(
            f"rf: warning: the rf server at {self.url} does not answer ({reason}); waiting up to "
            f"{self.outage_wait_s:.0f} s for it. Training goes on; metrics are spooled and sent when it is back.",
            file=sys.stderr,
            flush=True,
        )
        if self.on_outage is not None:
            self.on_outage()

    def _outage_over(self) -> None:
        if self._outage_since is None:
            return
        with self._outage_lock:
            since, self._outage_since = self._outage_since, None
        if since is not None:
            print(f"rf: the rf server at {self.url} answers again after {time.monotonic() - since:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    def _experiment_path(self, experiment: str, suffix: str = "") -> str:
        return f"/api/experiments/{urllib.parse.quote(str(experiment), safe='')}{suffix}"

    # -- API ------------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/api/health", idempotent=True)

    def create_experiment(
        self,
        name: str,
        configs: Sequence[Mapping[str, Any]],
        num_chunks: int,
        seed: int = 42,
        metric: str = "eval_loss",
        mode: str = "min",
        spec_ref: str | None = None,
    ) -> dict[str, Any]:
        """Returns {"experiment": row, "runs": [rows]}. Raises ExperimentExists when the name is taken."""
        body = {
            "name": name,
            "configs": list(configs),
            "num_chunks": num_chunks,
            "seed": seed,
            "metric": metric,
            "mode": mode,
            "spec_ref": spec_ref,
        }
        return self._request("POST", "/api/experiments", body)

    def list_experiments(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/experiments", idempotent=True)

    def get_experiment(self, name: str) -> dict[str, Any]:
        return self._request("GET", self._experiment_path(name), idempotent=True)

    def set_experiment_status(self, name: str, status: str) -> dict[str, Any]:
        return self._request(
            "POST", self._experiment_path(name, "/status"), {"status": status}, idempotent=True
        )

    def list_runs(self, experiment: str, include_deleted: bool = False) -> list[dict[str, Any]]:
        query = {"all": 1} if include_deleted else None
        return self._request("GET", self._experiment_path(experiment, "/runs"), query=query, idempotent=True)

    def get_run(self, experiment: str, run_id: int) -> dict[str, Any]:
        return self._request(
            "GET", self._experiment_path(experiment, f"/runs/{int(run_id)}"), idempotent=True
        )

    def experiment_snapshot(self, experiment: str, include_deleted: bool = False) -> dict[str, Any]:
        query = {"all": 1} if include_deleted else None
        return self._request(
            "GET", self._experiment_path(experiment, "/snapshot"), query=query, idempotent=True
        )

    def submit_op(
        self,
        experiment: str,
        kind: str,
        run_id: int,
        payload: Mapping[str, Any] | None = None,
        source: str = "cli",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Queue an IC Op; returns its row once committed. Raises OpRejected (`.problems`) when invalid."""
        body = {"kind": str(kind), "run_id": run_id, "payload": payload, "source": source, "who": who}
        return self._request("POST", self._experiment_path(experiment, "/ops"), body)

    def list_ops(
        self, experiment: str, run_id: int | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"run": run_id, "status": status}
        return self._request("GET", self._experiment_path(experiment, "/ops"), query=query, idempotent=True)

    def apply_due_ops(self, experiment: str, idle_run_ids: Iterable[int]) -> list[dict[str, Any]]:
        body = {"idle_run_ids": [int(run_id) for run_id in idle_run_ids]}
        # Safe to repeat: an op applied by a call whose answer was lost is no longer due.
        return self._request("POST", self._experiment_path(experiment, "/apply-ops"), body, idempotent=True)

    def boundary_view(self, experiment: str, busy_run_ids: Iterable[int]) -> dict[str, Any]:
        """Apply due ops of runs not in flight and return them with the runs table (`ops.boundary_view`)."""
        body = {"busy_run_ids": [int(run_id) for run_id in busy_run_ids]}
        return self._request("POST", self._experiment_path(experiment, "/boundary"), body, idempotent=True)

    def chunk_start(
        self, experiment: str, run_id: int, chunk_index: int, slot: int, total_chunks: int
    ) -> int:
        """Record that a chunk was dispatched (New → Ongoing); returns the timeline id for `chunk_end`."""
        body = {"run_id": run_id, "chunk_index": chunk_index, "slot": slot, "total_chunks": total_chunks}
        return int(
            # Safe to repeat: a second start closes the first, answerless entry as abandoned.
            self._request("POST", self._experiment_path(experiment, "/chunk-start"), body, idempotent=True)[
                "timeline_id"
            ]
        )

    def chunk_end(self, experiment: str, timeline_id: int, outcome: Mapping[str, Any]) -> dict[str, Any]:
        """Record a finished chunk (`ChunkOutcome.to_dict()`); returns the run's row. Safe to retry."""
        body = {"timeline_id": timeline_id, "outcome": dict(outcome)}
        return self._request("POST", self._experiment_path(experiment, "/chunk-end"), body, idempotent=True)

    def log_metrics(self, batch_id: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Store a batch of metric rows once per batch_id (retries and replays are harmless)."""
        return self._request(
            "POST", "/api/metrics", {"batch_id": batch_id, "rows": list(rows)}, idempotent=True
        )

    def get_metrics(
        self,
        experiment: str,
        run_ids: Iterable[int] | None = None,
        names: Iterable[str] | None = None,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        query = {
            "run": None if run_ids is None else [int(run_id) for run_id in run_ids],
            "name": None if names is None else list(names),
            "since": since,
        }
        return self._request(
            "GET", self._experiment_path(experiment, "/metrics"), query=query, idempotent=True
        )

    def timeline(self, experiment: str) -> list[dict[str, Any]]:
        return self._request("GET", self._experiment_path(experiment, "/timeline"), idempotent=True)

    def record_policy_decision(
        self,
        experiment: str,
        policy: str,
        run_id: int,
        boundary: int,
        kind: str,
        payload: Mapping[str, Any] | None,
        reason: str,
        mode: str = "act",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Record a policy decision (and queue its op in "act" mode): {"decision", "op", "duplicate"}.

        Safe to retry: a (policy, run, boundary) already decided comes back with "duplicate" set.
        """
        body = {
            "policy": policy,
            "run_id": run_id,
            "boundary": boundary,
            "kind": str(kind),
            "payload": None if payload is None else dict(payload),
            "reason": reason,
            "mode": mode,
            "who": who,
        }
        return self._request(
            "POST", self._experiment_path(experiment, "/policy-decisions"), body, idempotent=True
        )

    def list_policy_decisions(
        self, experiment: str, policy: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"policy": policy, "status": status}
        return self._request(
            "GET", self._experiment_path(experiment, "/policy-decisions"), query=query, idempotent=True
        )

    def resolve_proposal(self, experiment: str, decision_id: int, approve: bool, who: str) -> dict[str, Any]:
        """Approve (queues the op, `who` recorded as its submitter) or dismiss a policy's proposal."""
        action = "approve" if approve else "dismiss"
        path = self._experiment_path(experiment, f"/policy-decisions/{int(decision_id)}/{action}")
        return self._request("POST", path, {"who": who})


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _error_from_response(exc: urllib.error.HTTPError, method: str, path: str) -> Exception:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("error") or f"{method} {path} failed with HTTP {exc.code}")
    problems = [str(problem) for problem in body.get("problems") or []]
    error_type = body.get("type")
    if error_type == "NotFound":
        return NotFound(message)
    if error_type in _ERROR_TYPES:
        return _ERROR_TYPES[error_type](problems or [message], message)
    return ServerError(message, status=exc.code, problems=problems)


class MetricWriter:
    """Buffers metric rows and sends them in batches from a background thread; never raises into training.

    A batch is sent when `max_rows` rows are buffered or `flush_interval` seconds have passed. Each batch gets
    a uuid `batch_id`, so a batch sent twice is stored once. While the server is unreachable, batches are
    appended to a spool file in `spool_dir` (one JSON line per batch) and replayed, in order and before any
    new batch, as soon as it answers. Spool files left by a process that died are adopted and replayed too.
    """

    def __init__(
        self,
        client_or_url: RFClient | str | None = None,
        flush_interval: float = 0.5,
        max_rows: int = 500,
        spool_dir: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0, got {flush_interval=}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows=}")
        url = client_or_url.url if isinstance(client_or_url, RFClient) else client_or_url
        # No retries inside a send: a batch the server does not take at once goes to the spool instead.
        self._client = RFClient(url, timeout=timeout, retries=0)
        self.flush_interval = flush_interval
        self.max_rows = max_rows
        self.spool_dir = Path(spool_dir) if spool_dir is not None else paths.rf_home() / "spool"
        self.spool_path = self.spool_dir / f"metrics-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._buffer: list[dict[str, Any]] = []
        self._wakeup = threading.Condition()
        self._send_lock = threading.Lock()  # held while sending: batches leave in the order they were made
        self._closing = False
        self._closed = False
        self._outage = False  # True from a failed send until the spool is replayed
        self._retry_at = 0.0
        self._adopted = self._adopt_orphans()
        self._thread = threading.Thread(target=self._run, name="rf-metric-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Buffer one row or many: {"experiment", "run_id", "step", "name", "value"[, "chunk", "time"]}."""
        new_rows = [dict(rows)] if isinstance(rows, Mapping) else [dict(row) for row in rows]
        now = time.time()
        for row in new_rows:
            row.setdefault("time", now)
        with self._wakeup:
            self._buffer.extend(new_rows)
            if len(self._buffer) >= self.max_rows:
                self._wakeup.notify()

    def flush(self) -> None:
        """Send everything buffered now (spooling it if the server is unreachable)."""
        self._flush(force_replay=True)

    def close(self) -> None:
        """Flush everything and replay the spool; whatever the server still cannot take stays spooled."""
        if self._closed:
            return
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()
        self._flush(force_replay=True)
        self._closed = True

    @property
    def spooled_batches(self) -> int:
        return sum(_count_lines(path) for path in self._spool_files())

    # -- internals ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                if not self._closing and len(self._buffer) < self.max_rows:
                    self._wakeup.wait(self.flush_interval)
                closing = self._closing
            if closing:
                return  # close() does the last flush
            try:
                self._flush(force_replay=False)
            except Exception as exc:  # never let the writer thread die: metrics must keep flowing
                print(f"rf: metric writer error: {exc}", file=sys.stderr, flush=True)

    def _flush(self, force_replay: bool) -> None:
        with self._send_lock:
            with self._wakeup:
                rows, self._buffer = self._buffer, []
            batches = [
                {"batch_id": uuid.uuid4().hex, "rows": rows[start : start + self.max_rows]}
                for start in range(0, len(rows), self.max_rows)
            ]
            if self._spool_files():
                if not force_replay and time.monotonic() < self._retry_at:
                    self._spool(batches)
                    return
                if not self._replay():
                    self._spool(batches)
                    return
            for index, batch in enumerate(batches):
                if not self._send(batch):
                    self._spool(batches[index:])
                    return

    def _send(self, batch: Mapping[str, Any]) -> bool:
        """True when the server took the batch (or refused it for good); False when it should be retried."""
        try:
            self._client.log_metrics(batch["batch_id"], batch["rows"])
        except (InvalidRequest, NotFound) as exc:
            # The server will never accept this batch; keeping it would block every later one.
            print(
                f"rf: metric batch {batch['batch_id']} dropped, the server refused it: {exc}", file=sys.stderr
            )
            return True
        except ServerError as exc:
            self._enter_outage(exc)
            return False
        self._outage = False
        return True

    def _enter_outage(self, exc: Exception) -> None:
        if not self._outage:
            self._outage = True
            print(
                f"rf: warning: metrics server unreachable ({exc}); spooling metric batches to "
                f"{self.spool_path} and replaying them when it answers",
                file=sys.stderr,
                flush=True,
            )
        self._retry_at = time.monotonic() + 2.0

    def _spool(self, batches: Sequence[Mapping[str, Any]]) -> None:
        if not batches:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        with open(self.spool_path, "a", encoding="utf-8") as spool:
            for batch in batches:
                spool.write(json.dumps(batch) + "\n")
            spool.flush()
            os.fsync(spool.fileno())

    def _spool_files(self) -> list[Path]:
        files = [path for path in self._adopted if path.exists()]
        if self.spool_path.exists():
            files.append(self.spool_path)
        return files

    def _replay(self) -> bool:
        """Send spooled batches in order; True when the spool is empty afterwards."""
        for path in self._spool_files():
            lines = path.read_text(encoding="utf-8").splitlines()
            for index, line in enumerate(lines):
                try:
                    batch = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash mid-write carries no complete batch
                if not self._send(batch):
                    _rewrite(path, lines[index:])
                    return False
            path.unlink(missing_ok=True)
        self._adopted = [path for path in self._adopted if path.exists()]
        return True

    def _adopt_orphans(self) -> list[Path]:
        """Take over spool files of writers whose process has died (renaming makes a file ours alone)."""
        adopted = []
        if not self.spool_dir.is_dir():
            return adopted
        for path in sorted(self.spool_dir.glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime):
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid == os.getpid() or is_process_alive(pid):
                continue
            claimed = self.spool_dir / f"metrics-{os.getpid()}-adopted-{uuid.uuid4().hex[:8]}.jsonl"
            try:
                os.rename(path, claimed)
            except OSError:
                continue  # another writer adopted it first
            adopted.append(claimed)
        return adopted


def _rewrite(path: Path, lines: Sequence[str]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(temporary, path)


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0
