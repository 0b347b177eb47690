"""The dashboard's callbacks called as plain functions (Dash's unit-test recipe), on a real app and DuckDB store.

Where a callback reads `ctx`, the context is set the way Dash sets it for a request.
"""

from __future__ import annotations

import json
import time
from contextvars import copy_context
from typing import Any

import numpy as np
import pytest
from dash import Dash, Patch, no_update
from dash._callback_context import context_value
from dash._utils import AttributeDict

from dash_app import data
from dash_app.callbacks import register_callbacks, run_from_cell, run_from_click
from dash_app.figures import decode_typed_array
from dash_app.layout import build_layout
from rf_core.control import experiments, ops
from rf_core.control.store import DuckDBStore
from tests.dashboard_sample import SAMPLE_START, append_points, seed_experiment

BUTTONS = [{"type": "op-btn", "op": kind} for kind in ("stop", "resume", "delete", "clone")]


@pytest.fixture
def store(tmp_path):
    store = DuckDBStore(tmp_path / "rf.duckdb")
    seed_experiment(store, "older", runs=2, points=50)
    seed_experiment(store, "exp", runs=3, points=300)
    yield store
    store.close()


@pytest.fixture
def callbacks(store):
    app = Dash(__name__)
    app.layout = build_layout()
    return register_callbacks(app, store)


def triggered_by(prop_id: str, value: Any, function: Any, *args: Any) -> Any:
    """Call `function(*args)` as Dash would when `prop_id` ("<id>.<property>") changed to `value`."""

    def run() -> Any:
        context_value.set(AttributeDict(triggered_inputs=[{"prop_id": prop_id, "value": value}]))
        return function(*args)

    return copy_context().run(run)


def _render(component: Any) -> str:
    return json.dumps(component.to_plotly_json(), default=lambda item: item.to_plotly_json())


def test_experiment_picker_lists_every_experiment_and_keeps_the_choice(callbacks):
    options, chosen = callbacks["refresh_experiments"](None, None, None)
    assert [option["value"] for option in options] == ["exp", "older"]
    assert chosen == "exp"
    assert callbacks["refresh_experiments"](3, None, "older")[1] is no_update
    # The link a fit prints (?experiment=NAME) opens that experiment; an unknown name falls back to the newest.
    assert callbacks["refresh_experiments"](None, "?experiment=older", None)[1] == "older"
    assert callbacks["refresh_experiments"](None, "?experiment=nope", None)[1] == "exp"


def test_runs_table_and_header_refresh(callbacks, store):
    header, continue_button, rows, columns, options, style = callbacks["refresh_runs"](
        "exp", 1, [], 0, ["source"], True, None
    )
    assert style == {"height": f"{100 + 42 * 3}px"}  # every row shown, up to 15
    assert continue_button == {"display": "none"}, "a running experiment offers no Continue"
    assert [row["run"] for row in rows] == [1, 2, 3]
    assert next(column for column in columns if column["field"] == "source")["hide"] is True
    assert {"label": "learning_rate", "value": "knob:learning_rate"} in options
    assert "3 Ongoing" in _render(header[1])
    # Unchanged columns are not re-sent (that would undo the user's widths and order).
    assert callbacks["refresh_runs"]("exp", 2, [], 0, ["source"], True, columns)[3] is no_update
    # The page's first call leaves the rows for after its first charts are drawn (they would hold them back).
    header, _, rows, columns, _, _ = callbacks["refresh_runs"]("exp", None, [], 0, [], False, None)
    assert rows is no_update and columns is no_update and "3 Ongoing" in _render(header[1])
    _, _, rows, _, _, _ = triggered_by("charts-drawn.data", True, callbacks["refresh_runs"], "exp", None, [], 0, [],
                                       True, None)  # fmt: skip
    assert [row["run"] for row in rows] == [1, 2, 3]


