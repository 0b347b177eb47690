"""Where the engine keeps its files. One root, `RF_HOME` (default `~/.rf`), so every process finds the same store."""

from __future__ import annotations

import os
import re
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def rf_home() -> Path:
    return Path(os.environ.get("RF_HOME") or Path.home() / ".rf").expanduser().resolve()


def db_path(home: Path | None = None) -> Path:
    return (home or rf_home()) / "rf.duckdb"


def server_info_path(home: Path | None = None) -> Path:
    """The file the store server writes its URL and pid into, beside the DB."""
    return (home or rf_home()) / "server.json"


def model_cache_dir(home: Path | None = None) -> Path:
    return (home or rf_home()) / "models"


def check_name(kind: str, name: str) -> str:
    """Experiment names become folder names: allow only a safe alphabet, never a path."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def experiment_dir(experiment: str, home: Path | None = None) -> Path:
    return (home or rf_home()) / "experiments" / check_name("experiment", experiment)


def run_dir(experiment: str, run_id: int, home: Path | None = None) -> Path:
    return experiment_dir(experiment, home) / "runs" / f"run-{int(run_id)}"
