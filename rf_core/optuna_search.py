"""Optuna-driven search as IC Ops: Optuna's sampler proposes configs and its pruner stops runs, and every step is an
op in the ops log, with its reason, that a person can see, override or undo.

    search = OptunaSearch({"model_name_or_path": "rf-tiny-llama", "learning_rate": Range(1e-5, 1e-2, log=True),
                           "r": List([4, 8, 16])}, num_runs=16, max_concurrent=4, pruner="median")
    Experiment("lr").run_fit(search, create_model_fn, train, eval, num_chunks=4, policies=[search.policy()])

`OptunaSearch` is a config group: its first `max_concurrent` configs are the sampler's first asks. The `optuna`
policy keeps a study in step with the experiment — every run (not Deleted) is a trial whose intermediate values are
its metric at each chunk boundary (step = boundary) — and at each tick: asks the pruner about every run that has
reached a new boundary (a pruned run gets a Stop), and while fewer than `max_concurrent` runs train and fewer than
`num_runs` trials exist, asks the sampler for a config and submits it as a Clone-Modify of a run that ended
(stopped, completed or failed), the replacement. The user's own ops are told to the study: a run a person stopped
is a pruned trial, a person's clone a new trial (its knobs inside the space are its params).

The study is not kept anywhere: `decide` rebuilds it, in memory, from the snapshot each time (so it survives any
restart and needs no second database), and the sampler is seeded by (seed, number of trials), so the same snapshot
always gives the same ops. Optuna's own rung pruners (successive halving, Hyperband) keep state in trial attributes
that a rebuilt study does not have; use rf's `asha` and `hyperband` templates for those.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from rf_core.config import architecture_mismatch
from rf_core.knobs import ConfigError, List, Range, _as_config_tuple, parse_tagged, to_tagged
from rf_core.policies import (
    STOPPED,
    TEMPLATES,
    CloneModify,
    ExperimentSnapshot,
    PolicyOp,
    RunView,
    Stop,
    _check_int,
    _MetricPolicy,
    _thawed,
)
from rf_core.states import WARM_START_MODES, RunStatus

# Pruners whose verdict depends only on the trials' intermediate values, as a rebuilt study holds them.
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "threshold": "ThresholdPruner",
    "wilcoxon": "WilcoxonPruner",
    "none": "NopPruner",
}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler"}
_STATEFUL_PRUNERS = ("successive-halving", "hyperband")


def _named(kind: str, spec: str | Mapping[str, Any], known: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """A sampler or pruner named as JSON: "tpe", or {"name": "tpe", "n_startup_trials": 4}."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        params = {key: value for key, value in spec.items() if key != "name"}
        name = spec["name"]
    else:
        raise ConfigError(f'a {kind} is a name or {{"name": ..., <its parameters>}}, got {spec!r}')
    if kind == "pruner" and name in _STATEFUL_PRUNERS:
        raise ConfigError(
            f"Optuna's {name} pruner keeps its rungs in trial attributes that a study rebuilt from the store does "
            f"not have: use rf's own template ({'asha' if name == 'successive-halving' else 'hyperband'}) instead"
        )
    if name not in known:
        raise ConfigError(f"unknown {kind} {name!r}: use one of {', '.join(known)}")
    return name, params


def _searched(space: Mapping[str, Any]) -> dict[str, List | Range]:
    knobs = {key: value for key, value in space.items() if isinstance(value, List | Range)}
    if not knobs:
        raise ConfigError("an Optuna search space needs at least one List or Range knob")
    for key, knob in knobs.items():
        if isinstance(knob, List) and not all(
            value is None or isinstance(value, bool | int | float | str) for value in knob.values
        ):
            raise ConfigError(f"knob {key!r}: Optuna's categorical choices are None, bool, int, float or str")
    return knobs


def distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    """The space's List and Range knobs as Optuna distributions."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, knob in _searched(space).items():
        if isinstance(knob, List):
            out[key] = CategoricalDistribution(list(knob.values))
        elif knob.is_integer:
            out[key] = IntDistribution(int(knob.low), int(knob.high), log=knob.log)
        else:
            out[key] = FloatDistribution(float(knob.low), float(knob.high), log=knob.log)
    return out


class OptunaPolicy(_MetricPolicy):
    """Optuna's sampler and pruner as IC Ops (see the module docstring).

    Args:
        space: a config whose List and Range knobs are searched (tagged JSON in parameters); other keys are what
            `OptunaSearch` gives its first configs, and replacements inherit them from the run they replace.
        num_runs: trials in all, the first configs included.
        max_concurrent: runs training at once; a replacement is cloned only while fewer train.
        sampler: "tpe" (default) or "random", or {"name": ..., <its parameters>}; seeded by `seed`.
        pruner: "median" (default), "percentile", "threshold", "wilcoxon" or "none", or {"name": ..., ...}.
        warm_start: "off" (default), or "weights" / "weights+optimizer": a replacement starts from the weights of
            the run it replaces when that run has trained state and the sampled knobs keep its architecture.
    """

    def __init__(
        self,
        space: Mapping[str, Any],
        num_runs: int = 16,
        max_concurrent: int = 4,
        *,
        sampler: str | Mapping[str, Any] = "tpe",
        pruner: str | Mapping[str, Any] = "median",
        warm_start: str = "off",
        seed: int = 0,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "optuna",
    ) -> None:
        super().__init__(metric=metric, mode=mode, name=name)
        (parsed,) = _as_config_tuple(parse_tagged(dict(space)) if isinstance(space, Mapping) else space)
        self.searched = _searched(parsed)
        self.space = parsed
        _check_int("num_runs", num_runs, 1)
        _check_int("max_concurrent", max_concurrent, 1)
        _check_int("seed", seed, 0)
        if warm_start not in WARM_START_MODES:
            raise ValueError(f"warm_start must be one of {WARM_START_MODES}, got {warm_start=}")
        self.sampler_name, self.sampler_params = _named("sampler", sampler, SAMPLERS)
        self.pruner_name, self.pruner_params = _named("pruner", pruner, PRUNERS)
        self.num_runs, self.max_concurrent, self.warm_start, self.seed = num_runs, max_concurrent, warm_start, seed

    def params(self) -> dict[str, Any]:
        """This policy as JSON parameters of the `optuna` template (for `run_fit(policies=...)`, deployments)."""
        return {
            "space": to_tagged(self.space),
            "num_runs": self.num_runs,
            "max_concurrent": self.max_concurrent,
            "sampler": {"name": self.sampler_name, **self.sampler_params},
            "pruner": {"name": self.pruner_name, **self.pruner_params},
            "warm_start": self.warm_start,
            "seed": self.seed,
            "name": self.name,
            **({"metric": self.metric} if self.metric else {}),
            **({"mode": self.mode} if self.mode else {}),
        }

    # -- the study, rebuilt from the snapshot ------------------------------------------------------------------

    def study(self, snapshot: ExperimentSnapshot | None, trials: int = 0) -> Any:
        """An in-memory study with one trial per run of the snapshot (none without one)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        runs = [run for run in snapshot.runs if run.status != RunStatus.DELETED] if snapshot else []
        seed = random.Random(f"{self.seed}:{len(runs) + trials}").randrange(2**31)
        sampler = getattr(optuna.samplers, SAMPLERS[self.sampler_name])(seed=seed, **self.sampler_params)
        pruner = getattr(optuna.pruners, PRUNERS[self.pruner_name])(**self.pruner_params)
        mode = self.mode or (snapshot.mode if snapshot else "min")
        study = optuna.create_study(
            direction="minimize" if mode == "min" else "maximize", sampler=sampler, pruner=pruner
        )
        if snapshot is not None:
            for run in runs:
                study.add_trial(self._trial(snapshot, run))
        return study

    def _trial(self, snapshot: ExperimentSnapshot, run: RunView, state: Any = None) -> Any:
        from optuna.trial import TrialState, create_trial

        dists = distributions(self.space)
        params = {key: run.config[key] for key in dists if key in run.config and _inside(dists[key], run.config[key])}
        values = {point.boundary: point.value for point in run.points(self._metric(snapshot))}
        if state is None:
            state = {
                RunStatus.COMPLETED: TrialState.COMPLETE if values else TrialState.FAIL,
                RunStatus.FAILED: TrialState.FAIL,
                RunStatus.STOPPED: TrialState.PRUNED,
            }.get(run.status, TrialState.RUNNING)
            if run.status == RunStatus.STOPPED and "resume" in run.pending_ops:
                state = TrialState.RUNNING
        final = values[max(values)] if state == TrialState.COMPLETE else None
        return create_trial(
            params=params,
            distributions={key: dists[key] for key in params},
            value=final,
            intermediate_values=values,
            state=state,
            user_attrs={"run_id": run.run_id},
        )

    # -- deciding ----------------------------------------------------------------------------------------------

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        metric = self._metric(snapshot)
        study = self.study(snapshot)
        by_run = {trial.user_attrs["run_id"]: trial for trial in study.get_trials(deepcopy=False)}
        ops: list[PolicyOp] = []
        stopping: set[int] = set()
        for run in snapshot.trainable():
            boundary = run.chunks_done
            point = run.latest(metric)
            if point is None or point.boundary != boundary or not run.has_chunks_left:
                continue
            if run.rung_verdicts.get(boundary) is not None or run.run_id not in by_run:
                continue
            if study.pruner.prune(study, by_run[run.run_id]):
                stopping.add(run.run_id)
                ops.append(Stop(run.run_id, f"Optuna {PRUNERS[self.pruner_name]} prunes trial "
                                            f"{by_run[run.run_id].number}: {metric} {point.value:.4g} at chunk "
                                            f"{boundary}", boundary))  # fmt: skip
        ops.extend(self._replacements(snapshot, stopping))
        return ops

    def _replacements(self, snapshot: ExperimentSnapshot, stopping: set[int]) -> list[PolicyOp]:
        """Clone-Modify ops that keep `max_concurrent` runs training until `num_runs` trials exist."""
        alive = [run for run in snapshot.runs if run.status != RunStatus.DELETED]
        training = [run for run in snapshot.trainable() if run.run_id not in stopping and run.has_chunks_left]
        # A clone queued and not yet applied (its parent is still training its chunk) is a run already: counting it
        # keeps the budget and the concurrency, and its parent is not replaced twice.
        queued = sum(run.pending_ops.count("clone") for run in alive)
        free = min(self.max_concurrent - len(training) - queued, self.num_runs - len(alive) - queued)
        replaced = {run.parent_id for run in snapshot.runs if run.source == f"policy:{self.name}"}
        replaced |= {run.run_id for run in alive if "clone" in run.pending_ops}
        ended = [
            run
            for run in alive
            if run.run_id not in replaced
            and (run.run_id in stopping or run.status in (RunStatus.STOPPED, RunStatus.COMPLETED, RunStatus.FAILED)
                 or (run.status == RunStatus.ONGOING and "stop" in run.pending_ops))
            and "resume" not in run.pending_ops and run.allows("clone")
        ]  # fmt: skip
        ops: list[PolicyOp] = []
        if free <= 0 or not ended:
            return ops
        study = self.study(snapshot, trials=queued)  # seeded past the queued clones' asks: no repeat of theirs
        dists = distributions(self.space)
        for run in ended[:free]:
            trial = study.ask(fixed_distributions=dists)
            overrides = dict(trial.params)
            how = "ended"
            if run.run_id in stopping or run.rung_verdicts.get(run.chunks_done) == STOPPED:
                how = "was pruned"
            elif run.status == RunStatus.COMPLETED:
                how = "completed"
            elif run.status == RunStatus.FAILED:
                how = "failed"
            elif run.status == RunStatus.STOPPED:
                how = "was stopped"
            warm = self._warm_start(run, overrides)
            reason = (
                f"Optuna {SAMPLERS[self.sampler_name]} trial {trial.number + queued} replaces run {run.run_id}, "
                f"which {how} ({len(study.trials) + queued} of {self.num_runs} trials)"
            )
            if self.warm_start != "off" and warm == "off":
                reason += "; cold start: the sampled knobs change the architecture or the run has no trained state"
            ops.append(CloneModify(run.run_id, reason, run.chunks_done, overrides=overrides, warm_start=warm))
        return ops

    def _warm_start(self, run: RunView, overrides: Mapping[str, Any]) -> str:
        if self.warm_start == "off" or not run.has_checkpoint:
            return "off"
        from rf_core.config import normalize_config

        parent = normalize_config(dict(_thawed(run.config)))
        clone = normalize_config({**dict(_thawed(run.config)), **overrides})
        return "off" if architecture_mismatch(parent, clone) else self.warm_start


