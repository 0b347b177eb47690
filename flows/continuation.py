"""An experiment outlives its fit flow: an op on an ended experiment starts the fit deployment to continue it.

Used by the CLI (and any other front end) right after an op is accepted for an experiment whose fit has ended.
With a Prefect server configured (`PREFECT_API_URL`) that serves an `rf-fit` deployment, the experiment is
continued there (`continue_experiment=True`: its runs, ids, metrics and queued ops are kept); otherwise the caller
tells the user to run `rf continue EXP`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FIT_FLOW_NAME = "rf-fit"
DEPLOYMENT_ENV = "RF_FIT_DEPLOYMENT"  # which rf-fit deployment continues experiments, e.g. "rf-fit/demo"


@dataclass(frozen=True)
class Continuation:
    deployment: str  # "rf-fit/<name>"
    flow_run: str


def continue_through_deployment(experiment: Mapping[str, Any]) -> Continuation | None:
    """Start the fit deployment on `experiment` (a store row); None when there is no Prefect server or deployment.

    The deployment named by `$RF_FIT_DEPLOYMENT` is used, else the rf-fit deployment whose default `entrypoint`
    is the experiment's own, else the first rf-fit deployment. Experiments started from in-memory functions
    (no entrypoint) cannot be continued by a deployment.
    """
    if not os.environ.get("PREFECT_API_URL") or not experiment.get("spec_ref"):
        return None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import run_deployment

    chosen = os.environ.get(DEPLOYMENT_ENV)
    if not chosen:
        with get_client(sync_client=True) as prefect:
            deployments = prefect.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FIT_FLOW_NAME])))
        if not deployments:
            return None
        own = [d for d in deployments if (d.parameters or {}).get("entrypoint") == experiment["spec_ref"]]
        chosen = f"{FIT_FLOW_NAME}/{(own or deployments)[0].name}"
    flow_run = run_deployment(
        chosen,
        parameters={
            "experiment": experiment["name"],
            "entrypoint": experiment["spec_ref"],
            "num_chunks": int(experiment["num_chunks"]),
            "continue_experiment": True,
        },
        timeout=0,  # start it, don't wait for it
    )
    return Continuation(deployment=chosen, flow_run=flow_run.name)
