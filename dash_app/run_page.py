"""The run page (`/run/<experiment>/<id>`): one run in full, reachable from every place that names the run.

Its config and the diff against its parent (or any run picked), its status history, error and traceback, best step
and value, exports and checkpoints with their paths and sizes, its ops, the lineage around it and its curves.
`run_view` gathers the facts from the store (plain data, tested directly); `run_page` lays them out.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dash import dcc, html

from dash_app import data, figures
from dash_app.downsample import M4Cache
from dash_app.routes import run_page_path
from rf_core import errors, paths
from rf_core.control import experiments, ops
from rf_core.control.store import Store
from rf_core.report import progress_text, run_row


@dataclass
class RunView:
    """Everything the run page shows about one run."""

    experiment: dict[str, Any]
    run: dict[str, Any]
    progress: str
    compare_to: dict[str, Any] | None  # the run the config is compared with (the parent unless another is picked)
    config_diff: list[tuple[str, Any, Any]]  # (knob, this run's value, the other's), knobs that differ
    history: list[tuple[float, str]]  # (time, what happened), oldest first
    ops: list[dict[str, Any]]  # the ops log rows of this run
    ancestors: list[dict[str, Any]]  # parent first, then its parent...
    children: list[dict[str, Any]]  # its clones
    files: list[tuple[str, str, int]]  # (what, path, bytes) of its checkpoints and exports
    other_runs: list[int] = field(default_factory=list)  # runs the config may be compared with


def run_view(store: Store, experiment: str, run_id: int, compare_to: int | None = None) -> RunView | None:
    """The run page's facts, or None when the experiment or the run does not exist."""
    try:
        experiment_row = experiments.get_experiment(store, experiment)
        runs = {int(run["run_id"]): run for run in experiments.list_runs(store, experiment, include_deleted=True)}
        run_ops = ops.list_ops(store, experiment, run_id=run_id)
        entries = [entry for entry in data.timeline(store, experiment) if int(entry["run_id"]) == run_id]
    except errors.NotFound:
        return None
    run = runs.get(int(run_id))
    if run is None:
        return None
    other_id = compare_to if compare_to in runs and compare_to != run_id else run.get("parent_id")
    other = runs.get(int(other_id)) if other_id is not None else None
    return RunView(
        experiment=experiment_row,
        run=run,
        progress=progress_text(run_row(run)),
        compare_to=other,
        config_diff=config_diff(run["config"], other["config"]) if other else [],
        history=status_history(run, run_ops, entries),
        ops=[row for row in data.ops_log(store, experiment) if row["run"] == run_id],
        ancestors=_ancestors(run, runs),
        children=[child for child in runs.values() if child.get("parent_id") == run_id],
        files=run_files(paths.run_dir(experiment, run_id, _home(store)), run),
        other_runs=sorted(other_id for other_id in runs if other_id != run_id),
    )


def view_signature(view: RunView | None) -> str:
    """What the page shows changes only when this does: the run's row, its history, its files and clones, and the
    run it is compared with."""
    if view is None:
        return "missing"
    compared = None if view.compare_to is None else view.compare_to["run_id"]
    state = [view.run, view.history, view.files, [child["run_id"] for child in view.children], compared]
    return json.dumps(state, sort_keys=True, default=str)


