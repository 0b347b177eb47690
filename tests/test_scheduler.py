import random

import pytest

from rf_core.scheduler import Assignment, RunnableRun, assign, priority_order


def run(run_id: int, done: int, total: int = 4, warm: int | None = None) -> RunnableRun:
    return RunnableRun(run_id=run_id, chunks_done=done, total_chunks=total, warm_slot=warm)


@pytest.mark.parametrize(
    ("runs", "slots", "expected"),
    [
        ([run(1, 2), run(2, 0), run(3, 1)], [0], [Assignment(2, 0)]),
        ([run(1, 1), run(2, 1)], [0, 1], [Assignment(1, 0), Assignment(2, 1)]),
        ([run(1, 0), run(2, 0), run(3, 0)], [0, 1], [Assignment(1, 0), Assignment(2, 1)]),
        ([], [0, 1], []),
        ([run(1, 0)], [], []),
    ],
)
def test_least_progress_first(runs, slots, expected):
    assert assign(runs, slots) == expected


def test_progress_is_a_fraction_of_each_runs_chunks():
    # run 1 has done 2 of 8 chunks (25 %), run 2 has done 1 of 2 (50 %): run 1 is further behind
    assert priority_order([run(2, 1, total=2), run(1, 2, total=8)])[0].run_id == 1


def test_warm_slot_kept_when_it_costs_nothing():
    runs = [run(1, 1, warm=1), run(2, 1, warm=0)]
    assert sorted(assign(runs, [0, 1]), key=lambda a: a.run_id) == [Assignment(1, 1), Assignment(2, 0)]


def test_warmth_never_beats_priority():
    runs = [run(1, 3, warm=0), run(2, 0, warm=None)]
    assert assign(runs, [0]) == [Assignment(2, 0)]


def test_duplicate_slots_rejected():
    with pytest.raises(ValueError, match="distinct"):
        assign([run(1, 0)], [0, 0])


def test_simulation_no_starvation_and_chunks_stay_level():
    """Simulate 8 runs on 2 slots with random chunk durations: no run falls more than one chunk behind."""
    rng = random.Random(7)
    total = 6
    done = {run_id: 0 for run_id in range(1, 9)}
    busy: dict[int, tuple[float, int]] = {}  # slot -> (finish time, run id)
    clock = 0.0
    max_spread = 0
    while any(d < total for d in done.values()) or busy:
        free = [slot for slot in (0, 1) if slot not in busy]
        in_flight = {run_id for _, run_id in busy.values()}
        runnable = [run(r, d, total) for r, d in done.items() if d < total and r not in in_flight]
        for a in assign(runnable, free):
            busy[a.slot] = (clock + rng.uniform(0.5, 1.5), a.run_id)
        slot, (clock, finished) = min(busy.items(), key=lambda item: item[1][0])
        del busy[slot]
        done[finished] += 1
        max_spread = max(max_spread, max(done.values()) - min(done.values()))
    assert all(d == total for d in done.values())
    assert max_spread <= 2
