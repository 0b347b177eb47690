"""The head-to-head benchmark's arithmetic: the simulated sequential contestant and the per-contestant figures."""

from __future__ import annotations

import pytest

from bench.head_to_head import (
    EvalPoint,
    Observed,
    best_so_far,
    busy_until,
    max_disagreement,
    ratios,
    sequential_over_orders,
    simulate_sequential,
    summarize,
)

DURATIONS = {"a": 10.0, "b": 20.0, "c": 30.0}
CURVES = {  # fraction of the run done -> eval loss; only "c" ends below the target 1.0
    "a": [(0.5, 3.0), (1.0, 2.0)],
    "b": [(0.5, 2.5), (1.0, 1.5)],
    "c": [(0.5, 1.2), (1.0, 0.9)],
}


def test_sequential_fills_the_first_free_slot_in_order_after_the_startup() -> None:
    observed = simulate_sequential(["a", "b", "c"], DURATIONS, CURVES, slots=2, startup=5.0)
    assert observed.busy == [(5.0, 15.0), (5.0, 25.0), (15.0, 45.0)]  # c waits for a's slot
    assert observed.wall_seconds == 45.0
    points = {(point.key, point.chunk): point.seconds for point in observed.points}
    assert points == {("a", 0): 10.0, ("a", 1): 15.0, ("b", 0): 15.0, ("b", 1): 25.0, ("c", 0): 30.0, ("c", 1): 45.0}


def test_summary_of_a_contestant() -> None:
    observed = simulate_sequential(["a", "b", "c"], DURATIONS, CURVES, slots=2)
    figures = summarize(observed, target=1.0, initial_keys={"a", "b", "c"})
    assert figures["first_signal_all_seconds"] == 25.0  # c's first eval: it starts at 10, half of 30 s later
    assert figures["time_to_target_seconds"] == 40.0 and figures["target_reached_by"] == "c"
    assert figures["compute_seconds"] == 60.0
    assert figures["compute_seconds_to_target"] == 10.0 + 20.0 + 30.0
    assert figures["best_eval_loss"] == 0.9 and figures["best_config"] == "c"
    assert figures["curve"] == [(5.0, 3.0), (10.0, 2.0), (20.0, 1.5), (25.0, 1.2), (40.0, 0.9)]


def test_a_contestant_that_never_reaches_the_target_or_misses_a_config() -> None:
    observed = Observed("x", 9.0, [EvalPoint(3.0, "a", 1, 0, 2.0)], [(0.0, 4.0), (1.0, 9.0)])
    figures = summarize(observed, target=1.0, initial_keys={"a", "b"})
    assert figures["time_to_target_seconds"] is None and figures["compute_seconds_to_target"] is None
    assert figures["first_signal_all_seconds"] is None and figures["configs_without_signal"] == 1
    assert ratios(figures, {"time_to_target_seconds": 10.0, "compute_seconds": 24.0})["compute"] == 0.5


def test_median_and_worst_order() -> None:
    result = sequential_over_orders(DURATIONS, CURVES, slots=1, target=1.0, samples=200, seed=1)
    # On one slot the target comes when c's last eval does: 30 s after c starts.
    assert result["worst"]["time_to_target_seconds"] == 60.0  # a and b first (the adversarial order)
    assert result["worst_order"][-1] == "c"
    assert result["median"]["time_to_target_seconds"] in (30.0 + 10.0, 30.0 + 20.0, 30.0 + 30.0)
    assert result["orders"] == 201


def test_busy_time_and_best_so_far() -> None:
    assert busy_until([(0.0, 10.0), (5.0, 20.0)], 8.0) == 8.0 + 3.0
    points = [EvalPoint(s, "k", 1, 0, v) for s, v in [(3.0, 2.0), (1.0, 5.0), (2.0, 6.0), (4.0, 1.0)]]
    assert best_so_far(points) == [(1.0, 5.0), (3.0, 2.0), (4.0, 1.0)]


def test_disagreement_with_the_engine_curves() -> None:
    observed = Observed("ray", 1.0, [EvalPoint(1.0, "a", 1, 1, 2.25), EvalPoint(1.0, "zz", 2, 0, 9.0)], [])
    assert max_disagreement(observed, CURVES) == pytest.approx(0.25)
    assert max_disagreement(Observed("none", 0.0, [], []), CURVES) is None