def config_diff(config: Mapping[str, Any], other: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The knobs whose values differ, in the config's order (then the other's extra keys)."""
    keys = [*config, *(key for key in other if key not in config)]
    return [(key, config.get(key), other.get(key)) for key in keys if config.get(key) != other.get(key)]


def status_history(
    run: Mapping[str, Any], run_ops: Sequence[Mapping[str, Any]], entries: Sequence[Mapping[str, Any]]
) -> list[tuple[float, str]]:
    """What happened to the run, oldest first: created, each chunk on its slot, each op applied, how it ended."""
    source = run.get("source") or "initial"
    created = f"created ({source})"
    if run.get("parent_id") is not None:
        created = f"created as a clone of run {run['parent_id']} at step {run.get('parent_step') or 0} " \
                  f"(warm start {run.get('warm_start') or 'off'})"  # fmt: skip
    events: list[tuple[float, str]] = [(float(run["created_at"]), created)]
    for entry in entries:
        chunk = int(entry["chunk"]) + 1
        events.append((float(entry["start"]), f"chunk {chunk} started on slot {entry['slot']}"))
        if entry["end"] is not None:
            events.append((float(entry["end"]), f"chunk {chunk} ended: {entry['outcome'] or 'ok'}"))
    for op in run_ops:
        who = f" by {op['who']}" if op.get("who") else ""
        events.append((float(op["submitted_at"]), f"{op['kind']} submitted ({op['source']}{who}), op {op['op_id']}"))
        if op.get("applied_at"):
            outcome = "applied" if op["status"] == "applied" else f"{op['status']}: {op.get('reason') or ''}"
            events.append((float(op["applied_at"]), f"{op['kind']} {outcome}, op {op['op_id']}"))
    if run.get("error"):
        events.append((float(run.get("updated_at") or run["created_at"]), f"failed: {run['error']}"))
    return sorted(events, key=lambda event: event[0])


def run_files(folder: Path, run: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """The run's checkpoints and exports on disk, with their sizes (a folder counts everything in it)."""
    files: list[tuple[str, str, int]] = []
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir():
        for path in sorted(checkpoints.iterdir(), key=lambda path: path.name):
            files.append(("checkpoint", str(path), _size(path)))
    for what, column in (("export (latest)", "export_latest"), ("export (best)", "export_best")):
        if run.get(column) and Path(run[column]).exists():
            files.append((what, str(run[column]), _size(Path(run[column]))))
    return files


def compare_choices(view: RunView | None) -> tuple[list[dict[str, Any]], int | None]:
    """The compare picker's options (every other run) and its value (the run compared with, if any)."""
    if view is None:
        return [], None
    options = [{"label": f"run {other_id}", "value": other_id} for other_id in view.other_runs]
    return options, None if view.compare_to is None else int(view.compare_to["run_id"])


def run_page(
    view: RunView | None, experiment: str, run_id: int, cache: M4Cache, store: Store
) -> tuple[list[Any], list[Any]]:
    """The page's parts above and below the compare picker (a clear message when the run does not exist)."""
    if view is None:
        missing = [
            html.H2(f"No run {run_id} in experiment {experiment!r}", id="run-title"),
            html.A("← all experiments", href="/", className="rf-back"),
        ]
        return missing, []
    run = view.run
    status = run["status"]
    best = (
        f"{view.experiment['metric']} {run['best_value']:.4g} at step {run['best_step']}"
        if run.get("best_value") is not None
        else "no evaluation yet"
    )
    top = [
        html.A(
            f"← experiment {experiment}",
            href=f"/?experiment={urllib.parse.quote(experiment)}&run={run_id}",
            className="rf-back",
        ),
        html.H2([f"Run {run_id}", html.Span(f" {status}", className=f"rf-run-{status.lower()}")], id="run-title"),
        html.Div(
            [
                html.Span(["name: ", html.B(run["config"].get("run_name") or "-")]),
                html.Span(["progress: ", html.B(view.progress)]),
                html.Span(["best: ", html.B(best)]),
                html.Span(["source: ", html.B(run.get("source") or "initial")]),
            ],
            className="rf-header",
        ),
        *_error_section(run),
        html.H3("Curves"),
        html.Div(_curves(cache, store, experiment, run), className="rf-charts"),
    ]
    body = [
        html.Div(
            [
                html.Div(html.Pre(json.dumps(run["config"], indent=2), id="run-config"), className="rf-half rf-pad"),
                html.Div(_diff_section(view), className="rf-half rf-pad"),
            ],
            className="rf-row",
        ),
        html.Div(
            [
                html.Div([html.H3("Status history"), _history_table(view.history)], className="rf-half rf-pad"),
                html.Div([html.H3("Lineage"), *_lineage_section(view, experiment)], className="rf-half rf-pad"),
            ],
            className="rf-row",
        ),
        html.H3("Checkpoints and exports"),
        _files_table(view.files),
        html.H3("Ops"),
        _ops_table(view.ops),
    ]
    return top, body


# -- sections ---------------------------------------------------------------------------------------------------


