"""Policy templates on synthetic snapshots: exact ops for known metric histories, ties, missing metrics, and runs
that are stopped, deleted or already have ops queued. No training, no server."""

from __future__ import annotations

import dataclasses
import itertools
import random
from types import MappingProxyType
from typing import Any

import pytest

from rf_core import List, Range
from rf_core.optuna_search import OptunaPolicy
from rf_core.policies import (
    TEMPLATES,
    AnyOf,
    AsyncSuccessiveHalving,
    Budget,
    CloneModify,
    ExperimentSnapshot,
    Hyperband,
    MedianStopping,
    MetricPoint,
    NoopPolicy,
    Patient,
    PercentileStopping,
    Policy,
    PolicyOp,
    PopulationBasedTraining,
    Promote,
    RunView,
    Stop,
    StopBottomFraction,
    SuccessiveHalving,
    build_policy,
    illegal_op_problems,
)
from rf_core.states import RunStatus

METRIC = "eval_loss"


def run(
    run_id: int,
    values: list[float | None] = (),
    status: str = "Ongoing",
    *,
    done: int | None = None,
    total: int = 8,
    config: dict[str, Any] | None = None,
    pending: tuple[str, ...] = (),
    checkpoint: bool = True,
    source: str = "initial",
    parent_id: int | None = None,
    parent_step: int | None = None,
    metric: str = METRIC,
    verdicts: dict[int, str] | None = None,
) -> RunView:
    """A run whose metric was `values[i]` at chunk boundary i + 1 (None: nothing logged in that chunk)."""
    points = tuple(
        MetricPoint(boundary, boundary * 10, value)
        for boundary, value in enumerate(values, start=1)
        if value is not None
    )
    chunks_done = len(values) if done is None else done
    return RunView(
        run_id=run_id,
        status=RunStatus(status),
        config=MappingProxyType(config or {"learning_rate": 1e-3, "r": 8}),
        chunks_done=chunks_done,
        total_chunks=total,
        step=chunks_done * 10,
        source=source,
        parent_id=parent_id,
        parent_step=parent_step,
        has_checkpoint=checkpoint,
        pending_ops=pending,
        metrics=MappingProxyType({metric: points}),
        rung_verdicts=MappingProxyType(verdicts or {}),
    )


def snapshot(*runs: RunView, mode: str = "min", now: float = 1000.0, created_at: float = 0.0) -> ExperimentSnapshot:
    return ExperimentSnapshot("exp", METRIC, mode, 4, created_at, now, tuple(runs))


def summary(ops: list[PolicyOp]) -> list[tuple[str, int]]:
    return [(op.kind.value, op.run_id) for op in ops]


# -- the snapshot -------------------------------------------------------------------------------------------


def test_snapshot_from_the_api_keeps_the_last_value_per_chunk_and_is_frozen() -> None:
    raw = {
        "experiment": {"name": "exp", "metric": METRIC, "mode": "min", "num_chunks": 2, "created_at": 5.0},
        "runs": [
            {"run_id": 2, "status": "Stopped", "config": {"target_modules": ["q_proj"]}, "chunks_done": 1,
             "total_chunks": 2, "checkpoint": "/x", "pending_op_kinds": ["resume"], "source": "cli"},
            {"run_id": 1, "status": "Ongoing", "config": {"lr": 0.1}, "chunks_done": 2, "total_chunks": 2},
        ],
    }  # fmt: skip
    rows = [
        {"run_id": 1, "name": METRIC, "step": 5, "value": 3.0, "chunk": 0},
        {"run_id": 1, "name": METRIC, "step": 4, "value": 9.0, "chunk": 0},  # an earlier step of the same chunk
        {"run_id": 1, "name": METRIC, "step": 9, "value": float("nan"), "chunk": 1},  # diverged: no value
        {"run_id": 2, "name": METRIC, "step": 5, "value": 4.0, "chunk": 0},
        {"run_id": 2, "name": METRIC, "step": 6, "value": 1.0, "chunk": None},  # outside any chunk
    ]
    snap = ExperimentSnapshot.from_api(raw, rows, now=7.0)
    assert [view.run_id for view in snap.runs] == [1, 2]
    assert snap.run(1).points(METRIC) == (MetricPoint(1, 5, 3.0),)
    assert snap.run(1).value_at(METRIC, 2) is None
    assert snap.run(2).value_at(METRIC, 1) == 4.0
    assert snap.run(2).has_checkpoint and not snap.run(1).has_checkpoint
    assert snap.run(2).allows("stop")  # Stopped now, but its queued resume makes it Ongoing: stop is legal then
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.run(1).status = RunStatus.DELETED  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.run(1).config["lr"] = 1.0  # type: ignore[index]
    assert snap.run(2).config["target_modules"] == ("q_proj",)


