"""The Prefect fit flow: a loop of plan → train chunks on free slots → record, with no barrier across runs.

Runs reach chunk boundaries at different times; each finished chunk frees its slot and triggers a new plan at
once. IC Ops queued in the store are applied by the plan step, at each run's chunk boundary. A slot whose chunk has
done its steps is planned while it evaluates (unless a policy waits for that evaluation): the boundary's one store
request starts the slot's next chunk, which the worker takes up as soon as it has answered for the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from flows.lease import FitLease, mark_flow_run_crashed
from flows.policy import Policy, PolicyReader, boundary_policies, build_policies
from rf_core import paths
from rf_core.client import RFClient
from rf_core.data_forms import check_fit_data
from rf_core.errors import ExperimentExists, FitSuperseded, InvalidRequest
from rf_core.experiment import ExperimentSpec, load_entrypoint
from rf_core.kept_specs import keep_spec, load_kept_spec
from rf_core.messages import TrainTask
from rf_core.planner import EndedChunk, FitLoop, Plan
from rf_core.report import format_chunk_line, format_op_line, format_results_table
from rf_core.server_process import TemporaryServer, ensure_server, stop_server
from rf_core.services import dashboard_url, describe, ephemeral_requested, revive_rf_server, up
from rf_core.states import FAILED_CHUNK_OUTCOMES
from rf_core.training.staging import default_staging_root, persist_staged
from rf_core.training.worker import (
    Slot,
    SlotPool,
    SpecSource,
    WorkerDied,
    evaluates_beside_by_default,
    slot_devices,
    train_with_retry,
)

# Specs handed to run_fit from Python (possibly defined in a notebook) never pass through Prefect parameters.
_IN_MEMORY_SPECS: dict[str, ExperimentSpec] = {}
_IN_MEMORY_POLICIES: dict[str, list[tuple[Policy, str]]] = {}
# A fit on `rf up`'s rf server starts it again if it dies (a temporary server the fit started is revived likewise).
_SERVICE_REVIVERS: dict[str, Callable[[], None]] = {}
POLL_SECONDS = 0.5
SERVER_OUTAGE_ENV = "RF_SERVER_OUTAGE_S"
DEFAULT_SERVER_OUTAGE_S = 300.0  # how long the fit rides out an rf server that does not answer


PLAN_RETRY_DELAYS_S = (0.5, 2.0)


def plan_step(loop: FitLoop, in_flight: dict[int, int], ended: list[EndedChunk], finishing: set[int]) -> Plan:
    """Record the chunks that ended, apply due IC Ops for idle runs, then choose and start runs for the free slots.

    It runs in the flow itself, not as a Prefect task: a task run per boundary cost ~10 ms on the critical path
    between two chunks and showed nothing the flow's log and the train tasks do not (bench/orchestration.py). A
    failed step is tried again: its one request is safe to repeat.
    """
    for delay in (*PLAN_RETRY_DELAYS_S, None):
        try:
            return loop.plan(in_flight, ended, finishing)
        except (FitSuperseded, InvalidRequest):
            raise
        except Exception as exc:
            if delay is None:
                raise
            print(f"planning failed ({exc}); trying again in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


@task(task_run_name="train-run-{run_id}-chunk-{chunk_number}", cache_policy=NONE)
def train_chunk(
    client: RFClient,
    workers: list[Slot],
    train_task: TrainTask,
    run_id: int,
    chunk_number: int,
    total_chunks: int,
    releases: dict[int, list[int]] | None = None,
) -> EndedChunk:
    """Train one chunk of one run on its slot's worker (or its gang's workers); the next planning step records
    how it ended.

    Each attempt is recorded as it starts (the first, usually, by the planning step that picked the chunk): a
    worker that dies mid-chunk is restarted and the chunk trained again as a new attempt, whose start closes the
    dead one's entry and drops the metrics it had sent.
    """
    for member, run_ids in (releases or {}).items():  # states this slot's worker may forget before it trains
        next(worker for worker in workers if worker.slot == member).release(run_ids)
    attempts: list[int] = []

    def start_attempt() -> int:
        if not attempts and train_task.attempt is not None:
            attempts.append(train_task.attempt)
        else:
            attempts.append(client.chunk_start(train_task.experiment, run_id, train_task.chunk.index,
                                               workers[0].slot, total_chunks))  # fmt: skip
        return attempts[-1]

    def on_retry(died: WorkerDied) -> None:
        print(f"run {run_id} chunk {chunk_number}: {died}; restarted, training the chunk again")

    outcome = train_with_retry(workers, train_task, start_attempt, on_retry)
    return EndedChunk(run_id, train_task.chunk.index, attempts[-1], outcome)


# Retrying is safe: a run that has failed already is left as it is.
@task(task_run_name="fail-run-{run_id}", cache_policy=NONE, retries=2, retry_delay_seconds=[0.5, 2])
def fail_run(client: RFClient, experiment: str, run_id: int, reason: str) -> None:
    """A run that cannot train at all fails with the reason (its chunks cannot be planned, or it needs more
    devices than the fit has)."""
    client.fail_run(experiment, run_id, reason)
    print(f"run {run_id} failed: {reason}")


@flow(
    name="rf-fit",
    flow_run_name="fit-{experiment}",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=16),
)
def rf_fit(
    experiment: str,
    entrypoint: str | None = None,
    cpu_slots: int | None = None,
    idle_timeout: float = 30.0,
    server_url: str | None = None,
    num_chunks: int | None = None,
    max_configs: int | None = None,
    policies: list[dict[str, Any]] | None = None,
    continue_experiment: bool = False,
    ray_address: str | None = None,
    ray_slots: int | None = None,
    ray_gpus_per_slot: int = 0,
    force_takeover: bool = False,
    cpu_threads_per_slot: int | None = None,
    evaluate_beside_training: bool | None = None,
) -> dict[str, Any]:
    """Train an experiment's runs in chunks until every run is final, or all are stopped and `idle_timeout` passes.

    Args:
        experiment: experiment name in the store (created here if new).
        entrypoint: `module:function` returning the ExperimentSpec; omitted only when called from `run_fit` in
            the same process.
        cpu_slots: number of CPU slots (one worker process each); by default one slot per visible GPU, or 2 CPU
            slots when there is none.
        idle_timeout: seconds to wait, with every remaining run stopped, for an op before ending.
        server_url: the store server; by default the one found for RF_HOME, or a temporary one.
        num_chunks: overrides the spec's chunks per epoch.
        max_configs: train only the first N configs of the spec's config group.
        policies: policies to run at every chunk boundary, as JSON: {"template": NAME or "module:attr",
            "params": {...}, "mode": "act" | "propose"} (see rf_core.policies).
        continue_experiment: when the experiment exists already (its fit has ended), train it on: its runs, ids,
            metrics and queued ops are kept, and runs that can train resume from their checkpoints.
        ray_address: run the slot workers as actors on this Ray cluster ("auto", "host:port"; see README,
            "Several machines") instead of as child processes here.
        ray_slots: slots on the Ray cluster (default: one per GPU with ray_gpus_per_slot=1, else 2).
        ray_gpus_per_slot: 1 gives each Ray slot a GPU; 0 makes CPU slots.
        force_takeover: take the experiment even from a fit whose lease is live (a crashed fit's is taken without
            it); only for a lease that cannot be trusted, e.g. a store shared by machines whose clocks disagree.
        cpu_threads_per_slot: torch threads each local slot worker trains with (default: the CPU's cores shared
            evenly among the slots).
        evaluate_beside_training: with no policy attached, a slot evaluates a chunk's boundary in a thread of its
            own while its next chunk trains, instead of between the two (LoRA SFT runs on CPU slots whose metric
            draws no random numbers; see `SlotTrainer.evaluates_beside`). Default: where the slots' training
            threads leave a core per slot free.
    """
    if cpu_threads_per_slot is not None and cpu_threads_per_slot < 1:  # before any server, worker or row exists
        raise ValueError(f"cpu_threads_per_slot must be >= 1, got {cpu_threads_per_slot}")
    attached = build_policies(policies) + _IN_MEMORY_POLICIES.get(experiment, [])
    if entrypoint:
        spec = load_entrypoint(entrypoint)
    elif experiment in _IN_MEMORY_SPECS:
        spec = _IN_MEMORY_SPECS[experiment]
    else:  # `rf continue` of an experiment a script or notebook started
        spec = load_kept_spec(experiment)
    if num_chunks is not None:
        spec.num_chunks = num_chunks
    configs, functions = spec.named_configs()
    configs = configs[:max_configs]
    # Before any server, worker or row exists.
    check_fit_data(spec.train_dataset, spec.eval_dataset, configs, functions)
    home = paths.rf_home()
    home.mkdir(parents=True, exist_ok=True)
    temporary_server: TemporaryServer | None = None
    if server_url is None:
        server_url, process = ensure_server(home)
        temporary_server = TemporaryServer(process, server_url, home) if process else None
        kind = "temporary, exits with this flow" if temporary_server else "already running"
        print(f"rf server ({kind}): {server_url}  (DB {paths.db_path(home)})")
    print(f"dashboard: {dashboard_url(server_url, experiment)}")
    outage_wait = float(os.environ.get(SERVER_OUTAGE_ENV, DEFAULT_SERVER_OUTAGE_S))
    revive = temporary_server.revive if temporary_server else _SERVICE_REVIVERS.get(experiment)
    client = RFClient(server_url, outage_wait_s=outage_wait, on_outage=revive)
    try:
        try:
            created = client.create_experiment(
                experiment,
                configs=configs,
                num_chunks=spec.num_chunks,
                seed=spec.seed,
                metric=spec.metric,
                mode=spec.mode,
                spec_ref=entrypoint,
                functions=sorted(functions),
            )
            print(f"experiment {experiment!r}: {len(created['runs'])} runs, {spec.num_chunks} chunks per epoch")
            continuing = False
        except ExperimentExists:
            if not continue_experiment:
                raise
            continuing = True
        lease = FitLease(client, experiment, force=force_takeover and continuing)
        if continuing:
            client.set_experiment_functions(experiment, sorted(functions))
            print(f"experiment {experiment!r} continues: its runs, metrics and queued ops are kept")
        try:
            return _train(lease, client, experiment, spec, entrypoint, attached, idle_timeout, home, server_url,
                          cpu_slots, ray_address, ray_slots, ray_gpus_per_slot,
                          threads_per_slot=cpu_threads_per_slot,
                          evaluate_beside=evaluate_beside_training)  # fmt: skip
        finally:
            lease.release()  # a fit that raised (in a notebook that lives on) must not keep renewing
    finally:
        if temporary_server is not None:
            stop_server(temporary_server.process)


def _train(
    lease: FitLease,
    client: RFClient,
    experiment: str,
    spec: ExperimentSpec,
    entrypoint: str | None,
    attached: list[tuple[Policy, str]],
    idle_timeout: float,
    home: Path,
    server_url: str,
    cpu_slots: int | None,
    ray_address: str | None,
    ray_slots: int | None,
    ray_gpus_per_slot: int,
    threads_per_slot: int | None = None,
    evaluate_beside: bool | None = None,
) -> dict[str, Any]:
    """The fit once it holds its experiment: start the slots, drive the loop, end the fit and print the results."""
    if takeover := lease.describe_takeover():
        flow_run = (lease.took_over or {}).get("flow_run")
        crashed = f"; {mark_flow_run_crashed(flow_run, 'its fit stopped renewing its lease')}" if flow_run else ""
        print(f"experiment {experiment!r}: {takeover}{crashed}")
    if not entrypoint:
        keep_spec(experiment, spec)  # so `rf continue` can train it on after this fit
    if ray_address:
        from rf_core.training.ray_workers import ray_slots as size_ray_slots

        devices, threads, worker_class = size_ray_slots(ray_address, ray_slots, ray_gpus_per_slot)
    else:
        devices, worker_class = slot_devices(cpu_slots), None
        threads = threads_per_slot or max(1, (os.cpu_count() or 1) // len(devices))
    if evaluate_beside is None:
        evaluate_beside = not ray_address and evaluates_beside_by_default(devices, threads, os.cpu_count() or 1)
    # Policies rank by the boundary's evaluation; Ray's slot workers answer a chunk in one call.
    evaluate_beside = bool(evaluate_beside) and not attached and not ray_address
    source = SpecSource.for_spec(spec, entrypoint)
    cuda = any(str(device or "").startswith("cuda") for device in devices)
    loop = FitLoop(client, experiment, spec, len(devices), home, cuda=cuda)
    spool = paths.experiment_dir(experiment, home) / "spool"
    staging_root = default_staging_root()
    # States a crashed earlier fit left only in RAM become durable before anything reads them.
    persist_staged(staging_root, paths.experiment_dir(experiment, home))
    superseded = False
    try:
        with SlotPool(devices, source, server_url, spool, threads, worker_class, evaluate_beside) as pool:
            where = ", ".join(device or "cpu" for device in devices)
            nodes = sorted({str(getattr(worker, "node", "")) for worker in pool.workers})
            on_ray = f" on Ray nodes {', '.join(nodes)}" if ray_address else ""
            beside = "; boundaries evaluated beside training" if evaluate_beside else ""
            print(f"{len(devices)} slot workers ready ({where}; {threads} CPU threads each{beside}){on_ray}")
            if attached:
                print("policies at every chunk boundary: " + ", ".join(f"{p.name} ({m})" for p, m in attached))
            _drive(loop, pool, client, experiment, idle_timeout, attached, lease)
    except FitSuperseded as lost:
        superseded = True
        print(f"this fit stops without writing more: {lost}")
        raise
    finally:
        if not superseded:  # the staged states are the new fit's to persist now
            persist_staged(staging_root, paths.experiment_dir(experiment, home))
        if ray_address:
            from rf_core.training.ray_workers import disconnect

            disconnect()
    lease.end()
    print(lease.summary())
    snapshot = client.experiment_snapshot(experiment)
    print(format_results_table(snapshot))
    return snapshot


def _drive(
    loop: FitLoop,
    pool: SlotPool,
    client: RFClient,
    experiment: str,
    idle_timeout: float,
    policies: list[tuple[Policy, str]] | None = None,
    lease: FitLease | None = None,
) -> None:
    """The loop: plan when a slot frees up or an op arrives, train the planned chunks, record what came of them;
    end when every run is final, or when every remaining run has been stopped for `idle_timeout` seconds, or at
    once (FitSuperseded) when another fit took the experiment over."""
    # Policies read the boundary's evaluation before the next chunk is planned: no planning while it runs.
    slots = _SlotsInFlight(pool, client, loop, early_planning=not policies)
    crashes: dict[int, int] = {}  # run -> chunks whose training task failed
    ended: list[EndedChunk] = []  # chunks done since the last plan; the next plan records them
    chunk_lines: list[str] = []
    policy_readers: dict[int, PolicyReader] = {}  # each policy reads what changed since the last boundary
    tick = 0
    need_plan = True
    idle_since: float | None = None
    try:
        while True:
            if lease is not None and lease.lost:
                raise FitSuperseded([lease.lost])
            if need_plan:
                need_plan = False
                tick += 1
                if policies:  # policies decide first, so their ops apply at the boundary that was just reached
                    loop.record(ended)  # on the table they read
                    ended = []
                    boundary_policies(client, experiment, policies, tick, policy_readers)
                plan = plan_step(loop, slots.runs_in_flight(), ended, slots.finishing_runs())
                ended = []
                for op in plan.applied_ops:
                    print(format_op_line(op))
                slots.defer_releases(plan.releases)
                for run_id, reason in plan.unplannable.items():
                    fail_run(client, experiment, run_id, reason)
                    need_plan = True  # the next plan sees the run Failed (and may find every run final)
                for slot, train_task in plan.tasks:
                    slots.dispatch(slot, train_task)
                for line in chunk_lines:  # printed once the freed slots train again: a log line takes a few ms
                    print(line)
                chunk_lines = []
                if slots.busy:
                    idle_since = None
                elif plan.all_final:
                    return
                elif not plan.tasks and not plan.unplannable:
                    # Nothing can train: every remaining run is stopped. Wait for a Resume or a Clone, or give up.
                    now = time.monotonic()
                    if idle_since is None or plan.applied_ops:
                        idle_since = now
                        print(f"every remaining run is stopped; waiting up to {idle_timeout:.0f} s for an op")
                    elif now - idle_since >= idle_timeout:
                        print(f"no op for {idle_timeout:.0f} s with every remaining run stopped: ending the fit")
                        return
            if slots.busy:
                finished, trained = slots.collect(POLL_SECONDS)
                need_plan = need_plan or bool(trained)
                for slot, train_task, future in finished:
                    need_plan = True
                    try:
                        chunk = future.result()
                    except FitSuperseded:
                        raise
                    except Exception as exc:  # e.g. the server was unreachable for a retry's start: train it again
                        loop.forget(train_task.run_id)
                        crashes[train_task.run_id] = crashes.get(train_task.run_id, 0) + 1
                        print(f"run {train_task.run_id} chunk {train_task.chunk.index + 1}: {exc}")
                        if crashes[train_task.run_id] >= 3:
                            raise
                        continue
                    ended.append(chunk)
                    if chunk.outcome.status in FAILED_CHUNK_OUTCOMES:
                        loop.forget(train_task.run_id)
                    chunk_lines.append(format_chunk_line(chunk.outcome, slots.total_chunks(train_task), slot))
                if not need_plan and slots.free:
                    need_plan = _has_pending_ops(client, experiment)
            else:
                # Idle, every remaining run stopped: plan again only when an op arrives.
                time.sleep(POLL_SECONDS)
                need_plan = need_plan or _has_pending_ops(client, experiment)
                if not need_plan and idle_since is not None and time.monotonic() - idle_since >= idle_timeout:
                    print(f"no op for {idle_timeout:.0f} s with every remaining run stopped: ending the fit")
                    return
    except FitSuperseded:
        raise  # the experiment is another fit's now: this one writes nothing more
    except BaseException:
        with contextlib.suppress(Exception):  # what was trained before the fit broke stays trained
            loop.record(ended)
        raise


class _SlotsInFlight:
    """Which slot trains which chunk now: chunks are submitted as Prefect task runs, and a slot whose chunk ends
    is reported at once, in the order they end, while the others train on. A gang's chunk holds all its slots.

    A slot whose chunk has done its optimizer steps says so before evaluating (`trained`): the fit may plan and
    start its next chunk then, which waits in line behind the evaluation, so the boundary's request, the planning
    and Prefect's task start happen while the worker evaluates instead of after it."""

    def __init__(self, pool: SlotPool, client: RFClient, loop: FitLoop, early_planning: bool = True) -> None:
        self.pool = pool
        self.client = client
        self.loop = loop
        self.futures: dict[int, deque[PrefectFuture]] = {}  # slot -> its chunks' futures, oldest first (gang: rank 0)
        self.running: dict[int, deque[TrainTask]] = {}  # every busy slot -> its chunks' tasks, the one training first
        self.events: queue.Queue[tuple[str, int]] = queue.Queue()  # ("done" | "trained", slot), as they happen
        self.trained: set[int] = set()  # slots whose only chunk is evaluating: free to plan
        # Slots whose second chunk's steps were done before the first one's end was noticed (that one was evaluated
        # beside the second): free to plan once it is.
        self.trained_behind: set[int] = set()
        self.deferred_releases: dict[int, list[int]] = {}  # runs a busy slot may forget once it is free
        # Without policies nothing reads a boundary's evaluation before the next plan: a worker may answer later.
        self.early_planning = early_planning
        if early_planning:
            for member in range(loop.num_slots):
                pool[member].on_trained = lambda slot: self.events.put(("trained", slot))

    @property
    def busy(self) -> bool:
        return any(self.running.values())

    @property
    def free(self) -> bool:
        return sum(1 for tasks in self.running.values() if tasks) < self.loop.num_slots

    def runs_in_flight(self) -> dict[int, int]:
        """Slot -> the run it trains, for the slots planning must leave alone (a slot that is evaluating its only
        chunk is left out: it is free to plan)."""
        return {slot: tasks[-1].run_id for slot, tasks in self.running.items() if tasks and slot not in self.trained}

    def finishing_runs(self) -> set[int]:
        """Runs whose chunk is still on a slot left out of `runs_in_flight`: none of them may be planned."""
        return {task.run_id for slot, tasks in self.running.items() for task in tasks} - set(
            self.runs_in_flight().values()
        )

    def total_chunks(self, train_task: TrainTask) -> int:
        return len(self.loop.chunk_plan({"run_id": train_task.run_id, "config": train_task.config}))

    def defer_releases(self, releases: dict[int, list[int]]) -> None:
        for slot, run_ids in releases.items():
            self.deferred_releases.setdefault(slot, []).extend(run_ids)

    def dispatch(self, slot: int, train_task: TrainTask) -> None:
        train_task = dataclasses.replace(train_task, evaluation_may_wait=self.early_planning)
        members = _slots_of(slot, train_task)
        releases = {}
        for member in members:
            self.trained.discard(member)
            if not self.running.get(member):
                self._flush_releases(member)
            elif run_ids := self.deferred_releases.pop(member, None):
                releases[member] = run_ids  # the task releases them when the slot's worker is its own
        chunk_number = train_task.chunk.index + 1
        future = train_chunk.with_options(task_run_name=f"train-run-{train_task.run_id}-chunk-{chunk_number}").submit(
            self.client,
            [self.pool[member] for member in members],
            train_task,
            train_task.run_id,
            chunk_number,
            self.total_chunks(train_task),
            releases,
        )
        future.add_done_callback(lambda _future: self.events.put(("done", slot)))
        self.futures.setdefault(slot, deque()).append(future)
        for member in members:
            self.running.setdefault(member, deque()).append(train_task)

    def collect(self, timeout: float) -> tuple[list[tuple[int, TrainTask, PrefectFuture]], list[int]]:
        """What happened since the last call, waiting up to `timeout` for the first event: the chunks that ended,
        as (slot, task, future), and the slots that became free to plan while evaluating their chunk."""
        try:
            events = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return [], []
        while not self.events.empty():
            events.append(self.events.get_nowait())
        ended, trained = [], []
        for kind, slot in events:
            if kind == "trained":
                lined_up = len(self.running.get(slot) or ())
                if lined_up == 1:  # its only chunk: nothing is lined up behind it yet
                    self.trained.add(slot)
                    trained.append(slot)
                elif lined_up == 2:
                    self.trained_behind.add(slot)
                continue
            future, train_task = self.futures[slot].popleft(), self.running[slot][0]
            for member in _slots_of(slot, train_task):
                self.running[member].popleft()
                if not self.running[member]:
                    self.trained.discard(member)
                    self.trained_behind.discard(member)
                    self._flush_releases(member)
            if slot in self.trained_behind and len(self.running.get(slot) or ()) == 1:
                self.trained_behind.discard(slot)
                self.trained.add(slot)
                trained.append(slot)
            ended.append((slot, train_task, future))
        return ended, trained

    def _flush_releases(self, slot: int) -> None:
        run_ids = self.deferred_releases.pop(slot, None)
        if run_ids:
            self.pool[slot].release(run_ids)