def test_chart_list_follows_the_metrics_and_figures_follow_the_runs(callbacks, store):
    children, shown = callbacks["refresh_chart_list"]("exp", 1, None)
    assert shown == {"experiment": "exp", "names": ["train_loss", "learning_rate", "eval_loss"], "cells": 1}
    assert [child.id for child in children] == ["chart-train_loss", "chart-learning_rate", "chart-eval_loss"]
    assert callbacks["refresh_chart_list"]("exp", 2, shown) == (no_update, no_update)
    graph_ids = [child.children[1].id for child in children]
    figures, sent = callbacks["refresh_charts"](graph_ids, 1, [], 0.0, 0, None, "step", "exp", None)
    assert [[trace["name"] for trace in figure["data"]] for figure in figures] == [["run 1", "run 2", "run 3"]] * 3
    ops.submit_op(store, "exp", "delete", 2)
    # Drawn charts get their traces only (a Patch: the layout, and so the user's zoom, stays as it is).
    patches, sent = callbacks["refresh_charts"](graph_ids, 1, [], 0.5, 1, None, "step", "exp", sent)
    traces = patches[0].to_plotly_json()["operations"][0]["params"]["value"]
    assert [trace["name"] for trace in traces if "raw" not in trace["name"]] == ["run 1", "run 3"]
    assert all(isinstance(patch, Patch) for patch in patches)
    # Nothing changed since: nothing is sent.
    assert callbacks["refresh_charts"](graph_ids, 2, [], 0.5, 1, None, "step", "exp", sent)[0] == [no_update] * 3
    # New cells (another generation) are drawn whole, whatever was sent to the old ones.
    new_ids = [{**graph_id, "cells": 2} for graph_id in graph_ids]
    figures, _ = callbacks["refresh_charts"](new_ids, 3, ["show"], 0.0, 1, None, "step", "exp", sent)
    assert [trace["name"] for trace in figures[0]["data"]] == ["run 1", "run 2", "run 3"]


def test_a_new_metric_joins_the_charts_drawn_without_redrawing_them(callbacks):
    shown = {"experiment": "exp", "names": ["train_loss", "eval_loss"], "cells": 4}
    children, now_shown = callbacks["refresh_chart_list"]("exp", 1, shown)
    assert isinstance(children, Patch) and now_shown["cells"] == 4
    (insert,) = children.to_plotly_json()["operations"]
    assert insert["operation"] == "Insert" and insert["params"]["index"] == 1
    assert insert["params"]["value"].id == "chart-learning_rate"
    # Another experiment's charts are drawn anew, as a new generation of cells.
    children, now_shown = callbacks["refresh_chart_list"]("older", 1, now_shown)
    assert isinstance(children, list) and now_shown["cells"] == 5
    assert {child.children[1].id["experiment"] for child in children} == {"older"}


def test_the_table_s_ticks_or_filters_decide_which_runs_the_charts_and_history_show(callbacks, store):
    rows = [{"run": 1}, {"run": 2}, {"run": 3}]
    assert callbacks["follow_the_table"](rows, [], rows, None) is no_update  # every row: every run, new ones too
    assert callbacks["follow_the_table"]([rows[0], rows[2]], [], rows, None) == [1, 3]  # a filter keeps two
    assert callbacks["follow_the_table"](rows, [rows[1]], rows, [1, 3]) == [2]  # a tick wins over the filter
    assert callbacks["follow_the_table"](rows, [], rows, [2]) is None
    children, _ = callbacks["refresh_chart_list"]("exp", 1, None)
    graph_ids = [child.children[1].id for child in children]
    figures, _ = callbacks["refresh_charts"](graph_ids, 1, [], 0.0, 0, [1, 3], "step", "exp", None)
    assert [trace["name"] for trace in figures[0]["data"]] == ["run 1", "run 3"]
    timeline, lineage, _, _ = callbacks["refresh_history"]("exp", 1, [], 0, [2])
    assert [trace["name"] for trace in timeline["data"]] == ["run 2"] and lineage["data"][-1]["customdata"] == [2]


def test_history_panels_show_timeline_lineage_and_ops(callbacks, store):
    ops.submit_op(store, "exp", "clone", 1, payload={"overrides": {"learning_rate": 5e-4}})
    ops.apply_due_ops(store, "exp", [1])
    timeline, lineage, log, sent = callbacks["refresh_history"]("exp", 1, [], 0, None)
    assert sorted(trace["name"] for trace in timeline["data"]) == ["run 1", "run 2", "run 3"]
    assert lineage["data"][-1]["customdata"] == [1, 4, 2, 3]  # the clone sits under its parent
    assert [row["kind"] for row in log] == ["clone"]
    # A tick with nothing new sends none of them; a new op sends the log alone.
    assert callbacks["refresh_history"]("exp", 2, [], 0, None, sent)[:3] == (no_update,) * 3
    ops.submit_op(store, "exp", "stop", 3)
    timeline, lineage, log, _ = callbacks["refresh_history"]("exp", 3, [], 0, None, sent)
    assert (timeline, lineage) == (no_update, no_update) and [row["kind"] for row in log] == ["stop", "clone"]


