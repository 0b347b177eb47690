"""Results as DataFrames and Parquet files, from what the rf server returns."""

from __future__ import annotations

import json

import pandas as pd

from rf_core.results import metrics_frame, results_frame, write_parquet

SNAPSHOT = {
    "experiment": {"name": "exp", "metric": "rougeL", "mode": "max"},
    "runs": [
        {"run_id": 1, "status": "Completed", "source": "initial", "parent_id": None, "step": 20, "best_metric": 0.4,
         "config": {"run_name": "base", "learning_rate": 1e-3, "target_modules": ["q_proj"],
                    "generation_config": {"max_new_tokens": 8}}},
        {"run_id": 2, "status": "Stopped", "source": "cli", "parent_id": 1, "step": 10, "best_metric": None,
         "config": {"run_name": None, "learning_rate": 3e-4, "target_modules": None, "generation_config": None}},
    ],
}  # fmt: skip
RUN_METRICS = {1: {"rougeL": {"latest": 0.3, "best": 0.4}, "eval_loss": {"latest": 2.0, "best": 1.5}}}


def test_one_row_per_run_with_knobs_and_every_metric_latest_and_best() -> None:
    frame = results_frame(SNAPSHOT, RUN_METRICS)
    assert frame["run_id"].tolist() == [1, 2] and frame["run_name"].tolist()[0] == "base"
    assert frame["learning_rate"].tolist() == [1e-3, 3e-4] and frame.loc[1, "parent_id"] == 1
    assert frame.loc[0, "rougeL_best"] == 0.4 and frame.loc[0, "eval_loss_latest"] == 2.0
    assert pd.isna(frame.loc[1, "rougeL_best"])  # run 2 logged nothing
    assert frame.attrs == {"experiment": "exp", "metric": "rougeL", "mode": "max"}


def test_parquet_files_read_back_with_lists_and_objects_as_json(tmp_path) -> None:
    points = metrics_frame([{"run_id": 1, "step": 4, "name": "rougeL", "value": 0.3, "chunk": 0, "time": 1.0}])
    written = write_parquet(results_frame(SNAPSHOT, RUN_METRICS), points, tmp_path / "out")
    results = pd.read_parquet(written["results"])
    assert results["run_id"].tolist() == [1, 2]
    assert json.loads(results.loc[0, "generation_config"]) == {"max_new_tokens": 8}
    assert json.loads(results.loc[0, "target_modules"]) == ["q_proj"] and pd.isna(results.loc[1, "target_modules"])
    assert pd.read_parquet(written["metrics"]).to_dict("records") == points.to_dict("records")
