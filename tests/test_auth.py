"""Access to the rf server: loopback by default, a token for anything else, asked of API clients and browsers.

The real server runs as a subprocess; requests are real HTTP (urllib and RFClient). The login page is also
driven in headless Chromium, where the dashboard must load and answer its callbacks after signing in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dash_app.auth import binding_problem, is_loopback
from rf_core.client import RFClient, ServerError
from rf_core.server_process import TOKEN_ENV, health_ok
from tests.e2e.browser.chromium import needs_chromium, watched_page
from tests.test_server_api import CONFIG, start_server, stop

TOKEN = "correct-horse-battery-staple-42"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) without following redirects or raising on 4xx."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("rf_home_token")
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN  # the child inherits it; RFClient in this process picks it up too
    try:
        process, info = start_server(home)
    finally:
        if previous is None:
            os.environ.pop(TOKEN_ENV)
        else:
            os.environ[TOKEN_ENV] = previous
    yield info["url"]
    stop(process)


def test_only_loopback_is_served_without_a_token() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert binding_problem("127.0.0.1", None) is None
    assert binding_problem("0.0.0.0", TOKEN) is None
    assert TOKEN_ENV in binding_problem("0.0.0.0", None)
    assert "at least 16 characters" in binding_problem("127.0.0.1", "short")


@pytest.mark.parametrize(
    ("host", "token", "reason"),
    [("0.0.0.0", None, "set RF_API_TOKEN"), ("127.0.0.1", "short", "at least 16 characters")],
)
def test_the_server_refuses_to_start_unprotected(tmp_path: Path, host: str, token: str | None, reason: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    result = subprocess.run(
        [sys.executable, "-m", "dash_app.server", "--rf-home", str(tmp_path), "--host", host],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and reason in result.stderr, result.stderr
    assert not (tmp_path / "server.json").exists() and not (tmp_path / "rf.duckdb").exists()


def test_api_requests_need_the_token(token_server: str) -> None:
    status, headers, body = http(f"{token_server}/api/experiments")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    error = json.loads(body)
    assert error["type"] == "Unauthorized" and TOKEN_ENV in error["error"] and TOKEN not in error["error"]
    wrong = http(f"{token_server}/api/experiments", headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"})
    assert wrong[0] == 401
    posted = http(f"{token_server}/api/experiments", data=b'{"name": "sneaky", "configs": [], "num_chunks": 1}',
                  headers={"Content-Type": "application/json"})  # fmt: skip
    assert posted[0] == 401

    with pytest.raises(ServerError) as refused:
        RFClient(token_server, token="not-the-right-token-at-all").list_experiments()
    assert refused.value.status == 401
    client = RFClient(token_server, token=TOKEN)
    client.create_experiment("guarded", [CONFIG], num_chunks=2)
    assert [experiment["name"] for experiment in client.list_experiments()] == ["guarded"]  # "sneaky" never landed


def test_the_health_check_sends_the_token_from_the_environment(token_server: str, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert not health_ok(token_server)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert health_ok(token_server)


def test_browsers_sign_in_once_and_carry_a_cookie(token_server: str) -> None:
    status, headers, _ = http(f"{token_server}/?tab=ops")
    assert status == 302 and headers["Location"].endswith("/login?next=/%3Ftab%3Dops")
    assert http(f"{token_server}/_dash-layout")[0] == 401
    page = http(f"{token_server}/login")
    assert page[0] == 200 and b'name="token"' in page[2]

    failed = http(f"{token_server}/login", data=b"token=nope&next=/")
    assert failed[0] == 401 and b"not right" in failed[2] and "Set-Cookie" not in failed[1]
    offsite = http(f"{token_server}/login", data=f"token={TOKEN}&next=https://evil.example/".encode())
    assert offsite[0] == 302 and offsite[1]["Location"] == "/"  # never an open redirect
    signed_in = http(f"{token_server}/login", data=f"token={TOKEN}&next=/%3Ftab%3Dops".encode())
    assert signed_in[0] == 302 and signed_in[1]["Location"] == "/?tab=ops"
    cookie = signed_in[1]["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    carried = {"Cookie": cookie.split(";", 1)[0]}
    assert http(f"{token_server}/", headers=carried)[0] == 200
    assert http(f"{token_server}/_dash-layout", headers=carried)[0] == 200


@needs_chromium
def test_the_dashboard_asks_for_the_token_in_a_browser(token_server: str, browser: Any) -> None:
    RFClient(token_server, token=TOKEN).create_experiment("in-browser", [CONFIG], num_chunks=2)
    with watched_page(browser) as page:
        page.goto(token_server)
        assert "/login" in page.url
        page.fill("#token", "a wrong guess, surely")
        page.click("#sign-in")
        page.wait_for_selector("text=That token is not right.")
        page.fill("#token", TOKEN)
        page.click("#sign-in")
        # The dashboard's own callbacks (POSTs with the cookie) fill the experiment picker.
        page.wait_for_selector("#experiment-select", timeout=30_000)
        page.wait_for_function(
            "() => document.querySelector('#experiment-select').innerText.includes('in-browser')",
            timeout=30_000,
        )
