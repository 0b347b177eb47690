"""Experiments and their runs: create, look up, list, and the snapshot every view of an experiment starts from."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rf_core import paths
from rf_core.config import normalize_config, varying_knobs
from rf_core.control.checks import finite_or_none, is_int, require_experiment, require_run
from rf_core.control.leases import FINISHED, RUNNING, fit_state, with_fit_state
from rf_core.control.timeline import abandon_open_chunks
from rf_core.errors import ExperimentExists, InvalidRequest
from rf_core.functions import name_problem, unknown_function_problems
from rf_core.knobs import ConfigError
from rf_core.paths import check_name
from rf_core.states import DEFAULT_METRIC, EXPERIMENT_STATUSES, METRIC_MODES, TRAIN_LOSS_METRIC, OpKind, RunStatus

if TYPE_CHECKING:
    from rf_core.control.store import Store


def create_experiment(
    store: Store,
    name: str,
    configs: Sequence[Mapping[str, Any]],
    num_chunks: int,
    seed: int = 42,
    metric: str = DEFAULT_METRIC,
    mode: str = "min",
    spec_ref: str | None = None,
    functions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Create an experiment and one New run per config; returns {"experiment": row, "runs": [rows]}.

    Configs are validated and stored normalised (defaults filled in); a function a config names must be among
    `functions`, the names the experiment registers. Raises InvalidRequest listing every problem, or
    ExperimentExists when the name is taken.
    """
    problems = []
    try:
        check_name("experiment", name)
    except ValueError as exc:
        problems.append(str(exc))
    if not is_int(num_chunks) or num_chunks < 1:
        problems.append(f"num_chunks must be an integer >= 1, got {num_chunks!r}")
    if not is_int(seed):
        problems.append(f"seed must be an integer, got {seed!r}")
    if not isinstance(metric, str) or not metric:
        problems.append(f"metric must be a metric name, got {metric!r}")
    if mode not in METRIC_MODES:
        problems.append(f"mode must be 'min' or 'max', got {mode!r}")
    if spec_ref is not None and (not isinstance(spec_ref, str) or ":" not in spec_ref):
        problems.append(f"spec_ref must look like 'package.module:function', got {spec_ref!r}")
    function_names, function_problems = _function_names(functions)
    problems += function_problems
    normalised: list[dict[str, Any]] = []
    if isinstance(configs, Mapping) or not isinstance(configs, Sequence) or isinstance(configs, str) or not configs:
        problems.append("configs must be a non-empty list of config objects")
    else:
        for index, config in enumerate(configs, start=1):
            try:
                normalised.append(normalize_config(config))
                problems.extend(
                    f"config {index}: {problem}"
                    for problem in unknown_function_problems(normalised[-1], function_names)
                )
            except ConfigError as exc:
                problems.extend(f"config {index}: {problem}" for problem in exc.problems)
            except (TypeError, ValueError) as exc:
                problems.append(f"config {index}: {exc}")
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        existing = store.get_experiment(name)
        if existing is not None:
            created = datetime.fromtimestamp(existing["created_at"]).strftime("%Y-%m-%d %H:%M")
            raise ExperimentExists(
                [
                    f"experiment {name!r} already exists (created {created}); "
                    f"choose another name, e.g. {_free_name(store, name)!r}"
                ]
            )
        now = time.time()
        row = store.insert_experiment(
            {
                "name": name,
                "status": "running",
                "num_chunks": num_chunks,
                "seed": seed,
                "metric": metric,
                "mode": mode,
                "spec_ref": spec_ref,
                "functions": function_names,
                "created_at": now,
            }
        )
        runs = store.insert_runs(
            name,
            [
                {
                    "status": RunStatus.NEW.value,
                    "config": config,
                    "source": "initial",
                    "created_at": now,
                    "updated_at": now,
                }
                for config in normalised
            ],
        )
    return {"experiment": row, "runs": runs}


def _function_names(functions: Any) -> tuple[list[str], list[str]]:
    if functions is None:
        return [], []
    if isinstance(functions, str | Mapping) or not isinstance(functions, Sequence):
        return [], [f"functions must be a list of function names, got {functions!r}"]
    problems = [problem for name in functions if (problem := name_problem(name))]
    return sorted(set(functions)), problems


def set_experiment_functions(store: Store, name: str, functions: Sequence[str]) -> dict[str, Any]:
    """Replace the names an experiment registers (a fit that continues it brings its own spec's functions)."""
    names, problems = _function_names(functions)
    if problems:
        raise InvalidRequest(problems)
    with store.transaction():
        require_experiment(store, name)
        return store.update_experiment(name, {"functions": names})


def delete_experiment(store: Store, name: str, force: bool = False) -> dict[str, Any]:
    """Delete an experiment: its runs, metrics, ops, timeline and policy decisions, and its folder of checkpoints
    and exports under RF_HOME. Refused while a live fit holds it, unless `force`; a crashed fit's is deleted."""
    with store.transaction():
        experiment = require_experiment(store, name)
        if fit_state(experiment, time.time(), store.opened_at) == RUNNING and not force:
            raise InvalidRequest(
                [
                    f"experiment {name!r} has a live fit: let it end (or stop its runs) first; force only if that "
                    "fit's lease cannot be trusted"
                ]
            )
        deleted = store.delete_experiment(name)
    folder = paths.experiment_dir(name)
    shutil.rmtree(folder, ignore_errors=True)
    return {"experiment": name, "deleted_rows": deleted, "deleted_folder": str(folder)}


