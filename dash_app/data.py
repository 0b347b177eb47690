"""What the dashboard shows, read in-process from the store through rf_core.control (plain data, no Dash).

Every write (an IC Op) also goes through rf_core.control.ops, which validates it exactly as it does for the CLI.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from dash_app.downsample import CACHE_BUCKETS, M4Cache, Series, width_for
from dash_app.figures import run_color
from dash_app.routes import run_page_path
from rf_core import errors, states
from rf_core.config import KNOBS, TRAINER_TYPES, varying_knobs
from rf_core.control import continuation, experiments, metrics, ops
from rf_core.control import timeline as chunk_timeline
from rf_core.control.store import Store
from rf_core.report import RunRow, experiment_metric, fit_state_text, progress_text, run_row, runs_text
from rf_core.report import runs_table as table_rows
from rf_core.states import OpKind, RunStatus, allowed_ops

PIXEL_BUCKETS = 400  # about a chart's width in pixels on a laptop screen, two charts side by side
POINTS_PER_CHART = 48_000  # beyond this the browser redraws slowly: fewer buckets per run when runs are many
MIN_BUCKETS = 100
# Metrics shown first, in this order; any other metric follows alphabetically.
# The charts' order: the losses and the schedule, then what DPO and GRPO runs are judged by, then the rest by name.
METRIC_ORDER = (
    states.TRAIN_LOSS_METRIC,
    states.LEARNING_RATE_METRIC,
    states.EVAL_LOSS_METRIC,
    states.LOGGED_LOSS_METRIC,
    "rewards/margins",
    "rewards/accuracies",
    "eval_rewards/margins",
    "eval_rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "reward",
    "eval_reward",
    "reward_std",
    "kl",
)
# A loss means another thing for each trainer type (SFT's cross-entropy, DPO's preference loss): where an
# experiment mixes types, each type's runs get their own chart of it ("train_loss@dpo").
CHART_TYPE_SEPARATOR = "@"
IC_OPS_CELL = "IC Ops ▸"
MAX_SMOOTHING = 0.95  # the smoothing slider's top: an EMA weight of 1 would draw a flat line


def experiment_in_query(search: str | None) -> str | None:
    """The experiment a page URL names (`?experiment=NAME`, the link every fit prints), if any."""
    values = urllib.parse.parse_qs((search or "").lstrip("?")).get("experiment")
    return values[0] if values else None


def run_in_query(search: str | None, experiment: str | None) -> int | None:
    """The run a page URL opens (`?experiment=NAME&run=ID`), when NAME is `experiment`."""
    query = urllib.parse.parse_qs((search or "").lstrip("?"))
    runs = query.get("run")
    if not runs or not experiment or query.get("experiment", [None])[0] != experiment:
        return None
    return int(runs[0]) if runs[0].isdigit() else None


def x_axis_in_query(search: str | None) -> str | None:
    values = urllib.parse.parse_qs((search or "").lstrip("?")).get("x")
    return values[0] if values and values[0] in ("step", "lineage", "relative", "wall") else None


def ticks_in_query(search: str | None) -> list[int]:
    """The runs a page URL ticks (`?runs=1,3`)."""
    values = urllib.parse.parse_qs((search or "").lstrip("?")).get("runs")
    return [int(item) for item in values[0].split(",") if item.strip().isdigit()] if values else []


def zoom_in_query(search: str | None) -> dict[str, tuple[float, float]]:
    """Each chart's x range a page URL keeps (`?zoom=train_loss:120:210;eval_loss:100:300`)."""
    values = urllib.parse.parse_qs((search or "").lstrip("?")).get("zoom")
    ranges: dict[str, tuple[float, float]] = {}
    for item in values[0].split(";") if values else []:
        name, _, bounds = item.rpartition(":")
        name, _, low = name.rpartition(":")
        try:
            ranges[name] = (float(low), float(bounds))
        except ValueError:
            continue
    return {name: bounds for name, bounds in ranges.items() if name}


