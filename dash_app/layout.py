"""The dashboard page: ids and structure only (the callbacks live in dash_app.callbacks)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dash_ag_grid as dag
from dash import dcc, html

from dash_app.data import MAX_SMOOTHING, OPS_LOG_COLUMNS
from dash_app.figures import LOG_Y_METRICS, default_y_scale
from rf_core.states import WARM_START_MODES

REFRESH_MS = 2000
OP_BUTTONS = (("stop", "Stop"), ("resume", "Resume"), ("delete", "Delete"))
GRAPH_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def op_button_id(kind: str) -> dict[str, str]:
    return {"type": "op-btn", "op": kind}


def metric_graph_id(name: str, experiment: str, cells: int) -> dict[str, Any]:
    """A chart's graph. Its experiment and the generation of chart cells it belongs to (each full redraw of the
    charts is a new one) are part of its id, so a graph just created is never taken for one already drawn."""
    return {"type": "metric-graph", "metric": name, "experiment": experiment, "cells": cells}


def chart_id(name: str) -> str:
    """The stable id of a metric's chart cell (for tests and people's own scripts)."""
    return f"chart-{name}"


@dataclass(frozen=True)
class FirstView:
    """What the page shows before any callback: the view its URL asks for, and the charts' first figures with the
    signatures the figure callback keeps (so its first call on the page sends nothing it already has)."""

    smoothing: float = 0.0
    x_axis: str = "step"
    y_scales: Mapping[str, str] = field(default_factory=dict)  # metric -> "linear" | "log", where not the default
    visible: list[int] | None = None
    figures: Mapping[str, Any] = field(default_factory=dict)  # metric -> figure
    signatures: Mapping[str, Any] | None = None


def build_layout(
    experiment_options: list[dict[str, str]] | None = None,
    experiment: str | None = None,
    metric_names: list[str] | None = None,
    first: FirstView | None = None,
) -> html.Div:
    """The page. Given the experiment to open and its metrics, the charts exist from the start; given `first`, they
    are drawn from the start too: the first curves cost no callback round trip (several, as the page's first
    callbacks wait on each other and on the scripts)."""
    first = first or FirstView()
    dashboard = html.Div(
        [
            _top_bar(experiment_options or [], experiment, first),
            html.Div(id="header", className="rf-header"),
            html.Div(
                [
                    # Shown while the experiment has no live fit: ops queued now wait for it to continue.
                    html.Button("Continue experiment", id="continue-experiment", style={"display": "none"}),
                    html.Span(id="continue-result"),
                ],
                className="rf-row",
            ),
            html.Div(
                chart_cells(metric_names, experiment, 0, first.y_scales, first.figures)
                if metric_names and experiment
                else [],
                id="charts",
                className="rf-charts",
            ),
            _sweep_section(),
            html.Div(
                [
                    html.H3("Runs"),
                    html.Span("hide columns", className="rf-label"),
                    dcc.Dropdown(id="hidden-columns", multi=True, placeholder="none", className="rf-columns"),
                ],
                className="rf-section-title",
            ),
            dag.AgGrid(
                id="runs-grid",
                rowData=[],
                columnDefs=[],
                getRowId="params.data.row_id",
                defaultColDef={"sortable": True, "resizable": True, "filter": True, "floatingFilter": True},
                dashGridOptions={
                    "animateRows": False,
                    "tooltipShowDelay": 300,
                    # Ticked rows (or, with none ticked, the rows the filters keep) are the runs the charts,
                    # timeline and lineage show.
                    "rowSelection": {
                        "mode": "multiRow",
                        "checkboxes": True,
                        "headerCheckbox": True,
                        "enableClickSelection": False,
                    },
                },
                style={"height": "326px"},
            ),
            html.Div(
                [
                    html.Div(dcc.Graph(id="timeline-graph", config=GRAPH_CONFIG), className="rf-half"),
                    html.Div(dcc.Graph(id="lineage-graph", config=GRAPH_CONFIG), className="rf-half"),
                ],
                className="rf-row",
            ),
            html.H3("Ops log"),
            dag.AgGrid(
                id="ops-grid",
                rowData=[],
                columnDefs=OPS_LOG_COLUMNS,
                getRowId="params.data.row_id",
                defaultColDef={"sortable": True, "resizable": True, "filter": True},
                dashGridOptions={"animateRows": False, "tooltipShowDelay": 300},
                style={"height": "260px"},
            ),
            _ic_ops_panel(),
        ],
        id="dashboard-page",
    )
    return html.Div(
        [
            dashboard,
            # /run/<experiment>/<id>: one run in full (dash_app.run_page); the dashboard is hidden meanwhile.
            html.Div(
                [
                    html.Div(id="run-page-top"),
                    html.Div(
                        [
                            html.H3("Config and diff"),
                            html.Span("compare with", className="rf-label"),
                            dcc.Dropdown(id="run-compare", clearable=False, className="rf-knob"),
                        ],
                        className="rf-section-title",
                    ),
                    html.Div(id="run-page-body"),
                ],
                id="run-page",
                style={"display": "none"},
            ),
            dcc.Store(id="run-page-signature", data=None),
            # Whether the rf server answers (assets/page.js keeps it current), on every page.
            html.Span("live", id="liveness", className="rf-liveness rf-liveness-live", title="the rf server"),
            dcc.Store(id="selected-run", data=None),
            dcc.Store(id="clone-valid", data=None),
            dcc.Store(id="ticks-restored", data=None),
            dcc.Store(id="events-seen", data=None),  # the ops and failures the toasts have told of
            html.Div(id="toasts", className="rf-toasts"),  # the live check's verdict on the Clone-Modify request
            # The run ids the table's filter or ticks keep; None: every run.
            dcc.Store(id="visible-runs", data=first.visible),
            dcc.Store(id="row-highlighted", data=None),
            dcc.Store(id="ops-changed", data=0),
            # The charts the page shows ({"experiment", "names"}), and what each one's figure was last built from.
            dcc.Store(
                id="metric-names",
                data={"experiment": experiment, "names": metric_names, "cells": 0} if metric_names else None,
            ),
            dcc.Store(id="chart-signatures", data=first.signatures),
            dcc.Store(id="charts-drawn", data=False),  # set by assets/page.js once the first charts are on screen
            dcc.Store(id="history-signature", data=None),  # digests of the timeline, lineage and ops log sent
            # Which charts read best on a log y by default (the URL keeps only the scales people changed).
            dcc.Store(id="log-y-metrics", data=sorted(LOG_Y_METRICS)),
            dcc.Interval(id="refresh", interval=REFRESH_MS),
            # ?experiment=NAME&run=ID&smoothing=S&x=&runs=&zoom=&y=: the view (what a fit prints, what a reload
            # restores); the page keeps it current with history.replaceState (assets/page.js), which changes none
            # of url's props.
            dcc.Location(id="url", refresh=False),
            dcc.Store(id="url-written", data=None),
        ],
        className="rf-page",
    )


def _top_bar(experiment_options: list[dict[str, str]], experiment: str | None, first: FirstView) -> html.Div:
    return html.Div(
        [
            html.H2("rf"),
            dcc.Dropdown(
                id="experiment-select",
                options=experiment_options,
                value=experiment,
                placeholder="experiment",
                clearable=False,
                className="rf-experiment",
            ),
            dcc.Checklist(
                id="show-deleted", options=[{"label": " show deleted runs", "value": "show"}], value=[], inline=True
            ),
            dcc.RadioItems(
                id="x-axis",
                options=[
                    {"label": " step", "value": "step"},
                    {"label": " warm clones continue their parent", "value": "lineage"},
                    {"label": " minutes", "value": "relative"},
                    {"label": " time", "value": "wall"},
                ],
                value=first.x_axis,
                inline=True,
                className="rf-x-axis",
            ),
            html.Div(
                [
                    html.Span("smoothing", className="rf-label"),
                    dcc.Slider(
                        id="smoothing",
                        min=0,
                        max=MAX_SMOOTHING,
                        step=0.05,
                        value=first.smoothing,
                        marks={0: "0", 0.5: "0.5", 0.9: "0.9"},
                        updatemode="mouseup",
                    ),
                ],
                className="rf-smoothing",
            ),
        ],
        className="rf-topbar",
    )


def _sweep_section() -> html.Div:
    """How the knobs relate to the metric: parallel coordinates, one knob against the metric, importance."""
    return html.Div(
        [
            html.Div(
                [
                    html.H3("Sweep: knobs against the best metric"),
                    # Drawn when asked for: its importance estimate (Optuna's fANOVA: seconds to import the first
                    # time) must not slow the page's first charts.
                    dcc.Checklist(id="sweep-show", options=[{"label": " draw", "value": "show"}], value=[]),
                ],
                className="rf-section-title",
            ),
            html.Div(dcc.Graph(id="sweep-parcoords", config=GRAPH_CONFIG), className="rf-chart"),
            html.Div(
                [
                    html.Div(
                        [
                            html.Div(
                                [
                                    html.Span("knob", className="rf-label"),
                                    dcc.Dropdown(id="sweep-knob", clearable=False, className="rf-knob"),
                                ],
                                className="rf-row-tight",
                            ),
                            dcc.Graph(id="sweep-scatter", config=GRAPH_CONFIG),
                        ],
                        className="rf-half",
                    ),
                    html.Div(dcc.Graph(id="sweep-importance", config=GRAPH_CONFIG), className="rf-half"),
                ],
                className="rf-row",
            ),
            dcc.Store(id="sweep-signature", data=None),
            # {"run", "at"}: the parallel coordinates' line clicked (assets/page.js: Plotly gives parcoords no click)
            dcc.Store(id="sweep-line", data=None),
            dcc.Store(id="sweep-brush", data=None),  # {dimension index: [[low, high], ...]} brushed on the axes
        ],
        id="sweep",
        className="rf-sweep",
    )


def _ic_ops_panel() -> html.Div:
    return html.Div(
        [
            html.Div(
                [html.H3(id="panel-title"), html.Button("×", id="panel-close", className="rf-close", title="close")],
                className="rf-panel-head",
            ),
            html.Div(id="panel-status", className="rf-panel-status"),
            html.Div(
                [
                    html.Button(label, id=op_button_id(kind), className=f"rf-op rf-op-{kind}", disabled=True)
                    for kind, label in OP_BUTTONS
                ],
                className="rf-op-row",
            ),
            html.H4("Clone-Modify"),
            html.P(
                [
                    "The parent's config, editable. A knob may be a list ",
                    html.Code('{"$list": [1e-4, 3e-4]}'),
                    " (a grid) or a range ",
                    html.Code('{"$range": {"low": 1e-5, "high": 1e-3, "log": true}}'),
                    " inside ",
                    html.Code('{"$random": {"config": {...}, "num_runs": 4, "seed": 0}}'),
                    ".",
                ],
                className="rf-hint",
            ),
            dcc.Textarea(id="clone-json", spellCheck=False, className="rf-json"),
            html.Div(
                [
                    html.Span("warm start", className="rf-label"),
                    dcc.RadioItems(
                        id="warm-start",
                        options=[{"label": f" {mode}", "value": mode} for mode in WARM_START_MODES],
                        value="off",
                        inline=True,
                    ),
                ]
            ),
            html.Div(id="clone-preview", className="rf-preview"),
            html.Button("Submit Clone-Modify", id=op_button_id("clone"), className="rf-op rf-op-clone", disabled=True),
            html.Div(id="op-result", className="rf-op-result"),
        ],
        id="ic-panel",
        className="rf-panel",
        style={"display": "none"},
    )


def chart_cells(
    names: list[str],
    experiment: str,
    cells: int,
    y_scales: Mapping[str, str] | None = None,
    figures: Mapping[str, Any] | None = None,
) -> list[Any]:
    """One chart per metric, on the y scale `y_scales` names (else its default); the figures are filled by the
    figure callback unless given."""
    y_scales, figures = y_scales or {}, figures or {}
    return [chart_cell(name, experiment, cells, y_scales.get(name), figures.get(name)) for name in names]


def y_scale_id(name: str, experiment: str, cells: int) -> dict[str, Any]:
    return {"type": "y-scale", "metric": name, "experiment": experiment, "cells": cells}


def chart_cell(name: str, experiment: str, cells: int, y_scale: str | None = None, figure: Any = None) -> html.Div:
    graph_id = metric_graph_id(name, experiment, cells)
    graph = dcc.Graph(id=graph_id, config=GRAPH_CONFIG, **({"figure": figure} if figure is not None else {}))
    scale = dcc.RadioItems(
        id=y_scale_id(name, experiment, cells),
        options=[{"label": " lin", "value": "linear"}, {"label": " log", "value": "log"}],
        value=y_scale if y_scale in ("linear", "log") else default_y_scale(name),
        inline=True,
        className="rf-y-scale",
    )
    return html.Div([scale, graph], id=chart_id(name), className="rf-chart")
