"""Policies: IC Op templates. A policy reads a frozen experiment snapshot and returns the ops it wants, each with
a reason; it never does I/O and never touches the store.

    class StopAboveFive(Policy):
        name = "stop-above-five"

        def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
            return [
                Stop(run.run_id, f"{snapshot.metric} {point.value:.3g} > 5")
                for run in snapshot.trainable()
                if (point := run.latest(snapshot.metric)) and point.value > 5
            ]

The engine runs a policy at chunk boundaries (inside the fit flow) or on a schedule (a Prefect deployment), and
submits what it returns through the same validation as a user's ops, with source "policy:<name>". A policy acts on
a run at most once per chunk boundary and kind of decision (a verdict, stop or promote; a clone; a resume; a
delete): the store records every such key it acted on, and a second op for the same key is dropped, so a scheduled
policy can tick as often as it likes.

Built-in templates (`TEMPLATES`) take the metric name and its direction as parameters (default: the
experiment's own metric and mode); min/max becomes a sign once, so every ranking below maximises a score.
Ranking ties go to the older run (the lower run id ranks higher), so decisions are deterministic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from rf_core.paths import check_name
from rf_core.states import METRIC_MODES, PROMOTE, WARM_START_MODES, OpKind, RunStatus, Verdict, op_result

__all__ = [
    "TEMPLATES",
    "AnyOf",
    "AsyncSuccessiveHalving",
    "Budget",
    "CloneModify",
    "Delete",
    "ExperimentSnapshot",
    "Hyperband",
    "MedianStopping",
    "MetricPoint",
    "NoopPolicy",
    "Patient",
    "PercentileStopping",
    "Policy",
    "PolicyOp",
    "PopulationBasedTraining",
    "Promote",
    "Resume",
    "RunView",
    "Stop",
    "StopBottomFraction",
    "SuccessiveHalving",
    "build_policy",
    "illegal_op_problems",
]

# -- the snapshot a policy reads ----------------------------------------------------------------------------

# A policy's own past verdicts on a run, by chunk boundary (RunView.rung_verdicts).
PROMOTED = "promoted"  # the policy let the run go on past a rung: final
STOPPED = "stopped"  # the policy stopped the run there (whatever became of the op): it never judges the run again


@dataclass(frozen=True)
class MetricPoint:
    """A metric's last value in a chunk: `boundary` is the run's chunks_done once that chunk ended."""

    boundary: int
    step: int
    value: float


@dataclass(frozen=True)
class RunView:
    """One run as a policy sees it. `config` and `metrics` are read-only mappings."""

    run_id: int
    status: RunStatus
    config: Mapping[str, Any]
    chunks_done: int = 0
    total_chunks: int | None = None
    step: int = 0
    source: str = "initial"
    parent_id: int | None = None
    parent_step: int | None = None
    has_checkpoint: bool = False
    pending_ops: tuple[str, ...] = ()  # kinds of the run's queued ops, in order
    metrics: Mapping[str, tuple[MetricPoint, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # This policy's own past verdicts on the run, boundary -> PROMOTED | STOPPED, read from its decision records.
    rung_verdicts: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def boundary(self) -> int:
        """The chunk boundary the run is at (or training from): its chunks done."""
        return self.chunks_done

    @property
    def is_trainable(self) -> bool:
        """New or Ongoing, with no Stop or Delete queued: the run will train again unless someone acts."""
        return self.status.is_trainable() and not ({"stop", "delete"} & set(self.pending_ops))

    @property
    def has_chunks_left(self) -> bool:
        return self.total_chunks is None or self.chunks_done < self.total_chunks

    def points(self, metric: str) -> tuple[MetricPoint, ...]:
        return self.metrics.get(metric, ())

    def value_at(self, metric: str, boundary: int) -> float | None:
        """The metric's value at a chunk boundary (the last one logged in the chunk that ended there)."""
        for point in self.points(metric):
            if point.boundary == boundary:
                return point.value
        return None

    def latest(self, metric: str) -> MetricPoint | None:
        points = self.points(metric)
        return points[-1] if points else None

    def allows(self, kind: OpKind | str) -> bool:
        """The state table allows `kind` once the run's queued ops have applied."""
        status: RunStatus | None = self.status
        for pending in self.pending_ops:
            status = op_result(status, pending) or status
        return op_result(status, kind) is not None


