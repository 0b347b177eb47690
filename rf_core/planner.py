"""The fit's planner, free of Prefect and torch: apply due ops, pick runs for free slots, build train tasks.

`flows/fit.py` runs the loop and wraps these steps in Prefect tasks; everything here is testable with a fake
client.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rf_core.chunks import ChunkingError, elastic_device_counts, plan_chunks
from rf_core.config import with_defaults
from rf_core.data_forms import check_fit_data
from rf_core.experiment import ExperimentSpec
from rf_core.messages import ChunkOutcome, ChunkSpec, Gang, TrainTask, WarmStart
from rf_core.paths import run_dir
from rf_core.scheduler import Assignment, RunnableRun, assign
from rf_core.states import RunStatus

# A boundary asks only for the runs changed since the last one, less this margin (the rows a write racing that answer
# changed come again), and for the whole table at least this often.
CHANGES_MARGIN_S = 2.0
FULL_TABLE_EVERY_S = 60.0


@dataclass(frozen=True)
class EndedChunk:
    """A chunk whose training ended, not yet recorded in the store: its attempt's timeline id and its outcome."""

    run_id: int
    chunk_index: int
    attempt: int
    outcome: ChunkOutcome

    def record(self) -> dict[str, Any]:
        """What the store is sent: the attempt, its outcome and, apart, the chunk's last metric batches."""
        outcome = self.outcome.to_dict()
        return {"timeline_id": self.attempt, "outcome": outcome, "metrics": outcome.pop("metric_batches")}


@dataclass
class Plan:
    tasks: list[tuple[int, TrainTask]] = field(default_factory=list)  # (slot, task); a gang's: its rank-0 slot
    applied_ops: list[dict[str, Any]] = field(default_factory=list)
    releases: dict[int, list[int]] = field(default_factory=dict)  # slot -> runs whose warm state can go
    unplannable: dict[int, str] = field(default_factory=dict)  # run -> why it cannot train at all (it fails)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all_final(self) -> bool:
        """Every run is Completed, Failed or Deleted: nothing can train again."""
        return all(RunStatus(run["status"]).is_terminal() for run in self.runs)