def test_a_run_view_folds_its_queued_ops_when_judging_what_is_allowed() -> None:
    assert run(1, status="Stopped", pending=("resume",)).allows("stop")
    assert not run(1, status="Ongoing", pending=("stop",)).allows("stop")
    assert not run(1, status="Ongoing", pending=("delete",)).allows("resume")
    assert not run(1, status="Deleted").allows("clone")


# -- stop the bottom fraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "values", "expected_stops"),
    [
        ("min", [1.0, 2.0, 3.0, 4.0], [3, 4]),
        ("max", [1.0, 2.0, 3.0, 4.0], [2, 1]),
        ("min", [1.0, 2.0, 2.0, 2.0], [3, 4]),  # ties: the older run ranks higher
        ("min", [5.0, 2.0, 2.0, 1.0], [3, 1]),
    ],
)
def test_stop_bottom_fraction_stops_exactly_the_worst(
    mode: str, values: list[float], expected_stops: list[int]
) -> None:
    snap = snapshot(*(run(i, [value]) for i, value in enumerate(values, start=1)), mode=mode)
    ops = StopBottomFraction(0.5, after_chunks=1).decide(snap)
    assert summary(ops) == [("stop", run_id) for run_id in expected_stops]
    assert all("at chunk 1 ranks" in op.reason and "bottom 50%" in op.reason for op in ops)
    assert {op.boundary for op in ops} <= {1}  # the verdict is about chunk 1, whatever chunk the run is at


def test_runs_of_different_trainer_types_are_ranked_only_among_their_own() -> None:
    """An SFT eval_loss (cross-entropy, ~2) and a DPO one (~0.69) mean different things: ranked apart."""
    sft = {"learning_rate": 1e-3, "trainer_type": "sft"}
    dpo = {"learning_rate": 1e-4, "trainer_type": "dpo"}
    snap = snapshot(
        run(1, [2.0], config=sft), run(2, [2.5], config=sft), run(3, [0.6], config=dpo), run(4, [0.7], config=dpo)
    )
    policy = StopBottomFraction(0.5, after_chunks=1)
    ops = policy.decisions(snap)
    assert summary(ops) == [("stop", 4), ("stop", 2)]  # dpo then sft: each group's worse half
    assert ops[0].reason.startswith("among the 2 dpo runs: eval_loss 0.7 at chunk 1 ranks 2 of 2")
    assert ops[1].reason.startswith("among the 2 sft runs: eval_loss 2.5 at chunk 1 ranks 2 of 2")
    assert summary(policy.decide(snap)) == [("stop", 1), ("stop", 2)]  # one pool would stop both SFT runs
    # Runs stored before trainer types existed are SFT runs; one type alone is decided as before.
    plain = snapshot(run(1, [2.0]), run(2, [2.5], config=sft))
    assert policy.decisions(plain) == policy.decide(plain)


def test_stop_bottom_fraction_waits_for_every_training_run_to_reach_the_boundary() -> None:
    waiting = snapshot(run(1, [1.0, 1.0]), run(2, [2.0]), run(3, [3.0, 3.0]), run(4, [], status="New"))
    assert StopBottomFraction(0.5, after_chunks=2).decide(waiting) == []
    # A stopped run below the boundary does not hold the cohort back, and is never stopped again.
    ready = snapshot(run(1, [1.0, 1.0]), run(2, [2.0], status="Stopped"), run(3, [3.0, 3.0]), run(4, [9, 4.0]))
    assert summary(StopBottomFraction(0.5, after_chunks=2).decide(ready)) == [("stop", 4)]


