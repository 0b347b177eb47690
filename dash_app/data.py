"""What the dashboard shows, read in-process from the store through rf_core.ops (plain data, no Dash)."""

from __future__ import annotations

from typing import Any

from rf_core import ops
from rf_core.store import Store


def experiment_options(store: Store) -> list[dict[str, str]]:
    """Dropdown options, newest experiment first."""
    return [
        {"label": f"{row['name']} ({row['status']})", "value": row["name"]}
        for row in ops.list_experiments(store)
    ]


def runs_table(store: Store, experiment: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rowData, columnDefs) for the runs grid: one row per visible run, plus a column per varying knob."""
    if not experiment:
        return [], []
    try:
        snapshot = ops.experiment_snapshot(store, experiment)
    except ops.NotFound:
        return [], []
    metric = snapshot["experiment"]["metric"]
    knobs = snapshot["varying_knobs"]
    rows = []
    for run in snapshot["runs"]:
        rows.append(
            {
                "run": run["run_id"],
                "status": run["status"],
                "source": run["source"],
                "parent": run["parent_id"],
                "progress": progress_text(run),
                "train_loss": run["train_loss"],
                "latest_metric": run["latest_metric"],
                "best_metric": run["best_metric"],
                "pending_ops": run["pending_ops"],
                **{f"knob:{knob}": _display(run["config"].get(knob)) for knob in knobs},
            }
        )
    columns = [
        {"field": "run", "width": 80},
        {"field": "status"},
        {"field": "source"},
        {"field": "parent", "width": 90},
        {"field": "progress", "minWidth": 200},
        *({"field": f"knob:{knob}", "headerName": knob} for knob in knobs),
        {"field": "train_loss", "headerName": "train loss", "valueFormatter": _number_format()},
        {"field": "latest_metric", "headerName": metric, "valueFormatter": _number_format()},
        {"field": "best_metric", "headerName": f"best {metric}", "valueFormatter": _number_format()},
        {"field": "pending_ops", "headerName": "queued ops", "width": 110},
    ]
    return rows, columns


def progress_text(run: dict[str, Any]) -> str:
    total = run.get("total_chunks") or "?"
    return (
        f"epoch {run.get('epoch', 0)} · chunk {run.get('chunks_done', 0)}/{total} · step {run.get('step', 0)}"
    )


def _display(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _number_format() -> dict[str, str]:
    return {"function": "params.value == null ? '-' : d3.format('.4f')(params.value)"}