def _slots_of(slot: int, train_task: TrainTask) -> tuple[int, ...]:
    """The slots a chunk occupies: its own, or every slot of its gang (the first is the one it is keyed by)."""
    return train_task.gang.slots if train_task.gang is not None else (slot,)


def _has_pending_ops(client: RFClient, experiment: str) -> bool:
    return bool(client.list_ops(experiment, status="pending"))


def run_flow(experiment: str, *, ephemeral: bool | None = None, **options: Any) -> dict[str, Any]:
    """`rf_fit` on the services that stay up (those of `rf up`, started now when none answers, and left running),
    or, `ephemeral` (default: RF_EPHEMERAL), on a temporary rf server and Prefect server that exit with the fit.
    A `server_url` given, or PREFECT_API_URL set, is used as it is."""
    if ephemeral_requested(ephemeral):
        return rf_fit(experiment, **options)
    want_prefect = not os.environ.get("PREFECT_API_URL")
    services = up(rf=not options.get("server_url"), prefect=want_prefect)
    for line in describe(services):
        print(line)
    if services["rf"] is not None:
        options["server_url"] = services["rf"]["url"]
        if services["rf"].get("owned"):
            _SERVICE_REVIVERS[experiment] = revive_rf_server
    try:
        if services["prefect"] is None:
            return rf_fit(experiment, **options)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: services["prefect"]["url"]}):
            return rf_fit(experiment, **options)
    finally:
        _SERVICE_REVIVERS.pop(experiment, None)


