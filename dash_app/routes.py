"""The page's addresses: the dashboard at `/` and a run's page at `/run/<experiment>/<id>`."""

from __future__ import annotations

import urllib.parse

RUN_PATH_PREFIX = "/run/"


def run_page_path(experiment: str, run_id: int) -> str:
    return f"{RUN_PATH_PREFIX}{urllib.parse.quote(experiment, safe='')}/{int(run_id)}"


def parse_run_path(pathname: str | None) -> tuple[str, int] | None:
    """(experiment, run id) of a run page's path, or None for any other path."""
    if not pathname or not pathname.startswith(RUN_PATH_PREFIX):
        return None
    parts = pathname[len(RUN_PATH_PREFIX) :].strip("/").split("/")
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return urllib.parse.unquote(parts[0]), int(parts[1])