def _error_section(run: Mapping[str, Any]) -> list[Any]:
    if not run.get("error"):
        return []
    parts: list[Any] = [html.H3("Error"), html.Div(run["error"], className="rf-bad", id="run-error")]
    if run.get("traceback"):
        parts.append(html.Details([html.Summary("traceback"), html.Pre(run["traceback"], id="run-traceback")]))
    return parts


def _curves(cache: M4Cache, store: Store, experiment: str, run: Mapping[str, Any]) -> list[Any]:
    run_id = int(run["run_id"])
    names = data.chart_names(store, experiment)
    series = data.chart_series(cache, experiment, [run_id], names)
    cells = []
    for name in names:
        if run_id not in series.get(name, {}):
            continue
        figure = figures.metric_figure(name, {run_id: series[name][run_id]}, {}, uirevision=f"run:{run_id}:{name}")
        cells.append(html.Div(dcc.Graph(figure=figure, config={"displaylogo": False}), className="rf-chart"))
    return cells or [html.Div("no metrics yet", className="rf-label")]


def _diff_section(view: RunView) -> list[Any]:
    other = view.compare_to
    if other is None:
        return [html.Div("an initial run: pick a run to compare with", className="rf-label", id="run-diff-none")]
    title = "parent" if other["run_id"] == view.run.get("parent_id") else "run"
    rows = [html.Tr([html.Th("knob"), html.Th(f"run {view.run['run_id']}"), html.Th(f"{title} {other['run_id']}")])]
    rows += [
        html.Tr([html.Td(key), html.Td(_text(mine)), html.Td(_text(theirs))]) for key, mine, theirs in view.config_diff
    ]
    return [html.Table(rows, className="rf-table", id="run-diff") if view.config_diff else html.Div("same config")]


def _history_table(history: Sequence[tuple[float, str]]) -> Any:
    rows = [html.Tr([html.Td(data.clock(when)), html.Td(what)]) for when, what in history]
    return html.Table(rows, className="rf-table", id="run-history")


def _lineage_section(view: RunView, experiment: str) -> list[Any]:
    def link(run: Mapping[str, Any]) -> Any:
        return html.A(f"run {run['run_id']} ({run['status']})", href=run_page_path(experiment, int(run["run_id"])))

    parts: list[Any] = []
    if view.ancestors:
        parts.append(html.Div(["clone of: ", *_joined([link(run) for run in view.ancestors], " ← ")]))
    else:
        parts.append(html.Div("an initial run (no parent)"))
    if view.children:
        parts.append(html.Div(["its clones: ", *_joined([link(run) for run in view.children], ", ")]))
    return parts


def _files_table(files: Sequence[tuple[str, str, int]]) -> Any:
    if not files:
        return html.Div("no checkpoint on disk yet", className="rf-label")
    rows = [html.Tr([html.Th("what"), html.Th("path"), html.Th("size")])]
    rows += [html.Tr([html.Td(what), html.Td(html.Code(path)), html.Td(_bytes(size))]) for what, path, size in files]
    return html.Table(rows, className="rf-table", id="run-files")


def _ops_table(op_rows: Sequence[Mapping[str, Any]]) -> Any:
    if not op_rows:
        return html.Div("no op on this run", className="rf-label")
    columns = ("op", "kind", "source", "who", "status", "submitted", "applied", "detail")
    rows = [html.Tr([html.Th(column) for column in columns])]
    rows += [html.Tr([html.Td(str(row[column])) for column in columns]) for row in op_rows]
    return html.Table(rows, className="rf-table", id="run-ops")


# -- helpers ----------------------------------------------------------------------------------------------------


def _ancestors(run: Mapping[str, Any], runs: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = []
    parent = run.get("parent_id")
    while parent is not None and int(parent) in runs and len(chain) < len(runs):
        chain.append(dict(runs[int(parent)]))
        parent = runs[int(parent)].get("parent_id")
    return chain


def _home(store: Store) -> Path | None:
    path = getattr(store, "path", None)
    return Path(path).parent if path is not None else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file()) if path.is_dir() else 0


def _bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _joined(items: Sequence[Any], separator: str) -> list[Any]:
    joined: list[Any] = []
    for index, item in enumerate(items):
        if index:
            joined.append(separator)
        joined.append(item)
    return joined