@dataclass(frozen=True)
class ExperimentSnapshot:
    """An experiment at one moment: every run (Deleted ones included, so policies can see them gone)."""

    experiment: str
    metric: str
    mode: str
    num_chunks: int
    created_at: float
    now: float
    runs: tuple[RunView, ...]

    def __post_init__(self) -> None:
        if self.mode not in METRIC_MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode=}")

    def run(self, run_id: int) -> RunView | None:
        return next((run for run in self.runs if run.run_id == run_id), None)

    def alive(self) -> list[RunView]:
        """Runs that count in a ranking: not Deleted, not Failed."""
        return [run for run in self.runs if run.status not in (RunStatus.DELETED, RunStatus.FAILED)]

    def trainable(self) -> list[RunView]:
        return [run for run in self.runs if run.is_trainable]

    @classmethod
    def from_api(
        cls,
        snapshot: Mapping[str, Any],
        metric_rows: Iterable[Mapping[str, Any]],
        now: float,
        decisions: Iterable[Mapping[str, Any]] = (),
    ) -> ExperimentSnapshot:
        """Build from the server's snapshot (`include_deleted`), metric rows (run_id, step, name, value, chunk) and
        the policy's own decision records (run_id, boundary, kind), which become each run's `rung_verdicts`."""
        experiment = snapshot["experiment"]
        verdicts: dict[int, dict[int, str]] = {}
        for decision in decisions:
            verdict = {PROMOTE: PROMOTED, OpKind.STOP.value: STOPPED}.get(str(decision.get("kind")))
            if verdict is not None:
                verdicts.setdefault(int(decision["run_id"]), {})[int(decision["boundary"])] = verdict
        by_run: dict[int, dict[str, dict[int, MetricPoint]]] = {}
        for row in metric_rows:
            value, chunk = row.get("value"), row.get("chunk")
            if value is None or chunk is None or not math.isfinite(float(value)):
                continue  # a metric outside any chunk, or a diverged one, ranks nothing
            per_boundary = by_run.setdefault(int(row["run_id"]), {}).setdefault(str(row["name"]), {})
            point = MetricPoint(int(chunk) + 1, int(row["step"]), float(value))
            earlier = per_boundary.get(point.boundary)
            if earlier is None or point.step >= earlier.step:
                per_boundary[point.boundary] = point
        runs = []
        for run in snapshot["runs"]:
            run_id = int(run["run_id"])
            metrics = {
                name: tuple(points[boundary] for boundary in sorted(points))
                for name, points in by_run.get(run_id, {}).items()
            }
            runs.append(
                RunView(
                    run_id=run_id,
                    status=RunStatus(run["status"]),
                    config=frozen(run["config"]),
                    chunks_done=int(run.get("chunks_done") or 0),
                    total_chunks=run.get("total_chunks"),
                    step=int(run.get("step") or 0),
                    source=str(run.get("source") or "initial"),
                    parent_id=run.get("parent_id"),
                    parent_step=run.get("parent_step"),
                    has_checkpoint=bool(run.get("checkpoint")),
                    pending_ops=tuple(run.get("pending_op_kinds") or ()),
                    metrics=MappingProxyType(metrics),
                    rung_verdicts=MappingProxyType(verdicts.get(run_id, {})),
                )
            )
        return cls(
            experiment=str(experiment["name"]),
            metric=str(experiment["metric"]),
            mode=str(experiment["mode"]),
            num_chunks=int(experiment["num_chunks"]),
            created_at=float(experiment["created_at"]),
            now=float(now),
            runs=tuple(sorted(runs, key=lambda view: view.run_id)),
        )


_PLAIN = frozenset({str, int, float, bool, type(None)})


