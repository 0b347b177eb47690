"""Fit leases: which fit holds an experiment, and whether it is alive.

A fit takes its experiment with `acquire_fit` and renews the lease every `renew_every` seconds; a lease that was
not renewed for `lease_seconds` has lapsed, and the experiment reads as "crashed" (the stored status stays
"running": crashed is a fact about time, computed on every read). A new fit takes a crashed experiment over
without force, a live one only with force. Each take-over (and each reservation for a fit about to start) gives the
experiment a new fit epoch, from one sequence for the whole store, never reused; a fit presents its epoch on every
write, so an old fit that comes back afterwards is refused before it writes anything.

Leases never lapse within one lease period of the rf server opening the store: a fit that rode out a server
outage gets the time to renew before anyone may call it dead.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from rf_core.control.checks import require_experiment
from rf_core.control.timeline import abandon_open_chunks
from rf_core.errors import FitLive, FitSuperseded, InvalidRequest, NotFound
from rf_core.states import FIT_STATES, RESERVED_PREFIX

if TYPE_CHECKING:
    from rf_core.control.store import Store

LEASE_ENV = "RF_FIT_LEASE_S"
# A fit renews 5 times per period, so 4 renewals in a row may be late or lost before it is called dead.
# Measured on the 2-core machine with a 2-slot demo fit, a second fit and the test suite all running: 70 renewals,
# the longest gap 2.19 s for the 2 s asked, so a fit is called dead only after ~8 s of silence beyond any seen.
DEFAULT_LEASE_SECONDS = 10.0
RENEWALS_PER_LEASE = 5
# A Prefect deployment's fit may take half a minute to start on a busy machine; its reservation waits that long.
RESERVATION_SECONDS = 120.0

RUNNING, CRASHED, FINISHED = FIT_STATES


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{LEASE_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{LEASE_ENV} must be > 0, got {raw!r}")
    return value


def fit_state(experiment: dict[str, Any], now: float, store_opened_at: float, period: float | None = None) -> str:
    """ "running", "crashed" or "finished": a running experiment whose fit stopped renewing its lease crashed."""
    if experiment["status"] != RUNNING:
        return FINISHED
    period = lease_seconds() if period is None else period
    expires = experiment.get("lease_expires_at")
    if expires is None:  # created and not yet taken, or stored before leases existed
        expires = (experiment.get("last_seen_at") or experiment["created_at"]) + period
    if now < max(float(expires), store_opened_at + period):
        return RUNNING
    # A reservation whose fit never started leaves the experiment as it was: ended, not crashed.
    return FINISHED if str(experiment.get("fit_owner") or "").startswith(RESERVED_PREFIX) else CRASHED


def with_fit_state(store: Store, experiment: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The experiment row as readers see it: `status` is its fit state, `last_seen_at` when its fit last renewed."""
    now = time.time() if now is None else now
    return {**experiment, "status": fit_state(experiment, now, store.opened_at)}


