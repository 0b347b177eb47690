"""Property-based fuzzing of every API route and every CLI command with hostile input (hypothesis).

The API runs as the real server code (the Dash app's Flask server over a real DuckDB store), driven through
Flask's test client so thousands of requests take seconds. For any request: the answer is JSON, never a 5xx,
and a refused request (4xx) leaves the store exactly as it was. The CLI runs in process against a real server
subprocess: any arguments end with exit code 0, 1 or 2 and a message, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dash_app.server import build_app
from rf_core.control import decisions, experiments, metrics, ops, timeline
from rf_core.control.store import DuckDBStore
from tests.test_server_api import CONFIG, start_server, stop

EXPERIMENT = "exp"
# RF_FUZZ_EXAMPLES=2000 pytest tests/test_api_fuzz.py: the long fuzz run; CI runs the default.
FUZZ = settings(
    max_examples=int(os.environ.get("RF_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["../../etc/passwd", "/etc", "exp", "stop", "clone", "resume", "delete", "Completed", "ok"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
names = st.one_of(
    st.sampled_from([EXPERIMENT, "nope", "..", "a%2Fb", "exp ", ""]), st.text(string.printable, max_size=20)
)
run_ids = st.one_of(st.integers(min_value=-3, max_value=5), json_values)

# Each POST route with the fields it reads, so generated bodies get past the shape check and into the engine.
POST_FIELDS: dict[str, tuple[str, ...]] = {
    "/api/experiments": ("name", "configs", "num_chunks", "seed", "metric", "mode", "spec_ref"),
    "/api/experiments/{name}/status": ("status",),
    "/api/experiments/{name}/fit": ("owner", "flow_run", "force"),
    "/api/experiments/{name}/fit/renew": ("epoch",),
    "/api/experiments/{name}/fit/end": ("epoch",),
    "/api/experiments/{name}/fit/reserve": ("owner",),
    "/api/experiments/{name}/rename": ("new_name",),
    "/api/experiments/{name}/ops": ("kind", "run_id", "payload", "source", "who"),
    "/api/experiments/{name}/boundary": ("busy_run_ids",),
    "/api/experiments/{name}/runs/{run}/fail": ("error",),
    "/api/experiments/{name}/chunk-start": ("run_id", "chunk_index", "slot", "total_chunks"),
    "/api/experiments/{name}/chunk-end": ("timeline_id", "outcome"),
    "/api/metrics": ("batch_id", "rows"),
    "/api/experiments/{name}/policy-decisions": ("policy", "run_id", "boundary", "kind", "payload", "reason", "mode"),
    "/api/experiments/{name}/policy-decisions/{decision}/{action}": ("who",),
}
GET_ROUTES = (
    "/api/health", "/api/experiments", "/api/experiments/{name}", "/api/experiments/{name}/snapshot",
    "/api/experiments/{name}/runs", "/api/experiments/{name}/runs/{run}", "/api/experiments/{name}/ops",
    "/api/experiments/{name}/timeline", "/api/experiments/{name}/metrics",
    "/api/experiments/{name}/policy-decisions", "/api/{name}",
)  # fmt: skip


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, DuckDBStore]]:
    home = tmp_path_factory.mktemp("fuzz")
    patch = pytest.MonkeyPatch()
    patch.setenv("RF_HOME", str(home))  # a rename moves folders under RF_HOME: never the user's
    store = DuckDBStore(home / "rf.duckdb")
    experiments.create_experiment(store, EXPERIMENT, [CONFIG, {**CONFIG, "learning_rate": 1e-4}], 4)
    ops.submit_op(store, EXPERIMENT, "stop", 1, source="user")
    yield build_app(store).server.test_client(), store
    store.close()
    patch.undo()


def _state(store: DuckDBStore) -> str:
    """Everything a request could write, as one comparable string."""
    rows = store.list_experiments()  # as stored: a fit's state read through the API changes with the clock
    parts: list[Any] = [rows]
    for experiment in rows:
        name = experiment["name"]
        parts += [
            experiments.list_runs(store, name, include_deleted=True),
            ops.list_ops(store, name),
            timeline.timeline(store, name),
            metrics.metrics(store, name),
            decisions.list_policy_decisions(store, name),
        ]
    return json.dumps(parts, sort_keys=True, default=str)


def _check(response: Any, before: str, store: DuckDBStore) -> None:
    assert response.status_code < 500, (response.status_code, response.get_data(as_text=True)[:500])
    body = response.get_json(silent=True)
    assert body is not None, response.get_data(as_text=True)[:200]  # always JSON, even for errors
    if response.status_code >= 400:
        assert isinstance(body.get("error"), str) and body["error"], body
        assert _state(store) == before, "a refused request changed the store"


def _fill(route: str, name: str, decision: int, action: str, run: Any) -> str:
    from urllib.parse import quote

    return route.format(name=quote(name, safe=""), decision=decision, action=quote(action, safe=""), run=run)


@FUZZ
@given(
    route=st.sampled_from(sorted(POST_FIELDS)),
    name=names,
    decision=st.integers(min_value=-1, max_value=3),
    action=st.sampled_from(["approve", "dismiss", "explode"]),
    fields=st.data(),
)
def test_post_routes_with_shaped_bodies(api, route, name, decision, action, fields) -> None:
    client, store = api
    body = {
        field: fields.draw(run_ids if field.endswith("run_id") else json_values, label=field)
        for field in POST_FIELDS[route]
        if fields.draw(st.booleans(), label=f"send {field}")
    }
    before = _state(store)
    response = client.post(_fill(route, name, decision, action, 1), json=body)
    _check(response, before, store)


@FUZZ
@given(
    route=st.sampled_from(sorted(POST_FIELDS)),
    name=names,
    raw=st.one_of(st.binary(max_size=200), json_values.map(json.dumps)),
)
def test_post_routes_with_any_body(api, route, name, raw) -> None:
    client, store = api
    before = _state(store)
    body = raw if isinstance(raw, bytes) else raw.encode()
    response = client.post(_fill(route, name, 1, "approve", 1), data=body, content_type="application/json")
    _check(response, before, store)


@FUZZ
@given(
    route=st.sampled_from(GET_ROUTES),
    name=names,
    run=st.one_of(st.integers(min_value=-2, max_value=4), st.text(string.ascii_letters, min_size=1, max_size=5)),
    query=st.dictionaries(
        st.sampled_from(["run", "name", "since", "status", "policy", "all", "x"]), st.text(max_size=12), max_size=4
    ),
)
def test_get_routes_with_any_query(api, route, name, run, query) -> None:
    client, store = api
    before = _state(store)
    response = client.get(_fill(route, name, 0, "approve", run), query_string=query)
    _check(response, before, store)
    assert _state(store) == before  # a read never writes


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("fuzz_cli_home")
    process, info = start_server(home)
    from rf_core.client import RFClient

    RFClient(info["url"]).create_experiment(EXPERIMENT, [CONFIG, {**CONFIG, "r": 4}], num_chunks=4)
    yield info["url"]
    stop(process)


COMMANDS = ["experiments", "runs", "ops", "stop", "resume", "delete", "clone", "policy", "fit", "continue", "server"]
words = st.one_of(
    st.sampled_from([EXPERIMENT, "1", "2", "99", "-1", "--json", "--set", "r=0", "learning_rate=abc", "--warm-start",
                     "weights", "--config", "/etc/passwd", "nope", "templates", "list", "--all", "x=y=z", "{}"]),
    st.text(string.printable.replace("\x0b", "").replace("\x0c", ""), max_size=12),
)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(command=st.sampled_from(COMMANDS), arguments=st.lists(words, max_size=5))
def test_cli_commands_with_any_arguments(cli_server, monkeypatch, command, arguments) -> None:
    from rf_cli.main import main

    if command in ("fit", "continue", "server") and not any(a in ("-h", "--help") for a in arguments):
        arguments = [*arguments, "--help"]  # these start processes or trainings: their argument parsing is fuzzed
    monkeypatch.setenv("RF_SERVER_URL", cli_server)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([command, *arguments])
        except SystemExit as exit_:  # argparse: usage errors (2) and --help (0)
            code = exit_.code
    assert code in (0, 1, 2, 3), (command, arguments, code, stderr.getvalue()[-500:])
    assert "Traceback" not in stderr.getvalue() + stdout.getvalue(), (command, arguments, stderr.getvalue()[-2000:])
    if code not in (0, None):
        assert stderr.getvalue().strip(), (command, arguments)  # a failure always says why
