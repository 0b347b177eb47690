"""Where local base models may come from: only folders under the configured model roots.

A config's `model_name_or_path` reaches the server from the dashboard, the CLI and the API; a path in it would let
anyone who can submit a clone make the workers open any folder on the machine. So a value that looks like a path
must resolve (symlinks followed) inside one of the roots: `RF_MODEL_ROOTS` (folders separated by the OS path
separator), or by default RF_HOME, which holds the built-in models and every run's exports. Built-in names and hub
ids (`name` or `org/name`) are not paths: the engine's loader takes hub ids from the local Hugging Face cache only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rf_core.paths import rf_home

ROOTS_ENV = "RF_MODEL_ROOTS"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def model_roots() -> list[Path]:
    configured = [part for part in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if part.strip()]
    folders = configured or [str(rf_home())]
    return [Path(folder).expanduser().resolve() for folder in folders]


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and ".." not in value


def model_source_problem(value: str) -> str | None:
    """Why `value` may not name a base model, or None. Built-in names and hub ids always may."""
    if is_hub_id(value):
        return None
    shown_value = json.dumps(value)
    try:
        resolved = Path(value).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        return f"model_name_or_path={shown_value}: must be a usable path ({exc})"
    roots = model_roots()
    if any(resolved == root or root in resolved.parents for root in roots):
        return None
    shown_roots = ", ".join(str(root) for root in roots)
    return (
        f"model_name_or_path={shown_value}: must be a built-in name, a hub id or a local folder under the model "
        f"roots ({shown_roots}); this path is outside them: move the model under one, or add its folder to "
        f"{ROOTS_ENV} (folders separated by {os.pathsep!r})"
    )