def test_stop_bottom_fraction_skips_missing_metrics_and_runs_that_cannot_be_stopped() -> None:
    snap = snapshot(
        run(1, [1.0]),
        run(2, [None]),  # no value at chunk 1: not ranked, not stopped
        run(3, [7.0], status="Completed", total=1),  # ranks (it is the worst) but cannot be stopped
        run(4, [6.0], pending=("stop",)),  # already being stopped
        run(5, [5.0]),
        run(6, [8.0], status="Deleted"),  # gone: neither ranked nor stopped
        run(7, [0.5], status="Failed"),
    )
    # Ranked: 1 (1.0), 5 (5.0), 4 (6.0), 3 (7.0): the bottom half is 4 and 3, neither of which may be stopped.
    assert StopBottomFraction(0.5, after_chunks=1).decide(snap) == []
    assert summary(StopBottomFraction(0.75, after_chunks=1).decide(snap)) == [("stop", 5)]


def test_stop_bottom_fraction_ranks_a_metric_given_by_name() -> None:
    snap = snapshot(run(1, [0.9], metric="accuracy"), run(2, [0.7], metric="accuracy"))
    policy = StopBottomFraction(0.5, after_chunks=1, metric="accuracy", mode="max")
    assert policy.metric_names(METRIC) == {"accuracy"}
    assert summary(policy.decide(snap)) == [("stop", 2)]


# -- successive halving -------------------------------------------------------------------------------------


def stops(ops: list[PolicyOp]) -> list[int]:
    return [op.run_id for op in ops if isinstance(op, Stop)]


def promotions(ops: list[PolicyOp]) -> list[tuple[int, int | None]]:
    return [(op.run_id, op.boundary) for op in ops if isinstance(op, Promote)]


def after(snap: ExperimentSnapshot, ops: list[PolicyOp], **changes: dict[str, Any]) -> ExperimentSnapshot:
    """The snapshot once `ops` are recorded (stopped runs Stopped, verdicts in rung_verdicts), with per-run
    changes {run_id: RunView}."""
    runs = []
    for view in snap.runs:
        verdicts = dict(view.rung_verdicts)
        for op in ops:
            if op.run_id == view.run_id and op.boundary is not None:
                verdicts[op.boundary] = "promoted" if isinstance(op, Promote) else "stopped"
        status = RunStatus.STOPPED if view.run_id in stops(ops) else view.status
        view = dataclasses.replace(view, status=status, rung_verdicts=MappingProxyType(verdicts))
        runs.append(changes.get(f"run{view.run_id}", view))
    return dataclasses.replace(snap, runs=tuple(runs))


def test_successive_halving_keeps_the_top_half_at_each_complete_rung() -> None:
    first_rung = snapshot(run(1, [4.0]), run(2, [3.0]), run(3, [2.0]), run(4, [1.0]))
    ops = SuccessiveHalving(eta=2).decide(first_rung)
    assert stops(ops) == [2, 1] and promotions(ops) == [(4, 1), (3, 1)]
    assert all(op.boundary == 1 for op in ops)
    # The two survivors reach chunk 2 (rung 2): the better one goes on.
    second_rung = after(first_rung, ops)
    second_rung = dataclasses.replace(
        second_rung,
        runs=tuple(
            dataclasses.replace(view, chunks_done=2, metrics=MappingProxyType({METRIC: (*view.points(METRIC),
                                MetricPoint(2, 20, {3: 1.5, 4: 1.8}[view.run_id]))}))
            if view.run_id in (3, 4) else view
            for view in second_rung.runs
        ),
    )  # fmt: skip
    (promote, stop) = sorted(SuccessiveHalving(eta=2).decide(second_rung), key=lambda op: op.kind.value)
    assert (type(stop), stop.run_id, type(promote), promote.run_id) == (Stop, 4, Promote, 3)
    assert "rung at chunk 2" in stop.reason and "ranks 2 of 2" in stop.reason


def test_successive_halving_waits_for_a_rung_to_fill() -> None:
    snap = snapshot(run(1, [4.0, 4.0]), run(2, [3.0]), run(3, [2.0, 2.0]), run(4, [1.0, 1.0]))
    # Rung 1 is complete (everyone has chunk 1); rung 2's pool is runs 3 and 4, both there: it closes too.
    ops = SuccessiveHalving(eta=2).decide(snap)
    assert stops(ops) == [2, 1, 3] and promotions(ops) == [(4, 1), (3, 1), (4, 2)]
    # With a survivor of rung 1 still below chunk 2, rung 2 waits.
    slow = snapshot(run(1, [4.0, 4.0]), run(2, [3.0, 3.0]), run(3, [2.0]), run(4, [1.0, 1.0]))
    assert promotions(SuccessiveHalving(eta=2).decide(slow)) == [(4, 1), (3, 1)]


