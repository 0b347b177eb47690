"""Policy flows: a policy reads an experiment's snapshot through the rf server, decides, and its decisions are
recorded (ops queued with source "policy:<name>", or proposals left for a person).

- `rf_policy` (Prefect flow `rf-policy`) is what a scheduled deployment runs (deployments/prefect.yaml): one
  decision round per tick. The store records every (policy, run, chunk boundary, kind) the policy acted on, so a tick
  that finds nothing new does nothing, and a PBT policy does not clone again at every tick.
- `boundary_policies` is the fit flow's hook: the step it runs at every chunk boundary, before planning, so an op
  a policy queues applies at once to the run that has just reached its boundary.

The logic lives in rf_core.policies (decisions) and rf_core.policies_runner (reading, recording); this module only
orchestrates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from rf_core.client import RFClient
from rf_core.errors import NotFound
from rf_core.policies import ExperimentSnapshot, Policy, PolicyOp
from rf_core.policies_runner import (
    DecisionOutcome,
    PolicyReader,
    PolicySpec,
    apply_policy,
    decide,
    format_outcomes,
    read_snapshot,
    submit_decisions,
)


@task(task_run_name="snapshot-{experiment}", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 5])
def read_snapshot_task(client: RFClient, experiment: str, policy: Policy) -> ExperimentSnapshot | None:
    """The experiment's runs and the metric histories the policy reads, through the rf server's API; None when
    the experiment does not exist (yet): a schedule may start before the fit it watches, and retrying would not
    help."""
    try:
        return read_snapshot(client, experiment, policy)
    except NotFound:
        return None


@task(task_run_name="decide-{policy_name}", cache_policy=NONE)
def decide_task(policy: Policy, snapshot: ExperimentSnapshot, policy_name: str) -> list[PolicyOp]:
    """The policy's pure decision on the snapshot."""
    return decide(policy, snapshot)


# Retrying is safe: a decision already recorded for (policy, run, boundary, kind) comes back as a duplicate.
@task(task_run_name="record-{policy_name}", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 5])
def record_task(
    client: RFClient,
    experiment: str,
    policy: Policy,
    snapshot: ExperimentSnapshot,
    ops: list[PolicyOp],
    mode: str,
    dry_run: bool,
    policy_name: str,
) -> list[DecisionOutcome]:
    """Record each decision: queue the op ("act") or leave a proposal ("propose"); a dry run sends nothing."""
    return submit_decisions(
        client, experiment, policy, snapshot, ops, mode=mode, dry_run=dry_run, who=f"flow:rf-policy/{policy_name}"
    )


@flow(name="rf-policy", flow_run_name="policy-{template}-{experiment}", log_prints=True)
def rf_policy(
    experiment: str,
    template: str,
    params: dict[str, Any] | None = None,
    mode: str = "act",
    dry_run: bool = False,
    server_url: str | None = None,
) -> list[dict[str, Any]]:
    """One decision round of a policy on an experiment.

    Args:
        experiment: the experiment's name in the store.
        template: a built-in template (rf_core.policies.TEMPLATES) or `module:attr` naming your own policy.
        params: the template's parameters (JSON).
        mode: "act" queues the ops; "propose" leaves them for `rf policy approve` / `dismiss`.
        dry_run: print what the policy would do and why; record nothing.
        server_url: the rf server; by default $RF_SERVER_URL or the one recorded in $RF_HOME/server.json.
    """
    spec = PolicySpec(template, params or {}, mode)
    policy = spec.build()
    client = RFClient(server_url)
    snapshot = read_snapshot_task(client, experiment, policy)
    if snapshot is None:
        print(f"experiment {experiment!r} does not exist (yet): policy {policy.name} has nothing to decide")
        return []
    ops = decide_task(policy, snapshot, policy.name)
    outcomes = record_task(client, experiment, policy, snapshot, ops, mode, dry_run, policy.name)
    print(format_outcomes(policy.name, outcomes, dry_run))
    return [outcome.to_json() for outcome in outcomes]


def boundary_policies(
    client: RFClient,
    experiment: str,
    policies: Sequence[tuple[Policy, str]],
    tick: int,
    readers: dict[int, PolicyReader] | None = None,
) -> list[DecisionOutcome]:
    """The fit flow's chunk-boundary hook: every attached policy decides once. A policy that raises is reported
    and skipped: a bug in a policy must not stop the runs it watches.

    It runs in the fit flow itself, not as a Prefect task: a task run per boundary cost ~30 ms on the critical path
    between two chunks (bench/scale.py) and showed nothing the flow's log and the rf store's decision records do not.
    `readers`, kept by the caller from one boundary to the next (keyed by the policy object's id), lets each policy
    read only what changed since (`PolicyReader`)."""
    outcomes: list[DecisionOutcome] = []
    for policy, mode in policies:
        try:
            reader = None
            if readers is not None:
                if id(policy) not in readers:
                    readers[id(policy)] = PolicyReader(client, experiment, policy)
                reader = readers[id(policy)]
            decided = apply_policy(client, experiment, policy, mode=mode, who="flow:rf-fit", reader=reader)
        except Exception as exc:
            print(f"policy {policy.name} failed at tick {tick}, the fit goes on without it this time: {exc!r}")
            continue
        for outcome in decided:
            if outcome.status != "duplicate":
                print(f"policy {policy.name}: {outcome.line()}")
        outcomes.extend(decided)
    return outcomes


def build_policies(specs: Sequence[Any] | None) -> list[tuple[Policy, str]]:
    """Policies named as JSON ({"template", "params", "mode"} or a bare template name), built before any training
    so a typo fails the launch rather than the first chunk boundary."""
    built = []
    for data in specs or []:
        spec = PolicySpec.from_json(data)
        built.append((spec.build(), spec.mode))
    return built
