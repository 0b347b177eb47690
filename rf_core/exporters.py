"""An experiment's runs and metric points out to the trackers people already use: TensorBoard event files, an MLflow
tracking store, or Parquet files. Every exporter reads the same two things the rf server returns — the experiment's
snapshot and its metric rows — so the three carry the same runs and the same points.

TensorBoard and MLflow are optional extras (`pip install -e '.[tensorboard]'` / `'.[mlflow]'`); each is imported only
by its exporter, and a missing one is named with the install command.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rf_core.states import RunStatus

EXPORT_TARGETS = ("tensorboard", "mlflow", "parquet")
MLFLOW_BATCH = 1000  # MLflow's log_batch limit on metrics per call
MLFLOW_PARAMS_PER_BATCH = 100
MLFLOW_PARAM_CHARS = 6000
RF_RUN_TAG, RF_EXPERIMENT_TAG = "rf.run_id", "rf.experiment"
_MLFLOW_STATUS = {
    RunStatus.COMPLETED.value: "FINISHED",
    RunStatus.FAILED.value: "FAILED",
    RunStatus.STOPPED.value: "KILLED",
    RunStatus.DELETED.value: "KILLED",
}


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do."""


def export(client: Any, experiment: str, target: str, destination: str | Path) -> dict[str, Any]:
    """Export `experiment` through `client` (an RFClient) to `target` ("tensorboard" DIR, "mlflow" URI, "parquet"
    DIR); the CLI's `rf export` and `Experiment.export` both come here."""
    if target not in EXPORT_TARGETS:
        raise ExportError(f"export target must be one of {', '.join(EXPORT_TARGETS)}, got {target!r}")
    snapshot = client.experiment_snapshot(experiment)
    rows = client.get_metrics(experiment)
    if target == "tensorboard":
        return export_tensorboard(snapshot, rows, Path(destination))
    if target == "mlflow":
        return export_mlflow(snapshot, rows, str(destination))
    return export_parquet(snapshot, rows, Path(destination), client.run_metrics(experiment))


def run_label(run: Mapping[str, Any]) -> str:
    """`run-3`, or `run-3-<run_name>` when the run has a name: unique per experiment, readable in any tracker."""
    name = (run.get("config") or {}).get("run_name")
    return f"run-{run['run_id']}" + (f"-{name}" if name else "")