def test_successive_halving_with_eta_3_keeps_a_third() -> None:
    snap = snapshot(*(run(i, [float(i)]) for i in range(1, 7)))
    ops = SuccessiveHalving(eta=3).decide(snap)
    assert stops(ops) == [3, 4, 5, 6] and promotions(ops) == [(1, 1), (2, 1)]


def test_successive_halving_ranks_only_the_previous_rungs_survivors() -> None:
    # Two slots: run 4 is slow and holds rung 1 open while runs 1-3 train on; run 3 then improves to 0.5.
    snap = snapshot(run(1, [1, 1, 1]), run(2, [2, 2, 2]), run(3, [3, 0.5, 0.5]), run(4, [4]))
    policy = SuccessiveHalving(2, 1)
    ops = policy.decide(snap)
    # Rung 1 keeps runs 1 and 2; rung 2 ranks only them (run 3's 0.5 came after it was eliminated): run 1 goes on.
    assert stops(ops) == [3, 4, 2] and promotions(ops) == [(1, 1), (2, 1), (1, 2)]
    settled = after(snap, ops)
    assert policy.decide(settled) == []  # verdicts are final: the same snapshot decides nothing more
    assert [view.run_id for view in settled.trainable()] == [1]


def test_successive_halving_judges_a_late_arrival_against_the_runs_a_closed_rung_kept() -> None:
    closed = {1: "promoted"}
    snap = snapshot(
        run(1, [1.0], verdicts=closed), run(2, [3.0], "Stopped", verdicts={1: "stopped"}),
        run(3, [2.0]),  # a clone added after rung 1 closed: worse than run 1, the worst kept
        run(4, [0.5]),  # another, better: goes on
    )  # fmt: skip
    ops = SuccessiveHalving(2, 1).decide(snap)
    assert stops(ops) == [3] and promotions(ops) == [(4, 1)]
    assert "closed" in ops[0].reason


def test_a_run_the_policy_stopped_and_a_person_resumed_is_left_alone() -> None:
    snap = snapshot(run(1, [1.0, 1.0], verdicts={1: "promoted"}), run(2, [2.0, 0.1], verdicts={1: "stopped"}))
    assert SuccessiveHalving(2, 1).decide(snap) == [Promote(1, SuccessiveHalving(2, 1).decide(snap)[0].reason, 2)]
    assert AsyncSuccessiveHalving(2, 1).decide(snap) == AsyncSuccessiveHalving(2, 1).decide(snap)
    assert stops(AsyncSuccessiveHalving(2, 1).decide(snap)) == []


# -- hyperband ----------------------------------------------------------------------------------------------


def test_hyperband_brackets_follow_the_paper_and_deal_runs_in_proportion() -> None:
    assert Hyperband(3).brackets(9) == [(2, 1, 9), (1, 3, 5), (0, 9, 3)]  # R = 9, eta = 3: s_max = 2
    assert Hyperband(2).brackets(4) == [(2, 1, 4), (1, 2, 3), (0, 4, 3)]
    snap = snapshot(*(run(i, []) for i in range(1, 9)))
    dealt = Hyperband(2).bracket_of(dataclasses.replace(snap, num_chunks=4))
    assert [dealt[i][0] for i in range(1, 9)] == [2, 1, 0, 2, 1, 0, 2, 1]
    # A clone added later joins a bracket without moving anyone.
    more = dataclasses.replace(snap, num_chunks=4, runs=(*snap.runs, run(9, [])))
    assert {i: b for i, b in Hyperband(2).bracket_of(more).items() if i < 9} == dealt


