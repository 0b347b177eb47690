"""Which run trains next, and where: a pure function of the runs' progress and the free device slots.

The fit loop calls `assign` whenever slots are free. It never blocks waiting for a barrier across runs: a run that
reaches its chunk boundary frees its slot, and the next call fills it.

A run that needs several slots at once (a gang) is gang-scheduled with EASY backfilling: when the run first in
line does not fit in the free slots, it reserves them until enough busy slots free up; meanwhile a later run may
use a reserved slot only if its chunk is expected to end by then (give or take `BACKFILL_SLACK`), or if the slot is
one the gang will not need when it starts.

Slots that would still be idle after that (no run waits for them) go to runs that can use more for this chunk
(`device_counts`: DDP runs whose step can be shared by more processes with the same result), as Ray Tune's
ResourceChangingScheduler does; never while a gang is waiting for slots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# A backfilled chunk may end this fraction of the gang's wait after the gang could have started: estimates are
# rough, and a slot left idle for a chunk that nearly fits costs more than the gang's short delay (simulated).
BACKFILL_SLACK = 0.25


@dataclass(frozen=True)
class RunnableRun:
    """A run that may train its next chunk now (not in flight, not stopped, chunks left)."""

    run_id: int
    chunks_done: int
    total_chunks: int
    warm_slot: int | None = None  # the slot whose worker holds this run's state in memory, if any
    devices: int = 1  # slots the run trains on at once
    expected_seconds: float | None = None  # how long its next chunk should take; None: unknown
    device_counts: tuple[int, ...] = ()  # larger slot counts it may train a chunk on instead, when slots idle

    @property
    def progress(self) -> float:
        return self.chunks_done / self.total_chunks if self.total_chunks else 1.0


@dataclass(frozen=True)
class Assignment:
    run_id: int
    slot: int  # the run's slot; for a gang, its rank-0 slot
    more_slots: tuple[int, ...] = ()  # a gang's other slots, in rank order

    @property
    def slots(self) -> tuple[int, ...]:
        return (self.slot, *self.more_slots)


def priority_order(runs: Sequence[RunnableRun]) -> list[RunnableRun]:
    """Least progress first (fraction of the run's chunks done), then fewest chunks done, then oldest run.

    Ordering by progress is what keeps the comparison fair: no run gets two chunks ahead of a run that
    could have trained, so no run starves however many clones are added.
    """
    return sorted(runs, key=lambda run: (run.progress, run.chunks_done, run.run_id))


def assign(
    runs: Sequence[RunnableRun], free_slots: Sequence[int], busy_for: Mapping[int, float] | None = None
) -> list[Assignment]:
    """Choose which runs get the free slots, then place them, keeping each on its warm slot when possible.

    `busy_for` maps each busy slot to the seconds its chunk is expected to go on (only gangs need it). Which runs
    train is decided by priority and by gang reservations; warmth only decides placement, so it never costs
    fairness. A run needing more slots than exist is skipped (the caller reports it). Idempotent.
    """
    if len(set(free_slots)) != len(free_slots):
        raise ValueError(f"free slots must be distinct: {free_slots=}")
    busy_for = dict(busy_for or {})
    all_slots = len(free_slots) + len(busy_for)
    # Among equals, a run whose state is warm on a free slot goes first: same fairness, no swap.
    warm_here = {run.run_id for run in runs if run.warm_slot is not None and run.warm_slot in free_slots}
    ordered = sorted(priority_order(runs), key=lambda run: (run.progress, run.chunks_done, run.run_id not in warm_here))
    chosen: list[RunnableRun] = []
    open_count = len(free_slots)
    reserved_until: float | None = None  # set once the first run in line does not fit
    spare = 0  # slots free now that the waiting gang will not need when it starts: any run may take them
    for run in ordered:
        if run.devices > all_slots or run.devices > open_count:
            if reserved_until is None and run.devices <= all_slots:
                reserved_until = _slots_free_in(run.devices - open_count, busy_for)
                free_then = open_count + sum(1 for wait in busy_for.values() if wait <= reserved_until)
                spare = free_then - run.devices
            continue
        if reserved_until is not None and not _ends_by(run, reserved_until):
            if run.devices > spare:
                continue
            spare -= run.devices
        chosen.append(run)
        open_count -= run.devices
        if open_count == 0:
            break
    sizes = {run.run_id: run.devices for run in chosen}
    if reserved_until is None:
        for run in chosen:  # priority order: the run furthest behind grows first
            larger = [count for count in run.device_counts if run.devices < count <= run.devices + open_count]
            if larger:
                sizes[run.run_id] = max(larger)
                open_count -= sizes[run.run_id] - run.devices
    return _place(chosen, free_slots, sizes)


def _slots_free_in(count: int, busy_for: Mapping[int, float]) -> float:
    """Expected seconds until `count` more busy slots are free (infinite when that many are not busy)."""
    waits = sorted(busy_for.values())
    return waits[count - 1] if count <= len(waits) else math.inf


def _ends_by(run: RunnableRun, seconds: float) -> bool:
    return run.expected_seconds is not None and run.expected_seconds <= seconds * (1 + BACKFILL_SLACK)


def _place(chosen: Sequence[RunnableRun], free_slots: Sequence[int], sizes: Mapping[int, int]) -> list[Assignment]:
    """Each chosen run onto `sizes[run]` free slots: its warm slot when free (as a gang's rank 0), else the lowest."""
    open_slots = list(free_slots)
    lead: dict[int, int] = {}
    for run in chosen:
        if run.warm_slot is not None and run.warm_slot in open_slots:
            lead[run.run_id] = run.warm_slot
            open_slots.remove(run.warm_slot)
    assignments = []
    for run in chosen:
        if run.run_id not in lead:
            lead[run.run_id] = open_slots.pop(0)
        others = tuple(open_slots.pop(0) for _ in range(sizes[run.run_id] - 1))
        assignments.append(Assignment(run.run_id, lead[run.run_id], others))
    return assignments
