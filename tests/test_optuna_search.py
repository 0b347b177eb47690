"""Optuna-driven search as IC Ops on synthetic snapshots: Optuna's real sampler and pruners on a study rebuilt from
the snapshot, the ops they turn into, and what a person's own ops tell the study. No training, no server."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from optuna.trial import TrialState

from rf_core import List, Range
from rf_core.knobs import ConfigError, expand_config_group
from rf_core.optuna_search import OptunaPolicy, OptunaSearch
from rf_core.policies import CloneModify, Stop, build_policy
from rf_core.states import RunStatus
from tests.test_policies import run, snapshot

SPACE = {"model_name_or_path": "rf-tiny-llama", "learning_rate": Range(1e-5, 1e-2, log=True), "r": List([4, 8, 16])}


def config(learning_rate: float, r: int = 8) -> dict:
    return {"model_name_or_path": "rf-tiny-llama", "learning_rate": learning_rate, "r": r}


def test_the_first_configs_are_the_samplers_first_asks_and_repeat_for_the_same_seed() -> None:
    search = OptunaSearch(SPACE, num_runs=8, max_concurrent=3, seed=5)
    configs = expand_config_group(search)
    assert len(configs) == 3 and configs == OptunaSearch(SPACE, 8, max_concurrent=3, seed=5).configs()
    assert configs != OptunaSearch(SPACE, 8, max_concurrent=3, seed=6).configs()
    for item in configs:
        assert item["model_name_or_path"] == "rf-tiny-llama" and item["r"] in (4, 8, 16)
        assert 1e-5 <= item["learning_rate"] <= 1e-2
    # Its policy travels as JSON and builds the same policy back.
    spec = search.policy()
    assert spec["template"] == "optuna"
    assert build_policy("optuna", spec["params"]).params() == spec["params"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"pruner": "successive-halving"}, r"use rf's own template \(asha\)"),
        ({"pruner": "hyperband"}, r"use rf's own template \(hyperband\)"),
        ({"sampler": "cmaes"}, "unknown sampler 'cmaes'"),
        ({"pruner": {"n_startup_trials": 2}}, "a pruner is a name or"),
    ],
)
def test_bad_search_settings_are_refused_with_the_reason(arguments: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OptunaPolicy(SPACE, **arguments)
    with pytest.raises(ConfigError, match="at least one List or Range"):
        OptunaPolicy({"learning_rate": 1e-3})


def test_the_pruner_stops_a_run_worse_than_the_median_of_completed_trials() -> None:
    policy = OptunaPolicy(SPACE, num_runs=4, max_concurrent=4, pruner={"name": "median", "n_startup_trials": 2})
    snap = snapshot(
        run(1, [1.0, 0.8], "Completed", total=2, config=config(1e-3)),
        run(2, [1.2, 1.0], "Completed", total=2, config=config(3e-3)),
        run(3, [5.0], config=config(1e-2)),  # far above the completed trials' median at chunk 1
        run(4, [0.9], config=config(5e-4)),
    )
    ops = policy.decide(snap)
    (stop,) = [op for op in ops if isinstance(op, Stop)]
    assert stop.run_id == 3 and stop.boundary == 1 and "MedianPruner prunes trial 2" in stop.reason
    assert [op for op in ops if isinstance(op, CloneModify)] == []  # 4 trials exist: the budget is spent
    # Once the stop is recorded the run is not asked about again at that boundary.
    recorded = after_stop(snap, 3)
    assert [op for op in policy.decide(recorded) if isinstance(op, Stop)] == []


def after_stop(snap, run_id: int):
    return dataclasses.replace(
        snap,
        runs=tuple(
            dataclasses.replace(
                view, status=RunStatus.STOPPED, rung_verdicts=MappingProxyType({view.chunks_done: "stopped"})
            )
            if view.run_id == run_id
            else view
            for view in snap.runs
        ),
    )


def test_an_ended_run_is_replaced_by_the_samplers_next_config_until_the_budget_is_spent() -> None:
    policy = OptunaPolicy(SPACE, num_runs=5, max_concurrent=2, pruner="none", seed=1)
    snap = snapshot(
        run(1, [1.0, 0.8], "Completed", total=2, config=config(1e-3)),
        run(2, [1.2], "Stopped", config=config(3e-3)),  # a person stopped it: a pruned trial
        run(3, [0.9], config=config(5e-4)),
    )
    ops = policy.decide(snap)
    assert policy.decide(snap) == ops  # a pure function of the snapshot
    (clone,) = ops  # one run trains: one slot of two is free
    assert isinstance(clone, CloneModify) and clone.run_id == 1 and clone.warm_start == "off"
    assert set(clone.overrides) == {"learning_rate", "r"} and clone.overrides["r"] in (4, 8, 16)
    assert "replaces run 1, which completed" in clone.reason and "(4 of 5 trials)" in clone.reason
    # The study holds every run as a trial, a person's stop as a pruned one.
    states = [trial.state for trial in policy.study(snap).get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING]
    # With the clone made (run 4, New), one run short of the budget and no free slot: nothing more.
    cloned = dataclasses.replace(
        snap, runs=(*snap.runs, run(4, [], "New", config=config(2e-3), source="policy:optuna", parent_id=1))
    )
    assert policy.decide(cloned) == []
    # When run 3 completes, run 2 (stopped, never replaced) is replaced: the fifth and last trial.
    done = dataclasses.replace(
        cloned, runs=tuple(run(3, [0.9, 0.7], "Completed", total=2, config=config(5e-4)) if v.run_id == 3 else v
                           for v in cloned.runs),
    )  # fmt: skip
    (last,) = policy.decide(done)
    assert last.run_id == 2 and "which was stopped" in last.reason and "(5 of 5 trials)" in last.reason


def test_a_replacement_warm_starts_only_when_the_sampled_knobs_keep_the_architecture() -> None:
    same = OptunaPolicy({**SPACE, "r": 8}, num_runs=3, max_concurrent=1, pruner="none", warm_start="weights")
    snap = snapshot(run(1, [1.0, 0.8], "Completed", total=2, config=config(1e-3)))
    (clone,) = same.decide(snap)
    assert clone.warm_start == "weights" and set(clone.overrides) == {"learning_rate"}
    varied = OptunaPolicy(
        {**SPACE, "r": List([4, 16])}, num_runs=3, max_concurrent=1, pruner="none", warm_start="weights"
    )
    (cold,) = varied.decide(snap)
    assert cold.warm_start == "off" and "cold start" in cold.reason


def test_a_stop_and_the_replacement_of_the_same_run_come_in_one_decision() -> None:
    policy = OptunaPolicy(SPACE, num_runs=4, max_concurrent=1, pruner={"name": "threshold", "upper": 2.0})
    snap = snapshot(run(1, [3.0], config=config(1e-2)))
    stop, clone = policy.decide(snap)
    assert isinstance(stop, Stop) and "ThresholdPruner" in stop.reason
    assert isinstance(clone, CloneModify) and clone.run_id == 1 and "which was pruned" in clone.reason


def test_a_replacement_queued_but_not_applied_yet_counts_and_its_run_is_not_replaced_twice() -> None:
    """Seen in a real fit: a run pruned at chunk 1 and replaced there (the clone queued while its chunk 2 trains)
    completes at chunk 2; the clone is not applied yet, so the run has no child: it must not be replaced again."""
    policy = OptunaPolicy(SPACE, num_runs=4, max_concurrent=2, pruner="none", seed=1)
    snap = snapshot(
        run(1, [1.0, 0.8], "Completed", total=2, config=config(1e-3), pending=("clone",)),
        run(2, [1.2, 1.1], "Completed", total=2, config=config(3e-3)),
    )
    (clone,) = policy.decide(snap)  # 2 runs + 1 queued: one trial left, and it replaces run 2
    assert clone.run_id == 2 and "(4 of 4 trials)" in clone.reason
    full = snapshot(
        run(1, [1.0, 0.8], "Completed", total=2, config=config(1e-3), pending=("clone",)),
        run(2, [1.2, 1.1], "Completed", total=2, config=config(3e-3), pending=("clone",)),
    )
    assert policy.decide(full) == []  # the budget is spent by the two queued clones
