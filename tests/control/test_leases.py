"""Fit leases on a real DuckDBStore: a live fit is never taken over, a lapsed one reads as crashed and is taken over
without force, a taken-over fit is refused before it writes, and a fit rides out a server restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rf_core import errors
from rf_core.control import experiments, leases, timeline
from rf_core.control.store import DuckDBStore

CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 8, "lora_alpha": 16}
SHORT_LEASE_S = 0.3


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(leases.LEASE_ENV, str(SHORT_LEASE_S))
    opened = DuckDBStore(tmp_path / "rf.duckdb")
    opened.opened_at -= 60  # the server has been up a while: no restart grace unless a test asks for it
    experiments.create_experiment(opened, "exp", [CONFIG, CONFIG], num_chunks=2)
    yield opened
    opened.close()


def lapse() -> None:
    time.sleep(SHORT_LEASE_S + 0.1)


def test_fit_state_is_computed_from_the_lease_and_the_server_start() -> None:
    row = {"status": "running", "created_at": 100.0, "lease_expires_at": 110.0, "last_seen_at": 100.0}
    assert leases.fit_state(row, now=109.9, store_opened_at=0.0, period=10.0) == "running"
    assert leases.fit_state(row, now=110.0, store_opened_at=0.0, period=10.0) == "crashed"
    # A server that (re)opened the store at 105 gives every fit one whole period to renew.
    assert leases.fit_state(row, now=114.9, store_opened_at=105.0, period=10.0) == "running"
    assert leases.fit_state(row, now=115.0, store_opened_at=105.0, period=10.0) == "crashed"
    # Never leased (stored before leases existed, or created and not yet taken): one period from the last sign.
    never = {"status": "running", "created_at": 100.0, "lease_expires_at": None, "last_seen_at": None}
    assert leases.fit_state(never, now=109.0, store_opened_at=0.0, period=10.0) == "running"
    assert leases.fit_state(never, now=111.0, store_opened_at=0.0, period=10.0) == "crashed"
    assert leases.fit_state({**row, "status": "finished"}, now=0.0, store_opened_at=0.0) == "finished"


def test_a_live_fit_is_refused_and_a_lapsed_one_is_taken_over_without_force(store: DuckDBStore) -> None:
    first = leases.acquire_fit(store, "exp", "host:1", flow_run="flow-run-1")
    assert first["epoch"] >= 1 and first["took_over"] is None
    assert first["renew_every"] == pytest.approx(SHORT_LEASE_S / leases.RENEWALS_PER_LEASE)
    assert experiments.get_experiment(store, "exp")["status"] == "running"
    with pytest.raises(errors.FitLive, match=r"live fit \(host:1, last seen"):
        leases.acquire_fit(store, "exp", "host:2")
    open_chunk = timeline.record_chunk_start(store, "exp", 1, 0, slot=0, total_chunks=2)

    lapse()
    shown = experiments.get_experiment(store, "exp")
    assert shown["status"] == "crashed" and shown["last_seen_at"] is not None
    assert [row["status"] for row in experiments.list_experiments(store)] == ["crashed"]
    assert experiments.experiment_snapshot(store, "exp")["experiment"]["status"] == "crashed"
    second = leases.acquire_fit(store, "exp", "host:2")
    assert second["epoch"] > first["epoch"]
    assert second["took_over"] == {
        "owner": "host:1",
        "flow_run": "flow-run-1",
        "last_seen_at": shown["last_seen_at"],
        "state": "crashed",
    }
    (entry,) = [row for row in timeline.timeline(store, "exp") if row["id"] == open_chunk]
    assert entry["outcome"] == "abandoned", "the dead fit's open chunk is closed by the take-over"


def test_force_takes_a_live_fit_and_the_old_fit_is_refused_before_it_writes(store: DuckDBStore) -> None:
    first = leases.acquire_fit(store, "exp", "host:1")
    second = leases.acquire_fit(store, "exp", "host:2", force=True)
    assert second["took_over"]["state"] == "running"
    with pytest.raises(errors.FitSuperseded, match=f"epoch {first['epoch']}; the experiment is at epoch "
                       f"{second['epoch']}"):  # fmt: skip
        leases.renew_fit(store, "exp", first["epoch"])
    with pytest.raises(errors.FitSuperseded):
        leases.check_epoch(store, "exp", first["epoch"])
    with pytest.raises(errors.FitSuperseded):
        leases.end_fit(store, "exp", first["epoch"])
    assert experiments.get_experiment(store, "exp")["status"] == "running", "the old fit's end changed nothing"
    leases.check_epoch(store, "exp", second["epoch"])  # the holder may write
    renewed = leases.renew_fit(store, "exp", second["epoch"])
    assert renewed["lease_expires_at"] > time.time()
    ended = leases.end_fit(store, "exp", second["epoch"])
    assert ended["status"] == "finished" and ended["ended_at"] is not None
    with pytest.raises(errors.FitSuperseded, match="finished"):
        leases.renew_fit(store, "exp", second["epoch"])


def test_renewals_keep_a_fit_alive_past_many_lease_periods(store: DuckDBStore) -> None:
    taken = leases.acquire_fit(store, "exp", "host:1")
    for _ in range(6):
        time.sleep(SHORT_LEASE_S / 3)
        leases.renew_fit(store, "exp", taken["epoch"])
        assert experiments.get_experiment(store, "exp")["status"] == "running"


def test_a_store_reopened_gives_a_fit_one_lease_period_to_renew(tmp_path: Path, store: DuckDBStore) -> None:
    taken = leases.acquire_fit(store, "exp", "host:1")
    store.close()
    lapse()  # the server was down longer than a lease
    reopened = DuckDBStore(tmp_path / "rf.duckdb")
    try:
        assert experiments.get_experiment(reopened, "exp")["status"] == "running"
        with pytest.raises(errors.FitLive):
            leases.acquire_fit(reopened, "exp", "host:2")
        leases.renew_fit(reopened, "exp", taken["epoch"])  # the fit that rode out the outage renews in time
        lapse()
        assert experiments.get_experiment(reopened, "exp")["status"] == "crashed"
    finally:
        reopened.close()


def test_a_reservation_holds_an_ended_experiment_for_the_fit_a_deployment_starts(store: DuckDBStore) -> None:
    taken = leases.acquire_fit(store, "exp", "host:1")
    assert leases.reserve_fit(store, "exp", "deployment d")["reserved"] is False, "a live fit is not reserved over"
    leases.end_fit(store, "exp", taken["epoch"])
    assert leases.reserve_fit(store, "exp", "deployment d") == {"reserved": True, "state": "finished"}
    assert experiments.get_experiment(store, "exp")["status"] == "running"
    assert leases.reserve_fit(store, "exp", "deployment d")["reserved"] is False, "a second op starts no second fit"
    with pytest.raises(errors.FitSuperseded):  # the ended fit, stalled and waking now, holds nothing
        leases.renew_fit(store, "exp", taken["epoch"])
    started = leases.acquire_fit(store, "exp", "host:3")  # the deployment's fit takes its reservation
    assert started["epoch"] > taken["epoch"] and started["took_over"] is None


def test_a_reservation_whose_fit_never_starts_leaves_the_experiment_ended(store: DuckDBStore) -> None:
    taken = leases.acquire_fit(store, "exp", "host:1")
    leases.end_fit(store, "exp", taken["epoch"])
    leases.reserve_fit(store, "exp", "dashboard: continue")
    row = store.get_experiment("exp")
    assert leases.fit_state(row, now=row["last_seen_at"] + 1, store_opened_at=0.0) == "running"
    lapsed = row["lease_expires_at"] + 1
    assert leases.fit_state(row, now=lapsed, store_opened_at=0.0) == "finished", "not crashed: no fit ever ran"


def test_epochs_are_never_reused_even_when_a_name_is(store: DuckDBStore) -> None:
    first = leases.acquire_fit(store, "exp", "host:1")
    lapse()
    experiments.delete_experiment(store, "exp")
    experiments.create_experiment(store, "exp", [CONFIG], num_chunks=2)
    second = leases.acquire_fit(store, "exp", "host:2")
    assert second["epoch"] != first["epoch"]
    with pytest.raises(errors.FitSuperseded):  # the first fit, waking up, cannot pass for the new experiment's
        leases.check_epoch(store, "exp", first["epoch"])


def test_a_live_experiment_is_not_deleted_and_a_crashed_one_is(store: DuckDBStore) -> None:
    leases.acquire_fit(store, "exp", "host:1")
    with pytest.raises(errors.InvalidRequest, match="has a live fit"):
        experiments.delete_experiment(store, "exp")
    lapse()
    assert experiments.delete_experiment(store, "exp")["deleted_rows"]["runs"] == 2


def test_bad_lease_input_is_refused_with_the_reason(store: DuckDBStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(errors.InvalidRequest, match="owner must be a non-empty string"):
        leases.acquire_fit(store, "exp", "")
    with pytest.raises(errors.InvalidRequest, match="epoch must be an integer"):
        leases.renew_fit(store, "exp", "1")  # type: ignore[arg-type]
    with pytest.raises(errors.NotFound):
        leases.acquire_fit(store, "missing", "host:1")
    monkeypatch.setenv(leases.LEASE_ENV, "soon")
    with pytest.raises(ValueError, match="RF_FIT_LEASE_S must be a number of seconds"):
        leases.lease_seconds()
