"""The HTTP client of the rf server, used by the fit flow, slot workers, policies and the CLI.

Standard library only (urllib), so `rf runs` and friends start fast. The server's errors come back as the same
classes (`rf_core.errors`); `ServerError` and `ServerUnavailable` are the client's own.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any

from rf_core import paths
from rf_core.errors import (
    ExperimentExists,
    FitLive,
    FitSuperseded,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    OpRejected,
)
from rf_core.server_process import TOKEN_ENV, is_process_alive, read_server_info
from rf_core.states import DEFAULT_METRIC, FIT_EPOCH_HEADER

RETRY_DELAYS_S = (0.1, 0.3, 1.0)
OUTAGE_POLL_S = 1.0

__all__ = [
    "NoServerRunning",
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
    "FitLive": FitLive,
    "FitSuperseded": FitSuperseded,
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
        self.fit_epoch: int | None = None  # set by a fit that holds an experiment: every call carries it

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
        if self.fit_epoch is not None:
            headers[FIT_EPOCH_HEADER] = str(self.fit_epoch)
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
        metric: str = DEFAULT_METRIC,
        mode: str = "min",
        spec_ref: str | None = None,
        functions: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Returns {"experiment": row, "runs": [rows]}. Raises ExperimentExists when the name is taken.

        `functions`: the names the experiment registers, which its configs' function knobs may name."""
        body = {
            "name": name,
            "configs": list(configs),
            "num_chunks": num_chunks,
            "seed": seed,
            "metric": metric,
            "mode": mode,
            "spec_ref": spec_ref,
            "functions": list(functions) if functions is not None else None,
        }
        return self._request("POST", "/api/experiments", body)

    def list_experiments(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/experiments", idempotent=True)

    def get_experiment(self, name: str) -> dict[str, Any]:
        return self._request("GET", self._experiment_path(name), idempotent=True)

    def set_experiment_status(self, name: str, status: str) -> dict[str, Any]:
        return self._request("POST", self._experiment_path(name, "/status"), {"status": status}, idempotent=True)

    def acquire_fit(self, name: str, owner: str, flow_run: str | None = None, force: bool = False) -> dict[str, Any]:
        """Take the experiment for a fit (rf_core.control.leases.acquire_fit); FitLive while another fit lives."""
        body = {"owner": owner, "flow_run": flow_run, "force": force}
        return self._request("POST", self._experiment_path(name, "/fit"), body)

    def renew_fit(self, name: str, epoch: int) -> dict[str, Any]:
        """Renew the lease; FitSuperseded when another fit took the experiment over."""
        return self._request("POST", self._experiment_path(name, "/fit/renew"), {"epoch": epoch}, idempotent=True)

    def end_fit(self, name: str, epoch: int) -> dict[str, Any]:
        return self._request("POST", self._experiment_path(name, "/fit/end"), {"epoch": epoch}, idempotent=True)

    def reserve_fit(self, name: str, owner: str) -> dict[str, Any]:
        """Hold an ended experiment for a fit about to start elsewhere: {"reserved": bool, "state"}."""
        return self._request("POST", self._experiment_path(name, "/fit/reserve"), {"owner": owner})

    def continue_experiment(self, name: str) -> dict[str, Any]:
        """Have the server start a fit that continues an ended or crashed experiment, as a background process on its
        machine (the dashboard's Continue experiment): {"experiment", "pid", "log"}."""
        return self._request("POST", self._experiment_path(name, "/continue"))

    def rename_experiment(self, name: str, new_name: str) -> dict[str, Any]:
        """Rename an ended experiment: rows, folder, stored paths and kept spec (refused while a fit holds it)."""
        return self._request("POST", self._experiment_path(name, "/rename"), {"new_name": new_name})

    def delete_experiment(self, name: str, force: bool = False) -> dict[str, Any]:
        """Delete an experiment with its runs, metrics, ops and files; refused while its fit runs unless `force`."""
        query = {"force": "1"} if force else None
        return self._request("DELETE", self._experiment_path(name, ""), query=query)

    def set_experiment_functions(self, name: str, functions: Sequence[str]) -> dict[str, Any]:
        body = {"functions": list(functions)}
        return self._request("PUT", self._experiment_path(name, "/functions"), body, idempotent=True)

    def list_runs(self, experiment: str, include_deleted: bool = False) -> list[dict[str, Any]]:
        query = {"all": 1} if include_deleted else None
        return self._request("GET", self._experiment_path(experiment, "/runs"), query=query, idempotent=True)

    def get_run(self, experiment: str, run_id: int) -> dict[str, Any]:
        return self._request("GET", self._experiment_path(experiment, f"/runs/{int(run_id)}"), idempotent=True)

    def experiment_snapshot(self, experiment: str, include_deleted: bool = False) -> dict[str, Any]:
        query = {"all": 1} if include_deleted else None
        return self._request("GET", self._experiment_path(experiment, "/snapshot"), query=query, idempotent=True)

    def submit_op(
        self,
        experiment: str,
        kind: str,
        run_id: int,
        payload: Mapping[str, Any] | None = None,
        source: str = "api",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Queue an IC Op; returns its row once committed. Raises OpRejected (`.problems`) when invalid."""
        body = {"kind": str(kind), "run_id": run_id, "payload": payload, "source": source, "who": who}
        return self._request("POST", self._experiment_path(experiment, "/ops"), body)

    def list_ops(self, experiment: str, run_id: int | None = None, status: str | None = None) -> list[dict[str, Any]]:
        query = {"run": run_id, "status": status}
        return self._request("GET", self._experiment_path(experiment, "/ops"), query=query, idempotent=True)

    def boundary_view(
        self,
        experiment: str,
        busy_run_ids: Iterable[int],
        ended: Sequence[Mapping[str, Any]] = (),
        starts: Sequence[Mapping[str, Any]] = (),
        since: float | None = None,
    ) -> dict[str, Any]:
        """A chunk boundary in one request (`ops.boundary_view`): record the chunks that ended, apply the due ops of
        runs not in flight, start the chunks picked in advance that are still legal; returns the runs table too.

        Safe to retry: an end recorded twice changes nothing, and a start made twice is refused the second time
        (the run is in flight), so the loop plans it again and that start closes the first as abandoned. With
        `since`, only the runs changed from then on come back."""
        body: dict[str, Any] = {
            "busy_run_ids": [int(run_id) for run_id in busy_run_ids],
            "ended": [dict(chunk) for chunk in ended],
            "starts": [dict(start) for start in starts],
        }
        if since is not None:
            body["since"] = since
        view = self._request("POST", self._experiment_path(experiment, "/boundary"), body, idempotent=True)
        view["started"] = {int(run_id): int(tid) for run_id, tid in (view.get("started") or {}).items()}
        return view

    def chunk_start(self, experiment: str, run_id: int, chunk_index: int, slot: int, total_chunks: int) -> int:
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

    def fail_run(self, experiment: str, run_id: int, error: str) -> dict[str, Any]:
        """Fail a run that cannot train at all (its chunks cannot be planned), with the reason; returns its row.
        Safe to repeat: a run that has failed already is left as it is."""
        path = self._experiment_path(experiment, f"/runs/{int(run_id)}/fail")
        return self._request("POST", path, {"error": error}, idempotent=True)

    def log_metrics(self, batch_id: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Store a batch of metric rows once per batch_id (retries and replays are harmless)."""
        return self._request("POST", "/api/metrics", {"batch_id": batch_id, "rows": list(rows)}, idempotent=True)

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
        return self._request("GET", self._experiment_path(experiment, "/metrics"), query=query, idempotent=True)

    def run_metrics(self, experiment: str) -> dict[int, dict[str, dict[str, Any]]]:
        """Every evaluation metric of every run: latest (and its step), min, max, best, points."""
        summary = self._request("GET", self._experiment_path(experiment, "/run-metrics"), idempotent=True)
        return {int(run_id): metrics for run_id, metrics in summary.items()}

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

        Safe to retry: a (policy, run, boundary, kind) already decided comes back with "duplicate" set.
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
        return self._request("POST", self._experiment_path(experiment, "/policy-decisions"), body, idempotent=True)

    def list_policy_decisions(
        self, experiment: str, policy: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"policy": policy, "status": status}
        return self._request(
            "GET", self._experiment_path(experiment, "/policy-decisions"), query=query, idempotent=True
        )

    def policy_view(
        self,
        experiment: str,
        policy: str,
        names: Iterable[str],
        since: float | None = None,
        after_row: int = -1,
        after_decision: int = 0,
    ) -> dict[str, Any]:
        """What changed for a policy since its last view (`rf_core.control.decisions.policy_view`)."""
        query = {
            "policy": policy,
            "name": list(names),
            "since": since,
            "after_row": after_row,
            "after_decision": after_decision,
        }
        return self._request("GET", self._experiment_path(experiment, "/policy-view"), query=query, idempotent=True)

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
