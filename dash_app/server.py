"""The rf server: the one process that owns the DuckDB store, serving the Dash dashboard and the JSON API.

    python -m dash_app.server --rf-home DIR [--host 127.0.0.1] [--port 0] [--exit-with-pid PID]

Once its socket is bound it writes RF_HOME/server.json ({"url", "pid", "db"}) for clients to find it, and
removes it on exit. A second server on the same RF_HOME fails at once: DuckDB lets one process hold the file.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import flask
from dash import Dash, html
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from dash_app import data, page_shell
from dash_app.api import register_routes
from dash_app.auth import binding_problem, configured_token, require_token
from dash_app.callbacks import first_view, register_callbacks
from dash_app.downsample import M4Cache
from dash_app.layout import build_layout
from rf_core import paths
from rf_core.control.store import DuckDBStore, Store, StoreError
from rf_core.server_process import is_process_alive, read_server_info, write_server_info

PARENT_POLL_S = 1.0
logger = logging.getLogger(__name__)


class _NoDelayRequestHandler(WSGIRequestHandler):
    # Without TCP_NODELAY each small API call waited ~40 ms on Nagle's algorithm (measured 44 ms vs 4 ms).
    disable_nagle_algorithm = True


def build_app(store: Store, token: str | None = None) -> Dash:
    """The Dash app (all assets served locally, no CDN) with the JSON API on its Flask server; with a `token`,
    every request must carry it (see dash_app.auth)."""
    # Plotly's JSON encoder looks pandas up in sys.modules without the import lock: a first request that imports
    # pandas while another is being encoded made that one fail ("partially initialized module 'pandas'"), so the
    # page stayed blank. Imported here, before any request.
    import pandas  # noqa: F401

    cache = data.chart_cache(store)
    app = DashboardApp(
        store,
        cache,
        __name__,
        title="rf",
        serve_locally=True,
        update_title=None,
        compress=True,  # brotli or gzip, as the browser accepts: the scripts shrink about 4x
        # Named explicitly: under `python -m dash_app.server` the module is __main__.
        assets_folder=str(Path(__file__).with_name("assets")),
        assets_ignore=page_shell.ASSETS_LOADED_FIRST,
    )
    app.layout = functools.partial(layout_for, store, cache)
    register_callbacks(app, store, cache)
    register_routes(app.server, store)
    if token is not None:
        require_token(app.server, token)
    return app


class DashboardApp(Dash):
    """Dash, with a page whose HTML loads plotly.js ahead of Dash's scripts and draws the first chart from the
    figure it carries (dash_app.page_shell): the first curves need none of Dash's scripts."""

    def __init__(self, store: Store, cache: M4Cache, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store, self._cache = store, cache

    def interpolate_index(self, **kwargs: Any) -> str:
        kwargs["app_entry"] += self._shell()
        return super().interpolate_index(**kwargs)

    def _shell(self) -> str:
        """plotly.js, and the first chart's picture when the page's URL shows charts."""
        plotly_only = page_shell.shell_html(self._asset_url)
        if not flask.has_request_context():
            return plotly_only
        try:
            path, search = flask.request.path, flask.request.query_string.decode("utf-8", "replace")
            experiment, names = page_charts(self._store, path, search)
            shown = data.chart_runs(self._store, experiment, False) if names else None
            if not names or not shown or len(shown[0]) > page_shell.PICTURE_MAX_TRACES:
                return plotly_only
            figure = first_view(self._store, self._cache, experiment, names[:1], search, shown).figures[names[0]]
            return page_shell.shell_html(self._asset_url, names[0], figure)
        except Exception:  # the picture is a head start only: the page must load without it
            logger.exception("the first chart's picture could not be built; the page loads without it")
            return plotly_only

    def _asset_url(self, name: str) -> str:
        modified = int(Path(self.config.assets_folder, name).stat().st_mtime)
        return f"{self.get_asset_url(name)}?m={modified}"  # as Dash's own asset URLs: a new file, a new URL


def layout_for(store: Store, cache: M4Cache) -> html.Div:
    """The page as its URL asks for it (the experiment, else the newest; smoothing, x and y scales, ticked runs,
    zoom), with a chart per metric logged, drawn from the start."""
    path, search = page_location()
    options = data.experiment_options(store)
    experiment, drawn = page_charts(store, path, search, options)
    metric_names = drawn or data.chart_keys(store, experiment)
    first = first_view(store, cache, experiment, drawn, search)
    return build_layout(options, experiment, metric_names, first)


def page_charts(
    store: Store, path: str, search: str, options: list[dict[str, str]] | None = None
) -> tuple[str | None, list[str]]:
    """The experiment a page URL shows (the one it names, else the newest) and the charts drawn with the page: none
    on a run page (its charts are drawn when the user goes back to the dashboard)."""
    names = [option["value"] for option in (options if options is not None else data.experiment_options(store))]
    asked = data.experiment_in_query(search)
    experiment = asked if asked in names else (names[0] if names else None)
    if experiment is None or path.startswith("/run/"):
        return experiment, []
    return experiment, data.chart_keys(store, experiment)


def page_location() -> tuple[str, str]:
    """The path and query string of the page asking for its layout. Dash fetches the layout from the page, so the
    request's Referer is the page's own URL; another origin's, or none, counts as a bare visit."""
    if not flask.has_request_context() or not flask.request.referrer:
        return "/", ""
    page = urllib.parse.urlsplit(flask.request.referrer)
    if page.netloc != flask.request.host:
        return "/", ""
    return page.path or "/", page.query


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rf-server", description=__doc__.split("\n\n")[0])
    add_server_arguments(parser)
    return parser.parse_args(argv)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rf-home", type=Path, default=None, help="store folder (default: $RF_HOME or ~/.rf)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default 0)")
    parser.add_argument("--exit-with-pid", type=int, default=None, metavar="PID", help="exit when this process is gone")


