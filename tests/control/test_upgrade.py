"""A database written by an earlier version of rf opens with today's code: its migrations run once, its data intact.

`assets/rf-schema-003.duckdb.gz` (gzipped: a DuckDB file is mostly empty blocks) was written at schema 003 (the
three migrations of December 2026) by `write_asset` below, through the service layer as a fit and a user would:
an experiment, a finished chunk, metrics, a queued and an applied op, a warm clone, a failed run and a policy
decision. When a migration is added, the file stays as it is: the test then checks that the new migration
upgrades it. Regenerate it only for a new DuckDB storage format: `python -m tests.control.test_upgrade`.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

from rf_core.control import decisions, experiments, metrics, ops, timeline
from rf_core.control.store import DuckDBStore, migration_files

ASSET = Path(__file__).with_name("assets") / "rf-schema-003.duckdb.gz"
ASSET_SCHEMA = 3
CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 4, "lora_alpha": 8}


def write_asset(path: Path) -> None:
    store = DuckDBStore(path)
    try:
        configs = [{**CONFIG, "learning_rate": rate} for rate in (1e-3, 3e-3, 1e-2)]
        experiments.create_experiment(store, "old", configs, num_chunks=2, seed=7, spec_ref="tests.e2e_experiment:spec")
        entry = timeline.record_chunk_start(store, "old", 1, 0, slot=0, total_chunks=2)
        rows = [
            {"experiment": "old", "run_id": 1, "step": step, "name": "train_loss", "value": 3.0 - step / 10, "chunk": 0}
            for step in range(1, 6)
        ] + [{"experiment": "old", "run_id": 1, "step": 5, "name": "eval_loss", "value": 2.5, "chunk": 0}]
        metrics.log_metrics(store, "batch-1", rows)
        outcome = {"run_id": 1, "chunk_index": 0, "status": "ok", "step": 5, "epoch": 0, "samples": 40,
                   "checkpoint": "/ckpt/run-1/step-5.pt", "exports": {"latest": "/ckpt/run-1/export/latest"},
                   "best_step": 5, "best_value": 2.5}  # fmt: skip
        timeline.record_chunk_end(store, "old", entry, outcome)
        ops.submit_op(store, "old", "clone", 1, {"overrides": {"learning_rate": 5e-4}, "warm_start": "weights"})
        ops.apply_due_ops(store, "old", [1])
        ops.submit_op(store, "old", "stop", 2, source="cli", who="alice")
        timeline.fail_run(store, "old", 3, "cannot split run 3 into chunks")
        decisions.record_policy_decision(store, "old", "median-stopping", 1, 1, "stop", reason="below the median")
    finally:
        store.close()


def test_a_database_from_schema_003_opens_upgraded_with_its_data_intact(tmp_path: Path) -> None:
    path = unpack(ASSET, tmp_path / "rf.duckdb")
    store = DuckDBStore(path)
    try:
        assert store.schema_version() == len(migration_files())
        applied = store._query(None, "SELECT version, applied_at FROM schema_version ORDER BY version")
        assert [row["version"] for row in applied] == list(range(1, len(migration_files()) + 1))

        experiment = experiments.get_experiment(store, "old")
        assert (experiment["num_chunks"], experiment["seed"], experiment["spec_ref"]) == (
            2,
            7,
            "tests.e2e_experiment:spec",
        )
        runs = {run["run_id"]: run for run in experiments.list_runs(store, "old", include_deleted=True)}
        assert {run_id: run["status"] for run_id, run in runs.items()} == {
            1: "Ongoing",
            2: "New",
            3: "Failed",
            4: "New",
        }
        assert (runs[1]["chunks_done"], runs[1]["step"], runs[1]["samples"]) == (1, 5, 40)
        assert runs[1]["checkpoint"] == "/ckpt/run-1/step-5.pt" and runs[1]["export_latest"].endswith("latest")
        assert (runs[1]["best_step"], runs[1]["best_value"]) == (5, 2.5)
        assert runs[2]["config"]["learning_rate"] == 3e-3 and runs[3]["error"] == "cannot split run 3 into chunks"
        clone = runs[4]
        assert (clone["parent_id"], clone["warm_start"], clone["parent_step"]) == (1, "weights", 5)
        assert clone["warm_start_checkpoint"] == "/ckpt/run-1/step-5.pt"
        assert clone["config"]["learning_rate"] == 5e-4

        rows = metrics.metrics(store, "old", names=["train_loss"])
        assert [(row["step"], row["value"]) for row in rows] == [(step, 3.0 - step / 10) for step in range(1, 6)]
        assert [(op["kind"], op["run_id"], op["status"], op["source"]) for op in ops.list_ops(store, "old")] == [
            ("clone", 1, "applied", "user"),
            ("stop", 2, "pending", "cli"),
            ("stop", 1, "pending", "policy:median-stopping"),
        ]
        assert [entry["outcome"] for entry in timeline.timeline(store, "old")] == ["ok"]
        (decision,) = decisions.list_policy_decisions(store, "old")
        assert (decision["policy"], decision["status"], decision["reason"]) == (
            "median-stopping",
            "submitted",
            "below the median",
        )

        # The old database takes new writes: the pending stop applies, metrics append.
        ops.apply_due_ops(store, "old", [2])
        metrics.log_metrics(store, "batch-2", [{"experiment": "old", "run_id": 2, "step": 1, "name": "x", "value": 1}])
        assert experiments.get_run(store, "old", 2)["status"] == "Stopped"
        # 006 rebuilt the decisions table: a promotion is accepted, and decision ids go on after the old ones.
        promoted = decisions.record_policy_decision(store, "old", "asha", 1, 1, "promote", reason="top of rung 1")
        assert promoted["decision"]["status"] == "noted"
        assert promoted["decision"]["decision_id"] > decision["decision_id"]
    finally:
        store.close()

    reopened = DuckDBStore(path)
    try:
        again = reopened._query(None, "SELECT version, applied_at FROM schema_version ORDER BY version")
        assert again == applied  # no migration ran a second time
        assert experiments.get_run(reopened, "old", 2)["status"] == "Stopped"
    finally:
        reopened.close()


def unpack(asset: Path, path: Path) -> Path:
    with gzip.open(asset, "rb") as packed, path.open("wb") as unpacked:
        shutil.copyfileobj(packed, unpacked)
    return path


def test_the_asset_was_written_at_schema_003(tmp_path: Path) -> None:
    assert ASSET.is_file(), f"{ASSET} is missing: python -m tests.control.test_upgrade writes it"
    import duckdb

    connection = duckdb.connect(str(unpack(ASSET, tmp_path / "rf.duckdb")), read_only=True)
    try:
        versions = [row[0] for row in connection.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()]
    finally:
        connection.close()
    assert versions == list(range(1, ASSET_SCHEMA + 1))


if __name__ == "__main__":
    if len(migration_files()) != ASSET_SCHEMA:
        sys.exit(f"the asset is schema {ASSET_SCHEMA:03d}; the code is at {len(migration_files()):03d}: keep the old")
    ASSET.parent.mkdir(exist_ok=True)
    written = ASSET.with_suffix("")
    written.unlink(missing_ok=True)
    write_asset(written)
    with written.open("rb") as unpacked, ASSET.open("wb") as target:
        with gzip.GzipFile(fileobj=target, mode="wb", mtime=0) as packed:
            shutil.copyfileobj(unpacked, packed)
    written.unlink()
    print(f"wrote {ASSET} ({ASSET.stat().st_size} bytes)")