def select(trigger: str, value: Any, callbacks: Any, search: str = "", experiment: str = "exp") -> Any:
    """select_run as Dash calls it: its eight inputs (only the trigger's value matters), the URL and experiment."""
    return triggered_by(trigger, value, callbacks["select_run"], *[None] * 7, search, experiment)


def test_a_line_of_the_parallel_coordinates_clicked_selects_its_run(callbacks):
    assert select("sweep-line.data", {"run": 3, "at": 1.0}, callbacks) == 3
    assert select("sweep-line.data", {"run": "3; drop"}, callbacks) is no_update

    # The page's first call counts the Store as triggered beside the URL: the URL's run still opens.
    def first_call() -> Any:
        context_value.set(
            AttributeDict(
                triggered_inputs=[
                    {"prop_id": "sweep-line.data", "value": None},
                    {"prop_id": "url.search", "value": "?experiment=exp&run=2"},
                ]
            )
        )
        return callbacks["select_run"](*[None] * 7, "?experiment=exp&run=2", "exp")

    assert copy_context().run(first_call) == 2


def test_a_click_on_a_curve_a_grid_cell_or_the_close_button_selects_the_run(callbacks):
    click = {"points": [{"curveNumber": 1, "x": 10, "y": 2.0, "customdata": 2}]}
    graph = '{"cells":0,"experiment":"exp","metric":"train_loss","type":"metric-graph"}.clickData'
    assert select(graph, click, callbacks) == 2
    cell = {"colId": "ic_ops", "rowId": "3", "value": data.IC_OPS_CELL}
    assert select("runs-grid.cellClicked", cell, callbacks) == 3
    other_cell = {"colId": "status", "rowId": "3", "value": "Ongoing"}
    assert select("runs-grid.cellClicked", other_cell, callbacks) is no_update
    assert select("panel-close.n_clicks", 1, callbacks) is None
    assert run_from_click({"points": [{"customdata": [4, 2, "ok"]}]}) == 4  # a timeline bar
    assert run_from_click({"points": [{"x": 1}]}) is None and run_from_cell(None) is None


def test_the_url_reopens_the_run_panel_of_its_experiment_only(callbacks):
    search = "?experiment=exp&run=2&smoothing=0.6"
    assert callbacks["select_run"](*[None] * 7, search, "exp") == 2  # the page's first call
    assert select("url.search", search, callbacks, search, "older") is no_update  # left to the switch below
    assert select("experiment-select.value", "exp", callbacks, search, "older") == 2  # switched to the URL's
    assert select("experiment-select.value", "older", callbacks, search, "exp") is None
    assert callbacks["restore_smoothing"](search) == 0.6
    assert callbacks["restore_smoothing"]("?smoothing=7") is no_update
    assert callbacks["restore_smoothing"]("?smoothing=abc") is no_update and data.run_in_query("?run=x", "e") is None


def test_panel_enables_exactly_the_allowed_ops(callbacks, store):
    style, title, _, disabled = callbacks["refresh_panel"](1, 1, 0, None, "exp", BUTTONS)
    assert style == {"display": "block"} and title == "Run 1"
    assert disabled == [False, True, False, False]  # Ongoing: stop, clone and delete; not resume
    ops.submit_op(store, "exp", "stop", 1)
    assert callbacks["refresh_panel"](1, 1, 1, None, "exp", BUTTONS)[3] == [True, False, False, False]
    ops.submit_op(store, "exp", "delete", 1)
    assert callbacks["refresh_panel"](1, 1, 2, None, "exp", BUTTONS)[3] == [True, True, True, True]
    assert callbacks["refresh_panel"](None, 1, 0, None, "exp", BUTTONS)[0] == {"display": "none"}


