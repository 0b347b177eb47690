"""Continuing an ended (or crashed) experiment from the rf server, as the dashboard's "Continue experiment" does: a
detached local `rf continue` process, logging to the experiment's folder, that holds a lease like any fit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rf_core import paths
from rf_core.control.leases import reserve_fit
from rf_core.errors import InvalidRequest

if TYPE_CHECKING:
    from rf_core.control.store import Store

FIT_LOG = "fit.log"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def reserve_for_continuation(store: Store, name: str, who: str) -> None:
    """Hold the experiment for the fit about to continue it, so a second click starts no second fit; refused
    (InvalidRequest) while a fit holds it."""
    if not reserve_fit(store, name, f"{who}: continue")["reserved"]:
        raise InvalidRequest([f"experiment {name!r} has a fit running already: its ops apply there"])


def spawn_continue(name: str) -> dict[str, Any]:
    """`rf continue NAME` as a detached process on this machine, logging to the experiment's fit.log (reserve the
    experiment first): {"experiment", "pid", "log"}. It trains on the services that run and ends like any fit."""
    log = paths.experiment_dir(name) / FIT_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RF_HOME=str(paths.rf_home()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    # No --server: it finds this server through RF_HOME (the URL a browser used may be a tunnel's), as `rf up`'s
    # services or as the server this RF_HOME runs.
    command = [sys.executable, "-m", "rf_cli.main", "continue", name]
    with open(log, "ab") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env,
            cwd=_PROJECT_ROOT, start_new_session=True,
        )  # fmt: skip
    threading.Thread(target=process.wait, name=f"rf-continue-{name}", daemon=True).start()  # reaped when it ends
    return {"experiment": name, "pid": process.pid, "log": str(log)}
