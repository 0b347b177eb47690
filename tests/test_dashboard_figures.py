"""Figure builders: plain dicts in, Plotly figure dicts out."""

from __future__ import annotations

import numpy as np
import pytest

from dash_app.figures import (
    decode_typed_array,
    lineage_figure,
    lineage_layout,
    metric_figure,
    run_color,
    timeline_figure,
    typed_array,
)


@pytest.mark.parametrize(("values", "dtype"), [([1.5, -2.25, 1e-7], "f8"), ([0, 7, 2**31 - 1], "i4"), ([], "f8")])
def test_typed_arrays_round_trip(values, dtype):
    spec = typed_array(np.array(values), dtype)
    assert spec["dtype"] == dtype
    np.testing.assert_array_equal(decode_typed_array(spec), np.array(values, dtype=dtype))


def _series():
    return {
        2: (np.array([1, 2, 3, 4]), np.array([5.0, 4.0, 4.5, 3.0])),
        1: (np.arange(1, 101), np.linspace(6, 2, 100)),
    }


def test_metric_figure_has_a_curve_per_run_with_its_knobs_on_hover():
    figure = metric_figure(
        "train_loss", _series(), {1: "learning_rate=0.001", 2: "learning_rate=0.003"}, uirevision="exp:train_loss"
    )
    names = [trace["name"] for trace in figure["data"]]
    assert names == ["run 1", "run 2"]
    run_1, run_2 = figure["data"]
    np.testing.assert_array_equal(decode_typed_array(run_1["x"]), np.arange(1, 101))
    np.testing.assert_allclose(decode_typed_array(run_2["y"]), [5.0, 4.0, 4.5, 3.0])
    assert "learning_rate=0.003" in run_2["hovertemplate"] and "run 2" in run_2["hovertemplate"]
    assert run_2["customdata"] == [2, 2, 2, 2]  # what a click on the curve reports
    assert run_1["line"]["color"] == run_color(1) != run_color(2)
    assert run_1["mode"] == "lines" and run_2["mode"] == "lines+markers"  # a few points get markers
    assert figure["layout"]["uirevision"] == "exp:train_loss"
    assert figure["layout"]["title"]["text"] == "minibatch loss"


def test_smoothing_adds_the_smoothed_curve_over_a_faint_raw_one():
    figure = metric_figure("train_loss", _series(), {}, smoothing=0.8, deleted=frozenset({2}))
    assert [trace["name"] for trace in figure["data"]] == ["run 1 (raw)", "run 1", "run 2 (raw)", "run 2"]
    raw, smoothed = figure["data"][2], figure["data"][3]
    np.testing.assert_allclose(decode_typed_array(raw["y"]), [5.0, 4.0, 4.5, 3.0])
    smoothed_y = decode_typed_array(smoothed["y"])
    assert smoothed_y[0] == pytest.approx(5.0) and 3.0 < smoothed_y[-1] < 4.5
    assert raw["hoverinfo"] == "skip" and raw["opacity"] < 1
    assert smoothed["line"]["dash"] == "dot"  # a deleted run shown on request
    assert figure["data"][1]["line"]["dash"] == "solid"


@pytest.mark.parametrize("name", ["learning_rate", "eval_loss", "eval_rougeL"])
def test_smoothing_leaves_schedules_and_evaluations_exact(name):
    figure = metric_figure(name, _series(), {}, smoothing=0.8)
    assert [trace["name"] for trace in figure["data"]] == ["run 1", "run 2"]
    np.testing.assert_allclose(decode_typed_array(figure["data"][1]["y"]), [5.0, 4.0, 4.5, 3.0])


def test_the_learning_rate_is_on_a_log_axis_and_losses_on_a_linear_one():
    assert metric_figure("learning_rate", _series(), {})["layout"]["yaxis"]["type"] == "log"
    assert metric_figure("train_loss", _series(), {})["layout"]["yaxis"]["type"] == "linear"


def test_hover_shows_each_varying_knob_on_its_own_line_escaped():
    figure = metric_figure("train_loss", _series(), {2: "r=4\nlearning_rate=0.0003\nformatting_func=<lambda>"})
    hover = figure["data"][1]["hovertemplate"]
    assert "<br>r=4<br>learning_rate=0.0003<br>formatting_func=&lt;lambda&gt;<br>step" in hover
    assert "&lt;br&gt;" not in hover