def test_clone_submit_queues_the_op_and_an_invalid_config_queues_nothing(callbacks, store):
    text, warm, _ = callbacks["load_parent_config"](2, "exp")
    config = json.loads(text)
    assert config["learning_rate"] == data.panel_state(store, "exp", 2).config["learning_rate"] and warm == "off"
    grid = json.dumps({**config, "learning_rate": {"$list": [1e-4, 2e-4, 3e-4]}}, indent=2)
    preview, valid = callbacks["preview_clone"](grid, "weights", 2, "exp")
    assert preview.children == "Submit creates 3 clones (warm start: weights)" and valid is True

    clone_button = '{"op":"clone","type":"op-btn"}.n_clicks'
    bad = '{\n  "learning_rate": -1\n}'
    # The live check writes the problem under its line, and Submit waits until it is fixed.
    preview, valid = callbacks["preview_clone"](bad, "off", 2, "exp")
    assert "learning_rate=-1: must be > 0" in _render(preview) and valid is False
    assert callbacks["refresh_panel"](2, 1, 0, False, "exp", BUTTONS)[3] == [False, True, False, True]
    result, changed = triggered_by(clone_button, 1, callbacks["submit_op"], [None, None, None, 1], 2, "exp", bad,
                                   "off", 0)  # fmt: skip
    assert changed is no_update and "Not queued: 1 problem, each written under its line above." in _render(result)
    assert ops.list_ops(store, "exp") == []

    result, changed = triggered_by(clone_button, 2, callbacks["submit_op"], [None, None, None, 2], 2, "exp", grid,
                                   "weights", 0)  # fmt: skip
    [op] = ops.list_ops(store, "exp")
    assert changed == 1
    assert result.children == f"op {op['op_id']} (clone ×3) queued: applies at run 2's next chunk boundary"
    assert (op["kind"], op["payload"]["count"], op["payload"]["warm_start"]) == ("clone", 3, "weights")


def test_stop_from_the_panel_and_a_rejected_second_stop(callbacks, store):
    def click_stop(clicks: int, changes: int) -> Any:
        stop_button = '{"op":"stop","type":"op-btn"}.n_clicks'
        return triggered_by(stop_button, clicks, callbacks["submit_op"], [clicks, None, None, None], 3, "exp", "",
                            "off", changes)  # fmt: skip

    result, changed = click_stop(1, 4)
    assert changed == 5 and "applies at run 3's next chunk boundary" in result.children
    result, changed = click_stop(2, 5)
    assert changed is no_update and "will already be stopped" in _render(result)
    assert len(ops.list_ops(store, "exp")) == 1


def test_an_ended_experiment_stays_browsable(callbacks, store):
    experiments.set_experiment_status(store, "older", "finished")
    header, continue_button, rows, *_ = callbacks["refresh_runs"]("older", 1, [], 0, [], True, None)
    assert continue_button == {}, "an ended experiment offers Continue experiment"
    rendered = _render(header[0]) + _render(header[-1])
    assert "finished" in rendered and "ended" in rendered
    assert [row["run"] for row in rows] == [1, 2]
    children, _ = callbacks["refresh_chart_list"]("older", 1, None)
    graph_ids = [child.children[1].id for child in children]
    figures, _ = callbacks["refresh_charts"](graph_ids, 1, [], 0.0, 0, None, "step", "older", None)
    assert [trace["name"] for trace in figures[0]["data"]] == ["run 1", "run 2"]
    options, _ = callbacks["refresh_experiments"](1, None, "older")
    assert {"label": "older (finished)", "value": "older"} in options


def test_the_sweep_views_follow_the_runs_and_are_not_rebuilt_while_nothing_changed(callbacks, store):
    hidden = callbacks["refresh_sweep"]("exp", 1, None, None, [], None)  # not asked for: placeholders, once
    assert hidden[-1] == "hidden" and hidden[0]["data"] == []
    assert callbacks["refresh_sweep"]("exp", 2, None, None, [], "hidden") == (no_update,) * 6
    parallel, scatter, importance, options, knob, signature = callbacks["refresh_sweep"]("exp", 1, None, None, ["show"],
                                                                                         None)  # fmt: skip
    assert [option["value"] for option in options] == ["learning_rate"] and knob == "learning_rate"
    assert parallel["data"][0]["type"] == "parcoords" and parallel["layout"]["meta"]["run_ids"] == [1, 2, 3]
    assert scatter["data"][0]["customdata"] == [1, 2, 3]  # a click on a point opens that run's panel
    assert importance["data"] == []  # three runs: too few to estimate an importance (the figure says so)
    # The dropdown now holds the knob: drawn once more for it, then nothing while nothing changes.
    signature = callbacks["refresh_sweep"]("exp", 2, knob, None, ["show"], signature)[-1]
    assert callbacks["refresh_sweep"]("exp", 3, knob, None, ["show"], signature) == (no_update,) * 6
    parallel, scatter, *_ = callbacks["refresh_sweep"]("exp", 3, "learning_rate", [1, 3], ["show"], signature)
    # The scatter follows the runs the table keeps; the parallel coordinates keep every run (they select runs).
    assert parallel is no_update and scatter["data"][0]["customdata"] == [1, 3]
    click = {"points": [{"customdata": 3}]}
    assert select("sweep-scatter.clickData", click, callbacks) == 3


