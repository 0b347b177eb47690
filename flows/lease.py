"""The fit's hold on its experiment: take the lease, renew it from a background thread, give it back at the end.

A fit that loses the experiment to another (its lease lapsed while it was frozen or cut off, and `rf continue`
took over) learns it at its next renewal or write, and stops without writing anything more.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from rf_core.client import RFClient
from rf_core.errors import FitSuperseded


class FitLease:
    """Holds `experiment` for this fit; `lost` says why it no longer does (None while it holds it)."""

    def __init__(self, client: RFClient, experiment: str, force: bool = False) -> None:
        self.client = client
        self.experiment = experiment
        taken = client.acquire_fit(experiment, owner=_owner(), flow_run=_flow_run_id(), force=force)
        self.epoch = int(taken["epoch"])
        self.renew_every = float(taken["renew_every"])
        self.took_over: dict[str, Any] | None = taken.get("took_over")
        client.fit_epoch = self.epoch  # from here on every call says which fit makes it
        # The renewals' own client: it rides out a server outage as long as the fit's does.
        self._renewer = RFClient(client.url, timeout=client.timeout, outage_wait_s=client.outage_wait_s)
        self.lost: str | None = None
        self.renewals = 0
        self.longest_gap_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="rf-fit-lease", daemon=True)
        self._thread.start()

    def describe_takeover(self) -> str | None:
        if not self.took_over:
            return None
        seen = self.took_over.get("last_seen_at")
        when = time.strftime("%H:%M:%S", time.localtime(seen)) if seen else "never"
        return f"took over from a {self.took_over['state']} fit ({self.took_over['owner']}, last seen {when})"

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.renew_every):
            try:
                self._renewer.renew_fit(self.experiment, self.epoch)
            except FitSuperseded as lost:
                self.lost = str(lost)
                return
            except Exception as error:  # an outage longer than the fit rides out: the fit's own calls fail too
                print(f"warning: could not renew the fit's lease: {type(error).__name__}: {error}")
                continue
            now = time.monotonic()
            self.renewals += 1
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now

    def end(self) -> None:
        """Stop renewing and mark the experiment finished (only if this fit still holds it)."""
        self.release()
        self.client.end_fit(self.experiment, self.epoch)
        self.client.fit_epoch = None  # what follows (the results table) reads as anyone would

    def release(self) -> None:
        """Stop renewing without ending: the lease lapses unless a new fit takes the experiment first."""
        self._stop.set()
        self._thread.join(timeout=self.renew_every + self.client.timeout)

    def summary(self) -> str:
        return f"fit lease renewed {self.renewals} times, longest gap {self.longest_gap_s:.2f} s"


def mark_flow_run_crashed(flow_run: str, message: str) -> str:
    """Tell Prefect that the flow run of a fit found dead crashed; returns what happened, for the fit's log."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as prefect:
            prefect.set_flow_run_state(flow_run, Crashed(message=message), force=True)
    except Exception as error:  # e.g. it ran on a temporary Prefect server that is gone with it
        return f"its Prefect flow run {flow_run} could not be marked Crashed ({type(error).__name__}: {error})"
    return f"its Prefect flow run {flow_run} is marked Crashed"


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
    except Exception:
        return None
    return str(run_id) if run_id else None
