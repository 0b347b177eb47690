"""Rung templates as the papers define them, checked on random learning curves: runs of random chunk durations on
1-8 slots, scheduled by the real scheduler (rf_core.scheduler.assign), a policy tick at every chunk end, ops applied
the way the engine applies them (a stop reaches a run in flight at its next boundary, whose value is still logged),
and every decision recorded at most once per (run, boundary) as the store does.

Invariants: a promotion is never revoked and a stopped run is never judged again; the same snapshot decides nothing
new once its decisions are recorded; some run always finishes; each rung keeps what the paper says (successive
halving: the top max(1, n // eta) of the previous rung's survivors, ties to the older run; ASHA: a run goes on iff
it is within the top max(1, n // eta) of the n values recorded at its rung when it arrives, the first always does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from rf_core.policies import (
    PROMOTED,
    STOPPED,
    AsyncSuccessiveHalving,
    ExperimentSnapshot,
    Hyperband,
    MetricPoint,
    Promote,
    RunView,
    Stop,
    SuccessiveHalving,
    _RungPolicy,
)
from rf_core.scheduler import RunnableRun, assign
from rf_core.states import RunStatus

METRIC = "eval_loss"


@dataclass
class SimRun:
    run_id: int
    curve: list[float]
    durations: list[float]
    status: RunStatus = RunStatus.NEW
    chunks_done: int = 0
    busy_until: float | None = None
    slot: int | None = None
    stop_pending: bool = False
    values: dict[int, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.curve)


@dataclass
class Record:
    run_id: int
    boundary: int
    verdict: str
    arrived: tuple[tuple[int, float], ...]  # (run, value) recorded at the rung when the verdict was made


@dataclass
class Simulation:
    runs: dict[int, SimRun]
    records: list[Record] = field(default_factory=list)

    def verdicts(self, run_id: int) -> dict[int, str]:
        return {record.boundary: record.verdict for record in self.records if record.run_id == run_id}

    def snapshot(self, mode: str, now: float) -> ExperimentSnapshot:
        views = tuple(
            RunView(
                run_id=run.run_id,
                status=run.status,
                config=MappingProxyType({}),
                chunks_done=run.chunks_done,
                total_chunks=run.total,
                step=run.chunks_done,
                pending_ops=("stop",) if run.stop_pending else (),
                metrics=MappingProxyType(
                    {METRIC: tuple(MetricPoint(b, b, value) for b, value in sorted(run.values.items()))}
                ),
                rung_verdicts=MappingProxyType(self.verdicts(run.run_id)),
            )
            for run in self.runs.values()
        )
        return ExperimentSnapshot("sim", METRIC, mode, max(run.total for run in self.runs.values()), 0.0, now, views)


def simulate(
    policy: _RungPolicy, curves: list[list[float]], durations: list[list[float]], slots: int, mode: str
) -> Simulation:
    pairs = enumerate(zip(curves, durations, strict=True), start=1)
    sim = Simulation({run_id: SimRun(run_id, curve, duration) for run_id, (curve, duration) in pairs})
    now = 0.0
    while True:
        busy = {run.slot for run in sim.runs.values() if run.busy_until is not None}
        runnable = [
            RunnableRun(run.run_id, run.chunks_done, run.total)
            for run in sim.runs.values()
            if run.status.is_trainable() and run.busy_until is None and not run.stop_pending
            and run.chunks_done < run.total
        ]  # fmt: skip
        for placed in assign(runnable, [slot for slot in range(slots) if slot not in busy]):
            run = sim.runs[placed.run_id]
            run.busy_until, run.slot, run.status = now + run.durations[run.chunks_done], placed.slot, RunStatus.ONGOING
        in_flight = [run for run in sim.runs.values() if run.busy_until is not None]
        if not in_flight:
            return sim
        now = min(run.busy_until for run in in_flight if run.busy_until is not None)
        for run in in_flight:
            if run.busy_until == now:
                run.busy_until = run.slot = None
                run.chunks_done += 1
                run.values[run.chunks_done] = run.curve[run.chunks_done - 1]
                if run.stop_pending:
                    run.status, run.stop_pending = RunStatus.STOPPED, False
                elif run.chunks_done == run.total:
                    run.status = RunStatus.COMPLETED
        tick(sim, policy, mode, now)


def tick(sim: Simulation, policy: _RungPolicy, mode: str, now: float) -> None:
    snapshot = sim.snapshot(mode, now)
    ops = policy.decide(snapshot)
    for op in ops:
        assert isinstance(op, Promote | Stop) and op.boundary is not None, op
        earlier = sim.verdicts(op.run_id)
        assert op.boundary not in earlier, f"run {op.run_id} judged twice at chunk {op.boundary}: {op}"
        assert STOPPED not in earlier.values(), f"run {op.run_id} judged again after its stop: {op}"
        if isinstance(op, Stop):
            revoked = [b for b, verdict in earlier.items() if verdict == PROMOTED and b >= op.boundary]
            assert not revoked, f"promotion of run {op.run_id} at {revoked} revoked by {op}"
        arrived = tuple(
            (view.run_id, value)
            for view in snapshot.runs
            if (value := view.value_at(METRIC, op.boundary)) is not None
            and _entered(sim, view.run_id, op.boundary, policy)
        )
        sim.records.append(Record(op.run_id, op.boundary, PROMOTED if isinstance(op, Promote) else STOPPED, arrived))
        run = sim.runs[op.run_id]
        if isinstance(op, Stop):
            if run.busy_until is not None:
                run.stop_pending = True
            else:
                run.status = RunStatus.STOPPED
    # The same state, re-read with the decisions recorded, decides nothing new.
    again = policy.decide(sim.snapshot(mode, now))
    assert [op for op in again if op.boundary not in sim.verdicts(op.run_id)] == []
    # Some run can still finish, or has.
    assert any(
        run.status == RunStatus.COMPLETED or (run.status.is_trainable() and not run.stop_pending)
        for run in sim.runs.values()
    ), [(run.run_id, run.status, run.stop_pending) for run in sim.runs.values()]


def _rungs(policy: _RungPolicy, total: int) -> list[int]:
    rungs, rung = [], policy.min_chunks
    while rung <= total:
        rungs.append(rung)
        rung *= policy.eta
    return rungs


def _entered(sim: Simulation, run_id: int, rung: int, policy: _RungPolicy) -> bool:
    """The run reached `rung` through the rungs before it (a record made before now)."""
    rungs = _rungs(policy, rung)
    verdicts = sim.verdicts(run_id)
    return all(verdicts.get(earlier) == PROMOTED for earlier in rungs[:-1])


def score(value: float, mode: str) -> float:
    return value if mode == "max" else -value


curves_and_times = st.integers(2, 8).flatmap(
    lambda runs: st.integers(2, 8).flatmap(
        lambda chunks: st.tuples(
            st.lists(st.lists(st.integers(0, 6).map(float), min_size=chunks, max_size=chunks), min_size=runs,
                     max_size=runs),
            st.lists(st.lists(st.sampled_from([1.0, 2.0, 3.0, 7.0]), min_size=chunks, max_size=chunks),
                     min_size=runs, max_size=runs),
        )
    )
)  # fmt: skip


def check_halving(sim: Simulation, members: set[int], first_rung: int, eta: int, mode: str) -> None:
    """Successive halving's verdicts among `members` from `first_rung` on, as the paper keeps them."""
    total = len(next(iter(sim.runs.values())).curve)
    survivors = set(members)
    rung = first_rung
    while rung < total:  # a rung at the last boundary judges nobody: nobody trains past it
        judged = {r.run_id: r.verdict for r in sim.records if r.boundary == rung and r.run_id in members}
        # A survivor with no verdict there finished its chunks while the rung filled: it ranks, nothing to decide.
        assert set(judged) <= survivors, f"rung {rung} ranked a run the rung before had eliminated"
        assert all(sim.runs[run_id].status == RunStatus.COMPLETED for run_id in survivors - set(judged))
        ranked = sorted(survivors, key=lambda run_id: (-score(sim.runs[run_id].values[rung], mode), run_id))
        keep = max(1, len(ranked) // eta)
        assert {run_id for run_id, verdict in judged.items() if verdict == PROMOTED} == set(ranked[:keep]) & set(judged)
        assert {run_id for run_id, verdict in judged.items() if verdict == STOPPED} == set(ranked[keep:]) & set(judged)
        survivors = set(ranked[:keep])
        rung *= eta
    finished = {run_id for run_id in members if sim.runs[run_id].status == RunStatus.COMPLETED}
    assert survivors <= finished
    assert not [r for r in sim.records if r.boundary >= total], "a verdict where nobody trains on"


@settings(max_examples=150, deadline=None)
@given(curves_and_times, st.integers(1, 8), st.integers(2, 3), st.integers(1, 2), st.sampled_from(["min", "max"]))
def test_successive_halving_keeps_the_top_of_the_previous_rungs_survivors(
    curves_and_durations: tuple[list[list[float]], list[list[float]]], slots: int, eta: int, min_chunks: int, mode: str
) -> None:
    curves, durations = curves_and_durations
    sim = simulate(SuccessiveHalving(eta, min_chunks), curves, durations, slots, mode)
    assert any(run.status == RunStatus.COMPLETED for run in sim.runs.values())
    check_halving(sim, set(sim.runs), min_chunks, eta, mode)


@settings(max_examples=100, deadline=None)
@given(curves_and_times, st.integers(1, 8), st.integers(2, 3), st.sampled_from(["min", "max"]))
def test_hyperband_halves_each_bracket_on_its_own(
    curves_and_durations: tuple[list[list[float]], list[list[float]]], slots: int, eta: int, mode: str
) -> None:
    curves, durations = curves_and_durations
    policy = Hyperband(eta)
    sim = simulate(policy, curves, durations, slots, mode)
    brackets = policy.bracket_of(sim.snapshot(mode, 0.0))
    for bracket in set(brackets.values()):
        members = {run_id for run_id, assigned in brackets.items() if assigned == bracket}
        check_halving(sim, members, bracket[1], eta, mode)
        assert any(sim.runs[run_id].status == RunStatus.COMPLETED for run_id in members)


@settings(max_examples=150, deadline=None)
@given(curves_and_times, st.integers(1, 8), st.integers(2, 3), st.integers(1, 2), st.sampled_from(["min", "max"]))
def test_asha_judges_each_arrival_once_against_the_values_recorded_at_its_rung(
    curves_and_durations: tuple[list[list[float]], list[list[float]]], slots: int, eta: int, min_chunks: int, mode: str
) -> None:
    curves, durations = curves_and_durations
    policy = AsyncSuccessiveHalving(eta, min_chunks)
    sim = simulate(policy, curves, durations, slots, mode)
    total = len(curves[0])
    assert any(run.status == RunStatus.COMPLETED for run in sim.runs.values())
    for rung in _rungs(policy, total - 1):
        judged = [record for record in sim.records if record.boundary == rung]
        for record in judged:
            assert dict(record.arrived)[record.run_id] == sim.runs[record.run_id].values[rung]
            scores = sorted((score(value, mode) for _, value in record.arrived), reverse=True)
            needed = scores[max(len(scores) // eta - 1, 0)]
            mine = score(dict(record.arrived)[record.run_id], mode)
            assert (record.verdict == PROMOTED) == (mine >= needed), (rung, record)
    # A run stopped at a rung adds nothing to later rungs, even when its chunk in flight ended past them.
    for record in sim.records:
        if record.verdict == STOPPED:
            later = [other for other in sim.records if other.boundary > record.boundary]
            assert all(record.run_id not in dict(other.arrived) for other in later)


def test_the_two_slot_case_that_stopped_every_run_now_finishes_the_best() -> None:
    # Run 4 is slow: runs 1-3 train on while it holds rung 1 open; run 3 improves after it was eliminated.
    curves = [[1.0] * 8, [2.0] * 8, [3.0] + [0.5] * 7, [4.0] * 8]
    durations = [[1.0] * 8, [1.0] * 8, [1.0] * 8, [5.0] * 8]

    sim = simulate(SuccessiveHalving(2, 1), curves, durations, slots=2, mode="min")
    assert {run.run_id: run.status for run in sim.runs.values()} == {
        1: RunStatus.COMPLETED,
        2: RunStatus.STOPPED,
        3: RunStatus.STOPPED,
        4: RunStatus.STOPPED,
    }
    assert not [record for record in sim.records if record.run_id == 3 and record.boundary > 1]