def test_the_sweep_views_show_one_trainer_type_s_runs_where_types_mix(callbacks, store):
    """An SFT run's eval loss and a DPO run's are not one quantity: the sweep shows one type's runs, the first the
    table keeps, and brushing its axes ticks runs of that type."""
    run = next(run for run in experiments.list_runs(store, "exp") if run["run_id"] == 3)
    store.update_run("exp", 3, {"config": {**run["config"], "trainer_type": "dpo"}})
    parallel, scatter, *_ = callbacks["refresh_sweep"]("exp", 1, None, None, ["show"], None)
    assert parallel["layout"]["meta"]["run_ids"] == [1, 2] and scatter["data"][0]["customdata"] == [1, 2]
    assert "of SFT runs" in parallel["layout"]["title"]["text"]
    parallel, scatter, *_ = callbacks["refresh_sweep"]("exp", 2, None, [3], ["show"], None)  # the table keeps run 3
    # One DPO run, no knob varying between DPO runs: nothing to draw, and no SFT run drawn instead.
    assert parallel["data"] == [] and scatter["data"] == []
    # Dimension 0 is the learning rate (trainer_type no longer varies): runs 1 and 2 are at 1e-4 and 1e-3; run 3,
    # at 1e-2, is not drawn, so a brush over every rate ticks SFT runs only.
    ticked, _ = callbacks["brush_ticks"]([{"dimensions[0].constraintrange": [[0, 0.1]]}, [0]], None, "exp", None)
    assert ticked == {"ids": ["1", "2"]}


def test_warm_clones_can_continue_their_parent_s_curve_and_a_chart_switches_its_y_scale(callbacks, store):
    runs = [
        {"run_id": 1, "parent_id": None, "warm_start": "off", "parent_step": None},
        {"run_id": 2, "parent_id": 1, "warm_start": "weights", "parent_step": 300},
        {"run_id": 3, "parent_id": 2, "warm_start": "weights+optimizer", "parent_step": 50},
        {"run_id": 4, "parent_id": 1, "warm_start": "off", "parent_step": 300},  # a cold clone starts afresh
    ]
    assert data.step_offsets(runs) == {1: 0, 2: 300, 3: 350, 4: 0}
    store.update_run("exp", 2, {"parent_id": 1, "warm_start": "weights", "parent_step": 300})
    children, _ = callbacks["refresh_chart_list"]("exp", 1, None)
    graph_ids = [child.children[1].id for child in children]
    figures, _ = callbacks["refresh_charts"](graph_ids, 1, [], 0.0, 0, None, "lineage", "exp", None)
    run_2 = next(trace for trace in figures[0]["data"] if trace["name"] == "run 2")
    assert decode_typed_array(run_2["x"])[0] == 301  # its step 1 drawn where its parent's step 301 would be
    patches = callbacks["set_y_scales"](["log", "linear", "linear"])
    assert patches[0].to_plotly_json()["operations"][0] == {
        "operation": "Assign", "location": ["layout", "yaxis", "type"], "params": {"value": "log"}}  # fmt: skip


def test_the_page_s_scripts_are_served_compressed(store):
    import re

    from dash_app.server import build_app

    client = build_app(store).server.test_client()
    scripts = re.findall(r'src="([^"]+\.js[^"]*)"', client.get("/").data.decode())
    script = next(src for src in scripts if "dash_renderer" in src or "react" in src)
    packed = client.get(script, headers={"Accept-Encoding": "br, gzip"})
    plain = client.get(script)
    assert packed.headers.get("Content-Encoding") in ("br", "gzip") and "Content-Encoding" not in plain.headers
    assert len(packed.data) * 2 < len(plain.data)


def test_the_charts_x_can_be_minutes_or_the_clock_and_a_new_x_redraws_them_whole(callbacks, store):
    children, _ = callbacks["refresh_chart_list"]("exp", 1, None)
    graph_ids = [child.children[1].id for child in children]
    _, sent = callbacks["refresh_charts"](graph_ids, 1, [], 0.0, 0, None, "step", "exp", None)
    figures, sent = callbacks["refresh_charts"](graph_ids, 2, [], 0.0, 0, None, "relative", "exp", sent)
    assert all(isinstance(figure, dict) for figure in figures)  # whole figures, not patches: the axis changed
    assert figures[0]["layout"]["xaxis"]["title"]["text"] == "minutes since the run's first step"
    x = decode_typed_array(figures[0]["data"][0]["x"])  # run 1: a step every half second from its first
    assert x[0] == pytest.approx(0.0) and x[-1] == pytest.approx(299 * 0.5 / 60) and np.all(np.diff(x) > 0)
    figures, _ = callbacks["refresh_charts"](graph_ids, 3, [], 0.0, 0, None, "wall", "exp", sent)
    assert figures[0]["layout"]["xaxis"]["type"] == "date"
    first = decode_typed_array(figures[0]["data"][0]["x"])[0] / 1000 - time.localtime().tm_gmtoff  # ms, local
    assert first == pytest.approx(SAMPLE_START + 60 + 0.5)  # run 1's step 1


