"""The dashboard page. For now: pick an experiment, watch its runs table refresh (the full UI comes later)."""

from __future__ import annotations

from typing import Any

import dash_ag_grid as dag
from dash import Dash, Input, Output, State, dcc, html

from dash_app import data
from rf_core.store import Store

REFRESH_MS = 2000


def build_layout() -> html.Div:
    return html.Div(
        [
            html.H2("rf: interactive-control experiments"),
            dcc.Dropdown(id="experiment-select", placeholder="experiment", clearable=False),
            dag.AgGrid(
                id="runs-grid",
                rowData=[],
                columnDefs=[],
                defaultColDef={"sortable": True, "resizable": True, "filter": True},
                style={"height": "60vh"},
            ),
            dcc.Interval(id="refresh", interval=REFRESH_MS),
        ],
        style={"fontFamily": "sans-serif", "margin": "1em"},
    )


def register_callbacks(app: Dash, store: Store) -> None:
    """Thin callbacks: each reads one thing through dash_app.data."""

    @app.callback(
        Output("experiment-select", "options"),
        Output("experiment-select", "value"),
        Input("refresh", "n_intervals"),
        State("experiment-select", "value"),
    )
    def refresh_experiments(_: int | None, selected: str | None) -> tuple[list[dict[str, str]], str | None]:
        options = data.experiment_options(store)
        names = [option["value"] for option in options]
        return options, selected if selected in names else (names[0] if names else None)

    @app.callback(
        Output("runs-grid", "rowData"),
        Output("runs-grid", "columnDefs"),
        Input("experiment-select", "value"),
        Input("refresh", "n_intervals"),
    )
    def refresh_runs(
        experiment: str | None, _: int | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return data.runs_table(store, experiment)
