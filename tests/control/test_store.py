"""DuckDBStore: numbered migrations, bulk and exactly-once metric batches, thread safety, file locking."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rf_core.control.store import DuckDBStore, StoreConflict, StoreError, migration_files

TABLES = {"experiments", "runs", "ops", "metrics", "metric_batches", "timeline", "schema_version"}


@pytest.fixture
def store(tmp_path: Path):
    opened = DuckDBStore(tmp_path / "rf.duckdb")
    yield opened
    opened.close()


def _experiment(store: DuckDBStore, name: str = "exp") -> None:
    now = time.time()
    store.insert_experiment({"name": name, "num_chunks": 2, "seed": 0, "created_at": now})
    store.insert_runs(
        name,
        [{"status": "New", "config": {"lr": 0.1}, "source": "initial", "created_at": now, "updated_at": now}],
    )


def _rows(n: int, run_id: int = 1, start: int = 0) -> list[dict]:
    now = time.time()
    return [
        {"experiment": "exp", "run_id": run_id, "step": start + i, "name": "train_loss",
         "value": 1.0 / (i + 1), "chunk": 0, "time": now + i}
        for i in range(n)
    ]  # fmt: skip


def test_migrations_create_the_schema_and_reopening_applies_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "rf.duckdb"
    first = DuckDBStore(path)
    tables = {row["table_name"] for row in first._query(None, "SELECT table_name FROM information_schema.tables")}
    assert TABLES <= tables
    assert first.schema_version() == len(migration_files())
    _experiment(first)
    first.close()
    again = DuckDBStore(path)
    assert again.schema_version() == len(migration_files())
    assert again.get_experiment("exp")["num_chunks"] == 2
    again.close()


def test_migration_numbers_must_not_skip(tmp_path: Path) -> None:
    (tmp_path / "001_init.sql").write_text("SELECT 1;")
    (tmp_path / "003_later.sql").write_text("SELECT 1;")
    with pytest.raises(StoreError, match="should be numbered 002"):
        migration_files(tmp_path)


def test_returned_rows_are_snapshots(store: DuckDBStore) -> None:
    _experiment(store)
    run = store.get_run("exp", 1)
    run["config"]["lr"] = 99
    run["status"] = "Deleted"
    assert store.get_run("exp", 1)["config"] == {"lr": 0.1}
    assert store.get_run("exp", 1)["status"] == "New"


def test_a_failed_transaction_leaves_nothing(store: DuckDBStore) -> None:
    _experiment(store)
    with pytest.raises(RuntimeError), store.transaction():
        store.update_run("exp", 1, {"status": "Stopped"})
        raise RuntimeError("boom")
    assert store.get_run("exp", 1)["status"] == "New"


def test_constraint_errors_become_store_conflicts(store: DuckDBStore) -> None:
    _experiment(store)
    with pytest.raises(StoreConflict):
        store.insert_experiment({"name": "exp", "num_chunks": 1, "seed": 0, "created_at": 0.0})
    with pytest.raises(StoreConflict):
        store.update_run("exp", 1, {"status": "Sleeping"})


def test_a_metric_batch_sent_twice_is_stored_once(store: DuckDBStore) -> None:
    _experiment(store)
    rows = _rows(10)
    assert store.insert_metric_batch("batch-1", rows, time.time()) is True
    assert store.insert_metric_batch("batch-1", rows, time.time()) is False
    assert len(store.query_metrics("exp")) == 10


def test_bulk_insert_of_500_rows_is_fast_and_complete(store: DuckDBStore) -> None:
    _experiment(store)
    rows = _rows(500)
    rows[3]["value"] = None
    rows[4]["chunk"] = None
    store.insert_metric_batch("warm-up", _rows(500, run_id=2), time.time())
    started = time.perf_counter()
    store.insert_metric_batch("bulk", rows, time.time())
    elapsed = time.perf_counter() - started
    stored = store.query_metrics("exp", run_ids=[1])
    assert len(stored) == 500
    assert stored[3]["value"] is None and stored[4]["chunk"] is None
    assert [row["step"] for row in stored] == list(range(500))
    assert elapsed < 0.5, f"a 500-row batch took {elapsed * 1000:.0f} ms"


def test_metric_queries_filter_by_run_name_and_time(store: DuckDBStore) -> None:
    _experiment(store)
    rows = _rows(5) + [{**row, "name": "eval_loss"} for row in _rows(5, run_id=2)]
    store.insert_metric_batch("b", rows, time.time())
    assert {row["run_id"] for row in store.query_metrics("exp", run_ids=[2])} == {2}
    assert {row["name"] for row in store.query_metrics("exp", names=["eval_loss"])} == {"eval_loss"}
    latest = max(row["time"] for row in rows)
    assert store.query_metrics("exp", since_time=latest) == []
    summary = store.metric_summary("exp", "train_loss", "eval_loss", "min")
    assert summary[1]["train_loss"] == pytest.approx(1 / 5)
    assert summary[2]["latest_metric"] == pytest.approx(1 / 5) and summary[2]["best_metric"] == pytest.approx(1 / 5)


def test_two_threads_writing_at_once_lose_nothing(store: DuckDBStore) -> None:
    _experiment(store)
    errors: list[BaseException] = []

    def write_metrics() -> None:
        try:
            for batch in range(30):
                store.insert_metric_batch(f"m{batch}", _rows(50, start=batch * 50), time.time())
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def write_ops_and_progress() -> None:
        try:
            for step in range(30):
                with store.transaction():
                    store.update_run("exp", 1, {"step": step, "updated_at": time.time()})
                    store.insert_op(
                        {"experiment": "exp", "run_id": 1, "kind": "stop", "payload": {}, "source": "cli",
                         "submitted_at": time.time()}
                    )  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write_metrics), threading.Thread(target=write_ops_and_progress)]
    threads += [threading.Thread(target=lambda: [store.list_runs("exp") for _ in range(50)])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.query_metrics("exp")) == 30 * 50
    assert len(store.list_ops("exp")) == 30
    assert store.get_run("exp", 1)["step"] == 29


def test_a_second_process_gets_store_locked_naming_the_file_and_holder(store: DuckDBStore) -> None:
    code = (
        "import sys\n"
        "from rf_core.control.store import DuckDBStore, StoreLocked\n"
        "try:\n"
        f"    DuckDBStore({str(store.path)!r})\n"
        "except StoreLocked as exc:\n"
        "    print(exc)\n"
        "    sys.exit(7)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 7, result.stderr
    assert str(store.path) in result.stdout
    assert "locked by process" in result.stdout and "only one process may open it" in result.stdout
    assert time.monotonic() - started < 30
