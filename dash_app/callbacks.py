"""Thin callbacks: each reads its inputs, calls dash_app.data / dash_app.figures, and returns what to show.

The helpers they call are plain functions (tested directly); the callbacks themselves are tested by calling
them as functions, with Dash's callback context set where they read it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dash import ALL, ClientsideFunction, Dash, Input, Output, Patch, State, ctx, html, no_update
from dash.exceptions import MissingCallbackContextException

from dash_app import data, figures, routes, run_page, sweep
from dash_app.downsample import M4Cache
from dash_app.layout import FirstView, chart_cell, chart_cells, metric_graph_id
from rf_core.config import TRAINER_TYPES, varying_knobs
from rf_core.control.store import Store
from rf_core.report import experiment_metric, runs_table

Callbacks = dict[str, Any]
# Every metric chart's graph, and its lin/log switch (pattern-matching ids: see dash_app.layout.metric_graph_id).
ALL_GRAPHS = {"type": "metric-graph", "metric": ALL, "experiment": ALL, "cells": ALL}
ALL_Y_SCALES = {"type": "y-scale", "metric": ALL, "experiment": ALL, "cells": ALL}


def register_callbacks(app: Dash, store: Store, cache: M4Cache | None = None) -> Callbacks:
    """Register every dashboard callback on `app`, reading and writing `store` (the charts' points through `cache`,
    shared with the page's layout); returns them by name."""
    callbacks: Callbacks = {}
    cache = cache if cache is not None else data.chart_cache(store)

    def register(*dependencies: Any, **kwargs: Any) -> Any:
        def wrap(function: Any) -> Any:
            callbacks[function.__name__] = function
            app.callback(*dependencies, **kwargs)(function)
            return function

        return wrap

    @register(
        Output("experiment-select", "options"),
        Output("experiment-select", "value"),
        Input("refresh", "n_intervals"),
        Input("url", "search"),
        State("experiment-select", "value"),
    )
    def refresh_experiments(
        _: int | None, search: str | None, selected: str | None
    ) -> tuple[list[dict[str, str]], str | None]:
        options = data.experiment_options(store)
        names = [option["value"] for option in options]
        # The page's first call (nothing triggered it yet) and a URL change follow the link; a refresh keeps the pick.
        asked = data.experiment_in_query(search) if _triggered_id() in (None, "url") else None
        if asked in names:
            chosen = asked
        else:
            chosen = selected if selected in names else (names[0] if names else None)
        return options, chosen if chosen != selected else no_update

    @register(
        Output("header", "children"),
        Output("continue-experiment", "style"),
        Output("runs-grid", "rowData"),
        Output("runs-grid", "columnDefs"),
        Output("hidden-columns", "options"),
        Output("runs-grid", "style"),
        Input("experiment-select", "value"),
        Input("refresh", "n_intervals"),
        Input("show-deleted", "value"),
        Input("ops-changed", "data"),
        Input("hidden-columns", "value"),
        Input("charts-drawn", "data"),
        State("runs-grid", "columnDefs"),
    )
    def refresh_runs(
        experiment: str | None,
        _: int | None,
        show_deleted: list[str] | None,
        __: int | None,
        hidden: list[str] | None,
        charts_drawn: bool | None,
        current_columns: list[dict[str, Any]] | None,
    ) -> tuple[Any, ...]:
        snap = data.runs_view(store, cache, experiment, include_deleted=bool(show_deleted))
        if snap is None:
            return header_children(None), HIDDEN, [], [], [], no_update
        rows, columns = data.runs_grid(snap)
        hidden_set = set(hidden or [])
        columns = [{**column, "hide": column["field"] in hidden_set} for column in columns]
        options = [{"label": column.get("headerName", column["field"]), "value": column["field"]} for column in columns]
        # Re-sending unchanged column definitions would undo the user's column widths and order.
        columns_out = columns if columns != current_columns else no_update
        summary = data.header_summary(snap, data.timeline(store, experiment))
        continuable = HIDDEN if summary["status"] == "running" else {}
        height = {"height": data.grid_height(len(rows))}
        if not charts_drawn and _triggered_id() is None:
            # The page's first call: the table's rows wait until the first charts are drawn (assets/page.js says
            # when), as rendering them first would hold the charts back by most of a second on a busy machine.
            return header_children(summary), continuable, no_update, no_update, options, height
        return header_children(summary), continuable, rows, columns_out, options, height

    @register(
        Output("visible-runs", "data"),
        Input("runs-grid", "virtualRowData"),
        Input("runs-grid", "selectedRows"),
        State("runs-grid", "rowData"),
        State("visible-runs", "data"),
        prevent_initial_call=True,
    )
    def follow_the_table(
        kept_rows: list[dict[str, Any]] | None,
        ticked_rows: list[dict[str, Any]] | None,
        all_rows: list[dict[str, Any]] | None,
        shown: list[int] | None,
    ) -> Any:
        visible = data.visible_runs(kept_rows, ticked_rows, all_rows)
        return no_update if visible == shown else visible

    @register(
        Output("charts", "children"),
        Output("metric-names", "data"),
        Input("experiment-select", "value"),
        Input("refresh", "n_intervals"),
        State("metric-names", "data"),
        State(ALL_Y_SCALES, "value"),
        State(ALL_Y_SCALES, "id"),
    )
    def refresh_chart_list(
        experiment: str | None,
        _: int | None,
        shown: Mapping[str, Any] | None,
        scale_values: list[str | None] | None = None,
        scale_ids: list[dict[str, Any]] | None = None,
    ) -> tuple[Any, Any]:
        names = data.chart_keys(store, experiment)
        if shown and (shown.get("experiment"), shown.get("names")) == (experiment, names):
            return no_update, no_update
        cells = int((shown or {}).get("cells") or 0)
        if not names or not experiment:
            message = "no metrics yet" if experiment else "no experiment yet: start one with rf demo or run_fit"
            return [html.Div(message, className="rf-label")], {"experiment": experiment, "names": names, "cells": cells}
        inserts = chart_inserts(shown, experiment, names)
        # A chart drawn anew keeps the y scale its metric was shown on.
        scales = y_scales_by_metric(scale_ids, scale_values)
        if inserts is None:
            cells += 1
            shown_now = {"experiment": experiment, "names": names, "cells": cells}
            return chart_cells(names, experiment, cells, scales), shown_now
        # A new metric (eval_loss after the first chunk) joins the charts already drawn: they keep their zoom.
        children = Patch()
        for index, name in inserts:
            children.insert(index, chart_cell(name, experiment, cells, scales.get(name)))
        return children, {"experiment": experiment, "names": names, "cells": cells}

    @register(
        Output(ALL_GRAPHS, "figure"),
        Output("chart-signatures", "data"),
        Input(ALL_GRAPHS, "id"),
        Input("refresh", "n_intervals"),
        Input("show-deleted", "value"),
        Input("smoothing", "value"),
        Input("ops-changed", "data"),
        Input("visible-runs", "data"),
        Input("x-axis", "value"),
        State("experiment-select", "value"),
        State("chart-signatures", "data"),
        State("url", "search"),
        State(ALL_Y_SCALES, "value"),
        State(ALL_Y_SCALES, "id"),
    )
    def refresh_charts(
        graph_ids: list[dict[str, Any]],
        _: int | None,
        show_deleted: list[str] | None,
        smoothing: float | None,
        __: int | None,
        visible: list[int] | None,
        x_axis: str | None,
        experiment: str | None,
        sent: Mapping[str, Any] | None,
        search: str | None = None,
        scale_values: list[str | None] | None = None,
        scale_ids: list[dict[str, Any]] | None = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        scales = y_scales_by_metric(scale_ids, scale_values, experiment)
        view = ChartView(bool(show_deleted), smoothing, visible, x_axis or "step", scales)
        # A link's zoom applies to the charts' first drawing of its experiment (after that, the user's zoom rules).
        first_look = (sent or {}).get("experiment") != experiment and data.experiment_in_query(search) == experiment
        zoom = data.zoom_in_query(search) if first_look else {}
        updates, shown = chart_updates(store, cache, experiment, graph_ids, view, sent, zoom)
        return updates, (no_update if shown == sent else shown)

    @register(
        Output(ALL_GRAPHS, "figure", allow_duplicate=True),
        Input(ALL_Y_SCALES, "value"),
        prevent_initial_call=True,
    )
    def set_y_scales(scales: list[str | None]) -> list[Any]:
        """A chart's lin/log switch: its y axis changes, nothing else (the zoom on x stays)."""
        patches = []
        for scale in scales:
            patch = Patch()
            patch["layout"]["yaxis"]["type"] = scale or "linear"
            patch["layout"]["yaxis"]["autorange"] = True  # a log range is not a linear one
            patches.append(patch)
        return patches

    @register(
        Output("timeline-graph", "figure"),
        Output("lineage-graph", "figure"),
        Output("ops-grid", "rowData"),
        Output("history-signature", "data"),
        Input("experiment-select", "value"),
        Input("refresh", "n_intervals"),
        Input("show-deleted", "value"),
        Input("ops-changed", "data"),
        Input("visible-runs", "data"),
        State("history-signature", "data"),
    )
    def refresh_history(
        experiment: str | None,
        _: int | None,
        show_deleted: list[str] | None,
        __: int | None,
        visible: Any,
        sent: list[str] | None = None,
    ) -> tuple[Any, Any, Any, Any]:
        """The timeline, the lineage and the ops log; each is sent only when it changed (a finished experiment's
        page redraws nothing on its refresh ticks)."""
        answer = history_views(experiment, show_deleted, visible)
        signatures = [figures.digest(part) for part in answer]
        sent = sent if isinstance(sent, list) and len(sent) == len(answer) else [None] * len(answer)
        changed = [
            part if digest != seen else no_update for part, digest, seen in zip(answer, signatures, sent, strict=True)
        ]
        return *changed, signatures

    def history_views(experiment: str | None, show_deleted: list[str] | None, visible: Any) -> tuple[Any, Any, Any]:
        snap = data.runs_view(store, cache, experiment, include_deleted=bool(show_deleted))
        if snap is None:
            empty = figures.empty_figure("no experiment")
            return empty, empty, []
        if visible is not None:
            snap = {**snap, "runs": [run for run in snap["runs"] if int(run["run_id"]) in set(visible)]}
        entries = [entry for entry in data.timeline(store, experiment) if visible is None or entry["run_id"] in visible]
        timeline = (
            figures.timeline_figure(entries, float(snap["experiment"]["created_at"]), data.now())
            if entries
            else figures.empty_figure("no chunk has been trained yet")
        )
        return timeline, figures.lineage_figure(snap["runs"]), data.ops_log(store, experiment)

    @register(
        Output("selected-run", "data"),
        Input(ALL_GRAPHS, "clickData"),
        Input("runs-grid", "cellClicked"),
        Input("lineage-graph", "clickData"),
        Input("timeline-graph", "clickData"),
        Input("sweep-scatter", "clickData"),
        Input("sweep-line", "data"),
        Input("panel-close", "n_clicks"),
        Input("experiment-select", "value"),
        Input("url", "search"),
        State("experiment-select", "value"),
    )
    def select_run(*inputs: Any) -> int | None:
        search, experiment = inputs[-2], inputs[-1]
        trigger = _triggered_id()
        value = ctx.triggered[0]["value"] if trigger is not None and ctx.triggered else None
        # On the page's first call a Store (sweep-line) counts as triggered beside the URL: the URL decides.
        if trigger is None or trigger == "url" or "url.search" in _triggered_props():
            # The page's first call, or a link followed: the run the URL names, if it is of this experiment. If the
            # page still shows another one, leave the choice to the switch to the URL's experiment (its answer may
            # come first under load: "nothing" here must not undo it).
            run_id = data.run_in_query(search, experiment)
            return no_update if run_id is None else run_id
        if trigger == "experiment-select":
            return data.run_in_query(search, value)  # None when the URL names another experiment
        if trigger == "panel-close":
            return None
        if trigger == "runs-grid":
            run_id = run_from_cell(value)
        elif trigger == "sweep-line":
            run_id = int(value["run"]) if isinstance(value, Mapping) and isinstance(value.get("run"), int) else None
        else:
            run_id = run_from_click(value)
        return run_id if run_id is not None else no_update

    @register(
        Output("ic-panel", "style"),
        Output("panel-title", "children"),
        Output("panel-status", "children"),
        Output({"type": "op-btn", "op": ALL}, "disabled"),
        Input("selected-run", "data"),
        Input("refresh", "n_intervals"),
        Input("ops-changed", "data"),
        Input("clone-valid", "data"),
        State("experiment-select", "value"),
        State({"type": "op-btn", "op": ALL}, "id"),
    )
    def refresh_panel(
        run_id: int | None,
        _: int | None,
        __: int | None,
        clone_valid: bool | None,
        experiment: str | None,
        button_ids: list[dict[str, str]],
    ) -> tuple[Any, ...]:
        state = data.panel_state(store, experiment, run_id)
        if state is None:
            return {"display": "none"}, "", "", [True] * len(button_ids)
        # Submit Clone-Modify waits for a clone request the live check finds nothing wrong with.
        disabled = [
            button["op"] not in state.allowed or (button["op"] == "clone" and clone_valid is False)
            for button in button_ids
        ]
        return {"display": "block"}, f"Run {state.run_id}", panel_status(state), disabled

    @register(
        Output("clone-json", "value"),
        Output("warm-start", "value"),
        Output("op-result", "children", allow_duplicate=True),
        Input("selected-run", "data"),
        State("experiment-select", "value"),
        prevent_initial_call=True,
    )
    def load_parent_config(run_id: int | None, experiment: str | None) -> tuple[Any, Any, Any]:
        state = data.panel_state(store, experiment, run_id)
        if state is None:
            return "", "off", ""
        return data.config_text(state.config), "off", ""

    @register(
        Output("clone-preview", "children"),
        Output("clone-valid", "data"),
        Input("clone-json", "value"),
        Input("warm-start", "value"),
        State("selected-run", "data"),
        State("experiment-select", "value"),
        prevent_initial_call=True,
    )
    def preview_clone(
        text: str | None, warm_start: str | None, run_id: int | None, experiment: str | None
    ) -> tuple[Any, bool | None]:
        if run_id is None or not experiment:
            return "", None
        check = data.check_clone(store, experiment, run_id, text, warm_start)
        return clone_feedback(text or "", check), not check.problems

    @register(
        Output("op-result", "children"),
        Output("ops-changed", "data"),
        Input({"type": "op-btn", "op": ALL}, "n_clicks"),
        State("selected-run", "data"),
        State("experiment-select", "value"),
        State("clone-json", "value"),
        State("warm-start", "value"),
        State("ops-changed", "data"),
        prevent_initial_call=True,
    )
    def submit_op(
        clicks: list[int | None],
        run_id: int | None,
        experiment: str | None,
        text: str | None,
        warm_start: str | None,
        changes: int | None,
    ) -> tuple[Any, Any]:
        trigger = ctx.triggered_id
        if not isinstance(trigger, Mapping) or not any(clicks) or run_id is None or not experiment:
            return no_update, no_update
        kind = trigger["op"]
        payload = None
        if kind == "clone":
            check = data.check_clone(store, experiment, run_id, text, warm_start)
            if check.problems:
                return not_queued(text or "", check), no_update
            payload = check.payload
        op, problems = data.submit(store, experiment, kind, run_id, payload)
        if op is None:
            return html.Div(["Not queued: ", *_lines(problems)], className="rf-bad"), no_update
        message = data.accepted_message(op, data.fit_state(store, experiment))
        return html.Div(message, className="rf-ok", id="op-accepted"), (changes or 0) + 1

    @register(
        Output("sweep-parcoords", "figure"),
        Output("sweep-scatter", "figure"),
        Output("sweep-importance", "figure"),
        Output("sweep-knob", "options"),
        Output("sweep-knob", "value"),
        Output("sweep-signature", "data"),
        Input("experiment-select", "value"),
        Input("refresh", "n_intervals"),
        Input("sweep-knob", "value"),
        Input("visible-runs", "data"),
        Input("sweep-show", "value"),
        State("sweep-signature", "data"),
    )
    def refresh_sweep(
        experiment: str | None, _: int | None, knob: str | None, visible: list[int] | None, shown: Any, sent: Any
    ) -> tuple[Any, ...]:
        if not shown:
            if sent == "hidden":
                return (no_update,) * 6
            placeholder = figures.empty_figure("tick 'draw' to draw the sweep views")
            return placeholder, placeholder, placeholder, [], None, "hidden"
        snap = data.runs_view(store, cache, experiment)
        return sweep_views(snap, knob, visible, sent)

    @register(
        Output("dashboard-page", "style"),
        Output("run-page", "style"),
        Input("url", "pathname"),
    )
    def route(pathname: str | None) -> tuple[dict[str, str], dict[str, str]]:
        on_run_page = routes.parse_run_path(pathname) is not None
        return (HIDDEN, {}) if on_run_page else ({}, HIDDEN)

    @register(
        Output("run-page-top", "children"),
        Output("run-page-body", "children"),
        Output("run-compare", "options"),
        Output("run-compare", "value"),
        Output("run-page-signature", "data"),
        Input("url", "pathname"),
        Input("run-compare", "value"),
        Input("refresh", "n_intervals"),
        State("run-page-signature", "data"),
    )
    def refresh_run_page(pathname: str | None, compare: int | None, _: int | None, shown: str | None) -> Any:
        where = routes.parse_run_path(pathname)
        if where is None:
            return (no_update,) * 5
        experiment, run_id = where
        view = run_page.run_view(store, experiment, run_id, compare)
        signature = run_page.view_signature(view)
        if signature == shown:
            return (no_update,) * 5  # re-drawing would reset the curves' zoom and the open details
        top, body = run_page.run_page(view, experiment, run_id, cache, store)
        options, value = run_page.compare_choices(view)
        return top, body, options, value, signature

    @register(
        Output("toasts", "children"),
        Output("events-seen", "data"),
        Input("refresh", "n_intervals"),
        Input("experiment-select", "value"),
        State("events-seen", "data"),
    )
    def show_events(_: int | None, experiment: str | None, seen: Mapping[str, Any] | None) -> tuple[Any, Any]:
        events, now_seen = data.new_events(store, experiment, seen)
        if now_seen == seen:
            return no_update, no_update
        toasts = [html.Div(text, className=f"rf-toast rf-toast-{kind}") for kind, text in events]
        return (toasts if toasts else no_update), now_seen

    # A page loaded from a URL has these from its layout already: a change only for a link followed in the page.
    @register(Output("smoothing", "value"), Input("url", "search"), State("smoothing", "value"))
    def restore_smoothing(search: str | None, current: float | None = None) -> Any:
        smoothing = data.smoothing_in_query(search)
        return no_update if smoothing is None or smoothing == current else smoothing

    @register(Output("x-axis", "value"), Input("url", "search"), State("x-axis", "value"))
    def restore_x_axis(search: str | None, current: str | None = None) -> Any:
        x_axis = data.x_axis_in_query(search)
        return no_update if x_axis is None or x_axis == current else x_axis

    @register(
        Output("runs-grid", "selectedRows"),
        Output("ticks-restored", "data"),
        Input("url", "search"),
        Input("runs-grid", "rowData"),
        State("ticks-restored", "data"),
    )
    def restore_ticks(search: str | None, rows: list[dict[str, Any]] | None, restored: bool | None) -> Any:
        """The runs the URL ticks, ticked once, as soon as their rows are in the table (then the user's ticks rule:
        the page's own URL changes do not reach `search`)."""
        wanted = data.ticks_in_query(search)
        if restored or not wanted or not rows:
            return no_update, no_update
        present = [str(row["run"]) for row in rows if int(row["run"]) in wanted]
        return ({"ids": present} if present else no_update), True

    @register(
        Output("runs-grid", "selectedRows", allow_duplicate=True),
        Output("sweep-brush", "data"),
        Input("sweep-parcoords", "restyleData"),
        State("sweep-brush", "data"),
        State("experiment-select", "value"),
        State("visible-runs", "data"),
        prevent_initial_call=True,
    )
    def brush_ticks(
        restyle: Any, brush: Mapping[str, Any] | None, experiment: str | None, visible: Sequence[int] | None = None
    ) -> Any:
        """Brushing the parallel coordinates ticks the runs inside every brushed range (clearing it unticks)."""
        brush = sweep.brush_update(brush, restyle)
        snap = data.runs_view(store, cache, experiment)
        if snap is None:
            return no_update, brush
        drawn, _, metric = sweep_runs(snap, visible)
        knobs, rows = runs_table(drawn)
        figure = sweep.parallel_coordinates_figure(knobs, rows, metric, snap["experiment"]["mode"])
        inside = sweep.runs_in_brush(figure, brush)
        return {"ids": [str(run_id) for run_id in inside]} if brush else [], brush

    app.clientside_callback(
        ClientsideFunction(namespace="rf", function_name="highlight_row"),
        Output("row-highlighted", "data"),
        Input(ALL_GRAPHS, "hoverData"),
        prevent_initial_call=True,
    )

    app.clientside_callback(
        ClientsideFunction(namespace="rf", function_name="write_url"),
        Output("url-written", "data"),
        Input("experiment-select", "value"),
        Input("selected-run", "data"),
        Input("smoothing", "value"),
        Input("x-axis", "value"),
        Input("runs-grid", "selectedRows"),
        Input(ALL_GRAPHS, "relayoutData"),
        Input(ALL_Y_SCALES, "value"),
        State(ALL_GRAPHS, "id"),
        State(ALL_Y_SCALES, "id"),
        State("log-y-metrics", "data"),
        prevent_initial_call=True,
    )

    @register(
        Output("continue-result", "children"),
        Input("continue-experiment", "n_clicks"),
        State("experiment-select", "value"),
        prevent_initial_call=True,
    )
    def continue_experiment(clicks: int | None, experiment: str | None) -> Any:
        if not clicks or not experiment:
            return no_update
        started, problems = data.continue_experiment(store, experiment)
        if started is None:
            return html.Span(["Not started: ", *_lines(problems)], className="rf-bad")
        where = (
            f"deployment {started['deployment']}, flow run {started['flow_run']}"
            if "deployment" in started
            else f"process {started['pid']}, log {started['log']}"
        )
        return html.Span(f"continuing {experiment} ({where}): queued ops apply now", className="rf-ok",
                         id="continue-started")  # fmt: skip

    return callbacks


# -- helpers the callbacks call (plain functions) -----------------------------------------------------------


def metric_figures(
    store: Store,
    cache: M4Cache,
    experiment: str | None,
    names: Sequence[str],
    view: ChartView,
    snap_runs: tuple[list[dict[str, Any]], list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The figure of each chart in `names`: the refresh every chart gets (the benchmarked callback). `snap_runs`:
    `data.chart_runs`'s answer, when the caller has it."""
    snap_given = snap_runs is not None
    snap_runs = snap_runs if snap_given else data.chart_runs(store, experiment, view.include_deleted)
    if not experiment or not snap_runs:
        return [figures.empty_figure("no runs") for _ in names]
    runs, knobs = snap_runs
    if view.visible is not None:
        kept = set(view.visible)
        runs = [run for run in runs if int(run["run_id"]) in kept]
        if not runs:
            return [figures.empty_figure("no run is ticked or kept by the table's filters") for _ in names]
    run_ids = [int(run["run_id"]) for run in runs]
    charts = [data.chart_metric(name) for name in names]
    metrics = list(dict.fromkeys(metric for metric, _ in charts))
    # Given the runs, the caller has just brought the cache up to date (charts_inputs_signature).
    series = data.chart_series(cache, experiment, run_ids, metrics, up_to_date=snap_given)
    if view.x_axis != "step":
        series = data.chart_x(store, experiment, runs, series, view.x_axis)
    labels = data.hover_labels(runs, knobs)
    deleted = frozenset(int(run["run_id"]) for run in runs if run["status"] == "Deleted")
    run_types = {int(run["run_id"]): data.run_trainer_type(run) for run in runs}
    return [
        figures.metric_figure(
            metric,
            {
                run_id: points
                for run_id, points in series.get(metric, {}).items()
                if trainer_type is None or run_types.get(run_id) == trainer_type
            },
            labels,
            smoothing=float(view.smoothing or 0),
            uirevision=f"{experiment}:{name}",
            deleted=deleted,
            x_axis=view.x_axis,
            runs_of=trainer_type,
        )
        for name, (metric, trainer_type) in zip(names, charts, strict=True)
    ]


def sweep_views(
    snap: Mapping[str, Any] | None, knob: str | None, visible: Sequence[int] | None, sent: Mapping[str, str] | None
) -> tuple[Any, ...]:
    """The sweep section: parallel coordinates of every run (brushing its axes ticks runs in the table), the
    chosen knob against the metric and the knobs' importance over the runs the table keeps, the knob choices, and
    signatures of what they were built from (a view is not rebuilt or sent while its signature holds)."""
    if snap is None:
        empty = figures.empty_figure("no experiment")
        return empty, empty, empty, [], None, None
    mode = snap["experiment"]["mode"]
    snap, kept, metric = sweep_runs(snap, visible)
    every_knob, every_row = runs_table(snap)
    knobs, rows = runs_table(kept)
    signatures = {
        "all": _sweep_signature(metric, mode, None, every_row),
        "kept": _sweep_signature(metric, mode, knob, rows),
    }
    sent = sent if isinstance(sent, Mapping) else {}
    if sent == signatures:
        return (no_update,) * 6
    parallel: Any = no_update
    if sent.get("all") != signatures["all"]:
        parallel = sweep.parallel_coordinates_figure(every_knob, every_row, metric, mode)
    if sent.get("kept") == signatures["kept"]:
        return parallel, no_update, no_update, no_update, no_update, signatures
    importances = sweep.knob_importance(knobs, rows, metric, mode)
    # Until one is picked, the scatter shows the knob that explains most of the metric's spread.
    chosen = knob if knob in knobs else next(iter(importances), knobs[0] if knobs else None)
    options = [{"label": name, "value": name} for name in knobs]
    scatter = (
        sweep.knob_scatter_figure(knobs, rows, metric, mode, chosen)
        if chosen
        else figures.empty_figure("no knob varies between the runs")
    )
    return parallel, scatter, sweep.importance_figure(importances), options, chosen, signatures


def sweep_runs(
    snap: Mapping[str, Any], visible: Sequence[int] | None
) -> tuple[Mapping[str, Any], Mapping[str, Any], str]:
    """The snapshot the sweep's parallel coordinates draw, the one its other views draw (the runs the table keeps),
    and the metric's label. SFT's eval loss and DPO's are not one quantity: where trainer types mix, both hold one
    type's runs (the first type among the kept runs; filtering the table by trainer_type picks another)."""
    metric = experiment_metric(snap)
    kept = snap if visible is None else {**snap, "runs": [r for r in snap["runs"] if int(r["run_id"]) in visible]}
    types = {int(run["run_id"]): data.run_trainer_type(run) for run in snap["runs"]}
    if len(set(types.values())) < 2:
        return snap, kept, metric
    kept_types = {types[int(run["run_id"])] for run in kept["runs"]}
    shown = next((name for name in TRAINER_TYPES if name in kept_types), None) or min(types.values())
    runs = [run for run in snap["runs"] if types[int(run["run_id"])] == shown]
    knobs = varying_knobs([run["config"] for run in runs])  # those that vary between this type's runs
    snap = {**snap, "runs": runs, "varying_knobs": knobs}
    kept = {**kept, "runs": [run for run in kept["runs"] if types[int(run["run_id"])] == shown], "varying_knobs": knobs}
    return snap, kept, f"{metric} of {shown.upper()} runs"


def _sweep_signature(metric: str, mode: str, knob: str | None, rows: Sequence[Any]) -> str:
    state = [metric, mode, knob, [(row.run_id, row.status, row.best_metric, row.knobs) for row in rows]]
    return json.dumps(state, sort_keys=True, default=str)


@dataclass(frozen=True)
class ChartView:
    """How the page asks the charts to be drawn."""

    include_deleted: bool = False
    smoothing: float | None = 0.0
    visible: Sequence[int] | None = None  # the runs the table keeps; None: all
    x_axis: str = "step"  # a key of figures.X_AXIS_TITLES
    y_scales: Mapping[str, str] = field(default_factory=dict)  # metric -> "linear" | "log"; else its default


def y_scales_by_metric(
    ids: Sequence[Mapping[str, Any]] | None, values: Sequence[str | None] | None, experiment: str | None = None
) -> dict[str, str]:
    """The y scale each chart's lin/log switch shows, by metric (of `experiment`'s charts, when given)."""
    return {
        str(switch["metric"]): value
        for switch, value in zip(ids or [], values or [], strict=False)
        if value in ("linear", "log") and (experiment is None or switch.get("experiment") == experiment)
    }


def first_view(
    store: Store,
    cache: M4Cache,
    experiment: str | None,
    names: Sequence[str],
    search: str,
    runs: tuple[list[dict[str, Any]], list[str]] | None = None,
) -> FirstView:
    """The view a page URL asks for (`search`, its query string), with the first figures of `experiment`'s charts
    built into the page: the figure callback's first call then finds them drawn (same signatures) and sends
    nothing. `runs`: `data.chart_runs(store, experiment, False)`'s answer, when the caller has it."""
    view = ChartView(
        smoothing=data.smoothing_in_query(search) or 0.0,
        x_axis=data.x_axis_in_query(search) or "step",
        y_scales=data.y_scales_in_query(search),
    )
    if not experiment or not names:
        return FirstView(smoothing=float(view.smoothing or 0), x_axis=view.x_axis, y_scales=view.y_scales)
    ticked = data.ticks_in_query(search) if data.experiment_in_query(search) == experiment else []
    runs = runs if runs is not None else data.chart_runs(store, experiment, False)
    present = {int(run["run_id"]) for run in runs[0]} if runs else set()
    visible = [run_id for run_id in ticked if run_id in present] or None
    view = ChartView(view.include_deleted, view.smoothing, visible, view.x_axis, view.y_scales)
    zoom = data.zoom_in_query(search) if data.experiment_in_query(search) == experiment else {}
    graph_ids = [metric_graph_id(name, experiment, 0) for name in names]
    updates, signatures = chart_updates(store, cache, experiment, graph_ids, view, None, zoom, runs)
    return FirstView(
        smoothing=float(view.smoothing or 0),
        x_axis=view.x_axis,
        y_scales=view.y_scales,
        visible=visible,
        figures=dict(zip(names, updates, strict=True)),
        signatures=signatures,
    )


def chart_updates(
    store: Store,
    cache: M4Cache,
    experiment: str | None,
    graph_ids: Sequence[Mapping[str, Any]],
    view: ChartView,
    sent: Mapping[str, Any] | None,
    zoom: Mapping[str, tuple[float, float]] | None = None,
    snap_runs: tuple[list[dict[str, Any]], list[str]] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """What each chart gets on a refresh, and the signatures of what the page then shows.

    A chart drawn for the first time gets its whole figure. A drawn one gets its traces only (a `Patch`), so
    Plotly keeps the user's zoom: Dash's Graph writes a zoom into the figure's layout, and a whole new layout
    would reset it. A chart whose traces did not change gets nothing at all: a finished experiment costs a refresh
    tick a few bytes. Graphs of another experiment (the page is switching) are left to their new cells.
    `sent` is what the last call returned: {"experiment", "cells", "x_axis", "charts": {metric: [a signature per
    trace]}, "inputs": what the traces were built from}. `snap_runs`: `data.chart_runs`'s answer for the view, when
    the caller has it.
    """
    mine = [graph_id for graph_id in graph_ids if graph_id.get("experiment") == experiment]
    names = [graph_id["metric"] for graph_id in mine]
    cells = max((int(graph_id.get("cells") or 0) for graph_id in mine), default=0)
    drawn = (sent or {}).get("charts") or {}
    # Another x (step, time...) is another axis: the charts are drawn whole again.
    same_cells = (sent or {}).get("experiment") == experiment and (sent or {}).get("cells") == cells
    same_cells = same_cells and (sent or {}).get("x_axis", "step") == view.x_axis
    if snap_runs is None:
        snap_runs = data.chart_runs(store, experiment, view.include_deleted)
    # What every trace is built from: while it holds, no figure is built (the refresh tick of an idle page).
    inputs = charts_inputs_signature(cache, experiment, names, view, snap_runs)
    if (
        same_cells
        and sent
        and sent.get("inputs") == inputs
        and all(int(graph_id.get("cells") or 0) == cells and drawn.get(graph_id["metric"]) for graph_id in mine)
    ):
        return [no_update] * len(graph_ids), dict(sent)
    built = dict(zip(names, metric_figures(store, cache, experiment, names, view, snap_runs), strict=True))
    # A digest per trace: a live fit changes the curves of the runs that train now, and only those are sent.
    signatures = {name: [figures.trace_digest(trace) for trace in figure["data"]] for name, figure in built.items()}
    updates: list[Any] = []
    for graph_id in graph_ids:
        name = graph_id["metric"]
        if graph_id.get("experiment") != experiment:
            updates.append(no_update)
        elif not same_cells or graph_id.get("cells") != cells or drawn.get(name) is None:
            figure = built[name]
            if name in view.y_scales:
                figure["layout"]["yaxis"]["type"] = view.y_scales[name]
            if zoom and name in zoom:
                figure["layout"]["xaxis"].update(range=list(zoom[name]), autorange=False)
            updates.append(figure)
        elif drawn[name] == signatures[name]:
            updates.append(no_update)
        else:
            traces = Patch()
            before = drawn[name] if isinstance(drawn[name], list) else []
            if len(before) == len(signatures[name]):
                for index, (seen, now) in enumerate(zip(before, signatures[name], strict=True)):
                    if seen != now:
                        traces["data"][index] = built[name]["data"][index]
            else:  # curves came or went: every trace
                traces["data"] = built[name]["data"]
            updates.append(traces)
    shown = {"experiment": experiment, "cells": cells, "x_axis": view.x_axis, "charts": signatures, "inputs": inputs}
    return updates, shown


def charts_inputs_signature(
    cache: M4Cache,
    experiment: str | None,
    names: Sequence[str],
    view: ChartView,
    snap_runs: tuple[list[dict[str, Any]], list[str]] | None,
) -> str | None:
    """A digest of what the charts' traces are built from: the points read (the cache's last row and width), the
    runs shown with what their traces show of them (config for the hover, Deleted for the dash, parent for the
    lineage x), the charts and the view. None when there is nothing to draw from."""
    if not experiment or not snap_runs:
        return None
    runs, _ = snap_runs
    state = [
        cache.version(experiment),
        list(names),
        [view.include_deleted, view.smoothing, list(view.visible) if view.visible is not None else None, view.x_axis],
        [[run["run_id"], run["status"] == "Deleted", run["config"], run.get("parent_id"), run.get("warm_start"),
          run.get("parent_step")] for run in runs],
    ]  # fmt: skip
    encoded = json.dumps(state, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(encoded, digest_size=12).hexdigest()


def chart_inserts(
    shown: Mapping[str, Any] | None, experiment: str, names: Sequence[str]
) -> list[tuple[int, str]] | None:
    """The (index, name) of each chart to insert so that the charts shown become `names`, in increasing index
    order; None when that is not an insertion (another experiment, or a metric gone): draw them all anew."""
    if not shown or shown.get("experiment") != experiment:
        return None
    before = list(shown.get("names") or [])
    if not before or [name for name in names if name in set(before)] != before:
        return None
    return [(index, name) for index, name in enumerate(names) if name not in set(before)]


def run_from_click(click_data: Mapping[str, Any] | None) -> int | None:
    """The run id a click on a chart point carries (its customdata), or None."""
    points = (click_data or {}).get("points") or []
    if not points:
        return None
    custom = points[0].get("customdata")
    if isinstance(custom, list):  # timeline bars carry [run, chunk, outcome]
        custom = custom[0] if custom else None
    return int(custom) if isinstance(custom, int | float) else None


def run_from_cell(cell: Mapping[str, Any] | None) -> int | None:
    """The run whose IC Ops cell was clicked in the runs grid, or None for any other cell."""
    if not cell or cell.get("colId") != "ic_ops" or cell.get("rowId") is None:
        return None
    return int(cell["rowId"])


HIDDEN = {"display": "none"}


def _triggered_id() -> Any:
    """The id of the input that triggered the running callback; None on a page's first call, or when the function is
    called outside a callback (as the tests call it)."""
    try:
        return ctx.triggered_id
    except MissingCallbackContextException:
        return None


def _triggered_props() -> set[str]:
    """The "<id>.<property>" of every input that triggered the running callback (empty outside one)."""
    try:
        return set(ctx.triggered_prop_ids)
    except MissingCallbackContextException:
        return set()


def header_children(summary: Mapping[str, Any] | None) -> list[Any]:
    if summary is None:
        return [html.Span("no experiment selected")]
    status = summary["status"]
    by_status = ", ".join(f"{count} {status}" for status, count in summary["runs_by_status"].items()) or "no runs"
    items = [
        html.Span(
            [
                html.B(summary["name"]),
                " ",
                html.Span(summary["status_text"], className=f"rf-status-{status}", id="experiment-status"),
            ]
        ),
        html.Span(["runs: ", html.B(by_status)]),
        html.Span(
            ["chunks trained (all runs): ", html.B(f"{summary['chunks_done']}/{summary['chunks_planned']}")],
            title="a chunk is one slice of one run's training: num_chunks per epoch, so epochs x num_chunks per run",
        ),
        html.Span(["slots busy: ", html.B(f"{summary['slots_busy']}/{summary['slots_seen']}")]),
        html.Span(["metric: ", html.B(summary["metric"])]),
        html.Span(["started ", summary["started"]]),
    ]
    if summary["ended"]:
        items.append(html.Span(["ended ", summary["ended"]]))
    return items


def panel_status(state: data.PanelState) -> list[Any]:
    lines: list[Any] = [
        html.A("open the run's page →", href=state.page, id="panel-run-page", className="rf-back"),
        html.Div(["status: ", html.B(state.status, id="panel-run-status")]),
        html.Div(state.progress),
        html.Div(f"source: {state.source}" + (f" · {state.parent}" if state.parent else "")),
    ]
    if state.pending:
        lines.append(
            html.Div(
                [f"pending: {', '.join(state.pending)}", html.Br(), f"it will be {state.will_be} at its next boundary"],
                id="panel-pending",
            )
        )
    return lines


def clone_feedback(text: str, check: data.CloneCheck) -> Any:
    if check.problems:
        return annotated_json(text, check)
    noun = "clone" if check.count == 1 else "clones"
    warm = (check.payload or {}).get("warm_start", "off")
    return html.Div(f"Submit creates {check.count} {noun} (warm start: {warm})", className="rf-ok", id="clone-count")


def not_queued(text: str, check: data.CloneCheck) -> Any:
    """Submit's answer to an invalid clone request (Submit is disabled while the live check shows a problem, so this
    is a request changed between the check and the click): the count; the annotated text is the check's, above."""
    noun = "problem" if len(check.problems) == 1 else "problems"
    return html.Div(f"Not queued: {len(check.problems)} {noun}, each written under its line above.",
                    className="rf-bad", id="clone-not-queued")  # fmt: skip


def annotated_json(text: str, check: data.CloneCheck) -> Any:
    """The JSON box's text with each problem written under the line it is about."""
    lines, unplaced = data.annotate_problems(text, check.problems, check.bad_json_at)
    rows: list[Any] = []
    for line, notes in lines:
        rows.append(html.Div(line or " "))
        rows.extend(html.Div(f"    ^ {note}", className="rf-json-error") for note in notes)
    return html.Div(
        [
            *(html.Div(problem, className="rf-bad") for problem in unplaced),
            html.Div(rows, className="rf-annotated"),
        ],
        className="rf-config-errors",
    )


def _lines(problems: Sequence[str]) -> list[Any]:
    return [html.Div(problem) for problem in problems]