def test_timeline_bars_sit_on_their_slot_and_a_running_chunk_reaches_now():
    entries = [
        {"run_id": 1, "slot": 0, "chunk": 0, "start": 100.0, "end": 104.0, "outcome": "ok"},
        {"run_id": 2, "slot": 1, "chunk": 0, "start": 100.5, "end": 103.0, "outcome": "ok"},
        {"run_id": 1, "slot": 1, "chunk": 1, "start": 104.5, "end": None, "outcome": None},
    ]
    figure = timeline_figure(entries, origin=100.0, now=110.0)
    by_name = {trace["name"]: trace for trace in figure["data"]}
    run_1 = by_name["run 1"]
    assert run_1["y"] == ["slot 0", "slot 1"]
    assert run_1["base"] == [0.0, 4.5]
    assert run_1["x"] == [4.0, 5.5]  # the open chunk is drawn up to now
    assert run_1["marker"]["opacity"] == [1.0, 0.5]
    assert run_1["text"] == ["r1·c1", "r1·c2"]
    assert by_name["run 2"]["customdata"] == [[2, 1, "ok", 0.5, 3.0, 2.5]]  # run, chunk, outcome, start, end, s
    assert "from 0.5 s to 3.0 s (2.5 s)" not in by_name["run 2"]["hovertemplate"]  # (Plotly fills the template)
    assert "(%{customdata[5]:.1f} s)" in by_name["run 2"]["hovertemplate"]
    assert figure["layout"]["shapes"] == [] and figure["layout"]["uniformtext"]["mode"] == "hide"
    assert figure["layout"]["yaxis"]["categoryarray"] == ["slot 1", "slot 0"]


def test_an_idle_stretch_between_two_fits_is_cut_out_of_the_timeline_and_marked():
    first = [{"run_id": 1, "slot": 0, "chunk": c, "start": 10.0 * c, "end": 10.0 * c + 9, "outcome": "ok"}
             for c in range(3)]  # fmt: skip
    second = [{"run_id": 1, "slot": 0, "chunk": 3, "start": 3600.0, "end": 3609.0, "outcome": "ok"}]
    figure = timeline_figure(first + second, origin=0.0, now=3700.0)
    (bars,) = figure["data"]
    (shade,) = figure["layout"]["shapes"]
    # Busy 0-29 s and 3600-3609 s: the hour between shrinks to a few seconds, shaded and labelled.
    assert shade["x0"] == pytest.approx(29.0) and shade["x1"] - shade["x0"] < 5
    assert bars["base"][3] == pytest.approx(shade["x1"]) and bars["x"][3] == pytest.approx(9.0)
    assert figure["layout"]["annotations"][0]["text"] == "idle 60 min"  # 3571 s
    assert bars["customdata"][3][3:] == [3600.0, 3609.0, 9.0]  # the hover keeps the real times
    assert "idle stretches cut out" in figure["layout"]["xaxis"]["title"]["text"]


def _run(run_id, parent=None, warm="off", status="Ongoing"):
    return {"run_id": run_id, "parent_id": parent, "warm_start": warm, "status": status, "source": "user",
            "parent_step": 6}  # fmt: skip


def test_lineage_puts_clones_under_their_parent():
    runs = [_run(1), _run(2), _run(3, parent=2, warm="weights"), _run(4, parent=3), _run(5, parent=2), _run(6, 99)]
    placed = lineage_layout(runs)
    assert placed == {1: (0, 0), 2: (0, 1), 3: (1, 2), 4: (2, 3), 5: (1, 4), 6: (0, 5)}  # 6's parent is hidden


def test_lineage_figure_draws_warm_and_cold_edges_and_clickable_nodes():
    figure = lineage_figure([_run(1), _run(2, parent=1, warm="weights"), _run(3, parent=1, status="Deleted")])
    edges = {trace["name"]: trace for trace in figure["data"] if trace["mode"] == "lines"}
    assert edges["warm start"]["line"]["dash"] == "solid" and edges["cold clone"]["line"]["dash"] == "dash"
    assert edges["warm start"]["x"] == [0, 0, 1, None] and edges["warm start"]["y"] == [0, 1, 1, None]
    nodes = figure["data"][-1]
    assert nodes["customdata"] == [1, 2, 3]
    assert "clone of run 1 at step 6" in nodes["hovertext"][1]
