"""RFClient riding out a server outage: it waits (warning once), runs the outage hook, and gives up in time.

A stub HTTP server plays the rf server here; the real server killed and restarted under a real fit is in
tests/e2e/test_fit.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rf_core.client import RFClient, ServerUnavailable


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Experiments(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps([{"name": "exp"}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_call_waits_for_a_server_that_comes_back(capfd) -> None:
    port = _free_port()
    outages: list[float] = []
    client = RFClient(f"http://127.0.0.1:{port}", outage_wait_s=30, on_outage=lambda: outages.append(1.0))
    server: list[ThreadingHTTPServer] = []

    def start_later() -> None:
        time.sleep(2.5)
        server.append(ThreadingHTTPServer(("127.0.0.1", port), _Experiments))
        server[0].serve_forever()

    threading.Thread(target=start_later, daemon=True).start()
    try:
        started = time.monotonic()
        assert client.list_experiments() == [{"name": "exp"}]
        assert 2.0 < time.monotonic() - started < 15
        assert outages == [1.0]  # the hook ran once, at the start of the outage
        err = capfd.readouterr().err
        assert err.count("does not answer") == 1 and "waiting up to 30 s" in err
        assert "answers again after" in err
        # Once it is back, calls go straight through.
        started = time.monotonic()
        assert client.list_experiments() == [{"name": "exp"}]
        assert time.monotonic() - started < 2
    finally:
        if server:
            server[0].shutdown()


def test_a_call_gives_up_after_the_outage_wait() -> None:
    client = RFClient(f"http://127.0.0.1:{_free_port()}", outage_wait_s=1.5)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="did not answer GET /api/experiments"):
        client.list_experiments()
    assert 1.5 <= time.monotonic() - started < 10


def test_without_an_outage_wait_a_call_fails_fast() -> None:
    client = RFClient(f"http://127.0.0.1:{_free_port()}")
    started = time.monotonic()
    with pytest.raises(ServerUnavailable):
        client.list_experiments()
    assert time.monotonic() - started < 5  # the three quick retries only
