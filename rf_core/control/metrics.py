"""Metric rows: stored exactly once per batch, dropped when their chunk attempt was abandoned, read back for views."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rf_core.control.checks import finite_or_none, is_int, is_json_number, require_experiment, type_name
from rf_core.errors import InvalidRequest
from rf_core.states import ABANDONED, LEARNING_RATE_METRIC, TRAIN_LOSS_METRIC

if TYPE_CHECKING:
    from rf_core.control.store import Store

MAX_METRIC_ROWS = 100_000


def log_metrics(store: Store, batch_id: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Store a batch of metric rows exactly once per `batch_id` (a client may retry or replay it).

    Each row: experiment, run_id, step, name, value (number or null), optional chunk and time (epoch seconds;
    the server's clock when missing), and optional attempt (the timeline id of the chunk attempt that logged it):
    rows of an attempt that was abandoned meanwhile are dropped, since its retry logs those steps again.
    """
    if not isinstance(batch_id, str) or not 0 < len(batch_id) <= 200:
        raise InvalidRequest([f"batch_id must be a non-empty string of at most 200 characters, got {batch_id!r}"])
    if not isinstance(rows, list):
        raise InvalidRequest([f"rows must be a list of metric objects, got {type_name(rows)}"])
    if len(rows) > MAX_METRIC_ROWS:
        raise InvalidRequest([f"a batch holds at most {MAX_METRIC_ROWS} rows, got {len(rows)}: split it"])
    now = time.time()
    clean, problems = [], []
    for index, row in enumerate(rows):
        row_problems = _metric_row_problems(row)
        if row_problems:
            problems.extend(f"row {index}: {problem}" for problem in row_problems)
            if len(problems) >= 10:
                break
            continue
        value = row.get("value")
        clean.append(
            {
                "experiment": row["experiment"],
                "run_id": int(row["run_id"]),
                "step": int(row["step"]),
                "name": row["name"],
                "value": None if value is None else float(value),
                "chunk": row.get("chunk"),
                "time": float(row["time"]) if row.get("time") is not None else now,
                "attempt": row.get("attempt"),
            }
        )
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        for experiment in sorted({row["experiment"] for row in clean}):
            require_experiment(store, experiment)
        abandoned = _abandoned_attempts(store, {row["attempt"] for row in clean if row["attempt"] is not None})
        kept = [row for row in clean if row.pop("attempt") not in abandoned]
        inserted = store.insert_metric_batch(batch_id, kept, now)
    dropped = len(clean) - len(kept)
    return {"batch_id": batch_id, "inserted": inserted, "rows": len(kept) if inserted else 0, "dropped": dropped}


def _abandoned_attempts(store: Store, attempts: set[int]) -> set[int]:
    """Which of these chunk attempts (timeline ids) were abandoned: their late metric rows are not stored."""
    found = set()
    for attempt in attempts:
        entry = store.get_timeline(attempt)
        if entry is not None and entry["outcome"] == ABANDONED:
            found.add(attempt)
    return found


def _metric_row_problems(row: Any) -> list[str]:
    if not isinstance(row, Mapping):
        return [f"must be an object, got {type_name(row)}"]
    problems = []
    for name in ("experiment", "name"):
        if not isinstance(row.get(name), str) or not row.get(name):
            problems.append(f"{name} must be a non-empty string, got {row.get(name)!r}")
    for name in ("run_id", "step"):
        if not is_int(row.get(name)):
            problems.append(f"{name} must be an integer, got {row.get(name)!r}")
    for name in ("chunk", "attempt"):
        if row.get(name) is not None and not is_int(row[name]):
            problems.append(f"{name} must be an integer or null, got {row[name]!r}")
    for name in ("value", "time"):
        if row.get(name) is not None and not is_json_number(row[name]):
            problems.append(f"{name} must be a number or null, got {row[name]!r}")
    return problems


def metrics(
    store: Store,
    experiment: str,
    run_ids: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    since_time: float | None = None,
) -> list[dict[str, Any]]:
    """Metric rows (run_id, step, name, value, chunk, time) ordered by run, name and step."""
    require_experiment(store, experiment)
    return store.query_metrics(experiment, run_ids=run_ids, names=names, since_time=since_time)


def run_metrics(store: Store, experiment: str) -> dict[int, dict[str, dict[str, Any]]]:
    """Every evaluation metric of every run: {run_id: {name: {latest, latest_step, min, max, best, points}}}.

    `best` follows the experiment's `mode` for its own metric and Hugging Face's rule for the others (lower is
    better for a name ending in "loss", higher otherwise). The per-step training series are left out.
    """
    experiment_row = require_experiment(store, experiment)
    summary: dict[int, dict[str, dict[str, Any]]] = {}
    for row in store.metric_extremes(experiment, [TRAIN_LOSS_METRIC, LEARNING_RATE_METRIC]):
        name = str(row["name"])
        if name == experiment_row["metric"]:
            lower_is_better = experiment_row["mode"] == "min"
        else:
            lower_is_better = name.endswith("loss")
        lowest, highest = finite_or_none(row["lowest"]), finite_or_none(row["highest"])
        summary.setdefault(int(row["run_id"]), {})[name] = {
            "latest": finite_or_none(row["latest"]),
            "latest_step": int(row["latest_step"]),
            "min": lowest,
            "max": highest,
            "best": lowest if lower_is_better else highest,
            "points": int(row["points"]),
        }
    return summary


def metric_names(store: Store, experiment: str) -> list[str]:
    """The metric names the experiment's runs have logged, sorted."""
    require_experiment(store, experiment)
    return store.metric_names(experiment)


def max_metric_step(store: Store, experiment: str) -> int | None:
    """The highest step any metric of the experiment has reached; None before the first point."""
    require_experiment(store, experiment)
    return store.max_metric_step(experiment)


def step_times(store: Store, experiment: str, name: str, width: int) -> dict[int, tuple[Any, Any]]:
    """Per run, (steps, times) at which it reached them, one per `width` steps (see `Store.step_times`)."""
    require_experiment(store, experiment)
    return store.step_times(experiment, name, width)


def metric_buckets(store: Store, experiment: str, width: int, after_row: int = -1) -> tuple[dict[str, Any], int]:
    """M4 aggregates of the experiment's metric points stored after row `after_row` (see `Store.metric_buckets`)."""
    require_experiment(store, experiment)
    return store.metric_buckets(experiment, width, after_row)