def test_hyperband_halves_each_bracket_from_its_own_first_rung() -> None:
    values = {1: 1.0, 2: 5.0, 3: 9.0, 4: 2.0, 5: 4.0, 6: 8.0, 7: 3.0, 8: 6.0}
    snap = snapshot(*(run(i, [values[i], values[i]]) for i in range(1, 9)))
    ops = Hyperband(2, max_chunks=4).decide(snap)
    # Bracket 2 (runs 1, 4, 7; rungs 1, 2): keep 1 of 3 at chunk 1, then run 1 alone at chunk 2 goes on.
    # Bracket 1 (runs 2, 5, 8; rung 2): keep 1 of 3. Bracket 0 (runs 3, 6) trains to the end unjudged.
    assert sorted(promotions(ops)) == [(1, 1), (1, 2), (5, 2)]
    assert sorted(stops(ops)) == [2, 4, 7, 8]
    assert all("hyperband bracket" in op.reason for op in ops)


# -- asynchronous successive halving ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("others", "mine", "stopped"),
    [
        ([], 5.0, False),  # first at the rung: it is the best so far
        ([1.0], 5.0, True),  # fewer than eta values: only the best goes on
        ([1.0], 1.0, False),  # a tie with the best goes on
        ([1.0, 2.0, 3.0], 1.5, False),  # 4 values, eta 2: the top 2 go on
        ([1.0, 2.0, 3.0], 2.5, True),  # third of 4
    ],
)
def test_asha_judges_a_run_at_its_rung_against_everything_recorded_there(
    others: list[float], mine: float, stopped: bool
) -> None:
    runs = [run(i, [value, value], status="Completed", total=2) for i, value in enumerate(others, start=2)]
    snap = snapshot(run(1, [mine]), *runs)
    ops = AsyncSuccessiveHalving(eta=2, min_chunks=1).decide(snap)
    assert (stops(ops), promotions(ops)) == (([1], []) if stopped else ([], [(1, 1)]))


def test_asha_promotion_is_final() -> None:
    # One slot: run 1 reached rung 1 first and went on; run 2 arrives better. Run 1 is not judged again.
    snap = snapshot(run(1, [2.0], verdicts={1: "promoted"}), run(2, [1.0]))
    assert AsyncSuccessiveHalving(2, 1).decide(snap) == [
        Promote(2, "ASHA rung at chunk 1: eval_loss 1 is within the top 1/2 of 2 runs there", 1)
    ]
    # Without the record, both are judged together and run 1 would be stopped: the record is what makes it final.
    assert stops(AsyncSuccessiveHalving(2, 1).decide(snapshot(run(1, [2.0]), run(2, [1.0])))) == [1]


def test_asha_ignores_a_stopped_runs_late_value_at_the_next_rung() -> None:
    # Two slots: run 1 lost rung 1 and was stopped while it trained chunk 2, whose 0.5 must not enter rung 2.
    snap = snapshot(
        run(1, [2.0, 0.5], "Stopped", verdicts={1: "stopped"}),
        run(2, [1.0, 1.0], verdicts={1: "promoted"}),
    )
    ops = AsyncSuccessiveHalving(2, 1).decide(snap)
    assert stops(ops) == [] and promotions(ops) == [(2, 2)]


def test_asha_judges_only_at_rung_boundaries_and_never_a_finished_run() -> None:
    # Rungs 1, 2, 4: a run at chunk 3 was judged at 1 and 2 already; a run done with all its chunks is left alone.
    promoted = {1: "promoted", 2: "promoted"}
    snap = snapshot(
        run(1, [9.0, 9.0, 9.0], verdicts=promoted), run(2, [1.0, 1.0, 1.0], verdicts=promoted),
        run(3, [9.0, 9.0], total=2, verdicts={1: "promoted"}), run(4, [1.0, 1.0], verdicts=promoted),
    )  # fmt: skip
    assert AsyncSuccessiveHalving(eta=2).decide(snap) == []


# -- median / percentile stopping ---------------------------------------------------------------------------


def test_median_stopping_compares_the_best_so_far_with_the_peers_median_at_the_boundary() -> None:
    snap = snapshot(
        run(1, [3.0, 2.5]),  # best 2.5 vs median(1.0, 2.0, 3.0) = 2.0: stop
        run(2, [1.0, 1.0]),
        run(3, [2.5, 2.0], status="Completed", total=2),
        run(4, [1.0, 3.0]),  # best so far 1.0 beats the median: goes on
    )
    ops = MedianStopping(after_chunks=1).decide(snap)
    assert summary(ops) == [("stop", 1)]
    assert "median 2 of 3 other runs at chunk 2" in ops[0].reason


