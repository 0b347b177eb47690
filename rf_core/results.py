"""An experiment's results as pandas DataFrames: one row per run (`results_frame`), one row per metric point
(`metrics_frame`), and both as Parquet files. Built from what the rf server returns; pandas is imported here only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RUN_COLUMNS = (
    "run_id", "run_name", "status", "source", "parent_id", "warm_start", "parent_step", "epoch", "chunks_done",
    "total_chunks", "step", "train_loss", "latest_metric", "best_metric", "best_step", "truncated_rows",
    "export_latest", "export_best", "error",
)  # fmt: skip
METRIC_COLUMNS = ("run_id", "step", "name", "value", "chunk", "time")


def results_frame(snapshot: Mapping[str, Any], run_metrics: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> Any:
    """One row per run: its state and lineage, the experiment's metric (latest and best), every knob of its config
    as a column, and `<metric>_latest` / `<metric>_best` for every evaluation metric it logged."""
    import pandas as pd

    rows = []
    for run in snapshot["runs"]:
        config = run.get("config") or {}
        row = {column: run.get(column) for column in RUN_COLUMNS}
        row["run_name"] = config.get("run_name")
        row.update(config)
        for name, summary in sorted((run_metrics.get(int(run["run_id"])) or {}).items()):
            row[f"{name}_latest"] = summary.get("latest")
            row[f"{name}_best"] = summary.get("best")
        rows.append(row)
    frame = pd.DataFrame(rows, columns=_columns(rows))
    frame.attrs["experiment"] = snapshot["experiment"]["name"]
    frame.attrs["metric"], frame.attrs["mode"] = snapshot["experiment"]["metric"], snapshot["experiment"]["mode"]
    return frame


def metrics_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """One row per metric point: run_id, step, name, value, chunk, time."""
    import pandas as pd

    return pd.DataFrame([{column: row.get(column) for column in METRIC_COLUMNS} for row in rows],
                        columns=list(METRIC_COLUMNS))  # fmt: skip


def write_parquet(results: Any, metrics: Any, folder: Path) -> dict[str, Path]:
    """`results.parquet` and `metrics.parquet` in `folder`; config values that are lists or objects (target_modules,
    generation_config) are stored as JSON text, so every column has one type."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = results.copy()
    for column in flat.columns:
        if flat[column].map(lambda value: isinstance(value, list | dict)).any():
            flat[column] = flat[column].map(lambda value: None if value is None else json.dumps(value))
    written = {"results": folder / "results.parquet", "metrics": folder / "metrics.parquet"}
    flat.to_parquet(written["results"], index=False)
    metrics.to_parquet(written["metrics"], index=False)
    return written


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns or list(RUN_COLUMNS)