def points_by_run(metric_rows: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    by_run: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in metric_rows:
        by_run[int(row["run_id"])].append(row)
    for rows in by_run.values():
        rows.sort(key=lambda row: (str(row["name"]), int(row["step"])))
    return by_run


def export_tensorboard(
    snapshot: Mapping[str, Any], metric_rows: Sequence[Mapping[str, Any]], folder: Path
) -> dict[str, Any]:
    """One TensorBoard run folder per rf run (`folder/<experiment>/<run label>`), one scalar series per metric, each
    point at its training step and wall time; the run's config as a text summary `config`."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.util.tensor_util import make_tensor_proto
    except ImportError:
        raise ExportError("TensorBoard is not installed: pip install -e '.[tensorboard]'") from None
    experiment = str(snapshot["experiment"]["name"])
    root = Path(folder) / experiment
    by_run = points_by_run(metric_rows)
    written: dict[str, int] = {}
    for run in snapshot["runs"]:
        label = run_label(run)
        shutil.rmtree(root / label, ignore_errors=True)  # exported again: the run's points once, not twice
        writer = EventFileWriter(str(root / label))
        try:
            config = json.dumps(run.get("config") or {}, indent=1, sort_keys=True)
            text = Summary.Value(tag="config", tensor=make_tensor_proto([config]))
            text.metadata.plugin_data.plugin_name = "text"
            writer.add_event(Event(summary=Summary(value=[text]), step=0, wall_time=float(run["created_at"])))
            for row in by_run.get(int(run["run_id"]), []):
                scalar = Summary(value=[Summary.Value(tag=str(row["name"]), simple_value=_value(row))])
                writer.add_event(Event(summary=scalar, step=int(row["step"]), wall_time=float(row["time"])))
        finally:
            writer.close()
        written[label] = len(by_run.get(int(run["run_id"]), []))
    return {"target": "tensorboard", "folder": str(root), "runs": written}


def export_mlflow(
    snapshot: Mapping[str, Any], metric_rows: Sequence[Mapping[str, Any]], tracking_uri: str
) -> dict[str, Any]:
    """One MLflow run per rf run in the MLflow experiment of the same name: the config as params, every metric point
    with its step and time, lineage and status as tags (`rf.run_id`, `rf.parent_id`, `rf.status`, ...), the
    final status as MLflow's. Exporting again replaces the runs it exported before (found by their `rf.run_id`
    tag), so the store holds each rf run once."""
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag
    except ImportError:
        raise ExportError("MLflow is not installed: pip install -e '.[mlflow]'") from None
    experiment = str(snapshot["experiment"]["name"])
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    exported_before = _mlflow_run_ids(client, experiment_id, experiment)
    by_run = points_by_run(metric_rows)
    written: dict[str, str] = {}
    for run in snapshot["runs"]:
        tags = {
            RF_EXPERIMENT_TAG: experiment,
            RF_RUN_TAG: str(run["run_id"]),
            "rf.status": str(run["status"]),
            "rf.source": str(run.get("source")),
        }
        for field in ("parent_id", "warm_start", "parent_step", "ended_by", "export_latest", "export_best"):
            if run.get(field) is not None:
                tags[f"rf.{field}"] = str(run[field])
        created = client.create_run(
            experiment_id, start_time=int(float(run["created_at"]) * 1000), tags=tags, run_name=run_label(run)
        )
        run_id = created.info.run_id
        params = [Param(key, _param_text(value)) for key, value in sorted((run.get("config") or {}).items())]
        for batch in _chunks(params, MLFLOW_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch)
        points = [
            Metric(str(row["name"]), _value(row), int(float(row["time"]) * 1000), int(row["step"]))
            for row in by_run.get(int(run["run_id"]), [])
        ]
        for batch in _chunks(points, MLFLOW_BATCH):
            client.log_batch(run_id, metrics=batch, tags=[RunTag("rf.exported", "true")])
        status = _MLFLOW_STATUS.get(str(run["status"]))
        if status is not None:
            client.set_terminated(run_id, status=status, end_time=int(float(run["updated_at"]) * 1000))
        written[run_label(run)] = run_id
    for old_run_id in exported_before:  # only once the new runs are all written: a failed export loses nothing
        client.delete_run(old_run_id)
    return {"target": "mlflow", "tracking_uri": tracking_uri, "experiment_id": experiment_id, "runs": written}


def export_parquet(snapshot: Mapping[str, Any], metric_rows: Sequence[Mapping[str, Any]], folder: Path,
                   run_metrics: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:  # fmt: skip
    """`results.parquet` (a row per run) and `metrics.parquet` (a row per point) in `folder/<experiment>`."""
    from rf_core.results import metrics_frame, results_frame, write_parquet

    root = Path(folder) / str(snapshot["experiment"]["name"])
    written = write_parquet(results_frame(snapshot, run_metrics), metrics_frame(metric_rows), root)
    return {"target": "parquet", "folder": str(root), "files": {key: str(path) for key, path in written.items()}}


def _mlflow_run_ids(client: Any, experiment_id: str, experiment: str) -> list[str]:
    """Every MLflow run an earlier export of `experiment` wrote, page by page."""
    ids: list[str] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{RF_EXPERIMENT_TAG}` = '{experiment}'",
                                  max_results=1000, page_token=token)  # fmt: skip
        ids += [run.info.run_id for run in page]
        token = page.token
        if not token:
            return ids


def _value(row: Mapping[str, Any]) -> float:
    """A point's value; the server sends a non-finite one (a diverged loss) as null: exported as NaN."""
    return float("nan") if row.get("value") is None else float(row["value"])


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= MLFLOW_PARAM_CHARS else text[: MLFLOW_PARAM_CHARS - 1] + "…"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
