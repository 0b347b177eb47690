"""`rf export` through a real rf server to real TensorBoard event files, a real MLflow store (SQLite) and Parquet:
every exported point is read back with the tracker's own reader and compared with what the server holds."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rf_core.client import RFClient
from rf_core.exporters import ExportError, export, run_label
from tests.test_server_api import start_server, stop

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 8, "lora_alpha": 16}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RFClient, str]]:
    home = tmp_path_factory.mktemp("export-home")
    process, info = start_server(home)
    client = RFClient(info["url"])
    client.create_experiment("exp", [{**CONFIG, "run_name": "base"}, {**CONFIG, "learning_rate": 3e-4}], 2)
    rows = [
        {"experiment": "exp", "run_id": run_id, "step": step, "name": name, "value": value, "time": 1000.0 + step}
        for run_id in (1, 2)
        for step in range(1, 121)
        for name, value in (("train_loss", 5.0 / step + run_id / 7), ("learning_rate", 1e-3 * (1 - step / 200)))
    ] + [
        {"experiment": "exp", "run_id": 1, "step": step, "name": "eval_loss", "value": 4.0 - step / 100,
         "time": 1000.5 + step}
        for step in (40, 80, 120)
    ]  # fmt: skip
    client.log_metrics("export-batch", rows)
    client.fail_run("exp", 2, "diverged")
    yield client, info["url"]
    stop(process)


def rf_export(url: str, target: str, destination: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rf_cli.main", "export", "exp", "--to", target, destination, "--server", url],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def stored_points(client: RFClient) -> dict[tuple[int, str], list[tuple[int, float, float]]]:
    points: dict[tuple[int, str], list[tuple[int, float, float]]] = {}
    for row in client.get_metrics("exp"):
        points.setdefault((int(row["run_id"]), row["name"]), []).append((row["step"], row["value"], row["time"]))
    return {key: sorted(values) for key, values in points.items()}


def as_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def test_tensorboard_event_files_hold_every_point(served: tuple[RFClient, str], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client, url = served
    result = rf_export(url, "tensorboard", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr
    assert "exported 2 runs of exp to tensorboard" in result.stdout
    expected = stored_points(client)
    labels = {run["run_id"]: run_label(run) for run in client.experiment_snapshot("exp")["runs"]}
    assert labels == {1: "run-1-base", 2: "run-2"}
    for run_id, label in labels.items():
        events = EventAccumulator(str(tmp_path / "tb" / "exp" / label), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        names = {name for (rid, name) in expected if rid == run_id}
        assert set(events.Tags()["scalars"]) == names and "config" in events.Tags()["tensors"]
        for name in names:
            read = [(event.step, event.value, event.wall_time) for event in events.Scalars(name)]
            # TensorBoard stores scalars as float32.
            assert read == [(step, as_float32(value), time) for step, value, time in expected[(run_id, name)]]


def test_mlflow_runs_hold_params_tags_status_and_every_point(served: tuple[RFClient, str], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client, url = served
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):  # exporting again replaces the runs: each rf run is in the store once
        result = rf_export(url, "mlflow", uri)
        assert result.returncode == 0, result.stderr
    mlflow = MlflowClient(tracking_uri=uri)
    experiment = mlflow.get_experiment_by_name("exp")
    runs = {int(run.data.tags["rf.run_id"]): run for run in mlflow.search_runs([experiment.experiment_id])}
    assert sorted(runs) == [1, 2]
    assert runs[1].info.run_name == "run-1-base" and runs[1].data.params["learning_rate"] == "0.001"
    assert runs[2].info.status == "FAILED" and runs[2].data.tags["rf.status"] == "Failed"
    expected = stored_points(client)
    for (run_id, name), points in expected.items():
        history = mlflow.get_metric_history(runs[run_id].info.run_id, name)
        read = sorted((metric.step, metric.value, metric.timestamp) for metric in history)
        assert read == [(step, value, int(time * 1000)) for step, value, time in points]


def test_parquet_export_and_bad_targets(served: tuple[RFClient, str], tmp_path: Path) -> None:
    client, url = served
    result = rf_export(url, "parquet", str(tmp_path / "pq"))
    assert result.returncode == 0, result.stderr
    metrics = pd.read_parquet(tmp_path / "pq" / "exp" / "metrics.parquet")
    assert len(metrics) == sum(len(points) for points in stored_points(client).values())
    results = pd.read_parquet(tmp_path / "pq" / "exp" / "results.parquet")
    assert results["run_id"].tolist() == [1, 2] and results["status"].tolist() == ["New", "Failed"]
    refused = rf_export(url, "wandb", str(tmp_path))
    assert refused.returncode == 1 and "export target must be one of tensorboard, mlflow, parquet" in refused.stderr
    with pytest.raises(ExportError, match="got 'csv'"):
        export(client, "exp", "csv", tmp_path)


def test_a_missing_tracker_is_named_with_its_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    from rf_core import exporters

    real_import = builtins.__import__

    def without_mlflow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    snapshot = {"experiment": {"name": "exp"}, "runs": []}
    with pytest.raises(ExportError, match=r"pip install -e '\.\[mlflow\]'"):
        exporters.export_mlflow(snapshot, [], "sqlite:///x.db")


def test_a_diverged_point_is_exported_as_nan_and_a_second_export_replaces_the_first(tmp_path: Path) -> None:
    import math

    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rf_core.exporters import export_mlflow, export_tensorboard

    snapshot = {
        "experiment": {"name": "nan"},
        "runs": [{"run_id": 1, "status": "Failed", "source": "initial", "config": {"learning_rate": 1.0},
                  "created_at": 1000.0, "updated_at": 1010.0}],
    }  # fmt: skip
    rows = [{"run_id": 1, "step": 1, "name": "train_loss", "value": 2.0, "time": 1001.0},
            {"run_id": 1, "step": 2, "name": "train_loss", "value": None, "time": 1002.0}]  # fmt: skip
    for _ in range(2):
        export_tensorboard(snapshot, rows, tmp_path / "tb")
        export_mlflow(snapshot, rows, f"sqlite:///{tmp_path / 'mlflow.db'}")
    events = EventAccumulator(str(tmp_path / "tb" / "nan" / "run-1"))
    events.Reload()
    values = [event.value for event in events.Scalars("train_loss")]
    assert len(values) == 2 and values[0] == 2.0 and math.isnan(values[1])
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("nan").experiment_id])
    history = sorted((metric.step, metric.value) for metric in mlflow.get_metric_history(run.info.run_id, "train_loss"))
    assert history[0] == (1, 2.0) and history[1][0] == 2 and math.isnan(history[1][1])
    assert run.info.status == "FAILED"