def run_fit(
    experiment: str,
    spec: ExperimentSpec,
    *,
    entrypoint: str | None = None,
    cpu_slots: int | None = None,
    idle_timeout: float = 30.0,
    server_url: str | None = None,
    policies: Sequence[Any] | None = None,
    resume: bool = False,
    ephemeral: bool | None = None,
    cpu_threads_per_slot: int | None = None,
    evaluate_beside_training: bool | None = None,
) -> dict[str, Any]:
    """Run the fit flow for an in-memory spec (the `Experiment.run_fit` path); `resume` trains an existing
    experiment on (`rf_fit`'s `continue_experiment`); `ephemeral` as in `run_flow`.

    `policies` may mix Policy objects (which, like the spec, never pass through Prefect parameters) with template
    names and JSON specs (which do).
    """
    objects = [policy for policy in policies or [] if isinstance(policy, Policy)]
    specs = [policy for policy in policies or [] if not isinstance(policy, Policy)]
    _IN_MEMORY_SPECS[experiment] = spec
    _IN_MEMORY_POLICIES[experiment] = [(policy, "act") for policy in objects]
    try:
        return run_flow(
            experiment,
            ephemeral=ephemeral,
            entrypoint=entrypoint,
            cpu_slots=cpu_slots,
            idle_timeout=idle_timeout,
            server_url=server_url,
            policies=specs or None,
            continue_experiment=resume,
            cpu_threads_per_slot=cpu_threads_per_slot,
            evaluate_beside_training=evaluate_beside_training,
        )
    finally:
        _IN_MEMORY_SPECS.pop(experiment, None)
        _IN_MEMORY_POLICIES.pop(experiment, None)