class FitLoop:
    """Per-fit bookkeeping: chunk plans per run and which slot holds which run's state warm."""

    def __init__(
        self, client: Any, experiment: str, spec: ExperimentSpec, num_slots: int, home: Path, *, cuda: bool = False
    ) -> None:
        self.client = client
        self.experiment = experiment
        self.spec = spec
        self.num_slots = num_slots
        self.home = home
        self.cuda = cuda  # the slots train on CUDA devices (else on the CPU)
        self._chunk_plans: dict[int, list[ChunkSpec]] = {}
        self.warm_slots: dict[int, tuple[int, ...]] = {}  # run -> slots whose workers hold its state in memory
        self._dispatched_at: dict[int, float] = {}  # run in flight -> when its chunk was planned
        self._chunk_seconds: dict[int, list[float]] = {}  # run -> how long its chunks took, as seen from here
        self._overall_seconds: float | None = None  # their mean over every run, computed when first needed
        self._data_problems: dict[tuple[str, str | None], str | None] = {}  # (trainer type, formatting) -> why not
        self._runs: list[dict[str, Any]] | None = None  # the runs table as the last planning step saw it
        self._as_of: float | None = None  # the store's clock when it answered that step
        self._full_table_at = 0.0  # when the whole table was last asked for (time.monotonic)

    def chunk_plan(self, run: Mapping[str, Any]) -> list[ChunkSpec]:
        run_id = int(run["run_id"])
        if run_id not in self._chunk_plans:
            rows = self.spec.num_train_rows(run["config"])
            self._chunk_plans[run_id] = plan_chunks(rows, run["config"], self.spec.num_chunks)
        return self._chunk_plans[run_id]

    def _data_problem(self, config: Mapping[str, Any]) -> str | None:
        """Why the data does not fit a run of this trainer type and formatting function (a clone may have switched
        either), checked once per pair, before any worker tries; None when it fits."""
        key = (str(config.get("trainer_type") or "sft"), config.get("formatting_func"))
        if key not in self._data_problems:
            _, functions = self.spec.named_configs()
            try:
                check_fit_data(self.spec.train_dataset, self.spec.eval_dataset, [config], functions)
                self._data_problems[key] = None
            except ValueError as exc:
                self._data_problems[key] = str(exc)
        return self._data_problems[key]

    def plan(
        self, in_flight: Mapping[int, int], ended: Sequence[EndedChunk] = (), finishing: Collection[int] = ()
    ) -> Plan:
        """One planning step at a boundary. `in_flight` maps busy slots to the run each is training; `ended` are the
        chunks that finished since the last step, recorded by this step's one request; `finishing`: runs whose chunk
        is still on a slot that is free to plan (evaluating): neither picked nor given their ops yet.

        The runs for the free slots are picked before the request, from the runs table as the last step left it
        with the ended chunks' progress added, and started by the same request if they still may (the boundary's
        ops apply first). A slot whose pick is refused, or that no pick was made for, is planned again on the
        table the request returned, and its chunk's start is recorded when it is dispatched.
        """
        busy_runs = set(in_flight.values()) | set(finishing)
        now = time.monotonic()
        self._note_finished(busy_runs, now)
        predicted = _runs_after(self._runs or [], ended)
        # The first step has no table yet: every chunk it plans records its start when dispatched.
        picks = self._assign(self._runnable(predicted, busy_runs, None), in_flight, now) if self._runs else []
        predicted_by_id = {int(run["run_id"]): run for run in predicted}
        starts = [
            {
                "run_id": pick.run_id,
                "chunk_index": int(predicted_by_id[pick.run_id].get("chunks_done") or 0),
                "slot": pick.slot,
                "total_chunks": len(self.chunk_plan(predicted_by_id[pick.run_id])),
            }
            for pick in picks
        ]
        view = self.client.boundary_view(
            self.experiment,
            sorted(busy_runs),
            ended=[chunk.record() for chunk in ended],
            starts=starts,
            since=(since := self._changes_since(now)),
        )
        plan = Plan(applied_ops=view["applied_ops"], runs=self._merge(view, partial=since is not None))
        started: dict[int, int] = view.get("started") or {}
        accepted = [pick for pick in picks if pick.run_id in started]
        taken = dict(in_flight)
        for pick in accepted:
            taken.update(dict.fromkeys(pick.slots, pick.run_id))
        runnable = self._runnable(plan.runs, busy_runs | set(taken.values()), plan)
        by_id = {int(run["run_id"]): run for run in plan.runs}
        pinned = _pinned_steps(plan.runs)
        for assignment in accepted + self._assign(runnable, taken, now):
            run = by_id[assignment.run_id]
            for slot in self.warm_slots.get(assignment.run_id, ()):
                if slot not in assignment.slots:
                    # The state moves to other workers: the old copy must not be used again.
                    plan.releases.setdefault(slot, []).append(assignment.run_id)
            self.warm_slots[assignment.run_id] = assignment.slots
            self._dispatched_at[assignment.run_id] = now
            task = self.train_task(run, pinned.get(assignment.run_id, ()), assignment)
            if assignment.run_id in started:
                task = dataclasses.replace(task, attempt=started[assignment.run_id])
            plan.tasks.append((assignment.slot, task))
        return plan

    def _changes_since(self, now: float) -> float | None:
        """Ask only for the rows changed since the last answer (with a margin for writes it may have raced), and
        for the whole table now and then."""
        if self._runs is None or self._as_of is None or now - self._full_table_at >= FULL_TABLE_EVERY_S:
            self._full_table_at = now
            return None
        return self._as_of - CHANGES_MARGIN_S

    def _merge(self, view: Mapping[str, Any], partial: bool) -> list[dict[str, Any]]:
        """The runs table after a boundary: the whole table it sent, or the rows it sent (`partial`) in place of
        the ones kept from earlier answers."""
        merged = {int(run["run_id"]): run for run in self._runs or []} if partial else {}
        merged.update({int(run["run_id"]): run for run in view["runs"]})
        self._runs = [merged[run_id] for run_id in sorted(merged)]
        self._as_of = view.get("as_of")
        return self._runs

    def _runnable(self, runs: Sequence[Mapping[str, Any]], busy_runs: set[int], plan: Plan | None) -> list[RunnableRun]:
        """The runs that may train their next chunk now. With a `plan` (the runs as the store has them now), runs
        that can no longer train free their warm slots, and runs that can never train are reported unplannable."""
        runnable: list[RunnableRun] = []
        for run in runs:
            run_id = int(run["run_id"])
            status = RunStatus(run["status"])
            if not status.is_trainable():
                if plan is not None:
                    for slot in self.warm_slots.pop(run_id, ()):
                        plan.releases.setdefault(slot, []).append(run_id)
                continue
            if run_id in busy_runs:
                continue
            devices = int(run["config"].get("num_devices", 1))
            problem = self._why_unplannable(run, devices)
            if problem is None:
                try:
                    chunks = self.chunk_plan(run)
                except (ChunkingError, ValueError) as exc:
                    problem = f"cannot split run {run_id} into chunks: {exc}"
            if problem is not None:
                if plan is not None:
                    plan.unplannable[run_id] = problem
                continue
            done = int(run.get("chunks_done") or 0)
            if done < len(chunks):
                runnable.append(
                    RunnableRun(
                        run_id,
                        done,
                        len(chunks),
                        self._preferred_slot(run),
                        devices,
                        self._expected_seconds(run_id),
                        elastic_device_counts(run["config"], self.num_slots),
                    )
                )
        return runnable

    def _why_unplannable(self, run: Mapping[str, Any], devices: int) -> str | None:
        run_id = int(run["run_id"])
        if devices > self.num_slots:
            return (
                f"run {run_id} needs {devices} devices (num_devices) but this fit has {self.num_slots} "
                "slots: clone it with fewer, or continue the experiment with more slots"
            )
        if not self.spec.allows(run["config"]):
            return (
                f"run {run_id} has model_kwargs.trust_remote_code=true, which runs code from the model's "
                "repository; this experiment did not opt in (run_fit(..., trust_remote_code=True))"
            )
        if run["config"].get("fp16") and not self.cuda:
            return (
                f"run {run_id} has fp16=true but this fit's slots are CPUs: float16 training needs a CUDA "
                "device (as in HF's Trainer); clone it with bf16=true, which trains on the CPU"
            )
        data_problem = self._data_problem(run["config"])
        if data_problem is not None:
            return f"run {run_id} cannot train on this experiment's data: {data_problem}"
        return None

    def _assign(self, runnable: Sequence[RunnableRun], in_flight: Mapping[int, int], now: float) -> list[Assignment]:
        """`scheduler.assign` over the slots not in `in_flight`, told how long each busy slot should stay busy."""
        free_slots = [slot for slot in range(self.num_slots) if slot not in in_flight]
        if not free_slots or not runnable:
            return []
        busy_for = {
            slot: (self._expected_seconds(run_id) or 0.0) - (now - self._dispatched_at.get(run_id, now))
            for slot, run_id in in_flight.items()
        }
        return assign(runnable, free_slots, busy_for)

    def _note_finished(self, busy_runs: set[int], now: float) -> None:
        """Runs planned earlier and no longer in flight have finished a chunk: learn how long it took."""
        for run_id in [run_id for run_id in self._dispatched_at if run_id not in busy_runs]:
            seconds = now - self._dispatched_at.pop(run_id)
            history = self._chunk_seconds.setdefault(run_id, [])
            history.append(seconds)
            del history[:-5]  # recent chunks only: a run's chunks change length when its data or batch does
            self._overall_seconds = None

    def _expected_seconds(self, run_id: int) -> float | None:
        """A run's next chunk length: its recent mean, else the mean over all runs; None before any chunk ended."""
        own = self._chunk_seconds.get(run_id)
        if own:
            return statistics.fmean(own)
        if self._overall_seconds is None and self._chunk_seconds:  # once per change, not once per run planned
            self._overall_seconds = statistics.fmean(
                seconds for history in self._chunk_seconds.values() for seconds in history
            )
        return self._overall_seconds

    def _preferred_slot(self, run: Mapping[str, Any]) -> int | None:
        """Where the run's state is warm; for a warm clone's first chunk, where its parent's is."""
        run_id = int(run["run_id"])
        if run_id in self.warm_slots:
            return self.warm_slots[run_id][0]
        if int(run.get("chunks_done") or 0) == 0 and _is_warm_clone(run):
            parent_slots = self.warm_slots.get(int(run["parent_id"]))
            return parent_slots[0] if parent_slots else None
        return None

    def train_task(
        self, run: Mapping[str, Any], pinned_steps: tuple[int, ...] = (), assignment: Assignment | None = None
    ) -> TrainTask:
        run_id = int(run["run_id"])
        done = int(run.get("chunks_done") or 0)
        chunk = self.chunk_plan(run)[done]
        warm = None
        if done == 0 and _is_warm_clone(run):
            warm = WarmStart(
                parent_run_id=int(run["parent_id"]),
                parent_checkpoint=str(run["warm_start_checkpoint"]),
                parent_step=int(run.get("parent_step") or 0),
                mode=run["warm_start"],
            )
        return TrainTask(
            experiment=self.experiment,
            run_id=run_id,
            config=with_defaults(run["config"]),
            chunk=chunk,
            run_dir=str(run_dir(self.experiment, run_id, self.home)),
            seed=self.spec.seed,
            warm_start=warm,
            metric=self.spec.metric,
            mode=self.spec.mode,
            keep_checkpoints=self.spec.keep_checkpoints,
            pinned_steps=pinned_steps,
            gang=_gang(run["config"], assignment.slots if assignment else (0,)),
        )

    def record(self, ended: Sequence[EndedChunk]) -> None:
        """Record ended chunks on their own, before the planning step (policies read the table in between). The run
        rows the store answers replace the loop's, so the next step picks from the progress just recorded."""
        for chunk in ended:
            record = chunk.record()
            for batch in record["metrics"]:
                self.client.log_metrics(batch["batch_id"], batch["rows"])
            run = self.client.chunk_end(self.experiment, record["timeline_id"], record["outcome"])
            if self._runs is not None and isinstance(run, Mapping) and "run_id" in run:
                self._runs = [run if int(row["run_id"]) == int(run["run_id"]) else row for row in self._runs]

    def forget(self, run_id: int) -> None:
        """The run's worker died or failed: its warm copy, if any, is gone."""
        self.warm_slots.pop(run_id, None)