def frozen(value: Any) -> Any:
    """JSON data made read-only (mappings become mapping proxies, lists tuples); a mapping proxy is taken as
    frozen already, so a config frozen once (`PolicyReader` does it per run changed) is not walked again."""
    if type(value) in _PLAIN:  # most of a config; the ABC checks below cost more than the freezing
        return value
    if type(value) is MappingProxyType:
        return value
    if isinstance(value, Mapping):
        return MappingProxyType({key: frozen(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(frozen(item) for item in value)
    return value


def _thawed(value: Any) -> Any:
    """A frozen config value as plain JSON data again (for a clone's overrides)."""
    if isinstance(value, Mapping):
        return {key: _thawed(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thawed(item) for item in value]
    return value


# -- ops a policy returns -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyOp:
    """An op a policy wants, on `run_id`, and why. Submitted exactly like a user's op (a `Promote` queues none).

    `boundary` is the chunk boundary the decision is about, which keys "at most once per (policy, run,
    boundary)"; None means the run's current one. A template that judges runs at a fixed boundary (a rung) names
    it, so a run a person resumes after the policy stopped it is not stopped again for the same verdict.
    """

    kind: ClassVar[OpKind | Verdict]
    run_id: int
    reason: str
    boundary: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, int) or isinstance(self.run_id, bool):
            raise ValueError(f"run_id must be an integer, got {self.run_id=}")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError(f"every policy op needs a reason, got {self.reason=}")
        if self.boundary is not None and (not isinstance(self.boundary, int) or self.boundary < 0):
            raise ValueError(f"boundary must be a chunk boundary (an integer >= 0) or None, got {self.boundary=}")

    def payload(self) -> dict[str, Any] | None:
        return None

    def describe(self) -> str:
        return f"{self.kind.value} run {self.run_id}"


@dataclass(frozen=True)
class Stop(PolicyOp):
    kind: ClassVar[OpKind] = OpKind.STOP


@dataclass(frozen=True)
class Resume(PolicyOp):
    kind: ClassVar[OpKind] = OpKind.RESUME


@dataclass(frozen=True)
class Delete(PolicyOp):
    kind: ClassVar[OpKind] = OpKind.DELETE


@dataclass(frozen=True)
class Promote(PolicyOp):
    """A rung template's verdict that the run goes on past the rung at `boundary` (required). No op is queued:
    the verdict is recorded so that it is final, and comes back in the run's `rung_verdicts`."""

    kind: ClassVar[Verdict] = Verdict.PROMOTE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.boundary is None:
            raise ValueError("a promotion names the rung's chunk boundary it is about")

    def describe(self) -> str:
        return f"promote run {self.run_id} past chunk {self.boundary}"


@dataclass(frozen=True)
class CloneModify(PolicyOp):
    """Clone `run_id` (the parent) with `overrides` (a value may be a tagged knob such as {"$list": [...]}, which
    makes one clone per value), optionally warm-started from the parent's weights."""

    kind: ClassVar[OpKind] = OpKind.CLONE
    overrides: Mapping[str, Any] = field(default_factory=dict)
    warm_start: str = "off"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warm_start not in WARM_START_MODES:
            raise ValueError(f"warm_start must be one of {WARM_START_MODES}, got {self.warm_start=}")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a mapping of knob -> value, got {self.overrides=}")

    def payload(self) -> dict[str, Any]:
        return {"overrides": _thawed(self.overrides), "warm_start": self.warm_start}

    def describe(self) -> str:
        changes = ", ".join(f"{key}={value!r}" for key, value in self.overrides.items()) or "no changes"
        warm = "" if self.warm_start == "off" else f", warm-started ({self.warm_start})"
        return f"clone run {self.run_id} with {changes}{warm}"


def illegal_op_problems(snapshot: ExperimentSnapshot, op: PolicyOp) -> list[str]:
    """Why `op` cannot be queued on the snapshot's state (the server re-checks); empty when it can."""
    run = snapshot.run(op.run_id)
    if run is None:
        return [f"experiment {snapshot.experiment} has no run {op.run_id}"]
    if isinstance(op, Promote):
        return []  # a verdict, not an op: nothing in the run's state can forbid it
    if not run.allows(op.kind):
        queued = f" once its queued {', '.join(run.pending_ops)} apply" if run.pending_ops else ""
        return [f"cannot {op.kind.value} run {op.run_id}: it is {run.status.value}{queued}"]
    if isinstance(op, CloneModify) and op.warm_start != "off" and not run.has_checkpoint:
        if run.status != RunStatus.ONGOING:
            return [f"run {op.run_id} has no trained state to warm-start a clone from"]
    return []


# -- the interface ------------------------------------------------------------------------------------------


class Policy(ABC):
    """Decides IC Ops from an experiment snapshot. Subclasses implement `decide` and nothing else is required.

    `decide` must be a pure function of the snapshot: no I/O, no store, no clock (the snapshot carries `now`),
    no mutable state kept between calls (the engine may call it again with the same snapshot, or run it in
    another process). It must not change the snapshot (it is frozen anyway).
    """

    name: str = "policy"

    @abstractmethod
    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        """The ops to submit now, each with its reason; an empty list means nothing to do."""

    def decisions(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        """What the engine asks for: `decide` on the whole snapshot (a policy that ranks runs by a metric decides
        per trainer type instead; see `_MetricPolicy`)."""
        return self.decide(snapshot)

    def metric_names(self, experiment_metric: str) -> frozenset[str]:
        """Metrics whose histories the snapshot must carry for this policy."""
        return frozenset({experiment_metric})

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Policy:
        """Build from JSON parameters (`rf policy apply --param`, deployments); unknown names are an error."""
        return _construct(cls, params)


class NoopPolicy(Policy):
    """Does nothing: the neutral element for combinators and a baseline in tests."""

    name = "noop"

    def __init__(self, *, name: str = "noop") -> None:
        self.name = _policy_name(name)

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        return []


class _MetricPolicy(Policy):
    """A policy that ranks runs by one metric: `metric`/`mode` default to the experiment's own."""

    def __init__(self, *, metric: str | None, mode: str | None, name: str) -> None:
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ValueError(f"metric must be a metric name, got {metric=}")
        if mode is not None and mode not in METRIC_MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {mode=}")
        self.metric = metric
        self.mode = mode
        self.name = _policy_name(name)

    def metric_names(self, experiment_metric: str) -> frozenset[str]:
        return frozenset({self.metric or experiment_metric})

    def decisions(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        """`decide` once per trainer type, on its runs alone: a DPO run's eval_loss is not an SFT run's, so runs
        are ranked only against runs whose metric means the same; each reason says which group was ranked."""
        groups = trainer_type_groups(snapshot)
        if len(groups) <= 1:
            return self.decide(snapshot)
        ops: list[PolicyOp] = []
        for trainer_type, runs in groups.items():
            group = dataclasses.replace(snapshot, runs=runs)
            label = f"among the {len(runs)} {trainer_type} runs"
            ops += [_with_reason(op, f"{label}: {op.reason}") for op in self.decide(group)]
        return ops

    def _metric(self, snapshot: ExperimentSnapshot) -> str:
        return self.metric or snapshot.metric

    def _sign(self, snapshot: ExperimentSnapshot) -> float:
        """+1 when higher is better, -1 when lower is: score = sign * value is always maximised."""
        return 1.0 if (self.mode or snapshot.mode) == "max" else -1.0

    def _ranked(self, snapshot: ExperimentSnapshot, values: Mapping[int, float]) -> list[int]:
        """Run ids best first; ties go to the lower run id."""
        sign = self._sign(snapshot)
        return sorted(values, key=lambda run_id: (-sign * values[run_id], run_id))

    def _direction(self, snapshot: ExperimentSnapshot) -> str:
        return "lower is better" if self._sign(snapshot) < 0 else "higher is better"


# -- templates ----------------------------------------------------------------------------------------------


class StopBottomFraction(_MetricPolicy):
    """Once every run still training has done `after_chunks` chunks, stop the bottom `fraction` of the runs that
    reached that boundary, ranked by the metric there (runs that stopped or completed earlier rank, but only
    runs that would train on are stopped).

    Args:
        fraction: share of the ranked runs to stop, rounded down; 0 < fraction < 1.
        after_chunks: the chunk boundary to rank at (>= 1).
        min_runs: rank only when at least this many runs have a value there.
    """

    def __init__(
        self,
        fraction: float = 0.5,
        after_chunks: int = 1,
        *,
        min_runs: int = 2,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "stop-bottom-fraction",
    ) -> None:
        super().__init__(metric=metric, mode=mode, name=name)
        if not _is_finite_number(fraction) or not 0 < fraction < 1:
            raise ValueError(f"fraction must be a number between 0 and 1 (exclusive), got {fraction=}")
        _check_int("after_chunks", after_chunks, 1)
        _check_int("min_runs", min_runs, 2)
        self.fraction, self.after_chunks, self.min_runs = float(fraction), after_chunks, min_runs

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        metric, boundary = self._metric(snapshot), self.after_chunks
        if any(run.chunks_done < boundary for run in snapshot.trainable()):
            return []  # the cohort is not complete yet: ranking now would judge the fast runs alone
        values = _values_at(snapshot.alive(), metric, boundary)
        if len(values) < self.min_runs:
            return []
        ranked = self._ranked(snapshot, values)
        cut = len(ranked) - math.floor(self.fraction * len(ranked))
        ops: list[PolicyOp] = []
        for rank, run_id in enumerate(ranked[cut:], start=cut + 1):
            run = snapshot.run(run_id)
            if run is not None and run.is_trainable and run.allows(OpKind.STOP):
                reason = (
                    f"{metric} {values[run_id]:.4g} at chunk {boundary} ranks {rank} of {len(ranked)} "
                    f"({self._direction(snapshot)}): in the bottom {self.fraction:.0%}"
                )
                ops.append(Stop(run_id, reason, boundary))
        return ops


class _RungVerdicts:
    """A rung template's verdicts: the ones recorded earlier (each run's `rung_verdicts`) and the ones it decides
    in this call, which later rungs in the same call read as if recorded."""

    def __init__(self) -> None:
        self.decided: dict[tuple[int, int], str] = {}
        self.ops: list[PolicyOp] = []

    def of(self, run: RunView, rung: int) -> str | None:
        return self.decided.get((run.run_id, rung)) or run.rung_verdicts.get(rung)

    def stopped_before(self, run: RunView, rung: int) -> bool:
        recorded = any(verdict == STOPPED and boundary < rung for boundary, verdict in run.rung_verdicts.items())
        return recorded or any(
            verdict == STOPPED and run_id == run.run_id and boundary < rung
            for (run_id, boundary), verdict in self.decided.items()
        )

    def promote(self, run: RunView, rung: int, reason: str) -> None:
        self.decided[(run.run_id, rung)] = PROMOTED
        self.ops.append(Promote(run.run_id, reason, rung))

    def stop(self, run: RunView, rung: int, reason: str) -> None:
        self.decided[(run.run_id, rung)] = STOPPED
        self.ops.append(Stop(run.run_id, reason, rung))


class _RungPolicy(_MetricPolicy):
    """Rungs at chunk boundaries min_chunks * eta**k. A rung's pool is the previous rung's survivors (every run for
    the first rung); a run the policy stopped is never judged or ranked again, whatever becomes of it (a person may
    resume it: it then trains on outside the policy's rungs); a promotion is recorded and final."""

    def __init__(self, eta: int, min_chunks: int, *, metric: str | None, mode: str | None, name: str) -> None:
        super().__init__(metric=metric, mode=mode, name=name)
        _check_int("eta", eta, 2)
        _check_int("min_chunks", min_chunks, 1)
        self.eta, self.min_chunks = eta, min_chunks

    def _in_pool(self, run: RunView, rungs: Sequence[int], k: int, verdicts: _RungVerdicts) -> bool:
        """The run reached rung k through the rungs before it."""
        if run.status in (RunStatus.DELETED, RunStatus.FAILED) or verdicts.stopped_before(run, rungs[k]):
            return False
        return k == 0 or verdicts.of(run, rungs[k - 1]) == PROMOTED

    @staticmethod
    def _can_go_on(run: RunView, rung: int) -> bool:
        """Would train past the rung unless stopped: only such runs compete for a rung's places."""
        return run.is_trainable and (run.total_chunks is None or run.total_chunks > rung)


class SuccessiveHalving(_RungPolicy):
    """Synchronous successive halving (Jamieson & Talwalkar, 2016) over rungs at chunk boundaries
    min_chunks * eta**k. A rung closes when every run in its pool that still trains has reached it; the runs
    ranked there keep the top floor(n / eta) places (at least one; ties go to the older run), the rest stop.

    The pool of a rung is the previous rung's survivors. A survivor that finished its chunks while the rung was
    filling ranks there like the others (its place is spent: it has nothing left to train); a run a person
    stopped does not rank. A run that reaches a rung after it closed (a clone added later) goes on only if it
    ranks above the worst run promoted there.

    Args:
        eta: reduction factor (>= 2).
        min_chunks: the first rung's boundary (>= 1).
    """

    def __init__(
        self,
        eta: int = 2,
        min_chunks: int = 1,
        *,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "successive-halving",
    ) -> None:
        super().__init__(eta, min_chunks, metric=metric, mode=mode, name=name)

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        verdicts = _RungVerdicts()
        self._halve(snapshot, snapshot.runs, self.min_chunks, verdicts, "successive halving")
        return verdicts.ops

    def _halve(
        self,
        snapshot: ExperimentSnapshot,
        members: Sequence[RunView],
        min_chunks: int,
        verdicts: _RungVerdicts,
        label: str,
    ) -> None:
        metric, sign = self._metric(snapshot), self._sign(snapshot)
        rungs = _rungs(min_chunks, self.eta, _max_boundary(snapshot))
        for k, rung in enumerate(rungs):
            pool = [run for run in members if self._in_pool(run, rungs, k, verdicts)]
            judged = [run for run in pool if verdicts.of(run, rung) is not None]
            waiting = [run for run in pool if verdicts.of(run, rung) is None]
            arrived = {
                run.run_id: value
                for run in waiting
                if (self._can_go_on(run, rung) or run.status == RunStatus.COMPLETED)
                and (value := run.value_at(metric, rung)) is not None
            }
            if judged:  # the rung closed earlier: judge late arrivals against the runs it kept
                arrived = {
                    run_id: value for run_id, value in arrived.items() if self._can_go_on(snapshot.run(run_id), rung)
                }
                kept = [
                    (sign * value, -run.run_id)
                    for run in judged
                    if verdicts.of(run, rung) == PROMOTED and (value := run.value_at(metric, rung)) is not None
                ]
                bar = min(kept, default=None)
                for run_id, value in arrived.items():
                    late = snapshot.run(run_id)
                    assert late is not None
                    if bar is None or (sign * value, -run_id) > bar:
                        why = "ranks above" if bar is not None else "has no promoted run to rank below"
                        verdicts.promote(
                            late,
                            rung,
                            f"{label} rung at chunk {rung} (closed): {metric} {value:.4g} "
                            f"{why} the worst run promoted there",
                        )
                    else:
                        verdicts.stop(
                            late,
                            rung,
                            f"{label} rung at chunk {rung} (closed): {metric} {value:.4g} "
                            f"is worse than the {sign * bar[0]:.4g} of the worst run promoted "
                            f"there ({self._direction(snapshot)})",
                        )
                continue
            if any(run.is_trainable and run.chunks_done < rung and _reaches(run, rung) for run in waiting):
                break  # the rung is still filling; later rungs' pools come from it
            if not any(self._can_go_on(run, rung) for run in waiting if run.run_id in arrived):
                break  # nobody would train past this rung: there is nothing to decide
            ranked = self._ranked(snapshot, arrived)
            keep = max(1, len(ranked) // self.eta)
            for rank, run_id in enumerate(ranked, start=1):
                run = snapshot.run(run_id)
                assert run is not None
                where = f"{metric} {arrived[run_id]:.4g} ranks {rank} of {len(ranked)}"
                if rank <= keep:
                    verdicts.promote(run, rung, f"{label} rung at chunk {rung}: {where}, in the top {keep} that go on")
                elif run.is_trainable:
                    verdicts.stop(
                        run,
                        rung,
                        f"{label} rung at chunk {rung}: {where}, only the top {keep} go on "
                        f"(eta {self.eta}, {self._direction(snapshot)})",
                    )


class Hyperband(SuccessiveHalving):
    """Hyperband (Li et al., 2018): successive halving in several brackets that start at different budgets, so the
    outcome does not hang on one guess of `min_chunks`.

    With s_max = floor(log_eta(max_chunks / min_chunks)), bracket s (s_max down to 0) puts its first rung at
    chunk max_chunks // eta**s and gets n_s = ceil((s_max + 1) / (s + 1) * eta**s) runs, the paper's proportions
    (bracket 0 trains its runs to the end unjudged). Runs are dealt to brackets in run-id order in those
    proportions, interleaved, so every bracket gets early and late runs, and a clone added later joins a bracket
    without moving anyone else. Each bracket halves its own runs exactly as `successive-halving` does.

    Args:
        eta: reduction factor (>= 2).
        max_chunks: the largest budget, in chunks; default the experiment's `num_chunks`.
        min_chunks: the smallest first rung (>= 1).
    """

    def __init__(
        self,
        eta: int = 3,
        max_chunks: int | None = None,
        min_chunks: int = 1,
        *,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "hyperband",
    ) -> None:
        super().__init__(eta, min_chunks, metric=metric, mode=mode, name=name)
        if max_chunks is not None:
            _check_int("max_chunks", max_chunks, min_chunks)
        self.max_chunks = max_chunks

    def brackets(self, max_chunks: int) -> list[tuple[int, int, int]]:
        """(s, first rung, runs) for each bracket, the most aggressive first."""
        s_max = 0
        while max_chunks // self.eta ** (s_max + 1) >= self.min_chunks:
            s_max += 1
        return [
            (s, max_chunks // self.eta**s, math.ceil((s_max + 1) / (s + 1) * self.eta**s)) for s in range(s_max, -1, -1)
        ]

    def bracket_of(self, snapshot: ExperimentSnapshot) -> dict[int, tuple[int, int]]:
        """run id -> (s, first rung) of its bracket."""
        brackets = self.brackets(self.max_chunks or snapshot.num_chunks)
        # Bracket s takes the places (j + 0.5) / n_s of the deal, j < n_s: proportional and interleaved.
        deal = sorted(((j + 0.5) / size, -s, s, first) for s, first, size in brackets for j in range(size))
        ordered = sorted(run.run_id for run in snapshot.runs)
        return {run_id: deal[index % len(deal)][2:] for index, run_id in enumerate(ordered)}

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        verdicts = _RungVerdicts()
        assigned = self.bracket_of(snapshot)
        for s, first in sorted(set(assigned.values()), reverse=True):
            members = [run for run in snapshot.runs if assigned[run.run_id] == (s, first)]
            self._halve(snapshot, members, first, verdicts, f"hyperband bracket {s}")
        return verdicts.ops


class AsyncSuccessiveHalving(_RungPolicy):
    """Asynchronous successive halving (ASHA; Li et al., 2020) over rungs at chunk boundaries min_chunks * eta**k.
    When a run reaches a rung it is judged once, and the verdict is final: it goes on if its value there is within
    the top floor(n / eta) of the n values recorded at that rung so far (its own included); no run waits for the
    others. As in Optuna's pruner, while a rung holds fewer than eta values only a value at least as good as the
    rung's best goes on (so the first run at a rung always does). The values recorded at a rung are those of the
    runs that reached it through the rungs before it: a run stopped at a rung adds nothing to later rungs, even
    when its chunk in flight ends past them.
    """

    def __init__(
        self,
        eta: int = 2,
        min_chunks: int = 1,
        *,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "asha",
    ) -> None:
        super().__init__(eta, min_chunks, metric=metric, mode=mode, name=name)

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        metric, sign = self._metric(snapshot), self._sign(snapshot)
        verdicts = _RungVerdicts()
        rungs = _rungs(self.min_chunks, self.eta, _max_boundary(snapshot))
        for k, rung in enumerate(rungs):
            entered = [run for run in snapshot.runs if self._in_pool(run, rungs, k, verdicts)]
            recorded = {run.run_id: value for run in entered if (value := run.value_at(metric, rung)) is not None}
            for run in entered:
                if verdicts.of(run, rung) is not None or run.run_id not in recorded or not self._can_go_on(run, rung):
                    continue
                competing = sorted((sign * value for value in recorded.values()), reverse=True)
                needed = competing[max(len(competing) // self.eta - 1, 0)]
                value = recorded[run.run_id]
                where = f"ASHA rung at chunk {rung}: {metric} {value:.4g}"
                if sign * value >= needed:
                    verdicts.promote(
                        run, rung, f"{where} is within the top 1/{self.eta} of {len(competing)} runs there"
                    )
                else:
                    verdicts.stop(
                        run,
                        rung,
                        f"{where} is outside the top 1/{self.eta} of {len(competing)} runs "
                        f"there (needed {sign * needed:.4g}, {self._direction(snapshot)})",
                    )
        return verdicts.ops


class PercentileStopping(_MetricPolicy):
    """Stop a run whose best value so far is worse than the `percentile`-th percentile of the other runs' values
    at the same chunk boundary (`MedianStopping` is the 50th).

    The peers are every other run with a value at that boundary (training, stopped or completed; not Deleted or
    Failed), with the percentile interpolated linearly (numpy's default). Optuna's percentile pruner compares
    with completed trials only; runs here advance together chunk by chunk, so waiting for whole runs to finish
    before judging any would judge late, and the peers at the same boundary are the fair comparison.

    Args:
        percentile: 0-100; 25 keeps the top quarter, 75 stops only the bottom quarter.
        after_chunks: judge only from this boundary on (a warm-up).
        min_peers: judge only when at least this many other runs have a value at the boundary.
    """

    def __init__(
        self,
        percentile: float = 50.0,
        after_chunks: int = 1,
        *,
        min_peers: int = 2,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "percentile-stopping",
    ) -> None:
        super().__init__(metric=metric, mode=mode, name=name)
        if not _is_finite_number(percentile) or not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be a number between 0 and 100, got {percentile=}")
        _check_int("after_chunks", after_chunks, 1)
        _check_int("min_peers", min_peers, 1)
        self.percentile, self.after_chunks, self.min_peers = float(percentile), after_chunks, min_peers

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        metric, sign = self._metric(snapshot), self._sign(snapshot)
        ops: list[PolicyOp] = []
        for run in snapshot.trainable():
            boundary = run.chunks_done
            if boundary < self.after_chunks or not run.has_chunks_left:
                continue
            mine = [sign * point.value for point in run.points(metric) if point.boundary <= boundary]
            peers = _values_at(snapshot.alive(), metric, boundary)
            peers.pop(run.run_id, None)
            if not mine or len(peers) < self.min_peers:
                continue
            # In score space (higher is better) the p-th percentile of the raw values is the (100 - p)-th.
            threshold = _percentile(sorted(sign * value for value in peers.values()), 100.0 - self.percentile)
            if max(mine) < threshold:
                ops.append(
                    Stop(
                        run.run_id,
                        f"best {metric} so far {sign * max(mine):.4g} is worse than the {self._label()} "
                        f"{sign * threshold:.4g} of {len(peers)} other runs at chunk {boundary}",
                    )
                )
        return ops

    def _label(self) -> str:
        return "median" if self.percentile == 50 else f"{self.percentile:g}th percentile"


class MedianStopping(PercentileStopping):
    """Stop a run whose best value so far is worse than the median of the other runs' values at its boundary."""

    def __init__(
        self,
        after_chunks: int = 1,
        *,
        min_peers: int = 2,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "median-stopping",
    ) -> None:
        super().__init__(50.0, after_chunks, min_peers=min_peers, metric=metric, mode=mode, name=name)


class PopulationBasedTraining(_MetricPolicy):
    """Population-based training: every `interval` chunks, a run in the bottom `quantile` of the population
    (ranked by each run's latest value) is stopped and a top-quantile run is cloned in its place with perturbed
    knobs, warm-started from its weights.

    Perturbation is seeded by (seed, bottom run, boundary), so the same snapshot always gives the same clone.

    Args:
        perturb: knobs to change. A list of names multiplies each by one of `factors` (ints stay ints, >= 1);
            a mapping {knob: [choices]} picks another value from the list ({knob: null} means factors).
        factors: multipliers for numeric knobs.
        interval: chunks between decisions for a run.
        quantile: share of the population that is top and bottom (0 < quantile <= 0.5).
        warm_start: how the clone starts from the top run: weights, weights+optimizer or off.
        max_clones: stop cloning once this policy has created this many runs.
        min_population: act only when at least this many runs have a value.
    """

    def __init__(
        self,
        perturb: Sequence[str] | Mapping[str, Sequence[Any] | None] = ("learning_rate",),
        factors: Sequence[float] = (0.8, 1.25),
        interval: int = 1,
        quantile: float = 0.25,
        *,
        warm_start: str = "weights",
        max_clones: int = 8,
        min_population: int = 4,
        seed: int = 0,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "pbt",
    ) -> None:
        super().__init__(metric=metric, mode=mode, name=name)
        if isinstance(perturb, str):
            perturb = [perturb]
        if isinstance(perturb, Mapping):
            self.perturb = {str(knob): None if choices is None else list(choices) for knob, choices in perturb.items()}
        elif isinstance(perturb, Sequence):
            self.perturb = {str(knob): None for knob in perturb}
        else:
            raise ValueError(f"perturb must be knob names or {{knob: [choices]}}, got {perturb=}")
        if not self.perturb:
            raise ValueError(f"perturb must name at least one knob, got {perturb=}")
        if any(choices is not None and len(choices) < 2 for choices in self.perturb.values()):
            raise ValueError(f"each knob's choices need at least two values, got {perturb=}")
        if not factors or not all(_is_finite_number(factor) and factor > 0 for factor in factors):
            raise ValueError(f"factors must be positive numbers, got {factors=}")
        if not _is_finite_number(quantile) or not 0 < quantile <= 0.5:
            raise ValueError(f"quantile must be in (0, 0.5], got {quantile=}")
        if warm_start not in WARM_START_MODES:
            raise ValueError(f"warm_start must be one of {WARM_START_MODES}, got {warm_start=}")
        _check_int("interval", interval, 1)
        _check_int("max_clones", max_clones, 0)
        _check_int("min_population", min_population, 2)
        _check_int("seed", seed, 0)
        self.factors = [float(factor) for factor in factors]
        self.interval, self.quantile, self.warm_start = interval, float(quantile), warm_start
        self.max_clones, self.min_population, self.seed = max_clones, min_population, seed

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        metric = self._metric(snapshot)
        latest = {run.run_id: run.latest(metric) for run in snapshot.alive()}
        values = {run_id: point.value for run_id, point in latest.items() if point is not None}
        if len(values) < self.min_population:
            return []
        ranked = self._ranked(snapshot, values)
        size = max(1, math.floor(self.quantile * len(ranked)))
        top, bottom = ranked[:size], ranked[-size:]
        clones_made = sum(run.source == f"policy:{self.name}" for run in snapshot.runs)
        donors = [snapshot.run(run_id) for run_id in top]
        donors = [donor for donor in donors if donor is not None and self._can_donate(snapshot, donor)]
        ops: list[PolicyOp] = []
        for run_id in reversed(bottom):  # the worst run gets the best donor
            run = snapshot.run(run_id)
            if run is None or not self._at_decision_boundary(run) or run_id in top:
                continue
            if not donors or clones_made >= self.max_clones:
                break
            donor = donors.pop(0)
            overrides = self._perturbed(donor, run)
            why = (
                f"PBT at chunk {run.chunks_done}: run {run_id} ({metric} {values[run_id]:.4g}) is in the bottom "
                f"{self.quantile:.0%}, run {donor.run_id} ({values[donor.run_id]:.4g}) in the top"
            )
            ops.append(
                CloneModify(
                    donor.run_id,
                    f"{why}: exploit run {donor.run_id}, explore {overrides}",
                    overrides=overrides,
                    warm_start=self.warm_start,
                )
            )
            ops.append(Stop(run_id, f"{why}: replaced by a perturbed clone of run {donor.run_id}"))
            clones_made += 1
        return ops

    def _at_decision_boundary(self, run: RunView) -> bool:
        return run.is_trainable and run.chunks_done > 0 and run.chunks_done % self.interval == 0 and run.has_chunks_left

    def _can_donate(self, snapshot: ExperimentSnapshot, donor: RunView) -> bool:
        """A donor gives one clone per boundary: none queued, none already made from its current step."""
        if not donor.allows(OpKind.CLONE) or "clone" in donor.pending_ops:
            return False
        if self.warm_start != "off" and not donor.has_checkpoint:
            return False
        return not any(
            run.parent_id == donor.run_id and run.parent_step == donor.step and run.source == f"policy:{self.name}"
            for run in snapshot.runs
        )

    def _perturbed(self, donor: RunView, replaced: RunView) -> dict[str, Any]:
        digest = hashlib.sha256(f"pbt:{self.seed}:{replaced.run_id}:{replaced.chunks_done}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        overrides: dict[str, Any] = {}
        for knob, choices in self.perturb.items():
            current = _thawed(donor.config.get(knob))
            if choices is not None:
                others = [choice for choice in choices if choice != current] or choices
                overrides[knob] = rng.choice(others)
            elif _is_finite_number(current):
                factor = rng.choice(self.factors)
                overrides[knob] = max(1, round(current * factor)) if isinstance(current, int) else current * factor
            else:
                raise ValueError(f"PBT cannot scale knob {knob!r} = {current!r}: give it a list of choices")
        return overrides


class Budget(Policy):
    """Stop every run still training once the experiment has used its budget: wall time since it was created
    (`max_seconds`) and/or chunks trained across all runs (`max_chunks`). At least one must be given."""

    def __init__(
        self, max_seconds: float | None = None, max_chunks: int | None = None, *, name: str = "budget"
    ) -> None:
        if max_seconds is None and max_chunks is None:
            raise ValueError("give max_seconds, max_chunks or both")
        if max_seconds is not None and (not _is_finite_number(max_seconds) or max_seconds <= 0):
            raise ValueError(f"max_seconds must be a positive number, got {max_seconds=}")
        if max_chunks is not None:
            _check_int("max_chunks", max_chunks, 1)
        self.max_seconds, self.max_chunks = max_seconds, max_chunks
        self.name = _policy_name(name)

    def metric_names(self, experiment_metric: str) -> frozenset[str]:
        return frozenset()

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        elapsed = snapshot.now - snapshot.created_at
        chunks = sum(run.chunks_done for run in snapshot.runs)
        if self.max_seconds is not None and elapsed >= self.max_seconds:
            reason = f"budget: {elapsed:.0f} s of wall time used, the budget is {self.max_seconds:g} s"
        elif self.max_chunks is not None and chunks >= self.max_chunks:
            reason = f"budget: {chunks} chunks trained across runs, the budget is {self.max_chunks}"
        else:
            return []
        return [Stop(run.run_id, reason) for run in snapshot.trainable()]


# -- combinators --------------------------------------------------------------------------------------------


class AnyOf(Policy):
    """Every op any inner policy wants, in order; a later op on a run that an earlier one already stops, deletes,
    or targets with the same kind is dropped. Each reason names the inner policy."""

    def __init__(self, *policies: Policy, name: str = "any-of") -> None:
        if not policies or not all(isinstance(policy, Policy) for policy in policies):
            raise ValueError(f"AnyOf needs one or more policies, got {policies=}")
        self.policies = policies
        self.name = _policy_name(name)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Policy:
        params = dict(params)
        specs = params.pop("policies", None)
        if not isinstance(specs, list) or not specs:
            raise ValueError('any-of needs "policies": a list of {"template": ..., "params": {...}}')
        return _construct(cls, params, *[_policy_from_spec(spec) for spec in specs])

    def metric_names(self, experiment_metric: str) -> frozenset[str]:
        return frozenset().union(*(policy.metric_names(experiment_metric) for policy in self.policies))

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        chosen: list[PolicyOp] = []
        for policy in self.policies:
            for op in policy.decisions(snapshot):
                if not any(_clashes(op, other) for other in chosen):
                    chosen.append(_with_reason(op, f"{policy.name}: {op.reason}"))
        # A run that one policy stops is not promoted by another: the verdicts share one record per boundary.
        ended = {op.run_id for op in chosen if op.kind in (OpKind.STOP, OpKind.DELETE)}
        return [op for op in chosen if not (isinstance(op, Promote) and op.run_id in ended)]


class Patient(_MetricPolicy):
    """Pass on the inner policy's Stops only for runs that stopped improving; other ops pass unchanged.

    The rule, in score space (higher is better): a run's Stop passes when it has more than `patience` values and
    the best of its last `patience` values is not above the best of the earlier ones by more than `min_delta`.
    An equal value is no improvement, and `min_delta` is the improvement required (as in Keras' EarlyStopping).
    This is not Optuna's PatientPruner, whose `min_delta` is a tolerated worsening and which lets a flat run
    through: here a flat run is stopped, since a run that no longer improves is what an early stop is for."""

    def __init__(
        self,
        policy: Policy,
        patience: int = 1,
        min_delta: float = 0.0,
        *,
        metric: str | None = None,
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise ValueError(f"Patient wraps a Policy, got {policy=}")
        super().__init__(metric=metric, mode=mode, name=name or f"patient-{policy.name}")
        _check_int("patience", patience, 1)
        if not _is_finite_number(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta=}")
        self.policy, self.patience, self.min_delta = policy, patience, float(min_delta)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Policy:
        params = dict(params)
        spec = params.pop("policy", None)
        if not isinstance(spec, Mapping):
            raise ValueError('patience needs "policy": {"template": ..., "params": {...}}')
        return _construct(cls, params, _policy_from_spec(spec))

    def metric_names(self, experiment_metric: str) -> frozenset[str]:
        return self.policy.metric_names(experiment_metric) | super().metric_names(experiment_metric)

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        metric, sign = self._metric(snapshot), self._sign(snapshot)
        kept: list[PolicyOp] = []
        for op in self.policy.decisions(snapshot):
            run = snapshot.run(op.run_id)
            if op.kind != OpKind.STOP or run is None:
                kept.append(op)
                continue
            scores = [sign * point.value for point in run.points(metric) if point.boundary <= run.chunks_done]
            if len(scores) <= self.patience:
                continue  # too short a history to have been patient with
            before, recent = max(scores[: -self.patience]), max(scores[-self.patience :])
            if recent <= before + self.min_delta:
                kept.append(
                    _with_reason(op, f"{op.reason}; no {metric} improvement in the last {self.patience} chunks")
                )
        return kept


# -- building policies from names and JSON ------------------------------------------------------------------

TEMPLATES: dict[str, type[Policy]] = {
    "stop-bottom-fraction": StopBottomFraction,
    "successive-halving": SuccessiveHalving,
    "hyperband": Hyperband,
    "asha": AsyncSuccessiveHalving,
    "median-stopping": MedianStopping,
    "percentile-stopping": PercentileStopping,
    "pbt": PopulationBasedTraining,
    "budget": Budget,
    "any-of": AnyOf,
    "patience": Patient,
    "noop": NoopPolicy,
}


def build_policy(template: str, params: Mapping[str, Any] | None = None) -> Policy:
    """A built-in template by name, or a user policy by `module:attr`, built from JSON parameters.

    `module:attr` may name a Policy subclass (built with the parameters), a Policy instance (no parameters) or
    a factory function returning a Policy (called with the parameters).
    """
    params = dict(params or {})
    if not isinstance(template, str) or not template:
        raise ValueError(f"template must be a template name or 'module:attr', got {template=}")
    if ":" in template:
        return _user_policy(template, params)
    cls = TEMPLATES.get(template)
    if cls is None:
        raise ValueError(
            f"unknown policy template {template!r}: use one of {', '.join(TEMPLATES)}, or 'module:attr' for your own"
        )
    return cls.from_params(params)


def _user_policy(ref: str, params: Mapping[str, Any]) -> Policy:
    module_name, _, attr = ref.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ValueError(f"cannot import policy module {module_name!r} from {ref!r}: {exc}") from exc
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (policy {ref!r})") from None
    if isinstance(target, type) and issubclass(target, Policy):
        policy = target.from_params(params)
    elif isinstance(target, Policy):
        if params:
            raise ValueError(f"{ref} is a ready-made policy instance: it takes no parameters, got {sorted(params)}")
        policy = target
    elif callable(target):
        policy = target(**params)
    else:
        raise ValueError(f"{ref} is a {type(target).__name__}, not a Policy, Policy class or factory")
    if not isinstance(policy, Policy):
        raise ValueError(f"{ref} returned {type(policy).__name__}, expected a Policy")
    return policy


def _policy_from_spec(spec: Any) -> Policy:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("template"), str):
        raise ValueError(f'a nested policy is {{"template": NAME, "params": {{...}}}}, got {spec!r}')
    return build_policy(spec["template"], spec.get("params") or {})


def _construct(cls: type[Policy], params: Mapping[str, Any], *args: Any) -> Policy:
    accepted = [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{cls.__name__} has no parameter {', '.join(unknown)}: it takes {', '.join(accepted)}")
    try:
        return cls(*args, **params)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from None


# -- helpers ------------------------------------------------------------------------------------------------


def _values_at(runs: Iterable[RunView], metric: str, boundary: int) -> dict[int, float]:
    values = {}
    for run in runs:
        value = run.value_at(metric, boundary)
        if value is not None:
            values[run.run_id] = value
    return values


def _rungs(min_chunks: int, eta: int, up_to: int) -> list[int]:
    rungs, rung = [], min_chunks
    while rung <= up_to:
        rungs.append(rung)
        rung *= eta
    return rungs


def _reaches(run: RunView, boundary: int) -> bool:
    """The run has the chunks to reach `boundary`."""
    return run.total_chunks is None or run.total_chunks >= boundary


def _max_boundary(snapshot: ExperimentSnapshot) -> int:
    return max((run.total_chunks or run.chunks_done for run in snapshot.runs), default=0)


def _percentile(ordered: Sequence[float], percentile: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of an ascending, non-empty sequence."""
    position = (len(ordered) - 1) * percentile / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _clashes(op: PolicyOp, earlier: PolicyOp) -> bool:
    """`op` adds nothing after `earlier`: the run is already being stopped or deleted, or gets the same op."""
    if op.run_id != earlier.run_id:
        return False
    if isinstance(op, Promote) or isinstance(earlier, Promote):
        return type(op) is type(earlier) and op.boundary == earlier.boundary
    return op.kind == earlier.kind or earlier.kind in (OpKind.STOP, OpKind.DELETE)


def trainer_type_groups(snapshot: ExperimentSnapshot) -> dict[str, tuple[RunView, ...]]:
    """The snapshot's runs by trainer type (a run stored before trainer types existed is an SFT run)."""
    groups: dict[str, list[RunView]] = {}
    for run in snapshot.runs:
        groups.setdefault(str(run.config.get("trainer_type", "sft")), []).append(run)
    return {trainer_type: tuple(runs) for trainer_type, runs in sorted(groups.items())}


def _with_reason(op: PolicyOp, reason: str) -> PolicyOp:
    return dataclasses.replace(op, reason=reason)


def _policy_name(name: Any) -> str:
    """Policy names travel in op sources ("policy:<name>"): the same safe alphabet as experiment names."""
    return check_name("policy", name)


def _check_int(label: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {label}={value!r}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# The `optuna` template lives in its own module, which registers it here (Optuna is imported only when it decides).
import rf_core.optuna_search  # noqa: E402, F401
