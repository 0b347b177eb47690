"""Orchestration benchmark: slot utilisation and per-chunk overhead of the Prefect fit flow on CPU slots.

    .venv/bin/python bench/orchestration.py [--runs 8] [--chunks 8] [--chunk-seconds 5] [--slots 2] [--out FILE.json]
    .venv/bin/python bench/orchestration.py --smoke          # 2 runs x 2 chunks of a few steps, < 60 s

What it does:

1. Calibrates optimizer steps/s of the bench LoRA run with `--slots` calibration processes training at once (as
   the slot workers will), and sizes the training set so that one chunk is about `--chunk-seconds` of training.
2. Runs `flows.fit.rf_fit` in this process, in Prefect's ephemeral mode, with a fresh RF_HOME and PREFECT_HOME
   in a temporary folder and an rf server started here first (`ensure_server`), so the store outlives the flow.
3. Observes without changing behaviour: wrappers around `SlotWorker.train_once`, `RFClient` calls, `FitLoop.plan` and
   the fit loop's completion detection read the clock in this process; `bench.bench_experiment` does the same in
   each slot worker (setup, training loop, evaluation, checkpoint, metric flush). All clocks are `time.time()`.
4. Reads the store's timeline and metrics, and reports slot utilisation and the non-training time between
   consecutive chunks on each slot, broken into its steps. Results go to `--out` (JSON) and stdout.

"Completion detection" is read where the fit loop learns that a chunk is done: `_SlotsInFlight.collect` in
`flows/fit.py` (the queue fed by the train tasks' done callbacks).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script: make `bench`, `flows` and `rf_core` importable
    sys.path.insert(0, str(PROJECT_ROOT))

from bench.common import isolated_environment  # noqa: E402

EXPERIMENT = "bench-orchestration"
ENTRYPOINT = "bench.bench_experiment:spec"
SMOKE_RUNS = 2
SMOKE_CHUNKS = 2
SMOKE_STEPS_PER_CHUNK = 5
CALIBRATION_STEPS = 60
TARGET_UTILISATION = 0.95
TARGET_MEDIAN_OVERHEAD_S = 0.100

# Non-training steps between the end of one chunk's training loop and the start of the next one's on the same slot,
# in the order they happen. They are differences of consecutive clock readings, so they sum to the whole gap.
TRANSITION_STEPS: dict[str, str] = {
    "handover": "worker: the boundary handed to the thread that evaluates it beside the next chunk (evaluate-beside)",
    "eval": "worker: evaluation of the finished chunk (eval set forward passes)",
    "checkpoint": "worker: checkpoint of the finished chunk (torch.save + fsync + rename)",
    "metric_flush": "worker: earlier metric batches sent, the last ones taken to travel with the result",
    "result_pipe": "worker -> fit loop: result through the slot pipe",
    "chunk_end_http": "fit loop: the chunk recorded apart, when policies read the table first (FitLoop.record)",
    "completion_detection": "fit loop: Prefect train task finishes + the loop notices it",
    "plan_start": "fit loop: results handled, planning starts (after the policies, when attached)",
    "boundary_http": "fit loop: POST boundary (record the ended chunk, apply due ops, start the picked chunk)",
    "plan": "fit loop: FitLoop.plan less its request (pick runs before it, assign slots after it)",
    "dispatch": "fit loop: train task submitted and started",
    "chunk_start_http": "fit loop: POST chunk-start, when the boundary did not start the chunk",
    "task_pipe": "fit loop -> worker: task through the slot pipe (a chunk planned early: from the last one's end)",
    "setup": "worker: chunk setup before the training loop (run state, adapter switch, RNG)",
}
WORKER_WORK_STEPS = ("eval", "checkpoint")  # work the engine does at every chunk boundary by design
# Prefect's own machinery between two chunks: the train task ending and being noticed, the next one submitted and
# started.
PREFECT_STEPS = ("completion_detection", "dispatch")


# ------------------------------------------------------------------------------------------------- records


@dataclass
class CallRecord:
    started: float
    ended: float


@dataclass
class TrainCallRecord:
    slot: int
    dispatched: float
    returned: float
    train_seconds: float
    status: str


@dataclass
class PlanRecord:
    started: float
    ended: float
    tasks: list[tuple[int, int, int]]  # (slot, run_id, chunk_index)


@dataclass
class HttpRecord:
    method: str
    endpoint: str
    started: float
    seconds: float


@dataclass
class ChunkRecord:
    """Everything measured about one (run, chunk): store timeline, fit-loop clock readings, worker readings."""

    run_id: int
    chunk_index: int
    slot: int
    outcome: str
    timeline_start: float
    timeline_end: float
    train_seconds: float
    completion_noticed: float | None  # when the fit loop last learnt of a finished chunk before planning this one
    plan_start: float
    plan_end: float
    boundary_seconds: float  # the plan's one store request (record ends, apply ops, start picks)
    chunk_start_call: float | None  # None: the boundary request started the chunk
    chunk_start_return: float | None
    dispatched: float
    worker_returned: float
    chunk_end_call: float | None  # None: the next boundary request recorded the chunk
    chunk_end_return: float | None
    trainer_start: float
    trainer_end: float
    flush_end: float
    setup_seconds: float  # trainer time before the training loop (and the few bookkeeping lines after it)
    eval_seconds: float
    checkpoint_seconds: float
    base_model_seconds: float
    tokenize_seconds: float
    run_state_seconds: float
    state_source: str = ""  # "new run", "warm on this slot", "moved from another slot"
    handed_over: float | None = None  # evaluated beside the next chunk: when the worker's main thread was free

    @property
    def loop_start(self) -> float:
        return self.trainer_start + self.setup_seconds

    @property
    def loop_end(self) -> float:
        return self.loop_start + self.train_seconds


@dataclass
class Transition:
    """The non-training time on one slot between two consecutive chunks."""

    slot: int
    previous: tuple[int, int]  # (run_id, chunk_index)
    next: tuple[int, int]
    steps: dict[str, float]
    total_seconds: float  # next loop start - previous loop end
    timeline_gap_seconds: float  # next timeline start - previous timeline end (store clock readings)

    @property
    def orchestration_seconds(self) -> float:
        """Plan + dispatch + record: the whole gap less the evaluation and checkpoint work."""
        return self.total_seconds - sum(self.steps[name] for name in WORKER_WORK_STEPS)

    @property
    def prefect_seconds(self) -> float:
        """Prefect's own per-task cost inside the gap (task runs ending, starting, being submitted)."""
        return sum(self.steps[name] for name in PREFECT_STEPS)