def _runs_after(runs: Sequence[Mapping[str, Any]], ended: Sequence[EndedChunk]) -> list[dict[str, Any]]:
    """The runs table as it will be once the ended chunks are recorded, as far as picking runs goes: a chunk that
    counts moves its run on by one; a run whose chunk failed or ended it is left out (it is not picked)."""
    outcomes = {chunk.run_id: chunk for chunk in ended}
    predicted = []
    for run in runs:
        chunk = outcomes.get(int(run["run_id"]))
        if chunk is None:
            predicted.append(dict(run))
        elif chunk.outcome.status == "ok":
            predicted.append({**run, "chunks_done": chunk.chunk_index + 1})
    return predicted


def _gang(config: Mapping[str, Any], slots: Sequence[int]) -> Gang | None:
    """The gang a run trains in on these slots; None when it trains alone in one process."""
    strategy = config.get("strategy", "ddp")
    if len(slots) == 1 and strategy != "deepspeed":
        return None
    # The rendezvous address is picked just before the chunk, by rank 0's worker on its own machine.
    return Gang(rank=0, world_size=len(slots), address="", slots=tuple(slots), strategy=strategy)


def _is_warm_clone(run: Mapping[str, Any]) -> bool:
    return run.get("warm_start") not in (None, "", "off") and run.get("parent_id") is not None


def _pinned_steps(runs: list[dict[str, Any]]) -> dict[int, tuple[int, ...]]:
    """Per parent run, the checkpoint steps its not-yet-started warm clones will start from: never pruned."""
    pinned: dict[int, set[int]] = {}
    for run in runs:
        if (
            _is_warm_clone(run)
            and int(run.get("chunks_done") or 0) == 0
            and RunStatus(run["status"]) != RunStatus.DELETED
            and run.get("parent_step") is not None
        ):
            pinned.setdefault(int(run["parent_id"]), set()).add(int(run["parent_step"]))
    return {run_id: tuple(sorted(steps)) for run_id, steps in pinned.items()}