def rename_experiment(store: Store, name: str, new_name: str) -> dict[str, Any]:
    """Rename an experiment: its rows, its folder of checkpoints and exports (and the paths stored to them), its kept
    spec. Refused while a fit holds it, and for a crashed one (the next fit persists what the dead one left staged in
    memory under the old folder: continue it first)."""
    try:
        check_name("experiment", new_name)
    except ValueError as exc:
        raise InvalidRequest([str(exc)]) from None
    old_folder, new_folder = paths.experiment_dir(name), paths.experiment_dir(new_name)
    moved_folder = False
    try:
        with store.transaction():
            experiment = require_experiment(store, name)
            state = fit_state(experiment, time.time(), store.opened_at)
            if state != FINISHED:
                why = "a live fit holds it" if state == RUNNING else "its fit crashed: `rf continue` it (or delete it)"
                raise InvalidRequest([f"experiment {name!r} cannot be renamed now: {why}"])
            if store.get_experiment(new_name) is not None:
                raise ExperimentExists([f"experiment {new_name!r} already exists; choose another name"])
            if new_folder.exists():
                raise InvalidRequest([f"{new_folder} exists already (left by another experiment?); move it away first"])
            if old_folder.exists():
                old_folder.rename(new_folder)
                moved_folder = True
            moved = store.rename_experiment(name, new_name, (f"{old_folder}/", f"{new_folder}/"))
    except BaseException:
        if moved_folder:
            new_folder.rename(old_folder)
        raise
    return {"experiment": new_name, "renamed_from": name, "moved_rows": moved, "folder": str(new_folder)}


def _free_name(store: Store, name: str) -> str:
    for suffix in range(2, 1000):
        candidate = f"{name}-{suffix}"
        if store.get_experiment(candidate) is None:
            return candidate
    return f"{name}-{int(time.time())}"


def get_experiment(store: Store, name: str) -> dict[str, Any]:
    return shown(store, require_experiment(store, name))


def shown(store: Store, experiment: dict[str, Any]) -> dict[str, Any]:
    """An experiment row as every reader sees it: its status is its fit's state ("crashed" when the fit's lease
    lapsed; rf_core.control.leases)."""
    return with_fit_state(store, experiment)


def set_experiment_status(store: Store, name: str, status: str) -> dict[str, Any]:
    """A fit sets "running" when it starts and "finished" when it ends. A fit that starts owns every chunk of
    the experiment: one still open was left by a fit that died (`rf continue --force`), and is abandoned."""
    if status not in EXPERIMENT_STATUSES:
        allowed = " or ".join(repr(each) for each in EXPERIMENT_STATUSES)
        raise InvalidRequest([f"experiment status must be {allowed}, got {status!r}"])
    with store.transaction():
        require_experiment(store, name)
        now = time.time()
        if status == "running":
            abandon_open_chunks(store, name, store.open_timeline(name), now)
        if status == "running":  # held for one lease period, like a fit that took it and has yet to renew
            lease = {"ended_at": None, "lease_expires_at": None, "last_seen_at": now}
        else:
            lease = {"ended_at": now, "lease_expires_at": None, "fit_owner": None}
        return shown(store, store.update_experiment(name, {"status": status, **lease}))


def list_experiments(store: Store) -> list[dict[str, Any]]:
    return [shown(store, experiment) for experiment in store.list_experiments()]


def get_run(store: Store, experiment: str, run_id: int) -> dict[str, Any]:
    require_experiment(store, experiment)
    return require_run(store, experiment, run_id)


def list_runs(store: Store, experiment: str, include_deleted: bool = False) -> list[dict[str, Any]]:
    """The experiment's runs by id. Deleted runs, and runs whose Delete is queued, are hidden by default."""
    with store.transaction():
        require_experiment(store, experiment)
        runs = store.list_runs(experiment)
        if include_deleted:
            return runs
        pending = store.list_ops(experiment, statuses=["pending"])
    return _visible(runs, pending)


def _visible(runs: list[dict[str, Any]], pending: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    being_deleted = {int(op["run_id"]) for op in pending if op["kind"] == OpKind.DELETE.value}
    return [run for run in runs if run["status"] != RunStatus.DELETED.value and int(run["run_id"]) not in being_deleted]


def experiment_snapshot(store: Store, name: str, include_deleted: bool = False) -> dict[str, Any]:
    """The experiment and its runs, each with progress, latest train loss, latest and best value of the
    experiment's metric, and its queued ops; plus the config keys whose values differ between runs."""
    with store.transaction():
        experiment = shown(store, require_experiment(store, name))
        runs = store.list_runs(name)
        pending = store.list_ops(name, statuses=["pending"])
        summary = store.metric_summary(name, TRAIN_LOSS_METRIC, experiment["metric"], experiment["mode"])
    if not include_deleted:
        runs = _visible(runs, pending)
    return snapshot_of(experiment, runs, pending, summary)


def snapshot_of(
    experiment: dict[str, Any],
    runs: list[dict[str, Any]],
    pending: Sequence[Mapping[str, Any]],
    summary: Mapping[int, Mapping[str, Any]],
) -> dict[str, Any]:
    """A snapshot from its parts: each run gets its latest train loss, the latest and best value of the
    experiment's metric (from `summary`, per run: `Store.metric_summary`'s shape) and its queued ops."""
    for run in runs:
        rid = int(run["run_id"])
        metrics = summary.get(rid, {})
        queued = [op for op in pending if int(op["run_id"]) == rid]
        run.update(
            train_loss=finite_or_none(metrics.get("train_loss")),
            latest_metric=finite_or_none(metrics.get("latest_metric")),
            best_metric=finite_or_none(metrics.get("best_metric")),
            pending_ops=len(queued),
            pending_op_kinds=[op["kind"] for op in queued],
        )
    return {
        "experiment": experiment,
        "runs": runs,
        "varying_knobs": varying_knobs([run["config"] for run in runs]) if runs else [],
    }