def test_median_stopping_needs_peers_and_honours_its_warm_up() -> None:
    assert MedianStopping(min_peers=2).decide(snapshot(run(1, [9.0]), run(2, [1.0]))) == []
    snap = snapshot(run(1, [9.0]), run(2, [1.0]), run(3, [2.0]))
    assert summary(MedianStopping().decide(snap)) == [("stop", 1)]
    assert MedianStopping(after_chunks=2).decide(snap) == []


def test_percentile_stopping_at_25_keeps_only_the_top_quarter_in_max_mode() -> None:
    snap = snapshot(*(run(i, [float(i)]) for i in range(1, 6)), mode="max")
    # Run 4's peers are 1, 2, 3, 5: their 75th percentile is 3.5 (linear interpolation), and 4 beats it; run 3's
    # peers 1, 2, 4, 5 give 4.25, which 3 does not reach.
    assert summary(PercentileStopping(25, min_peers=2).decide(snap)) == [("stop", 1), ("stop", 2), ("stop", 3)]


# -- population-based training ------------------------------------------------------------------------------


def _population() -> ExperimentSnapshot:
    return snapshot(
        run(1, [1.0, 0.8], config={"learning_rate": 1e-3, "r": 8}),
        run(2, [2.0, 1.9], config={"learning_rate": 2e-3, "r": 8}),
        run(3, [3.0, 2.9], config={"learning_rate": 3e-3, "r": 8}),
        run(4, [4.0, 3.9], config={"learning_rate": 4e-3, "r": 8}),
    )


def test_pbt_clones_the_top_run_with_perturbed_knobs_warm_started_and_stops_the_bottom() -> None:
    ops = PopulationBasedTraining(perturb=["learning_rate"], factors=[0.5, 2.0], quantile=0.25).decide(_population())
    clone, stop = ops
    assert isinstance(clone, CloneModify) and clone.run_id == 1 and clone.warm_start == "weights"
    assert clone.overrides["learning_rate"] in (5e-4, 2e-3)
    assert isinstance(stop, Stop) and stop.run_id == 4
    assert "bottom 25%" in stop.reason and "run 1" in stop.reason
    # Pure: the same snapshot gives the same perturbation.
    assert PopulationBasedTraining(perturb=["learning_rate"], factors=[0.5, 2.0]).decide(_population()) == ops


def test_pbt_choices_ints_and_interval() -> None:
    policy = PopulationBasedTraining(perturb={"r": None, "lora_dropout": [0.0, 0.1]}, factors=[2.0], interval=2)
    clone, stop = policy.decide(_population())
    assert clone.overrides == {"r": 16, "lora_dropout": 0.1} or clone.overrides == {"r": 16, "lora_dropout": 0.0}
    assert stop.run_id == 4
    odd = snapshot(*(dataclasses.replace(view, chunks_done=3) for view in _population().runs))
    assert policy.decide(odd) == []  # chunk 3 is not a multiple of the interval


def test_pbt_does_not_clone_a_donor_twice_at_one_boundary_nor_past_its_budget() -> None:
    base = _population()
    queued = snapshot(*(dataclasses.replace(v, pending_ops=("clone",)) if v.run_id == 1 else v for v in base.runs))
    assert PopulationBasedTraining().decide(queued) == []
    made = snapshot(*base.runs, run(5, [], status="New", source="policy:pbt", parent_id=1, parent_step=20))
    assert PopulationBasedTraining(min_population=4).decide(made) == []
    spent = snapshot(*base.runs, run(5, [], status="New", source="policy:pbt", parent_id=2, parent_step=0))
    assert PopulationBasedTraining(max_clones=1).decide(spent) == []
    assert summary(PopulationBasedTraining(max_clones=2).decide(spent)) == [("clone", 1), ("stop", 4)]


def test_pbt_needs_a_checkpoint_to_warm_start_from_and_a_population() -> None:
    no_state = snapshot(*(dataclasses.replace(v, has_checkpoint=False) for v in _population().runs))
    assert PopulationBasedTraining().decide(no_state) == []
    assert summary(PopulationBasedTraining(warm_start="off").decide(no_state)) == [("clone", 1), ("stop", 4)]
    assert PopulationBasedTraining(min_population=5).decide(_population()) == []