def serve(home: Path, host: str = "127.0.0.1", port: int = 0, exit_with_pid: int | None = None) -> int:
    """Run the server until SIGTERM/SIGINT (or until `exit_with_pid` exits); returns the exit code."""
    token = configured_token()
    problem = binding_problem(host, token)
    if problem is not None:
        print(f"rf server: cannot start: {problem}", file=sys.stderr, flush=True)
        return 2
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["RF_HOME"] = str(home)
    db_path = paths.db_path(home)
    # Open the DB before binding the port: a second server on this home fails here, fast, with a clear reason.
    try:
        store = DuckDBStore(db_path)
    except StoreError as exc:
        print(f"rf server: cannot start: {exc}", file=sys.stderr, flush=True)
        running = read_server_info(home)
        if running and is_process_alive(int(running["pid"])):
            print(
                f"rf server: one already runs for this RF_HOME at {running['url']}",
                file=sys.stderr,
                flush=True,
            )
        return 2
    try:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per metric batch
        app = build_app(store, token)
        try:
            http_server = make_server(host, port, app.server, threaded=True, request_handler=_NoDelayRequestHandler)
        except OSError as exc:
            print(f"rf server: cannot listen on {host}:{port}: {exc}", file=sys.stderr, flush=True)
            return 2
        return _serve_until_stopped(http_server, home, db_path, exit_with_pid)
    finally:
        store.close()


def _serve_until_stopped(http_server: BaseWSGIServer, home: Path, db_path: Path, exit_with_pid: int | None) -> int:
    url_host = "127.0.0.1" if http_server.host in ("0.0.0.0", "", "::") else http_server.host
    url = f"http://{url_host}:{http_server.server_port}"
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    thread = threading.Thread(target=http_server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    write_server_info({"url": url, "pid": os.getpid(), "db": str(db_path)}, home)
    watching = f"; exits with process {exit_with_pid}" if exit_with_pid else "; Ctrl-C to stop"
    print(f"rf server: dashboard and API at {url} (DB {db_path}){watching}", flush=True)
    try:
        while not stop.wait(PARENT_POLL_S):
            if exit_with_pid is not None and not is_process_alive(exit_with_pid):
                print(f"rf server: process {exit_with_pid} has exited; stopping", flush=True)
                break
    finally:
        http_server.shutdown()
        http_server.server_close()
        thread.join(timeout=5)
        info = read_server_info(home)
        if info and info.get("pid") == os.getpid():
            paths.server_info_path(home).unlink(missing_ok=True)
        print("rf server: stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    home = args.rf_home if args.rf_home is not None else paths.rf_home()
    return serve(Path(home), args.host, args.port, args.exit_with_pid)


if __name__ == "__main__":
    sys.exit(main())