def test_brushing_the_parallel_coordinates_ticks_the_runs_inside_every_range(callbacks):
    # Dimension 0 is log10(learning_rate) (runs at 1e-4, 1e-3, 1e-2), dimension 1 the best eval_loss.
    ticked, brush = callbacks["brush_ticks"]([{"dimensions[0].constraintrange": [[-3.5, -1.5]]}, [0]], None, "exp")
    assert ticked == {"ids": ["2", "3"]} and brush == {"0": [[-3.5, -1.5]]}
    ticked, brush = callbacks["brush_ticks"]([{"dimensions[1].constraintrange": [[0, 2.5]]}, [0]], brush, "exp")
    assert ticked == {"ids": ["3"]}  # inside both ranges
    ticked, brush = callbacks["brush_ticks"]([{"dimensions[0].constraintrange": None}, [0]], brush, "exp")
    assert ticked == {"ids": ["3"]} and brush == {"1": [[0, 2.5]]}
    ticked, brush = callbacks["brush_ticks"]([{"dimensions[1].constraintrange": None}, [0]], brush, "exp")
    assert ticked == [] and brush == {}  # no brush left: nothing ticked, every run shows


def test_the_page_comes_with_its_url_s_view_and_its_first_charts_drawn(store):
    """The layout a page gets is built from its URL (the Referer of Dash's layout request): the experiment, its
    charts' figures on the URL's x, y scales, ticks and zoom, and the signatures that make the figure callback's
    first call send nothing the page already has."""
    from dash_app.server import build_app

    client = build_app(store).server.test_client()
    page = "http://localhost/?experiment=older&x=relative&runs=2,9&y=train_loss:log;learning_rate:linear"
    layout = client.get("/_dash-layout", headers={"Referer": page}).get_json()

    def find(node: Any, wanted: Any) -> Any:
        if isinstance(node, dict):
            if node.get("props", {}).get("id") == wanted:
                return node["props"]
            node = list(node.values())
        if isinstance(node, list):
            return next((found for item in node if (found := find(item, wanted)) is not None), None)
        return None

    assert find(layout, "experiment-select")["value"] == "older"
    assert find(layout, "x-axis")["value"] == "relative"
    assert find(layout, "visible-runs")["data"] == [2]  # run 9 is not one of its runs
    graph_id = {"type": "metric-graph", "metric": "train_loss", "experiment": "older", "cells": 0}
    figure = find(layout, graph_id)["figure"]
    assert [trace["name"] for trace in figure["data"]] == ["run 2"]
    assert figure["layout"]["yaxis"]["type"] == "log"
    assert figure["layout"]["xaxis"]["title"]["text"] == "minutes since the run's first step"
    scale_id = {"type": "y-scale", "metric": "learning_rate", "experiment": "older", "cells": 0}
    assert find(layout, scale_id)["value"] == "linear"  # the URL's, not the metric's default (log)
    signatures = find(layout, "chart-signatures")["data"]
    assert signatures["experiment"] == "older"
    assert set(signatures["charts"]) == {"train_loss", "learning_rate", "eval_loss"}

    # The figure callback's first call on that page finds every chart drawn: nothing is sent.
    app = Dash(__name__)
    app.layout = build_layout()
    callbacks = register_callbacks(app, store)
    graph_ids = [{**graph_id, "metric": name} for name in ("train_loss", "learning_rate", "eval_loss")]
    updates, _ = callbacks["refresh_charts"](graph_ids, None, [], 0.0, 0, [2], "relative", "older", signatures)
    assert updates == [no_update] * 3

    # A bare visit, or a Referer of another site, opens the newest experiment with the default view.
    for headers in ({}, {"Referer": "http://elsewhere.example/?experiment=older"}):
        layout = client.get("/_dash-layout", headers=headers).get_json()
        assert find(layout, "experiment-select")["value"] == "exp"
        assert find(layout, "visible-runs")["data"] is None
        assert find(layout, {**graph_id, "experiment": "exp"})["figure"]["layout"]["yaxis"]["type"] == "linear"