def y_scales_in_query(search: str | None) -> dict[str, str]:
    """Each chart's y scale a page URL keeps (`?y=train_loss:log;learning_rate:linear`: the ones people changed)."""
    values = urllib.parse.parse_qs((search or "").lstrip("?")).get("y")
    scales: dict[str, str] = {}
    for item in values[0].split(";") if values else []:
        name, _, scale = item.rpartition(":")
        if name and scale in ("linear", "log"):
            scales[name] = scale
    return scales


def smoothing_in_query(search: str | None) -> float | None:
    """The smoothing a page URL asks for (`?smoothing=0.6`), within the slider's range; None if none or invalid."""
    values = urllib.parse.parse_qs((search or "").lstrip("?")).get("smoothing")
    try:
        smoothing = float(values[0]) if values else None
    except ValueError:
        return None
    return smoothing if smoothing is not None and 0 <= smoothing <= MAX_SMOOTHING else None


def experiment_options(store: Store) -> list[dict[str, str]]:
    """Dropdown options, newest experiment first."""
    return [
        {"label": f"{row['name']} ({row['status']})", "value": row["name"]}
        for row in experiments.list_experiments(store)
    ]


# -- header and runs table ----------------------------------------------------------------------------------


def snapshot(store: Store, experiment: str | None, include_deleted: bool = False) -> dict[str, Any] | None:
    if not experiment:
        return None
    try:
        return experiments.experiment_snapshot(store, experiment, include_deleted=include_deleted)
    except errors.NotFound:
        return None


def runs_view(
    store: Store, cache: M4Cache, experiment: str | None, include_deleted: bool = False
) -> dict[str, Any] | None:
    """What `experiments.experiment_snapshot` returns (experiment, runs with their latest and best metrics and queued
    ops, varying knobs), with the metrics read from the charts' cache instead of a scan of every point: on every
    refresh tick, that scan cost ~300 ms with 64 runs x 20,000 steps."""
    if not experiment:
        return None
    try:
        experiment_row = experiments.get_experiment(store, experiment)
        runs = experiments.list_runs(store, experiment, include_deleted=include_deleted)
        pending = ops.list_ops(store, experiment, status="pending")
    except errors.NotFound:
        return None
    summary = cache.summary(experiment, states.TRAIN_LOSS_METRIC, experiment_row["metric"], experiment_row["mode"])
    return experiments.snapshot_of(experiment_row, runs, pending, summary)


