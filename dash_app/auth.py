"""Who may talk to the rf server: anyone on this machine by default, only token holders once a token is set.

The server listens on 127.0.0.1 unless told otherwise, and refuses any other interface unless `RF_API_TOKEN` is
set. With a token, every request needs it: API clients send `Authorization: Bearer <token>` (RFClient does, from
the same variable), a browser signs in once on /login and then carries it in an HttpOnly cookie. Tokens are
compared in constant time; the token never appears in server.json, in logs or in error messages.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import os
from urllib.parse import quote, urlsplit

from flask import Flask, Response, redirect, request

from rf_core.server_process import TOKEN_ENV

COOKIE = "rf_token"
LOGIN_PATH = "/login"
MIN_TOKEN_CHARS = 16
API_PREFIX = "/api/"


def configured_token() -> str | None:
    token = os.environ.get(TOKEN_ENV, "")
    return token or None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def binding_problem(host: str, token: str | None) -> str | None:
    """Why the server must not listen on `host` with `token`, or None when it may."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        return (
            f"{TOKEN_ENV} must be at least {MIN_TOKEN_CHARS} characters "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    if token is None and not is_loopback(host):
        return (
            f"listening on {host} would let anyone who reaches it stop, clone and delete runs; set {TOKEN_ENV} "
            "(every request must then carry it) or listen on 127.0.0.1"
        )
    return None


def token_matches(supplied: str | None, token: str) -> bool:
    return supplied is not None and hmac.compare_digest(supplied.encode(), token.encode())


def require_token(server: Flask, token: str) -> None:
    """Refuse every request to `server` that does not carry `token`; add the /login page for browsers."""

    @server.before_request
    def check() -> Response | None:
        if request.path == LOGIN_PATH:
            return None
        header = request.headers.get("Authorization", "")
        supplied = header[len("Bearer ") :] if header.startswith("Bearer ") else request.cookies.get(COOKIE)
        if token_matches(supplied, token):
            return None
        if request.path.startswith(API_PREFIX) or request.path.startswith("/_dash") or request.method != "GET":
            return _unauthorized()
        return redirect(f"{LOGIN_PATH}?next={quote(request.full_path.rstrip('?'))}")

    @server.route(LOGIN_PATH, methods=["GET", "POST"])
    def login() -> Response:
        target = _local_path(request.values.get("next", "/"))
        if request.method == "GET":
            return _login_page(target, failed=False)
        if not token_matches(request.form.get("token"), token):
            return _login_page(target, failed=True)
        response = redirect(target)
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.is_secure)
        return response


def _unauthorized() -> Response:
    body = (
        '{"error": "this rf server needs a token: send Authorization: Bearer <token> (RFClient and the rf CLI '
        f'send ${TOKEN_ENV})", "problems": [], "type": "Unauthorized"}}'
    )
    return Response(body, status=401, mimetype="application/json", headers={"WWW-Authenticate": "Bearer"})


def _local_path(target: str) -> str:
    """`target` when it is a path on this server, else "/": the login page never redirects elsewhere."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _login_page(target: str, failed: bool) -> Response:
    message = '<p class="error">That token is not right.</p>' if failed else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rf: sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:5rem auto;padding:0 1rem}}
input{{width:100%;padding:.5rem;margin:.5rem 0;box-sizing:border-box}}.error{{color:#b00020}}</style></head>
<body><h1>rf</h1><p>This server needs its access token (the value of {TOKEN_ENV} where it was started).</p>
{message}<form method="post" action="{LOGIN_PATH}">
<input type="hidden" name="next" value="{html.escape(target, quote=True)}">
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<button type="submit" id="sign-in">Sign in</button></form></body></html>"""
    return Response(page, status=401 if failed else 200, mimetype="text/html")
