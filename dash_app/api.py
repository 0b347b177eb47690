"""The rf server's JSON API, registered on the Dash app's Flask server. Every route goes through rf_core.control.

Errors are JSON: {"error": message, "problems": [...], "type": exception class}. Bad input (malformed JSON,
wrong types, unknown experiment or run, an illegal op) is always a 4xx, never a 5xx.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from dash_app import data
from rf_core import errors
from rf_core.control import decisions, experiments, leases, metrics, ops, timeline
from rf_core.control.store import Store, StoreError
from rf_core.states import DEFAULT_METRIC, FIT_EPOCH_HEADER

API_PREFIX = "/api"

# Exception class -> HTTP status. The class name travels in the body so the client raises the same class.
_STATUS = (
    (errors.OpRejected, 422),
    (errors.ExperimentExists, 409),
    (errors.FitLive, 409),
    (errors.FitSuperseded, 409),
    (errors.IllegalTransition, 409),
    (errors.InvalidRequest, 400),
    (errors.NotFound, 404),
)


MAX_REQUEST_BYTES = 16 * 2**20  # far above any op or metric batch; a bigger body is refused before it is read


def register_routes(server: Flask, store: Store) -> None:
    """Add the /api routes to `server`; they read and write `store` through rf_core.control."""
    server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    api = Blueprint("rf_api", __name__, url_prefix=API_PREFIX)

    @api.get("/health")
    def health() -> Response:
        return _json({"ok": True, "pid": os.getpid(), "db": str(getattr(store, "path", ""))})

    @api.get("/experiments")
    def list_experiments() -> Response:
        return _json(experiments.list_experiments(store))

    @api.post("/experiments")
    def create_experiment() -> Response:
        body = _body()
        _require(body, "name", "configs", "num_chunks")
        created = experiments.create_experiment(
            store,
            body["name"],
            body["configs"],
            body["num_chunks"],
            seed=body.get("seed", 42),
            metric=body.get("metric") or DEFAULT_METRIC,
            mode=body.get("mode") or "min",
            spec_ref=body.get("spec_ref"),
            functions=body.get("functions"),
        )
        return _json(created, 201)

    @api.get("/experiments/<name>")
    def get_experiment(name: str) -> Response:
        return _json(experiments.get_experiment(store, name))

    @api.get("/experiments/<name>/snapshot")
    def snapshot(name: str) -> Response:
        return _json(experiments.experiment_snapshot(store, name, include_deleted=_flag("all")))

    @api.post("/experiments/<name>/status")
    def set_status(name: str) -> Response:
        body = _body()
        _require(body, "status")
        return _json(experiments.set_experiment_status(store, name, body["status"]))

    @api.post("/experiments/<name>/fit")
    def acquire_fit(name: str) -> Response:
        body = _body()
        _require(body, "owner")
        force = body.get("force") is True
        return _json(leases.acquire_fit(store, name, body["owner"], flow_run=body.get("flow_run"), force=force))

    @api.post("/experiments/<name>/fit/renew")
    def renew_fit(name: str) -> Response:
        body = _body()
        _require(body, "epoch")
        return _json(leases.renew_fit(store, name, body["epoch"]))

    @api.post("/experiments/<name>/fit/end")
    def end_fit(name: str) -> Response:
        body = _body()
        _require(body, "epoch")
        return _json(experiments.shown(store, leases.end_fit(store, name, body["epoch"])))

    @api.post("/experiments/<name>/fit/reserve")
    def reserve_fit(name: str) -> Response:
        body = _body()
        _require(body, "owner")
        return _json(leases.reserve_fit(store, name, body["owner"]))

    @api.post("/experiments/<name>/continue")
    def continue_experiment(name: str) -> Response:
        experiments.get_experiment(store, name)  # an unknown experiment is a 404, as on every route
        started, problems = data.continue_experiment(store, name, who="api")
        if started is None:
            raise errors.InvalidRequest(problems)
        return _json(started, 202)

    @api.post("/experiments/<name>/rename")
    def rename_experiment(name: str) -> Response:
        body = _body()
        _require(body, "new_name")
        return _json(experiments.rename_experiment(store, name, body["new_name"]))

    @api.delete("/experiments/<name>")
    def delete_experiment(name: str) -> Response:
        return _json(experiments.delete_experiment(store, name, force=_flag("force")))

    @api.put("/experiments/<name>/functions")
    def set_functions(name: str) -> Response:
        body = _body()
        _require(body, "functions")
        return _json(experiments.set_experiment_functions(store, name, body["functions"]))

    @api.get("/experiments/<name>/runs")
    def list_runs(name: str) -> Response:
        return _json(experiments.list_runs(store, name, include_deleted=_flag("all")))

    @api.get("/experiments/<name>/runs/<int:run_id>")
    def get_run(name: str, run_id: int) -> Response:
        return _json(experiments.get_run(store, name, run_id))

    @api.post("/experiments/<name>/ops")
    def submit_op(name: str) -> Response:
        body = _body()
        _require(body, "kind", "run_id")
        op = ops.submit_op(
            store,
            name,
            body["kind"],
            body["run_id"],
            payload=body.get("payload"),
            source=body.get("source") or "api",
            who=body.get("who"),
        )
        return _json(op, 201)

    @api.get("/experiments/<name>/ops")
    def list_ops(name: str) -> Response:
        run_ids = _int_args("run")
        if len(run_ids) > 1:
            raise errors.InvalidRequest(["give at most one run= filter for ops"])
        run_id = run_ids[0] if run_ids else None
        return _json(ops.list_ops(store, name, run_id=run_id, status=request.args.get("status")))

    @api.post("/experiments/<name>/boundary")
    def boundary(name: str) -> Response:
        body = _body()
        _require(body, "busy_run_ids")
        return _json(
            ops.boundary_view(
                store, name, body["busy_run_ids"], body.get("ended", []), body.get("starts", []), body.get("since")
            )
        )

    @api.post("/experiments/<name>/chunk-start")
    def chunk_start(name: str) -> Response:
        body = _body()
        _require(body, "run_id", "chunk_index", "slot", "total_chunks")
        timeline_id = timeline.record_chunk_start(
            store, name, body["run_id"], body["chunk_index"], body["slot"], body["total_chunks"]
        )
        return _json({"timeline_id": timeline_id}, 201)

    @api.post("/experiments/<name>/chunk-end")
    def chunk_end(name: str) -> Response:
        body = _body()
        _require(body, "timeline_id", "outcome")
        return _json(timeline.record_chunk_end(store, name, body["timeline_id"], body["outcome"]))

    @api.post("/experiments/<name>/runs/<int:run_id>/fail")
    def fail_run(name: str, run_id: int) -> Response:
        body = _body()
        _require(body, "error")
        return _json(timeline.fail_run(store, name, run_id, body["error"]))

    @api.get("/experiments/<name>/timeline")
    def list_timeline(name: str) -> Response:
        return _json(timeline.timeline(store, name))

    @api.post("/metrics")
    def log_metrics() -> Response:
        body = _body()
        _require(body, "batch_id", "rows")
        return _json(metrics.log_metrics(store, body["batch_id"], body["rows"]))

    @api.get("/experiments/<name>/metrics")
    def get_metrics(name: str) -> Response:
        run_ids = _int_args("run") or None
        names = [item for value in request.args.getlist("name") for item in value.split(",") if item] or None
        since = request.args.get("since")
        since_time = None
        if since:
            try:
                since_time = float(since)
            except ValueError:
                raise errors.InvalidRequest([f"since must be a number (epoch seconds), got {since!r}"]) from None
        return _json(metrics.metrics(store, name, run_ids=run_ids, names=names, since_time=since_time))

    @api.get("/experiments/<name>/run-metrics")
    def get_run_metrics(name: str) -> Response:
        return _json({str(run_id): summary for run_id, summary in metrics.run_metrics(store, name).items()})

    @api.post("/experiments/<name>/policy-decisions")
    def record_policy_decision(name: str) -> Response:
        body = _body()
        _require(body, "policy", "run_id", "boundary", "kind", "reason")
        recorded = decisions.record_policy_decision(
            store,
            name,
            body["policy"],
            body["run_id"],
            body["boundary"],
            body["kind"],
            payload=body.get("payload"),
            reason=body["reason"],
            mode=body.get("mode") or "act",
            who=body.get("who"),
        )
        return _json(recorded, 200 if recorded["duplicate"] else 201)

    @api.get("/experiments/<name>/policy-decisions")
    def list_policy_decisions(name: str) -> Response:
        return _json(
            decisions.list_policy_decisions(
                store, name, policy=request.args.get("policy"), status=request.args.get("status")
            )
        )

    @api.get("/experiments/<name>/policy-view")
    def policy_view(name: str) -> Response:
        names = [item for value in request.args.getlist("name") for item in value.split(",") if item]
        since = _number_arg("since", "a time in epoch seconds")
        after_row = _number_arg("after_row", "a row number", integer=True)
        after_decision = _number_arg("after_decision", "a decision id", integer=True)
        return _json(
            decisions.policy_view(
                store,
                name,
                request.args.get("policy", ""),
                names,
                since=since,
                after_row=-1 if after_row is None else int(after_row),
                after_decision=0 if after_decision is None else int(after_decision),
            )
        )

    @api.post("/experiments/<name>/policy-decisions/<int:decision_id>/<action>")
    def resolve_proposal(name: str, decision_id: int, action: str) -> Response:
        if action not in ("approve", "dismiss"):
            raise errors.InvalidRequest([f"a proposal can be approved or dismissed, not {action!r}"])
        body = _body()
        _require(body, "who")
        return _json(decisions.resolve_proposal(store, name, decision_id, action == "approve", body["who"]))

    @api.route("/", defaults={"unknown": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    @api.route("/<path:unknown>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unknown_route(unknown: str) -> Response:
        # Without this, Dash's catch-all page route would answer unknown API paths with HTML and a 200.
        return _error(f"no API route {request.method} /api/{unknown}", [], "NotFound", 404)

    @api.before_request
    def fence_superseded_fits() -> None:
        epoch = request.headers.get(FIT_EPOCH_HEADER)
        name = (request.view_args or {}).get("name")
        # The lease routes take the epoch in their body and answer a retried end themselves.
        if epoch is not None and name is not None and request.endpoint not in _LEASE_ENDPOINTS:
            try:
                held = int(epoch)
            except ValueError:
                raise errors.InvalidRequest([f"{FIT_EPOCH_HEADER} must be an integer, got {epoch!r}"]) from None
            leases.check_epoch(store, name, held)

    server.register_blueprint(api)
    _register_error_handlers(server)

    @server.before_request
    def api_paths_answer_json() -> Response | None:
        # A path under /api that no API route matched (e.g. "/api//x") would otherwise get Dash's HTML page.
        if request.path.startswith(API_PREFIX + "/") and request.blueprint != api.name:
            return _error(f"no API route {request.method} {request.path}", [], "NotFound", 404)
        return None


_LEASE_ENDPOINTS = frozenset(f"rf_api.{name}" for name in ("acquire_fit", "renew_fit", "end_fit", "reserve_fit"))


def _register_error_handlers(server: Flask) -> None:
    for error_class, status in _STATUS:
        server.register_error_handler(error_class, _handler(status))

    @server.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if not request.path.startswith(API_PREFIX + "/"):
            return exc  # the Dash pages keep Flask's own error pages
        if isinstance(exc, RequestEntityTooLarge):
            size = f"{request.content_length:,} bytes" if request.content_length else "the request body"
            message = f"{size} exceeds the server's limit of {MAX_REQUEST_BYTES:,} bytes per request"
            return _error(message, [message], type(exc).__name__, 413)
        return _error(exc.description or exc.name, [], type(exc).__name__, exc.code or 500)

    @server.errorhandler(StoreError)
    def store_error(exc: StoreError) -> Response:
        return _error(str(exc), [], type(exc).__name__, 503)


def _handler(status: int) -> Any:
    def handle(exc: Exception) -> Response:
        problems = list(getattr(exc, "problems", []) or [str(exc)])
        message = "; ".join(problems) if problems else str(exc)
        return _error(message, problems, type(exc).__name__, status)

    return handle


def _error(message: str, problems: list[str], error_type: str, status: int) -> Response:
    return _json({"error": message, "problems": problems, "type": error_type}, status)


def _json(data: Any, status: int = 200) -> Response:
    # Strict JSON for browsers: NaN and infinities (a diverged loss) become null. They are rare, and walking a
    # thousand runs' snapshot for them costs more than encoding it twice when one is there.
    try:
        text = json.dumps(data, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data), allow_nan=False)
    return Response(text, status=status, mimetype="application/json")


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def _body() -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise errors.InvalidRequest(["the request body is empty: send a JSON object"])
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidRequest([f"the request body is not valid JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise errors.InvalidRequest([f"the request body must be a JSON object, got {type(data).__name__}"])
    return data


def _require(body: dict[str, Any], *names: str) -> None:
    missing = [name for name in names if name not in body]
    if missing:
        raise errors.InvalidRequest([f"missing field {name!r}" for name in missing])


def _number_arg(name: str, what: str, integer: bool = False) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (integer and not value.is_integer()):
        raise errors.InvalidRequest([f"{name} must be {what}, got {raw!r}"])
    return value


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes", "on")


def _int_args(name: str) -> list[int]:
    values = [item for value in request.args.getlist(name) for item in value.split(",") if item]
    try:
        return [int(value) for value in values]
    except ValueError:
        raise errors.InvalidRequest([f"{name} must be integers, got {values!r}"]) from None