def test_charts_drawn_anew_keep_the_y_scale_their_metric_was_shown_on(callbacks):
    scale_ids = [{"type": "y-scale", "metric": name, "experiment": "exp", "cells": 4} for name in ("train_loss",)]
    children, _ = callbacks["refresh_chart_list"]("older", 1, {"experiment": "exp", "cells": 4}, ["log"], scale_ids)
    scales = {child.children[0].id["metric"]: child.children[0].value for child in children}
    assert scales == {"train_loss": "log", "learning_rate": "log", "eval_loss": "linear"}  # lr: its default
    graph_ids = [child.children[1].id for child in children]
    new_scale_ids = [child.children[0].id for child in children]
    figures, _ = callbacks["refresh_charts"](
        graph_ids, 1, [], 0.0, 0, None, "step", "older", None, None, list(scales.values()), new_scale_ids
    )
    assert [figure["layout"]["yaxis"]["type"] for figure in figures] == ["log", "log", "linear"]


def test_the_page_s_plotly_is_the_partial_bundle_of_the_plotly_js_dash_would_load(store):
    """dash_app/assets/plotly-rf.min.js (scatter, bar, parcoords: see dash_app/plotly_bundle) is the plotly.js
    version the installed plotly package ships, and the page loads it instead of the full bundle."""
    import re
    from pathlib import Path

    import plotly

    from dash_app.server import build_app

    shipped = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text()[:300]
    bundle = Path(__file__).parents[1] / "dash_app" / "assets" / "plotly-rf.min.js"
    banner = bundle.read_text()[:300]
    version = re.search(r"plotly\.js v(\d+\.\d+\.\d+)", shipped).group(1)
    assert re.search(r"plotly\.js v(\d+\.\d+\.\d+)", banner).group(1) == version, (
        "rebuild dash_app/assets/plotly-rf.min.js for the installed plotly (dash_app/plotly_bundle/README.md)"
    )
    page = build_app(store).server.test_client().get("/").data.decode()
    assert "plotly-rf.min.js" in page


def test_the_page_s_html_carries_its_first_chart_and_plotly_ahead_of_dash_s_scripts(store):
    """The page's HTML draws its first chart before Dash's scripts run (dash_app/page_shell.py): plotly.js and
    the picture's script come first, once each, with the first chart's figure of the URL's view; a run page and
    an empty store get plotly.js only."""
    import re

    from dash_app.page_shell import PICTURE_MAX_TRACES, shell_html
    from dash_app.server import build_app

    client = build_app(store).server.test_client()
    page = client.get("/?experiment=older&runs=2&y=train_loss:log").data.decode()
    scripts = re.findall(r'<script src="([^"]+)"', page)
    names = [src.split("?")[0].rsplit("/", 1)[-1] for src in scripts]
    assert names[:2] == ["plotly-rf.min.js", "first_chart.js"]
    assert names.count("plotly-rf.min.js") == 1 and names.count("first_chart.js") == 1
    assert any("dash_renderer" in src for src in scripts[2:])
    shown = json.loads(re.search(r'id="first-chart-figure">(.*?)</script>', page).group(1))
    assert shown["chart"] == "chart-train_loss"
    assert [trace["name"] for trace in shown["figure"]["data"]] == ["run 2"]
    assert shown["figure"]["layout"]["yaxis"]["type"] == "log"
    assert page.index('id="first-chart-preview"') < page.index(scripts[0])
    for asset in scripts[:2]:
        assert client.get(asset).status_code == 200

    for bare in ("/run/older/1", "/run/older/1?experiment=older"):
        page = client.get(bare).data.decode()
        assert "plotly-rf.min.js" in page and "first-chart-figure" not in page
    # Text from a run or a metric's name cannot end or change the script element that carries the figure.
    for name in ("</script><b>x", "<!--<script>", "a & b"):
        html = shell_html(lambda asset: f"/assets/{asset}", "train_loss", {"data": [{"name": name}]})
        assert name not in html and html.count("<script") == 3 and html.count("</script>") == 3
        carried = json.loads(re.search(r'id="first-chart-figure">(.*?)</script>', html).group(1))
        assert carried["figure"]["data"][0]["name"] == name
    # Past PICTURE_MAX_TRACES curves the picture would hold the dashboard's chart back: plotly.js only.
    many = {"data": [{"name": f"run {run_id}"} for run_id in range(PICTURE_MAX_TRACES + 1)]}
    html = shell_html(lambda asset: f"/assets/{asset}", "train_loss", many)
    assert "first-chart-figure" not in html and "plotly-rf.min.js" in html
    # A query string that is not UTF-8 still gets the page.
    assert client.get("/", environ_overrides={"QUERY_STRING": "experiment=\xff"}).status_code == 200