# -- budget -------------------------------------------------------------------------------------------------


def test_budget_stops_every_training_run_once_time_or_chunks_run_out() -> None:
    runs = (
        run(1, [1.0, 1.0]),
        run(2, [2.0], status="Stopped"),
        run(3, [], status="New"),
        run(4, [1.0], pending=("stop",)),
    )
    assert Budget(max_seconds=100).decide(snapshot(*runs, now=99.0)) == []
    ops = Budget(max_seconds=100).decide(snapshot(*runs, now=100.0))
    assert summary(ops) == [("stop", 1), ("stop", 3)]
    assert ops[0].reason == "budget: 100 s of wall time used, the budget is 100 s"
    assert Budget(max_chunks=5).decide(snapshot(*runs)) == []
    assert summary(Budget(max_chunks=4).decide(snapshot(*runs))) == [("stop", 1), ("stop", 3)]


# -- combinators --------------------------------------------------------------------------------------------


def test_any_of_keeps_the_first_op_per_run_and_names_the_policy() -> None:
    snap = snapshot(run(1, [1.0]), run(2, [2.0]), run(3, [3.0]), run(4, [4.0]), now=500.0)
    policy = AnyOf(StopBottomFraction(0.25), Budget(max_seconds=10), NoopPolicy())
    ops = policy.decide(snap)
    assert summary(ops) == [("stop", 4), ("stop", 1), ("stop", 2), ("stop", 3)]
    assert ops[0].reason.startswith("stop-bottom-fraction: ") and ops[1].reason.startswith("budget: budget:")
    assert policy.metric_names(METRIC) == {METRIC}


def test_patient_passes_a_stop_only_when_the_run_stopped_improving() -> None:
    snap = snapshot(
        run(1, [1.0, 1.0, 1.0]),
        run(2, [3.0, 2.0, 1.5]),  # worst at chunk 3 but still improving: spared
        run(3, [2.0, 2.0, 2.5]),  # no improvement in the last 2 chunks: stopped
        run(4, [1.0, 1.0, 1.1]),
    )
    inner = StopBottomFraction(0.5, after_chunks=3)
    assert summary(inner.decide(snap)) == [("stop", 2), ("stop", 3)]
    ops = Patient(inner, patience=2).decide(snap)
    assert summary(ops) == [("stop", 3)]
    assert ops[0].reason.endswith("no eval_loss improvement in the last 2 chunks")
    assert Patient(inner, patience=3).decide(snap) == []  # a history no longer than the patience is spared


# -- building from names and parameters ---------------------------------------------------------------------


class KeepBest(Policy):
    """A user policy, importable as tests.test_policies:KeepBest: stop everything but the best run."""

    def __init__(self, *, name: str = "keep-best") -> None:
        self.name = name

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        latest = {view.run_id: view.latest(snapshot.metric) for view in snapshot.trainable()}
        ranked = sorted((point.value, run_id) for run_id, point in latest.items() if point is not None)
        return [Stop(run_id, f"not the best {snapshot.metric}") for _, run_id in ranked[1:]]


def test_build_policy_from_templates_nested_combinators_and_user_code() -> None:
    policy = build_policy("stop-bottom-fraction", {"fraction": 0.25, "after_chunks": 2, "metric": "acc", "mode": "max"})
    assert isinstance(policy, StopBottomFraction) and policy.after_chunks == 2 and policy.name == "stop-bottom-fraction"
    nested = build_policy(
        "any-of",
        {"name": "guard", "policies": [{"template": "budget", "params": {"max_chunks": 3}},
                                       {"template": "patience", "params": {"policy": {"template": "asha"}}}]},
    )  # fmt: skip
    assert nested.name == "guard" and isinstance(nested.policies[1], Patient)
    user = build_policy("tests.test_policies:KeepBest", {"name": "mine"})
    assert isinstance(user, KeepBest) and user.name == "mine"
    assert summary(user.decide(snapshot(run(1, [2.0]), run(2, [1.0])))) == [("stop", 1)]