def _inside(distribution: Any, value: Any) -> bool:
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


class OptunaSearch:
    """A config group whose configs Optuna's sampler proposes: the first `max_concurrent` of `num_runs`; the
    `optuna` policy (`.policy()`) prunes runs and proposes the rest as replacements, as IC Ops."""

    def __init__(
        self,
        space: Mapping[str, Any],
        num_runs: int = 16,
        *,
        max_concurrent: int = 4,
        sampler: str | Mapping[str, Any] = "tpe",
        pruner: str | Mapping[str, Any] = "median",
        warm_start: str = "off",
        seed: int = 0,
        metric: str | None = None,
        mode: str | None = None,
        name: str = "optuna",
    ) -> None:
        self._policy = OptunaPolicy(
            space, num_runs, max_concurrent, sampler=sampler, pruner=pruner, warm_start=warm_start, seed=seed,
            metric=metric, mode=mode, name=name,
        )  # fmt: skip

    def configs(self) -> list[dict[str, Any]]:
        study = self._policy.study(None)
        dists = distributions(self._policy.space)
        fixed = {key: value for key, value in self._policy.space.items() if key not in dists}
        count = min(self._policy.max_concurrent, self._policy.num_runs)
        return [{**fixed, **study.ask(fixed_distributions=dists).params} for _ in range(count)]

    def policy(self) -> dict[str, Any]:
        """The `optuna` policy that goes with these configs, as JSON (`run_fit(policies=[search.policy()])`)."""
        return {"template": "optuna", "params": self._policy.params()}


TEMPLATES["optuna"] = OptunaPolicy