@dataclass
class FlowProbe:
    """Clock readings taken in the fit flow's process by thin wrappers around engine methods."""

    plans: list[PlanRecord] = field(default_factory=list)
    completion_notices: list[float] = field(default_factory=list)  # the fit loop learns that chunks are done
    chunk_starts: dict[tuple[int, int], CallRecord] = field(default_factory=dict)
    chunk_ends: dict[tuple[int, int], CallRecord] = field(default_factory=dict)
    train_calls: dict[tuple[int, int], TrainCallRecord] = field(default_factory=dict)
    http_calls: list[HttpRecord] = field(default_factory=list)
    _restore: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> None:
        import flows.fit
        from rf_core.client import RFClient
        from rf_core.planner import FitLoop
        from rf_core.training.worker import SlotWorker

        probe = self
        original_train = SlotWorker.train_once
        original_chunk_start = RFClient.chunk_start
        original_chunk_end = RFClient.chunk_end
        original_request = RFClient._request
        original_plan = FitLoop.plan
        original_record = FitLoop.record
        # Where the loop learns of finished chunks: `collect(timeout) -> the chunks that ended`.
        original_detector = flows.fit._SlotsInFlight.collect

        @functools.wraps(original_train)
        def train(self: SlotWorker, task: Any) -> Any:
            dispatched = time.time()
            outcome = original_train(self, task)
            record = TrainCallRecord(self.slot, dispatched, time.time(), outcome.train_seconds, outcome.status)
            with probe._lock:
                probe.train_calls[(task.run_id, task.chunk.index)] = record
            return outcome

        @functools.wraps(original_chunk_start)
        def chunk_start(self: RFClient, experiment: str, run_id: int, chunk_index: int, *args: Any) -> int:
            started = time.time()
            timeline_id = original_chunk_start(self, experiment, run_id, chunk_index, *args)
            with probe._lock:
                probe.chunk_starts[(run_id, chunk_index)] = CallRecord(started, time.time())
            return timeline_id

        @functools.wraps(original_chunk_end)
        def chunk_end(self: RFClient, experiment: str, timeline_id: int, outcome: Any) -> Any:
            started = time.time()
            result = original_chunk_end(self, experiment, timeline_id, outcome)
            with probe._lock:
                probe.chunk_ends[(int(outcome["run_id"]), int(outcome["chunk_index"]))] = CallRecord(
                    started, time.time()
                )
            return result

        @functools.wraps(original_request)
        def request(self: RFClient, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            started = time.time()
            clock = time.perf_counter()
            try:
                return original_request(self, method, path, *args, **kwargs)
            finally:
                record = HttpRecord(method, _endpoint(path), started, time.perf_counter() - clock)
                with probe._lock:
                    probe.http_calls.append(record)

        @functools.wraps(original_plan)
        def plan(self: FitLoop, in_flight: Any, ended: Any = (), finishing: Any = ()) -> Any:
            started = time.time()
            result = original_plan(self, in_flight, ended, finishing)
            tasks = [(slot, task.run_id, task.chunk.index) for slot, task in result.tasks]
            with probe._lock:
                probe.plans.append(PlanRecord(started, time.time(), tasks))
            return result

        @functools.wraps(original_record)
        def record_apart(self: FitLoop, ended: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.time()
            result = original_record(self, ended, *args, **kwargs)
            with probe._lock:
                for chunk in ended:
                    probe.chunk_ends[(int(chunk.run_id), int(chunk.chunk_index))] = CallRecord(started, time.time())
            return result

        @functools.wraps(original_detector)
        def detector(*args: Any, **kwargs: Any) -> Any:
            result = original_detector(*args, **kwargs)
            if result[0]:  # chunks ended (not only slots that began evaluating)
                with probe._lock:
                    probe.completion_notices.append(time.time())
            return result

        SlotWorker.train_once = train  # type: ignore[method-assign]
        RFClient.chunk_start = chunk_start  # type: ignore[method-assign]
        RFClient.chunk_end = chunk_end  # type: ignore[method-assign]
        RFClient._request = request  # type: ignore[method-assign]
        FitLoop.plan = plan  # type: ignore[method-assign]
        FitLoop.record = record_apart  # type: ignore[method-assign]
        flows.fit._SlotsInFlight.collect = detector  # type: ignore[method-assign]

        def restore() -> None:
            SlotWorker.train_once = original_train  # type: ignore[method-assign]
            RFClient.chunk_start = original_chunk_start  # type: ignore[method-assign]
            RFClient.chunk_end = original_chunk_end  # type: ignore[method-assign]
            RFClient._request = original_request  # type: ignore[method-assign]
            FitLoop.plan = original_plan  # type: ignore[method-assign]
            FitLoop.record = original_record  # type: ignore[method-assign]
            flows.fit._SlotsInFlight.collect = original_detector  # type: ignore[method-assign]

        self._restore.append(restore)

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()


def _endpoint(path: str) -> str:
    """`/api/experiments/<name>/chunk-start` -> `chunk-start`; ids become `{id}`."""
    parts = [part for part in path.split("?")[0].split("/") if part]
    if len(parts) >= 3 and parts[:2] == ["api", "experiments"]:
        parts = parts[3:] or ["experiment"]
    elif parts[:1] == ["api"]:
        parts = parts[1:]
    return "/".join("{id}" if part.isdigit() else part for part in parts) or "/"


class OpSender:
    """Submits `count` IC Ops through the rf server's API during the fit, one every `interval` seconds, in turn: stop
    a run that trains or waits, resume a stopped one, clone one (warm-started from its weights every other time).
    An op the server refuses (the run moved on meanwhile) is counted, not retried; each submission is timed."""

    def __init__(self, url: str, count: int, interval: float, seed: int = 3) -> None:
        from rf_core.client import RFClient

        self.count, self.interval = count, interval
        self.submit_seconds: list[float] = []
        self.sent: dict[str, int] = {}
        self.refused = 0
        self.last_refusal: str | None = None
        self._client = RFClient(url)
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="op-sender", daemon=True)

    def __enter__(self) -> OpSender:
        if self.count:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        from rf_core.errors import InvalidRequest, NotFound

        for index in range(self.count):
            if self._stop.wait(self.interval):
                return
            kind = ("stop", "resume", "clone")[index % 3]
            try:
                runs = self._client.list_runs(EXPERIMENT)
                wanted = {"stop": ("New", "Ongoing"), "resume": ("Stopped",), "clone": ("Ongoing", "Completed")}[kind]
                candidates = [run for run in runs if run["status"] in wanted]
                if not candidates:
                    continue
                run = self._rng.choice(candidates)
                payload: dict[str, Any] = {}
                if kind == "clone":
                    payload = {"overrides": {"learning_rate": float(run["config"]["learning_rate"]) * 0.5}}
                    if index % 2 and run.get("checkpoint"):
                        payload["warm_start"] = "weights"
                started = time.perf_counter()
                self._client.submit_op(EXPERIMENT, kind, int(run["run_id"]), payload, source="api", who="bench")
                self.submit_seconds.append(time.perf_counter() - started)
                self.sent[kind] = self.sent.get(kind, 0) + 1
            except (InvalidRequest, NotFound) as refusal:  # the run moved on between the read and the op
                self.refused += 1
                self.last_refusal = str(refusal)
            except Exception as error:  # a sender must not stop the benchmark; the failure is reported
                self.refused += 1
                self.last_refusal = repr(error)

    def figures(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "refused": self.refused,
            "last_refusal": self.last_refusal,
            "submit": describe(self.submit_seconds),
        }


class PrefectApiProbe:
    """Prefect's side of the fit, through its own API from a thread of this process: every `interval` seconds the
    latency of a round trip (`hello`) and of counting the task runs (a query over a table the fit keeps growing),
    then the flow-run and task-run counts at the end (the fit's flow run and one task run per chunk)."""

    def __init__(self, interval: float = 2.0) -> None:
        from prefect import get_client

        self.interval = interval
        self.hello_seconds: list[float] = []
        self.count_seconds: list[float] = []
        self.errors = 0
        self.counts: dict[str, int] = {}
        self._client = get_client(sync_client=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefect-api-probe", daemon=True)

    def __enter__(self) -> PrefectApiProbe:
        self._client.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.counts = {
                "flow_runs": int(self._client._client.post("/flow_runs/count", json={}).json()),
                "task_runs": int(self._client._client.post("/task_runs/count", json={}).json()),
            }
        finally:
            self._client.__exit__(None, None, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                started = time.perf_counter()
                self._client.hello()
                self.hello_seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
                self._client._client.post("/task_runs/count", json={})
                self.count_seconds.append(time.perf_counter() - started)
            except Exception:  # a probe must not stop the benchmark; the count of failures is reported
                self.errors += 1

    def figures(self) -> dict[str, Any]:
        return {
            "hello": describe(self.hello_seconds),
            "count_task_runs": describe(self.count_seconds),
            "probe_errors": self.errors,
            **self.counts,
        }


class ForeignLoadMonitor:
    """CPU seconds used, while the benchmark runs, by processes that are not this one or its descendants.

    Samples /proc once a second; a process first seen after the start counts with all its CPU time, so only
    processes that start and end between two samples are missed. The benchmark shares its cores with them.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.foreign_cpu_seconds = 0.0
        self.foreign_commands: dict[str, float] = {}
        self._ticks_per_second = os.sysconf("SC_CLK_TCK")
        self._boot_time = self._read_boot_time()
        self._started = time.time()
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreign-load-monitor", daemon=True)

    def __enter__(self) -> ForeignLoadMonitor:
        self._last = {pid: cpu for pid, (_parent, cpu, _start, _name) in self._snapshot().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @staticmethod
    def _read_boot_time() -> float:
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("btime "):
                    return float(line.split()[1])
        except OSError:
            pass
        return 0.0

    def _snapshot(self) -> dict[int, tuple[int, float, float, str]]:
        """pid -> (parent pid, CPU seconds, start time, command name)."""
        processes = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / self._ticks_per_second  # utime + stime
            started = self._boot_time + int(fields[19]) / self._ticks_per_second
            processes[int(entry.name)] = (int(fields[1]), cpu, started, name)
        return processes

    def _sample(self) -> None:
        snapshot = self._snapshot()
        ours = {os.getpid()}
        changed = True
        while changed:  # descendants of this process, whatever their depth
            changed = False
            for pid, (parent, _cpu, _start, _name) in snapshot.items():
                if parent in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        for pid, (_parent, cpu, started, name) in snapshot.items():
            if pid in ours:
                self._last[pid] = cpu
                continue
            previous = self._last.get(pid, 0.0 if started >= self._started else cpu)
            if cpu > previous:
                self.foreign_cpu_seconds += cpu - previous
                self.foreign_commands[name] = self.foreign_commands.get(name, 0.0) + cpu - previous
            self._last[pid] = cpu


# ---------------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, median, p95, max and mean of seconds (None when empty)."""
    items = list(values)
    if not items:
        return {"count": 0, "median": None, "p95": None, "max": None, "mean": None}
    return {
        "count": len(items),
        "median": statistics.median(items),
        "p95": percentile(items, 0.95),
        "max": max(items),
        "mean": statistics.fmean(items),
    }


def milliseconds(value: float | int | None) -> str:
    return "n/a" if value is None else f"{1000 * value:.0f} ms"


# ---------------------------------------------------------------------------------------------- analysis


def build_chunk_records(
    timeline: list[dict[str, Any]], probe: FlowProbe, worker_records: list[dict[str, Any]]
) -> list[ChunkRecord]:
    by_chunk = {(int(row["run_id"]), int(row["chunk_index"])): row for row in worker_records}
    planned_by: dict[tuple[int, int], PlanRecord] = {}
    for plan_record in probe.plans:
        for _slot, run_id, chunk_index in plan_record.tasks:
            planned_by[(run_id, chunk_index)] = plan_record
    records = []
    for row in timeline:
        if int(row["slot"]) < 0:
            continue  # a run that failed before it could be planned: never reached a slot
        key = (int(row["run_id"]), int(row["chunk"]))
        worker, train_call = by_chunk[key], probe.train_calls[key]
        plan_record = planned_by[key]
        earlier_notices = [moment for moment in probe.completion_notices if moment <= plan_record.started]
        eval_seconds = float(worker.get("eval_seconds", 0.0))
        checkpoint_seconds = float(worker.get("checkpoint_seconds", 0.0))
        trainer_seconds = float(worker["trainer_seconds"])
        setup_seconds = trainer_seconds - train_call.train_seconds - eval_seconds - checkpoint_seconds
        handed_over = None
        if worker.get("evaluated_beside"):
            handover_seconds = float(worker.get("handover_seconds", 0.0))
            setup_seconds = float(worker["handed_seconds"]) - train_call.train_seconds - handover_seconds
            handed_over = float(worker["trainer_start"]) + float(worker["handed_seconds"])
        records.append(
            ChunkRecord(
                run_id=key[0],
                chunk_index=key[1],
                slot=int(row["slot"]),
                outcome=str(row["outcome"]),
                timeline_start=float(row["start"]),
                timeline_end=float(row["end"]),
                train_seconds=train_call.train_seconds,
                completion_noticed=max(earlier_notices) if earlier_notices else None,
                plan_start=plan_record.started,
                plan_end=plan_record.ended,
                boundary_seconds=sum(
                    call.seconds
                    for call in probe.http_calls
                    if call.endpoint == "boundary" and plan_record.started <= call.started <= plan_record.ended
                ),
                chunk_start_call=start.started if (start := probe.chunk_starts.get(key)) else None,
                chunk_start_return=start.ended if start else None,
                dispatched=train_call.dispatched,
                worker_returned=train_call.returned,
                chunk_end_call=end.started if (end := probe.chunk_ends.get(key)) else None,
                chunk_end_return=end.ended if end else None,
                trainer_start=float(worker["trainer_start"]),
                trainer_end=float(worker["trainer_end"]),
                flush_end=float(worker["flush_end"]),
                setup_seconds=setup_seconds,
                eval_seconds=eval_seconds,
                checkpoint_seconds=checkpoint_seconds,
                base_model_seconds=float(worker.get("base_model_seconds", 0.0)),
                tokenize_seconds=float(worker.get("tokenize_seconds", 0.0)),
                run_state_seconds=float(worker.get("run_state_seconds", 0.0)),
                handed_over=handed_over,
            )
        )
    records.sort(key=lambda record: record.timeline_start)
    last_slot: dict[int, int] = {}
    for record in records:
        previous_slot = last_slot.get(record.run_id)
        if record.chunk_index == 0:
            record.state_source = "new run"
        elif previous_slot == record.slot:
            record.state_source = "warm on this slot"
        else:
            record.state_source = "moved from another slot"
        last_slot[record.run_id] = record.slot
    return records


def planned_early(previous: ChunkRecord, following: ChunkRecord) -> bool:
    """The following chunk was planned before the previous one's worker answered (while it evaluated)."""
    return following.plan_end <= previous.worker_returned


def transition_between(previous: ChunkRecord, following: ChunkRecord) -> Transition:
    detected = following.completion_noticed
    recorded = previous.chunk_end_return if previous.chunk_end_return is not None else previous.worker_returned
    if detected is None or detected < recorded:
        detected = recorded  # no wait() return to tell apart: count it all as plan_start
    dispatched = following.chunk_start_call if following.chunk_start_call is not None else following.dispatched
    handed = following.chunk_start_return if following.chunk_start_return is not None else following.dispatched
    plan_start, plan_end, boundary = following.plan_start, following.plan_end, following.boundary_seconds
    if planned_early(previous, following):
        # Planned, started and sent while the previous chunk evaluated: none of it is between the two chunks.
        detected = plan_start = plan_end = dispatched = handed = recorded
        boundary = 0.0
    steps = {
        "handover": 0.0,
        "eval": previous.eval_seconds,
        "checkpoint": previous.checkpoint_seconds,
        "metric_flush": previous.flush_end - previous.trainer_end,
        "result_pipe": previous.worker_returned - previous.flush_end,
        "chunk_end_http": recorded - previous.worker_returned,
        "completion_detection": detected - recorded,
        "plan_start": plan_start - detected,
        "boundary_http": boundary,
        "plan": plan_end - plan_start - boundary,
        "dispatch": dispatched - plan_end,
        "chunk_start_http": handed - dispatched,
        "task_pipe": following.trainer_start - handed,
        "setup": following.setup_seconds,
    }
    if previous.handed_over is not None:
        # Evaluated beside the next chunk: once handed over, the worker takes up the chunk already in its pipe.
        steps = dict.fromkeys(TRANSITION_STEPS, 0.0)
        steps["handover"] = previous.handed_over - previous.loop_end
        steps["task_pipe"] = following.trainer_start - previous.handed_over
        steps["setup"] = following.setup_seconds
    return Transition(
        slot=following.slot,
        previous=(previous.run_id, previous.chunk_index),
        next=(following.run_id, following.chunk_index),
        steps=steps,
        total_seconds=following.loop_start - previous.loop_end,
        timeline_gap_seconds=following.timeline_start - previous.timeline_end,
    )


def analyse(
    records: list[ChunkRecord], probe: FlowProbe, num_slots: int, metrics: list[dict[str, Any]], steps_per_chunk: int
) -> dict[str, Any]:
    window_start = min(record.timeline_start for record in records)
    window_end = max(record.timeline_end for record in records)
    window = window_end - window_start
    by_slot = {slot: [record for record in records if record.slot == slot] for slot in range(num_slots)}
    transitions = [
        transition_between(previous, following)
        for chunks in by_slot.values()
        for previous, following in zip(chunks, chunks[1:], strict=False)
    ]
    early = sum(
        planned_early(previous, following)
        for chunks in by_slot.values()
        for previous, following in zip(chunks, chunks[1:], strict=False)
    )
    later_setups = [record.setup_seconds for chunks in by_slot.values() for record in chunks[1:]]
    typical_setup = statistics.median(later_setups) if later_setups else 0.0

    slots: dict[str, Any] = {}
    for slot, chunks in by_slot.items():
        if not chunks:
            slots[str(slot)] = {"chunks": 0}
            continue
        train_total = sum(record.train_seconds for record in chunks)
        busy_total = sum(record.timeline_end - record.timeline_start for record in chunks)
        first = chunks[0]
        first_chunk_extra = max(0.0, first.setup_seconds - typical_setup)
        slots[str(slot)] = {
            "chunks": len(chunks),
            "train_seconds": train_total,
            "busy_seconds": busy_total,
            "utilisation": train_total / window,
            "busy_fraction": busy_total / window,
            "utilisation_own_span": train_total / (chunks[-1].timeline_end - chunks[0].timeline_start),
            "utilisation_without_first_chunk_load": train_total / (window - first_chunk_extra),
            "idle_before_first_chunk_seconds": first.timeline_start - window_start,
            "idle_after_last_chunk_seconds": window_end - chunks[-1].timeline_end,
            "first_chunk_setup_seconds": first.setup_seconds,
            "first_chunk_extra_seconds": first_chunk_extra,
            "first_chunk_base_model_seconds": first.base_model_seconds,
            "first_chunk_tokenize_seconds": first.tokenize_seconds,
            "first_chunk_dispatch_to_training_seconds": first.loop_start
            - (first.chunk_start_call if first.chunk_start_call is not None else first.dispatched),
        }
    train_total = sum(record.train_seconds for record in records)

    in_task = [record.timeline_end - record.timeline_start - record.train_seconds for record in records]
    first_keys = {(chunks[0].run_id, chunks[0].chunk_index) for chunks in by_slot.values() if chunks}
    in_task_later = [
        record.timeline_end - record.timeline_start - record.train_seconds
        for record in records
        if (record.run_id, record.chunk_index) not in first_keys
    ]
    per_chunk_from_timeline = []  # gap before the chunk + its in-task overhead: the chunk's share of slot time
    for transition in transitions:
        following = next(record for record in records if (record.run_id, record.chunk_index) == transition.next)
        per_chunk_from_timeline.append(
            transition.timeline_gap_seconds
            + following.timeline_end
            - following.timeline_start
            - following.train_seconds
        )

    setup_by_source: dict[str, Any] = {}
    for source in ("new run", "warm on this slot", "moved from another slot"):
        setup_by_source[source] = describe(
            record.setup_seconds
            for record in records
            if record.state_source == source and (record.run_id, record.chunk_index) not in first_keys
        )

    http_in_window = [call for call in probe.http_calls if window_start - 1 <= call.started <= window_end]
    http_by_endpoint: dict[str, Any] = {}
    for endpoint in sorted({f"{call.method} {call.endpoint}" for call in http_in_window}):
        seconds = [call.seconds for call in http_in_window if f"{call.method} {call.endpoint}" == endpoint]
        http_by_endpoint[endpoint] = {**describe(seconds), "total": sum(seconds)}

    train_loss_rows: dict[int, int] = {}
    eval_loss_rows: dict[int, int] = {}
    for row in metrics:
        counter = {"train_loss": train_loss_rows, "eval_loss": eval_loss_rows}.get(row["name"])
        if counter is not None:
            counter[int(row["run_id"])] = counter.get(int(row["run_id"]), 0) + 1
    chunks_per_run: dict[int, int] = {}
    for record in records:
        chunks_per_run[record.run_id] = chunks_per_run.get(record.run_id, 0) + 1

    train_seconds = [record.train_seconds for record in records]
    consistency = max((abs(sum(t.steps.values()) - t.total_seconds) for t in transitions), default=0.0)
    return {
        "window_seconds": window,
        "chunks": len(records),
        "outcomes": {outcome: sum(r.outcome == outcome for r in records) for outcome in {r.outcome for r in records}},
        "chunk_train_seconds": describe(train_seconds),
        "training_steps_per_second_in_flow": steps_per_chunk / statistics.median(train_seconds),
        "utilisation": {
            "overall": train_total / (num_slots * window),
            "overall_busy_fraction": sum(s.get("busy_seconds", 0.0) for s in slots.values()) / (num_slots * window),
            "per_slot": slots,
        },
        "overhead_per_chunk": {
            "training_end_to_next_training_start": describe(t.total_seconds for t in transitions),
            "plan_dispatch_record_only": describe(t.orchestration_seconds for t in transitions),
            "planned_while_previous_evaluated": early,
            "prefect_task_machinery": describe(t.prefect_seconds for t in transitions),
            "plan_dispatch_record_less_prefect": describe(
                t.orchestration_seconds - t.prefect_seconds for t in transitions
            ),
            "steps": {name: describe(t.steps[name] for t in transitions) for name in TRANSITION_STEPS},
            "step_descriptions": TRANSITION_STEPS,
            "step_sum_mismatch_max_seconds": consistency,
        },
        "overhead_from_store_timeline": {
            "in_task_overhead_all_chunks": describe(in_task),
            "in_task_overhead_excluding_first_chunk_per_slot": describe(in_task_later),
            "between_task_gap": describe(t.timeline_gap_seconds for t in transitions),
            "per_chunk_gap_plus_in_task": describe(per_chunk_from_timeline),
        },
        "setup_by_run_state_source": setup_by_source,
        "fit_loop_http_calls": http_by_endpoint,
        "store_metrics": {
            "rows": len(metrics),
            "train_loss_rows_per_run": train_loss_rows,
            "eval_loss_rows_per_run": eval_loss_rows,
            "complete": all(
                train_loss_rows.get(run_id) == count * steps_per_chunk and eval_loss_rows.get(run_id) == count
                for run_id, count in chunks_per_run.items()
            ),
        },
        "transitions": [{**asdict(t), "orchestration_seconds": t.orchestration_seconds} for t in transitions],
        "chunk_records": [{**asdict(r), "loop_start": r.loop_start, "loop_end": r.loop_end} for r in records],
    }


# ------------------------------------------------------------------------------------------ environment


def machine_description() -> dict[str, Any]:
    cpu_model = "unknown"
    memory_gib: float | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for package in ("torch", "prefect", "duckdb", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "versions": versions,
    }


def prepare_environment(scratch: Path, runs: int, chunks: int, steps_per_chunk: int) -> Path:
    """Fresh RF_HOME and PREFECT_HOME (ephemeral Prefect), offline libraries, bench experiment sizes."""
    return isolated_environment(
        scratch,
        RF_BENCH_MODEL_CACHE=str(scratch / "models"),
        RF_BENCH_PROBE_DIR=str(scratch / "worker-probe"),
        RF_BENCH_RUNS=str(runs),
        RF_BENCH_CHUNKS=str(chunks),
        RF_BENCH_STEPS_PER_CHUNK=str(steps_per_chunk),
    )


def calibrate_steps_per_second(num_slots: int, threads: int) -> list[float]:
    """Steps/s of the bench run measured by `num_slots` processes training at the same time, one per slot."""
    command = [
        sys.executable, "-m", "bench.bench_experiment", "--calibrate",
        "--steps", str(CALIBRATION_STEPS), "--threads", str(threads),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    processes = [
        subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(num_slots)
    ]
    rates = []
    for process in processes:
        output, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"calibration failed with exit code {process.returncode}")
        rates.append(float(json.loads(output.strip().splitlines()[-1])["steps_per_second"]))
    return rates


def start_base_model_build() -> subprocess.Popen[bytes]:
    """Build the tiny base model once, outside the measured window (a subprocess: torch stays out of this one)."""
    code = (
        "import os, pathlib; from rf_core.training.models import ensure_pretrained; "
        "ensure_pretrained('rf-tiny-llama', pathlib.Path(os.environ['RF_BENCH_MODEL_CACHE']), pretrain_steps=0)"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)


def read_worker_records(probe_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(probe_dir.glob("*.jsonl")):
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return rows


# ------------------------------------------------------------------------------------------------ report


def print_summary(results: dict[str, Any]) -> None:
    settings, figures = results["settings"], results["figures"]
    utilisation = figures["utilisation"]
    overhead = figures["overhead_per_chunk"]
    total = overhead["training_end_to_next_training_start"]
    orchestration = overhead["plan_dispatch_record_only"]
    timeline = figures["overhead_from_store_timeline"]
    lines = [
        "",
        f"== orchestration benchmark: {settings['runs']} runs x {settings['chunks']} chunks on "
        f"{settings['slots']} CPU slots ({settings['threads_per_slot']} thread each)",
        f"chunk training time: median {figures['chunk_train_seconds']['median']:.2f} s "
        f"({settings['steps_per_chunk']} steps; {figures['training_steps_per_second_in_flow']:.1f} steps/s in the "
        f"flow, calibration {settings['calibrated_steps_per_second'] or 'skipped'})",
        f"window (first chunk start -> last chunk end): {figures['window_seconds']:.1f} s; fit flow call "
        f"{results['timings']['rf_fit_seconds']:.1f} s in all",
        f"slot utilisation (training / window): overall {utilisation['overall']:.1%} (target >= "
        f"{TARGET_UTILISATION:.0%}); busy (timeline) {utilisation['overall_busy_fraction']:.1%}",
    ]
    for slot, data in utilisation["per_slot"].items():
        if not data.get("chunks"):
            continue
        lines.append(
            f"  slot {slot}: {data['chunks']} chunks, training {data['utilisation']:.1%}, busy "
            f"{data['busy_fraction']:.1%}, own span {data['utilisation_own_span']:.1%}, idle after last chunk "
            f"{data['idle_after_last_chunk_seconds']:.2f} s, first-chunk extra {data['first_chunk_extra_seconds']:.2f}"
            f" s (base model {data['first_chunk_base_model_seconds']:.2f} s)"
        )
    lines += [
        f"overhead per (run, chunk), training end -> next training start on the slot (n={total['count']}): "
        f"median {milliseconds(total['median'])}, p95 {milliseconds(total['p95'])}, max {milliseconds(total['max'])}",
        f"  of which plan + dispatch + record (less eval and checkpoint): median "
        f"{milliseconds(orchestration['median'])} (target <= {milliseconds(TARGET_MEDIAN_OVERHEAD_S)}), p95 "
        f"{milliseconds(orchestration['p95'])}, max {milliseconds(orchestration['max'])}",
        f"    Prefect's own task machinery in it ({' + '.join(PREFECT_STEPS)}): "
        + _triple(overhead["prefect_task_machinery"]),
        "    plan + dispatch + record less Prefect's machinery: "
        + _triple(overhead["plan_dispatch_record_less_prefect"]),
        f"  chunks planned, started and sent while the slot's previous chunk evaluated: "
        f"{overhead['planned_while_previous_evaluated']} of {total['count']}",
        "  steps (median / p95 / max):",
    ]
    for name, description in TRANSITION_STEPS.items():
        step = overhead["steps"][name]
        lines.append(
            f"    {name:<21} {milliseconds(step['median']):>8} {milliseconds(step['p95']):>8} "
            f"{milliseconds(step['max']):>8}  {description}"
        )
    lines += [
        "store timeline view (median / p95 / max):",
        "  in-task overhead (timeline duration - train_seconds, first chunk per slot excluded): "
        + _triple(timeline["in_task_overhead_excluding_first_chunk_per_slot"]),
        "  between-task gap (previous chunk's end -> next chunk's start on the slot): "
        + _triple(timeline["between_task_gap"]),
        "  per chunk (gap before + in-task): " + _triple(timeline["per_chunk_gap_plus_in_task"]),
        "chunk setup by where the run's state came from (median): "
        + ", ".join(
            f"{source} {milliseconds(data['median'])} (n={data['count']})"
            for source, data in figures["setup_by_run_state_source"].items()
        ),
        f"store metrics: {figures['store_metrics']['rows']} rows, complete: {figures['store_metrics']['complete']}",
        f"other processes on this machine used {results['other_processes']['cpu_seconds_during_fit']:.1f} CPU s "
        f"during the fit ({results['other_processes']['cpu_share_of_machine_during_fit']:.1%} of the machine): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in results["other_processes"]["top_commands"].items()),
    ]
    ops = results.get("ops")
    if ops and results["settings"].get("ops"):
        lines.append(
            f"IC Ops during the fit: sent {ops['sent']}, refused {ops['refused']}; submission " + _triple(ops["submit"])
        )
    prefect_api = results.get("prefect_api")
    if prefect_api:
        lines.append(
            f"Prefect API through the fit (median / p95 / max): hello {_triple(prefect_api['hello'])}, counting task "
            f"runs {_triple(prefect_api['count_task_runs'])}; at the end {prefect_api.get('flow_runs')} flow runs, "
            f"{prefect_api.get('task_runs')} task runs ({prefect_api['probe_errors']} probe errors)"
        )
    print("\n".join(lines))


def _triple(stats: dict[str, Any]) -> str:
    return f"{milliseconds(stats['median'])} / {milliseconds(stats['p95'])} / {milliseconds(stats['max'])}"


# -------------------------------------------------------------------------------------------------- main


def _policy_argument(text: str) -> dict[str, Any]:
    return json.loads(text) if text.lstrip().startswith("{") else {"template": text}


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8, help="configs (runs) in the experiment")
    parser.add_argument("--chunks", type=int, default=8, help="chunks per run")
    parser.add_argument("--chunk-seconds", type=float, default=5.0, help="target training seconds per chunk")
    parser.add_argument("--slots", type=int, default=2, help="CPU slots (slot worker processes)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per slot (default: the cores shared among the slots)"
    )
    parser.add_argument(
        "--evaluate-beside",
        choices=("auto", "on", "off"),
        default="auto",
        help="evaluate each boundary beside the next chunk's training (rf_fit's evaluate_beside_training)",
    )
    parser.add_argument("--steps-per-chunk", type=int, default=None, help="skip calibration: steps per chunk")
    parser.add_argument(
        "--policy",
        action="append",
        type=_policy_argument,
        help="a policy attached to the fit, as `rf fit --policy` takes it (a template name or JSON); repeatable",
    )
    parser.add_argument("--ops", type=int, default=0, help="IC Ops submitted through the API during the fit")
    parser.add_argument("--op-interval", type=float, default=3.0, help="seconds between two of those ops")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="2 runs x 2 chunks of 5 steps: checks the script")
    parser.add_argument("--keep-files", action="store_true", help="keep the temporary RF_HOME / PREFECT_HOME")
    arguments = parser.parse_args(argv)
    if arguments.smoke:
        arguments.runs, arguments.chunks = SMOKE_RUNS, SMOKE_CHUNKS
        arguments.steps_per_chunk = arguments.steps_per_chunk or SMOKE_STEPS_PER_CHUNK
    for name in ("runs", "chunks", "slots", "threads"):
        if getattr(arguments, name) is not None and getattr(arguments, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if arguments.chunk_seconds <= 0:
        parser.error("--chunk-seconds must be > 0")
    return arguments


def run_benchmark(arguments: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    threads = arguments.threads or max(1, (os.cpu_count() or 1) // arguments.slots)  # as rf_fit sizes them
    evaluate_beside = {"auto": None, "on": True, "off": False}[arguments.evaluate_beside]
    home = prepare_environment(scratch, arguments.runs, arguments.chunks, arguments.steps_per_chunk or 1)
    calibration: list[float] = []
    started = time.time()
    model_build = None
    if arguments.steps_per_chunk is None:  # the calibration processes build the base model
        print(f"calibrating: {arguments.slots} processes x {CALIBRATION_STEPS} steps on {threads} thread(s) ...")
        calibration = calibrate_steps_per_second(arguments.slots, threads)
        steps_per_chunk = max(1, round(arguments.chunk_seconds * statistics.fmean(calibration)))
        print(f"calibration: {[round(rate, 1) for rate in calibration]} steps/s -> {steps_per_chunk} steps per chunk")
    else:
        steps_per_chunk = arguments.steps_per_chunk
        model_build = start_base_model_build()
    os.environ["RF_BENCH_STEPS_PER_CHUNK"] = str(steps_per_chunk)
    if arguments.policy:  # a policy that ranks runs should not see each run better than the last
        os.environ["RF_BENCH_SHUFFLE"] = "1"

    from rf_core.client import RFClient
    from rf_core.server_process import ensure_server, stop_server

    server_url, server_process = ensure_server(home)
    probe = FlowProbe()
    try:
        from flows.fit import rf_fit

        if model_build is not None and model_build.wait() != 0:
            raise RuntimeError(f"building the base model failed with exit code {model_build.returncode}")
        preparation_seconds = time.time() - started
        probe.install()
        load_before = os.getloadavg()
        flow_started = time.time()
        try:
            with (
                ForeignLoadMonitor() as foreign_load,
                PrefectApiProbe() as prefect_api,
                OpSender(server_url, arguments.ops, arguments.op_interval) as op_sender,
            ):
                rf_fit(
                    EXPERIMENT,
                    entrypoint=ENTRYPOINT,
                    cpu_slots=arguments.slots,
                    idle_timeout=1,
                    server_url=server_url,
                    policies=arguments.policy or None,
                    cpu_threads_per_slot=threads,
                    evaluate_beside_training=evaluate_beside,
                )
        finally:
            flow_ended = time.time()
            probe.uninstall()
        client = RFClient(server_url)
        timeline = client.timeline(EXPERIMENT)
        metrics = client.get_metrics(EXPERIMENT)
    finally:
        stop_server(server_process)

    records = build_chunk_records(timeline, probe, read_worker_records(Path(os.environ["RF_BENCH_PROBE_DIR"])))
    figures = analyse(records, probe, arguments.slots, metrics, steps_per_chunk)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "settings": {
            "runs": arguments.runs,
            "chunks": arguments.chunks,
            "slots": arguments.slots,
            "threads_per_slot": threads,
            "evaluate_beside": arguments.evaluate_beside,
            "chunk_seconds_target": arguments.chunk_seconds,
            "steps_per_chunk": steps_per_chunk,
            "calibrated_steps_per_second": [round(rate, 2) for rate in calibration] or None,
            "smoke": arguments.smoke,
            "entrypoint": ENTRYPOINT,
            "policies": arguments.policy,
            "ops": arguments.ops,
        },
        "targets": {"utilisation": TARGET_UTILISATION, "median_overhead_seconds": TARGET_MEDIAN_OVERHEAD_S},
        "timings": {
            "preparation_seconds": preparation_seconds,
            "rf_fit_seconds": flow_ended - flow_started,
            "flow_start_to_first_chunk_seconds": min(r.timeline_start for r in records) - flow_started,
            "last_chunk_to_flow_end_seconds": flow_ended - max(r.timeline_end for r in records),
        },
        "other_processes": {
            "cpu_seconds_during_fit": foreign_load.foreign_cpu_seconds,
            "cpu_share_of_machine_during_fit": foreign_load.foreign_cpu_seconds
            / ((flow_ended - flow_started) * (os.cpu_count() or 1)),
            "top_commands": dict(sorted(foreign_load.foreign_commands.items(), key=lambda item: -item[1])[:5]),
            "load_average_before": load_before,
        },
        "figures": figures,
        "prefect_api": prefect_api.figures(),
        "ops": op_sender.figures(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    scratch = Path(tempfile.mkdtemp(prefix="rf-bench-orchestration-"))
    try:
        results = run_benchmark(arguments, scratch)
    finally:
        if arguments.keep_files:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print_summary(results)
    if arguments.out is not None:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
