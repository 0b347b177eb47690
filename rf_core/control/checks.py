"""Lookups and input checks every service module of the rf server shares: a missing experiment or run raises
NotFound, and request values are checked for JSON types before anything is read or written."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rf_core.errors import NotFound

if TYPE_CHECKING:
    from rf_core.control.store import Store


def require_experiment(store: Store, name: str) -> dict[str, Any]:
    experiment = store.get_experiment(name) if isinstance(name, str) else None
    if experiment is None:
        raise NotFound(f"no experiment named {name!r}")
    return experiment


def registered_functions(store: Store, experiment: str) -> list[str]:
    """The function names the experiment registers (its configs' formatting_func and compute_metrics name them)."""
    return list(require_experiment(store, experiment).get("functions") or [])


def require_run(store: Store, experiment: str, run_id: int) -> dict[str, Any]:
    run = store.get_run(experiment, run_id) if is_int(run_id) else None
    if run is None:
        raise NotFound(f"experiment {experiment} has no run {run_id}")
    return run


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_json_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite_or_none(value: Any) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