def acquire_fit(
    store: Store, name: str, owner: str, flow_run: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Take the experiment for a fit: {"epoch", "lease_seconds", "renew_every", "took_over"}.

    Refused (FitLive) while another fit holds a live lease, unless `force`: for a lease that cannot be trusted,
    e.g. a store shared over a network filesystem whose clocks disagree. `took_over` describes the fit that held
    it before, when that one did not end (crashed, or forced out): its owner, flow run and when it was last seen.
    Chunks it left open are abandoned.
    """
    problems = [] if isinstance(owner, str) and owner else [f"owner must be a non-empty string, got {owner!r}"]
    if flow_run is not None and not isinstance(flow_run, str):
        problems.append(f"flow_run must be a string or null, got {flow_run!r}")
    if problems:
        raise InvalidRequest(problems)
    period = lease_seconds()
    with store.transaction():
        experiment = require_experiment(store, name)
        now = time.time()
        state = fit_state(experiment, now, store.opened_at, period)
        epoch = int(experiment.get("fit_epoch") or 0)
        holder = experiment.get("fit_owner") or ""
        reserved = holder.startswith(RESERVED_PREFIX)
        if state == RUNNING and epoch > 0 and not reserved and not force:
            seen = experiment.get("last_seen_at")
            ago = f"{now - seen:.1f} s ago" if seen else "at its start"
            raise FitLive(
                [
                    f"experiment {name!r} has a live fit ({holder}, last seen {ago}); its ops apply there. Force "
                    "a take-over only if that lease cannot be trusted (a store shared between machines whose "
                    "clocks disagree)"
                ]
            )
        took_over = None
        if state != FINISHED and epoch > 0 and not reserved:
            took_over = {
                "owner": holder,
                "flow_run": experiment.get("fit_flow_run"),
                "last_seen_at": experiment.get("last_seen_at"),
                "state": state,
            }
        abandon_open_chunks(store, name, store.open_timeline(name), now)
        new_epoch = store.next_fit_epoch()
        store.update_experiment(
            name,
            {
                "status": RUNNING,
                "ended_at": None,
                "fit_epoch": new_epoch,
                "fit_owner": owner,
                "fit_flow_run": flow_run,
                "lease_expires_at": now + period,
                "last_seen_at": now,
            },
        )
    return {
        "epoch": new_epoch,
        "lease_seconds": period,
        "renew_every": period / RENEWALS_PER_LEASE,
        "took_over": took_over,
    }


def renew_fit(store: Store, name: str, epoch: int) -> dict[str, Any]:
    """Extend the lease of the fit holding `epoch`; FitSuperseded when another fit took the experiment since."""
    period = lease_seconds()
    with store.transaction():
        _held(store, name, epoch)
        now = time.time()
        store.update_experiment(name, {"lease_expires_at": now + period, "last_seen_at": now})
    return {"epoch": epoch, "lease_expires_at": now + period}


def end_fit(store: Store, name: str, epoch: int) -> dict[str, Any]:
    """The fit holding `epoch` ended: the experiment is finished until the next fit takes it."""
    with store.transaction():
        experiment = require_experiment(store, name)
        if experiment["status"] == FINISHED and int(experiment.get("fit_epoch") or 0) == epoch:
            return experiment  # said twice (a retried call): once is enough
        _held(store, name, epoch)
        return store.update_experiment(
            name, {"status": FINISHED, "ended_at": time.time(), "lease_expires_at": None, "fit_owner": None}
        )


def reserve_fit(store: Store, name: str, owner: str) -> dict[str, Any]:
    """Hold an ended (or crashed) experiment for a fit about to start elsewhere, e.g. through a Prefect
    deployment, so that a second op right behind the first starts no second fit. {"reserved": bool, "state"}."""
    with store.transaction():
        experiment = require_experiment(store, name)
        now = time.time()
        state = fit_state(experiment, now, store.opened_at)
        if state == RUNNING:
            return {"reserved": False, "state": state}
        store.update_experiment(
            name,
            {
                "status": RUNNING,
                "ended_at": None,
                "fit_epoch": store.next_fit_epoch(),  # a stalled fit that wakes up now is refused, not revived
                "fit_owner": RESERVED_PREFIX + owner,
                "lease_expires_at": now + RESERVATION_SECONDS,
                "last_seen_at": now,
            },
        )
    return {"reserved": True, "state": state}


def check_epoch(store: Store, name: str, epoch: int) -> None:
    """Refuse a write from a fit that no longer holds the experiment (FitSuperseded)."""
    try:
        _held(store, name, epoch)
    except NotFound:
        pass  # the route itself reports an unknown experiment


def _held(store: Store, name: str, epoch: Any) -> dict[str, Any]:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise InvalidRequest([f"epoch must be an integer, got {epoch!r}"])
    experiment = require_experiment(store, name)
    current = int(experiment.get("fit_epoch") or 0)
    if current != epoch or experiment["status"] != RUNNING:
        raise FitSuperseded(
            [
                f"experiment {name!r} is no longer held by this fit (epoch {epoch}; the experiment is at epoch "
                f"{current}, {experiment['status']}): another fit took it over, so this one stops without writing"
            ]
        )
    return experiment
