"""Renaming an experiment on a real DuckDBStore: all or nothing, folder included."""

from __future__ import annotations

from pathlib import Path

import pytest

from rf_core.control import experiments
from rf_core.control.store import DuckDBStore, StoreError
from rf_core.errors import InvalidRequest

CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 8, "lora_alpha": 16}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RF_HOME", str(tmp_path))
    opened = DuckDBStore(tmp_path / "rf.duckdb")
    experiments.create_experiment(opened, "old", [CONFIG], num_chunks=2)
    experiments.set_experiment_status(opened, "old", "finished")
    yield opened
    opened.close()


def test_a_failed_rename_puts_the_folder_back_and_changes_no_row(
    store: DuckDBStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "experiments" / "old"
    folder.mkdir(parents=True)

    def broken(*args: object) -> None:
        raise StoreError("disk gone")

    monkeypatch.setattr(store, "rename_experiment", broken)
    with pytest.raises(StoreError, match="disk gone"):
        experiments.rename_experiment(store, "old", "new")
    assert folder.is_dir() and not (tmp_path / "experiments" / "new").exists()
    assert [row["name"] for row in store.list_experiments()] == ["old"]


def test_a_folder_in_the_way_is_named_and_nothing_moves(store: DuckDBStore, tmp_path: Path) -> None:
    (tmp_path / "experiments" / "new").mkdir(parents=True)
    with pytest.raises(InvalidRequest, match="exists already"):
        experiments.rename_experiment(store, "old", "new")
    assert [row["name"] for row in store.list_experiments()] == ["old"]
    moved = experiments.rename_experiment(store, "old", "newer")
    assert moved["moved_rows"]["runs"] == 1 and [row["name"] for row in store.list_experiments()] == ["newer"]
