"""Which run trains next, and where: a pure function of the runs' progress and the free device slots.

The fit loop calls `assign` whenever slots are free. It never blocks waiting for a barrier across runs: a run that
reaches its chunk boundary frees its slot, and the next call fills it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RunnableRun:
    """A run that may train its next chunk now (not in flight, not stopped, chunks left)."""

    run_id: int
    chunks_done: int
    total_chunks: int
    warm_slot: int | None = None  # the slot whose worker holds this run's state in memory, if any

    @property
    def progress(self) -> float:
        return self.chunks_done / self.total_chunks if self.total_chunks else 1.0


@dataclass(frozen=True)
class Assignment:
    run_id: int
    slot: int


def priority_order(runs: Sequence[RunnableRun]) -> list[RunnableRun]:
    """Least progress first (fraction of the run's chunks done), then fewest chunks done, then oldest run.

    Ordering by progress is what keeps the comparison fair: no run gets two chunks ahead of a run that
    could have trained, so no run starves however many clones are added.
    """
    return sorted(runs, key=lambda run: (run.progress, run.chunks_done, run.run_id))


def assign(runs: Sequence[RunnableRun], free_slots: Sequence[int]) -> list[Assignment]:
    """Choose which runs get the free slots, then place them, keeping each on its warm slot when possible.

    Which runs train is decided by priority alone; warmth only decides placement, so it never costs fairness.
    Idempotent: the same inputs give the same assignments.
    """
    if len(set(free_slots)) != len(free_slots):
        raise ValueError(f"free slots must be distinct: {free_slots=}")
    # Among equals, a run whose state is warm on a free slot goes first: same fairness, no swap.
    warm_here = {run.run_id for run in runs if run.warm_slot is not None and run.warm_slot in free_slots}
    ordered = sorted(priority_order(runs), key=lambda run: (run.progress, run.chunks_done, run.run_id not in warm_here))
    chosen = ordered[: len(free_slots)]
    open_slots = list(free_slots)
    placed: dict[int, int] = {}
    for run in chosen:
        if run.warm_slot is not None and run.warm_slot in open_slots:
            placed[run.run_id] = run.warm_slot
            open_slots.remove(run.warm_slot)
    for run in chosen:
        if run.run_id not in placed:
            placed[run.run_id] = open_slots.pop(0)
    return [Assignment(run.run_id, placed[run.run_id]) for run in chosen]