def test_an_experiment_mixing_trainer_types_gets_a_chart_of_each_loss_per_type(callbacks, store):
    """SFT's cross-entropy and DPO's preference loss are not one quantity: each type's runs get their own chart
    of each loss, while the rest (the learning rate) stays one chart of every run."""
    run = next(run for run in experiments.list_runs(store, "exp") if run["run_id"] == 2)
    store.update_run("exp", 2, {"config": {**run["config"], "trainer_type": "dpo"}})
    assert data.chart_keys(store, "exp") == [
        "train_loss@sft", "train_loss@dpo", "learning_rate", "eval_loss@sft", "eval_loss@dpo"]  # fmt: skip
    assert data.chart_keys(store, "older") == ["train_loss", "learning_rate", "eval_loss"]  # one type: as before
    children, _ = callbacks["refresh_chart_list"]("exp", 1, None)
    graph_ids = [child.children[1].id for child in children]
    figures, _ = callbacks["refresh_charts"](graph_ids, 1, [], 0.0, 0, None, "step", "exp", None)
    shown = {graph_id["metric"]: [trace["name"] for trace in figure["data"]]
             for graph_id, figure in zip(graph_ids, figures, strict=True)}  # fmt: skip
    assert shown["train_loss@sft"] == ["run 1", "run 3"] and shown["train_loss@dpo"] == ["run 2"]
    assert shown["learning_rate"] == ["run 1", "run 2", "run 3"]
    titles = [figure["layout"]["title"]["text"] for figure in figures]
    assert "(DPO runs)" in titles[1] and "(SFT runs)" in titles[0] and "runs)" not in titles[2]


def test_dpo_and_grpo_charts_come_in_the_order_they_are_read():
    logged = ["rewards/rejected", "eval_rewards/accuracies", "logps/chosen", "rewards/margins", "train_loss",
              "rewards/accuracies", "kl", "eval_loss", "reward"]  # fmt: skip
    assert data.ordered_metrics(logged) == [
        "train_loss", "eval_loss", "rewards/margins", "rewards/accuracies", "eval_rewards/accuracies",
        "rewards/rejected", "reward", "kl", "logps/chosen"]  # fmt: skip


def test_an_idle_refresh_builds_no_figure(callbacks, store, monkeypatch):
    """While the points read, the runs shown and the view are what the last answer was built from, a refresh
    tick answers without building a figure; a new point builds them again."""
    import dash_app.callbacks as module

    children, _ = callbacks["refresh_chart_list"]("exp", 1, None)
    graph_ids = [child.children[1].id for child in children]
    _, sent = callbacks["refresh_charts"](graph_ids, 1, [], 0.0, 0, None, "step", "exp", None)
    built = module.metric_figures

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a figure was built for a tick with nothing new")

    monkeypatch.setattr(module, "metric_figures", refuse)
    updates, again = callbacks["refresh_charts"](graph_ids, 2, [], 0.0, 0, None, "step", "exp", sent)
    assert updates == [no_update] * 3 and again is no_update  # the signatures the page holds still hold
    with pytest.raises(AssertionError, match="nothing new"):  # another view is another build
        callbacks["refresh_charts"](graph_ids, 3, [], 0.5, 0, None, "step", "exp", sent)
    append_points(store, "exp", 1, np.arange(301, 311))
    with pytest.raises(AssertionError, match="nothing new"):  # so is a new point
        callbacks["refresh_charts"](graph_ids, 4, [], 0.0, 0, None, "step", "exp", sent)
    monkeypatch.setattr(module, "metric_figures", built)
    updates, _ = callbacks["refresh_charts"](graph_ids, 5, [], 0.0, 0, None, "step", "exp", sent)
    # Run 1 alone trained: its curves alone are sent (train_loss and learning_rate), eval_loss not at all.
    for update in updates[:2]:
        (operation,) = update.to_plotly_json()["operations"]
        assert operation["location"] == ["data", 0] and operation["params"]["value"]["name"] == "run 1"
    assert updates[2] is no_update