def header_summary(snap: Mapping[str, Any], timeline: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Experiment status, runs by status, chunks done of all planned, device slots busy."""
    experiment = snap["experiment"]
    runs = [run for run in snap["runs"] if run["status"] != RunStatus.DELETED]
    done = sum(int(run.get("chunks_done") or 0) for run in runs)
    planned = sum(int(run.get("total_chunks") or experiment["num_chunks"]) for run in runs)
    slots = {int(entry["slot"]) for entry in timeline}
    busy = {int(entry["slot"]) for entry in timeline if entry["end"] is None}
    by_status = Counter(run["status"] for run in snap["runs"])
    return {
        "name": experiment["name"],
        "status": experiment["status"],
        "status_text": fit_state_text(experiment),
        "runs_by_status": {status.value: by_status[status.value] for status in RunStatus if by_status[status.value]},
        "chunks_done": done,
        "chunks_planned": planned,
        "slots_busy": len(busy),
        "slots_seen": len(slots),
        "metric": f"{experiment['metric']} ({experiment['mode']})",
        "started": clock(experiment["created_at"]),
        "ended": clock(experiment["ended_at"]) if experiment.get("ended_at") else None,
    }


def runs_table(
    store: Store, experiment: str | None, include_deleted: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rowData, columnDefs) for the runs grid of `experiment`; empty when there is no such experiment."""
    return runs_grid(snapshot(store, experiment, include_deleted))


def runs_grid(snap: Mapping[str, Any] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rowData, columnDefs) for the runs grid: one row per run, plus a column per varying knob."""
    if snap is None:
        return [], []
    metric = experiment_metric(snap)
    knobs, runs = table_rows(snap)
    # SFT's eval loss and DPO's are not one quantity: where types mix, each type gets its own metric columns, so a
    # sort ranks runs of one type.
    types = _row_types(runs) if "trainer_type" in knobs else {}
    type_order = [trainer_type for trainer_type in TRAINER_TYPES if trainer_type in set(types.values())]
    rows = [
        {
            "run": row.run_id,
            "row_id": str(row.run_id),  # AG Grid's row ids are strings (a number is cast, with a warning)
            "page": run_page_path(snap["experiment"]["name"], row.run_id),
            "color": run_color(row.run_id),
            "name": row.name,
            "status": row.status,
            "source": row.source,
            "parent": row.parent_id,
            "warm_start": warm_start_text(row),
            "progress": progress_text(row),
            "train_loss": row.train_loss,
            "latest_metric": row.latest_metric,
            "best_metric": row.best_metric,
            "pending_ops": ", ".join(row.pending_op_kinds),
            "ic_ops": IC_OPS_CELL,
            **{f"knob:{knob}": _display(row.knobs[knob]) for knob in knobs},
            **_typed_metrics(row, types),
        }
        for row in runs
    ]
    number = {"valueFormatter": {"function": "params.value == null ? '-' : d3.format('.4~g')(params.value)"}}
    # What decides between runs comes first (status, the metric, the knobs), so it is on screen at 1366 px too;
    # the run's curve colour is the bar on its id.
    columns = [
        {
            "field": "run",
            "width": 90,
            "pinned": "left",
            "cellStyle": {"function": "({borderLeft: '6px solid ' + params.data.color})"},
            "cellRenderer": "RunLink",  # assets/page.js: the id links to the run's page
        },
        *([{"field": "name", "width": 140, "pinned": "left"}] if any(row.name for row in runs) else []),
        {
            "field": "ic_ops",
            "headerName": "IC Ops",
            "width": 100,
            "pinned": "left",
            "sortable": False,
            "filter": False,
            "cellClass": "ic-ops-cell",
        },
        {"field": "status", "width": 115, "cellClassRules": STATUS_CELL_CLASSES},
        *(
            column
            for suffix in ([f"@{trainer_type}" for trainer_type in type_order] or [""])
            for column in (
                {"field": f"latest_metric{suffix}", "headerName": f"{metric}{_type_label(suffix)}", "width": 120,
                 **number},
                {"field": f"best_metric{suffix}", "headerName": f"best {metric}{_type_label(suffix)}", "width": 130,
                 **number},
            )
        ),
        *({"field": f"knob:{knob}", "headerName": knob, "width": 140} for knob in knobs),
        {"field": "progress", "minWidth": 270, "flex": 1},
        {"field": "train_loss", "headerName": "last train loss", "width": 130, **number,
         "headerTooltip": "the minibatch loss of the run's last step (noisy: the charts show its curve)"},
        {"field": "pending_ops", "headerName": "pending ops", "width": 130},
        {"field": "source", "width": 110},
        {"field": "parent", "width": 90},
        {"field": "warm_start", "headerName": "warm start", "width": 240},
    ]  # fmt: skip
    return rows, columns


def _row_types(runs: Sequence[RunRow]) -> dict[int, str]:
    return {row.run_id: trainer_type_name(row.knobs.get("trainer_type")) for row in runs}


def _typed_metrics(row: RunRow, types: Mapping[int, str]) -> dict[str, Any]:
    """The run's metric under its own trainer type's columns (none where the experiment has one type)."""
    if row.run_id not in types:
        return {}
    suffix = f"@{types[row.run_id]}"
    return {f"latest_metric{suffix}": row.latest_metric, f"best_metric{suffix}": row.best_metric}


def _type_label(suffix: str) -> str:
    return f" ({suffix[1:].upper()})" if suffix else ""


# One CSS class per run status (dashboard.css colours them as the lineage does).
STATUS_CELL_CLASSES = {f"rf-run-{status.value.lower()}": f"params.value == '{status.value}'" for status in RunStatus}


def new_events(
    store: Store, experiment: str | None, seen: Mapping[str, Any] | None
) -> tuple[list[tuple[str, str]], dict[str, Any] | None]:
    """What happened since the page last looked, as (kind, text) toasts: each op applied or skipped, each run that
    failed; and what the page has now seen. The first look at an experiment tells nothing (it is not news)."""
    if not experiment:
        return [], None
    try:
        op_rows = ops.list_ops(store, experiment)
        runs = experiments.list_runs(store, experiment, include_deleted=True)
    except errors.NotFound:
        return [], None
    done = {int(op["op_id"]): op for op in op_rows if op["status"] != "pending"}
    failed = {int(run["run_id"]): run for run in runs if run["status"] == RunStatus.FAILED}
    now_seen = {"experiment": experiment, "ops": sorted(done), "failed": sorted(failed)}
    if not seen or seen.get("experiment") != experiment:
        return [], now_seen
    events: list[tuple[str, str]] = []
    for op_id in sorted(set(done) - set(seen.get("ops") or [])):
        op = done[op_id]
        kind = "ok" if op["status"] == "applied" else "bad"
        events.append((kind, f"op {op_id} ({op['kind']} run {op['run_id']}) {op['status']}: {op_detail(op)}"))
    for run_id in sorted(set(failed) - set(seen.get("failed") or [])):
        events.append(("bad", f"run {run_id} failed: {failed[run_id].get('error') or 'no reason recorded'}"))
    return events, now_seen


def visible_runs(
    kept_rows: Sequence[Mapping[str, Any]] | None,
    ticked_rows: Sequence[Mapping[str, Any]] | None,
    all_rows: Sequence[Mapping[str, Any]] | None,
) -> list[int] | None:
    """The runs the charts, timeline and lineage show: the ticked rows; with none ticked, the rows the table's
    filters keep; None when that is every row (so a run that appears later shows at once)."""
    if ticked_rows:
        return sorted(int(row["run"]) for row in ticked_rows)
    kept = sorted(int(row["run"]) for row in kept_rows or [])
    every = sorted(int(row["run"]) for row in all_rows or [])
    return None if kept_rows is None or kept == every else kept


def grid_height(rows: int) -> str:
    """The runs grid's height: every row up to 15, then a scrollbar (a row is 42 px, header and filters 100)."""
    return f"{100 + 42 * min(max(rows, 3), 15)}px"


def warm_start_text(row: RunRow) -> str:
    if not row.is_clone:
        return ""
    if not row.is_warm:
        return "cold"
    return f"{row.warm_start} of run {row.parent_id} @ step {row.parent_step or 0}"


# -- charts -------------------------------------------------------------------------------------------------


def buckets_for(num_runs: int) -> int:
    """Pixel buckets per curve: one per pixel, fewer when many runs would put too many points on one chart."""
    return max(MIN_BUCKETS, min(PIXEL_BUCKETS, POINTS_PER_CHART // (4 * max(num_runs, 1))))


def ordered_metrics(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [name for name in METRIC_ORDER if name in names] + sorted(names - set(METRIC_ORDER))


def chart_cache(store: Store) -> M4Cache:
    """The charts' downsampled points of every experiment, kept current from the store's new rows."""
    return M4Cache(
        lambda experiment, width, after_row: metrics.metric_buckets(store, experiment, width, after_row),
        lambda experiment: width_for(metrics.max_metric_step(store, experiment) or 0, CACHE_BUCKETS),
    )


def chart_series(
    cache: M4Cache, experiment: str, run_ids: Sequence[int], names: Sequence[str], up_to_date: bool = False
) -> dict[str, dict[int, Series]]:
    """Per metric (in display order), each listed run's downsampled points (`up_to_date`: see M4Cache.series)."""
    if not run_ids:
        return {}
    return cache.series(experiment, ordered_metrics(names), run_ids, buckets_for(len(run_ids)), up_to_date)


def chart_names(store: Store, experiment: str | None) -> list[str]:
    """The metrics the experiment has logged, in display order: one chart each."""
    if not experiment:
        return []
    try:
        return ordered_metrics(metrics.metric_names(store, experiment))
    except errors.NotFound:
        return []


def chart_keys(store: Store, experiment: str | None) -> list[str]:
    """The dashboard's charts, in display order: one per metric logged, and one per trainer type for each loss
    when the experiment's runs are of more than one type."""
    names = chart_names(store, experiment)
    types = trainer_types(store, experiment) if names else []
    if len(types) < 2:
        return names
    return [
        f"{name}{CHART_TYPE_SEPARATOR}{trainer_type}" if is_loss(name) else name
        for name in names
        for trainer_type in (types if is_loss(name) else types[:1])
    ]


def chart_metric(key: str) -> tuple[str, str | None]:
    """(metric, trainer type) a chart key stands for; the type is None where the chart shows every run."""
    metric, _, trainer_type = key.partition(CHART_TYPE_SEPARATOR)
    return metric, trainer_type or None


def is_loss(metric: str) -> bool:
    return metric == states.LOGGED_LOSS_METRIC or metric.endswith("_loss")


def trainer_types(store: Store, experiment: str | None) -> list[str]:
    """The trainer types of the experiment's runs, deleted ones too (their curves can be shown), in TRAINER_TYPES
    order. One distinct-values query: the chart list asks on every refresh tick."""
    if not experiment:
        return []
    values = store.config_values(experiment, "trainer_type")
    present = {trainer_type_name(value) for value in values}
    return [trainer_type for trainer_type in TRAINER_TYPES if trainer_type in present]


def run_trainer_type(run: Mapping[str, Any]) -> str:
    return trainer_type_name((run.get("config") or {}).get("trainer_type"))


def trainer_type_name(value: Any) -> str:
    """A config's trainer_type as the dashboard keys it: lower case, the knob's default where unset."""
    return str(value or KNOBS["trainer_type"].default).lower()


def chart_runs(
    store: Store, experiment: str | None, include_deleted: bool
) -> tuple[list[dict[str, Any]], list[str]] | None:
    """The runs the charts show (deleted ones, and those whose Delete is queued, only on request) and the knobs
    that vary between them."""
    if not experiment:
        return None
    try:
        runs = experiments.list_runs(store, experiment, include_deleted=include_deleted)
    except errors.NotFound:
        return None
    return runs, varying_knobs([run["config"] for run in runs]) if runs else []


def chart_x(
    store: Store,
    experiment: str,
    runs: Sequence[Mapping[str, Any]],
    series: Mapping[str, Mapping[int, Series]],
    x_axis: str,
) -> dict[str, dict[int, Series]]:
    """The curves with x as the page asks: "lineage" (a warm clone from its parent's step, `step_offsets`),
    "relative" (minutes since the run's first step) or "wall" (the server's clock, as Plotly's date axis takes it:
    milliseconds, shifted to local time). Times come from when each run logged its train_loss, interpolated
    between one sample per bucket of steps."""
    if x_axis == "lineage":
        offsets = step_offsets(runs)
        return {name: {run: (steps + offsets.get(run, 0), values) for run, (steps, values) in curves.items()}
                for name, curves in series.items()}  # fmt: skip
    last_step = metrics.max_metric_step(store, experiment) or 0
    samples = metrics.step_times(store, experiment, states.TRAIN_LOSS_METRIC, max(1, last_step // 2000))
    local_offset = time.localtime().tm_gmtoff
    moved: dict[str, dict[int, Series]] = {}
    for name, curves in series.items():
        moved[name] = {}
        for run_id, (steps, values) in curves.items():
            if run_id not in samples:
                continue  # a run with no training step logged has no times to place its points at
            known_steps, known_times = samples[run_id]
            times = np.interp(steps, known_steps, known_times)
            x = (times - known_times[0]) / 60 if x_axis == "relative" else (times + local_offset) * 1000
            moved[name][run_id] = (x, values)
    return moved


def step_offsets(runs: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Per run, the step its curve starts from when warm clones continue their parent's curve: a warm clone's own
    step 0 is its parent's step at the clone (and so on up a chain of warm clones); everything else starts at 0."""
    by_id = {int(run["run_id"]): run for run in runs}
    offsets: dict[int, int] = {}

    def offset(run_id: int, seen: frozenset[int] = frozenset()) -> int:
        if run_id in offsets:
            return offsets[run_id]
        run = by_id.get(run_id)
        parent = run.get("parent_id") if run else None
        warm = run is not None and (run.get("warm_start") or "off") != "off"
        if parent is None or not warm or int(parent) in seen:
            value = 0
        else:
            value = int(run.get("parent_step") or 0) + (offset(int(parent), seen | {run_id}) if int(parent) in by_id
                                                        else 0)  # fmt: skip
        offsets[run_id] = value
        return value

    return {run_id: offset(run_id) for run_id in by_id}


def hover_labels(runs: Sequence[Mapping[str, Any]], knobs: Sequence[str]) -> dict[int, str]:
    """Per run, the knobs that differ between runs, as "name=value" lines (plain text) for the chart hover, and
    the runs with the very same config: their curves lie on top of each other, and only the hover can say so."""
    twins: dict[str, list[int]] = {}
    for run in runs:
        config = {key: value for key, value in run["config"].items() if key != "run_name"}
        twins.setdefault(json.dumps(config, sort_keys=True, default=str), []).append(int(run["run_id"]))
    same = {run_id: [other for other in group if other != run_id] for group in twins.values() for run_id in group}
    labels = {}
    for run in runs:
        run_id = int(run["run_id"])
        lines = [f"{knob}={_display(run['config'].get(knob))}" for knob in knobs]
        if same.get(run_id):
            lines.append(f"same config as {runs_text(same[run_id])} (curves may overlap)")
        labels[run_id] = "\n".join(lines)
    return labels


# -- ops log and timeline -----------------------------------------------------------------------------------


def ops_log(store: Store, experiment: str | None) -> list[dict[str, Any]]:
    """Every op of the experiment, newest first: who, what, when, status and result."""
    if not experiment:
        return []
    try:
        rows = ops.list_ops(store, experiment)
    except errors.NotFound:
        return []
    return [
        {
            "op": op["op_id"],
            "row_id": str(op["op_id"]),
            "run": op["run_id"],
            "kind": op["kind"],
            "source": op["source"],
            "who": op["who"] or "",
            "status": op["status"],
            "submitted": clock(op["submitted_at"]),
            "applied": clock(op["applied_at"]) if op["applied_at"] else "",
            "detail": op_detail(op),
        }
        for op in reversed(rows)
    ]


OPS_LOG_COLUMNS = [
    {"field": "op", "width": 75},
    {"field": "run", "width": 75},
    {"field": "kind", "width": 90},
    {"field": "source", "width": 110},
    {"field": "who", "width": 110},
    {"field": "status", "width": 100},
    {"field": "submitted", "width": 165},
    {"field": "applied", "width": 165},
    {"field": "detail", "flex": 1, "minWidth": 250, "tooltipField": "detail"},
]


def op_detail(op: Mapping[str, Any]) -> str:
    """One line saying what the op did, or why it was skipped."""
    if op["status"] == "skipped":
        return f"skipped: {op.get('reason') or ''}"
    payload, result = op.get("payload") or {}, op.get("result") or {}
    parts = []
    if op["kind"] == OpKind.CLONE:
        parts.append(f"{payload.get('count', '?')} clone(s), warm start {payload.get('warm_start', 'off')}")
        overrides = (payload.get("request") or {}).get("overrides")
        if isinstance(overrides, Mapping) and overrides:
            # What the clone changed, a switch of trainer type included: the ops log is where people look back.
            parts.append("set " + ", ".join(f"{key}={_short_json(value)}" for key, value in overrides.items()))
        if result.get("created_run_ids"):
            parts.append("created " + runs_text(result["created_run_ids"]))
    elif result:
        parts.append(f"{result.get('from')} → {result.get('to')}")
    if isinstance(payload.get("policy"), Mapping) and payload["policy"].get("reason"):
        parts.append(f"policy: {payload['policy']['reason']}")
    return "; ".join(parts)


def _short_json(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def timeline(store: Store, experiment: str | None) -> list[dict[str, Any]]:
    if not experiment:
        return []
    try:
        return chunk_timeline.timeline(store, experiment)
    except errors.NotFound:
        return []


# -- the IC Ops panel ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelState:
    """What the IC Ops panel shows for one run."""

    run_id: int
    status: str
    progress: str
    source: str
    parent: str
    pending: list[str]
    allowed: frozenset[str]  # the ops the state table allows once the pending ops apply
    will_be: str  # the status once the pending ops apply
    config: dict[str, Any] = field(default_factory=dict)
    page: str = ""  # the run page's path


def panel_state(store: Store, experiment: str | None, run_id: int | None) -> PanelState | None:
    if not experiment or run_id is None:
        return None
    try:
        run = experiments.get_run(store, experiment, run_id)
        pending = ops.list_ops(store, experiment, run_id=run_id, status="pending")
    except errors.NotFound:
        return None
    future, _ = ops.fold_pending(run["status"], pending)
    row = run_row(run)
    parent = f"clone of run {row.parent_id} ({warm_start_text(row)})" if row.is_clone else ""
    return PanelState(
        run_id=row.run_id,
        status=row.status,
        progress=progress_text(row),
        source=run["source"],
        parent=parent,
        pending=[f"{op['kind']} (op {op['op_id']})" for op in pending],
        allowed=frozenset(op.value for op in allowed_ops(future)),
        will_be=future.value,
        config=run["config"],
        page=run_page_path(experiment, row.run_id),
    )


def config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2)


@dataclass(frozen=True)
class CloneCheck:
    """A Clone-Modify request read from the panel: the payload to submit, or every problem with it."""

    payload: dict[str, Any] | None
    problems: list[str]
    count: int = 0
    bad_json_at: tuple[int, int] | None = None  # (line, column) of malformed JSON


def read_clone_request(text: str | None, warm_start: str | None) -> CloneCheck:
    """Parse the JSON box: a full config, where a knob may be tagged ($list, $range) or the whole config a
    generator ($grid, $random)."""
    try:
        config = json.loads(text or "")
    except json.JSONDecodeError as exc:
        return CloneCheck(
            None, [f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"], 0, (exc.lineno, exc.colno)
        )
    if not isinstance(config, dict):
        return CloneCheck(None, [f"the config must be a JSON object, got {type(config).__name__}"])
    return CloneCheck({"config": config, "warm_start": warm_start or "off"}, [])


def check_clone(store: Store, experiment: str, run_id: int, text: str | None, warm_start: str | None) -> CloneCheck:
    """The clone request checked as `submit_op` will check it, with the number of clones it creates."""
    request = read_clone_request(text, warm_start)
    if request.payload is None:
        return request
    verdict = ops.preview_op(store, experiment, OpKind.CLONE, run_id, request.payload)
    return CloneCheck(request.payload, verdict["problems"], verdict["count"])


_KEY_IN_PROBLEM = (
    re.compile(r"^(?:clone \d+ of \d+: )?([A-Za-z_][\w.-]*)="),  # "learning_rate=-1: must be > 0"
    re.compile(r"'([A-Za-z_][\w.-]*)'"),  # "unknown key 'learnin_rate' (did you mean ...)"
    re.compile(r"^(?:clone \d+ of \d+: )?.*?\b(\w+) differs"),  # "warm start needs ...: r differs: ..."
)


def annotate_problems(
    text: str, problems: Sequence[str], bad_json_at: tuple[int, int] | None = None
) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Place each problem under the line of the JSON box it is about.

    Returns ([(line text, messages under it)] for every line, problems that name no line of the text).
    """
    lines = (text or "").split("\n")
    notes: dict[int, list[str]] = {}
    unplaced = []
    for problem in problems:
        line = _line_of_problem(lines, problem, bad_json_at)
        if line is None:
            unplaced.append(problem)
        else:
            notes.setdefault(line, []).append(problem)
    return [(line, notes.get(index, [])) for index, line in enumerate(lines)], unplaced


def _line_of_problem(lines: Sequence[str], problem: str, bad_json_at: tuple[int, int] | None) -> int | None:
    if bad_json_at is not None and problem.startswith("malformed JSON"):
        return min(max(bad_json_at[0] - 1, 0), len(lines) - 1)
    for pattern in _KEY_IN_PROBLEM:
        match = pattern.search(problem)
        if match:
            key_pattern = re.compile(r'"' + re.escape(match.group(1)) + r'"\s*:')
            for index, line in enumerate(lines):
                if key_pattern.search(line):
                    return index
    return None


def submit(
    store: Store, experiment: str, kind: str, run_id: int, payload: dict[str, Any] | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """Queue an IC Op from the dashboard: (the op's row, []) or (None, every reason it was rejected)."""
    try:
        return ops.submit_op(store, experiment, kind, run_id, payload=payload, source="dashboard", who=None), []
    except (errors.InvalidRequest, errors.NotFound) as exc:
        return None, list(exc.problems)


def accepted_message(op: Mapping[str, Any], fit_state: str = "running") -> str:
    what = op["kind"]
    if op["kind"] == OpKind.CLONE:
        count = op["payload"].get("count", 1)
        what = f"clone ×{count}" if count != 1 else "clone"
    if fit_state != "running":
        return f"op {op['op_id']} ({what}) queued; starts when the experiment continues (Continue experiment, above)"
    return f"op {op['op_id']} ({what}) queued: applies at run {op['run_id']}'s next chunk boundary"


def fit_state(store: Store, experiment: str) -> str:
    """ "running", "crashed" or "finished" (rf_core.control.leases)."""
    return str(experiments.get_experiment(store, experiment)["status"])


def continue_experiment(
    store: Store, experiment: str, who: str = "dashboard"
) -> tuple[dict[str, Any] | None, list[str]]:
    """Start a fit that continues the experiment: through the rf-fit deployment when a Prefect server this rf server
    knows (PREFECT_API_URL) serves one, else as a background `rf continue` on this machine. (what was started, [])
    or (None, why not)."""
    try:
        row = experiments.get_experiment(store, experiment)
        continuation.reserve_for_continuation(store, experiment, who)
    except (errors.InvalidRequest, errors.NotFound) as exc:
        return None, list(exc.problems)
    through = _through_deployment(row)
    if through is not None:
        return {"experiment": experiment, "deployment": through.deployment, "flow_run": through.flow_run}, []
    return continuation.spawn_continue(experiment), []


def _through_deployment(row: Mapping[str, Any]) -> Any:
    if not os.environ.get("PREFECT_API_URL") or not row.get("spec_ref"):
        return None  # Prefect is imported only when a deployment may serve the experiment
    try:
        from flows.continuation import continue_through_deployment

        return continue_through_deployment(row)
    except Exception:  # noqa: BLE001 - no deployment answers: the local process continues it instead
        return None


def clock(epoch_seconds: float | None) -> str:
    if not epoch_seconds:
        return ""
    return datetime.fromtimestamp(float(epoch_seconds)).strftime("%Y-%m-%d %H:%M:%S")


def _display(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else json.dumps(value)


def now() -> float:
    return time.time()