@pytest.mark.parametrize(
    ("template", "params", "message"),
    [
        ("nope", {}, "unknown policy template 'nope'"),
        ("stop-bottom-fraction", {"fractoin": 0.5}, "has no parameter fractoin"),
        ("stop-bottom-fraction", {"fraction": 1.5}, "fraction=1.5"),
        ("successive-halving", {"eta": 1}, "eta must be an integer >= 2"),
        ("pbt", {"perturb": {"lr": [1]}}, "at least two values"),
        ("budget", {}, "give max_seconds, max_chunks or both"),
        ("any-of", {}, '"policies"'),
        ("noop", {"name": "../x"}, "invalid policy name"),
        ("tests.nowhere:Policy", {}, "cannot import policy module"),
        ("tests.test_policies:nothing", {}, "has no attribute 'nothing'"),
    ],
)
def test_bad_templates_and_parameters_are_explained(template: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_policy(template, params)


def test_ops_need_a_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        Stop(1, " ")
    with pytest.raises(ValueError, match="warm_start"):
        CloneModify(1, "why", warm_start="hot")


# -- no template ever proposes an illegal op ----------------------------------------------------------------


def _random_snapshot(rng: random.Random) -> ExperimentSnapshot:
    statuses = ["New", "Ongoing", "Ongoing", "Ongoing", "Stopped", "Completed", "Failed", "Deleted"]
    runs = []
    for run_id in range(1, rng.randint(1, 9)):
        status = rng.choice(statuses)
        done = 0 if status == "New" else rng.randint(1, 8)
        values = [rng.choice([None, rng.uniform(0, 5)]) for _ in range(done)]
        pending = tuple(rng.sample(["stop", "resume", "clone", "delete"], rng.randint(0, 1)))
        if status == "Deleted" or (pending and pending[0] in ("stop", "delete") and status in ("Stopped", "Completed")):
            pending = ()
        runs.append(run(run_id, values, status, done=done, pending=pending, checkpoint=rng.random() < 0.8))
    return snapshot(*runs, mode=rng.choice(["min", "max"]), now=rng.uniform(0, 200))


ALL_TEMPLATES: list[Policy] = [
    StopBottomFraction(0.5, 1),
    StopBottomFraction(0.3, 3),
    SuccessiveHalving(2),
    SuccessiveHalving(3, 2),
    Hyperband(2),
    AsyncSuccessiveHalving(2),
    MedianStopping(),
    PercentileStopping(25, min_peers=1),
    PopulationBasedTraining(min_population=2, quantile=0.5),
    PopulationBasedTraining(perturb={"r": [4, 8, 16]}, warm_start="off", min_population=2),
    Budget(max_seconds=100, max_chunks=10),
    AnyOf(StopBottomFraction(0.5), MedianStopping()),
    Patient(AsyncSuccessiveHalving(), patience=1),
    NoopPolicy(),
    OptunaPolicy({"learning_rate": Range(1e-5, 1e-2, log=True), "r": List([4, 8])}, num_runs=12, max_concurrent=3,
                 pruner={"name": "median", "n_startup_trials": 1}),
]  # fmt: skip


def test_every_builtin_template_is_in_the_sweep() -> None:
    swept = {type(policy) for policy in ALL_TEMPLATES}
    assert set(TEMPLATES.values()) <= swept


@pytest.mark.parametrize("policy", ALL_TEMPLATES, ids=lambda policy: type(policy).__name__)
def test_templates_never_produce_an_illegal_op_nor_two_ops_on_one_run(policy: Policy) -> None:
    rng = random.Random(f"{type(policy).__name__}")
    for _ in range(300):
        snap = _random_snapshot(rng)
        ops = policy.decide(snap)
        assert [problem for op in ops for problem in illegal_op_problems(snap, op)] == []
        assert policy.decide(snap) == ops  # a pure function of the snapshot
        acting = [op for op in ops if not isinstance(op, Promote)]
        for first, second in itertools.combinations(acting, 2):
            replacement = isinstance(first, Stop) and isinstance(second, CloneModify)  # stop a run and replace it
            assert first.run_id != second.run_id or replacement, f"two ops on run {first.run_id}: {first}, {second}"
        # A promotion is a verdict per rung: one per (run, boundary), never beside a stop of that run there.
        verdicts = [(op.run_id, op.boundary) for op in ops if isinstance(op, Promote | Stop) and op.boundary]
        assert len(verdicts) == len(set(verdicts)), ops
