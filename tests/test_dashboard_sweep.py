"""Sweep views: runs-table rows in, Plotly figure dicts and knob importances out."""

from __future__ import annotations

import math
import random

import plotly.graph_objects as go
import pytest

from dash_app.figures import run_color
from dash_app.sweep import (
    LOG_RATIO,
    category_key,
    importance_figure,
    knob_axis,
    knob_importance,
    knob_scatter_figure,
    parallel_coordinates_figure,
    sweep_points,
)
from rf_core.report import RunRow, run_row

KNOBS = ["learning_rate", "lora_r", "formatting_func", "target_modules", "use_rslora"]


def _row(run_id: int, best: float | None, status: str = "Completed", latest: float | None = None, **knobs) -> RunRow:
    config = {"run_name": f"trial-{run_id}", **knobs}
    run = {"run_id": run_id, "config": config, "status": status, "best_metric": best, "latest_metric": latest}
    return run_row(run, list(knobs))


def _mixed_sweep() -> list[RunRow]:
    """Five runs over every kind of knob value, plus runs the views must leave out."""
    return [
        _row(1, 0.9, learning_rate=1e-5, lora_r=4, formatting_func="chat", target_modules=["q_proj", "v_proj"],
             use_rslora=False),
        _row(2, 0.5, status="Stopped", latest=0.7, learning_rate=1e-4, lora_r=8, formatting_func="alpaca",
             target_modules="all-linear", use_rslora=True),
        _row(3, 0.3, learning_rate=1e-3, lora_r=16, formatting_func="chat", target_modules=None, use_rslora=True),
        _row(4, None, status="Ongoing", learning_rate=3e-4, lora_r=8, formatting_func="plain",
             target_modules=["q_proj"], use_rslora=False),
        _row(5, 0.1, status="Deleted", learning_rate=3e-5, lora_r=4, formatting_func="plain",
             target_modules=["q_proj"], use_rslora=False),
        _row(6, 0.4, learning_rate=1e-4, lora_r=16, formatting_func="alpaca", target_modules=["q_proj", "v_proj"],
             use_rslora=True),
    ]  # fmt: skip


def _valid_plotly(figure: dict) -> None:
    go.Figure(figure)  # raises on a property Plotly does not know, or a value of the wrong shape


def test_sweep_points_keep_measured_live_runs_with_their_best_value():
    points = sweep_points(KNOBS, _mixed_sweep())
    assert [point.run_id for point in points] == [1, 2, 3, 6]  # 4: no metric yet, 5: deleted
    stopped = points[1]
    assert stopped.value == 0.5  # its best, not its latest (0.7)
    assert stopped.knobs["target_modules"] == "all-linear" and stopped.name == "trial-2"
    assert stopped.status == "Stopped"


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_sweep_points_skip_non_finite_values(bad):
    points = sweep_points(["lr"], [_row(1, bad, lr=1e-4), _row(2, 0.5, lr=1e-3)])
    assert [point.run_id for point in points] == [2]


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([1e-5, 1e-4, 1e-3], "log"),
        ([2e-5, 5e-5, 1e-4], "linear"),  # only 5x apart
        ([4, 8, 16], "linear"),
        ([1, LOG_RATIO], "linear"),  # exactly the ratio: not more than it
        ([1, LOG_RATIO * 1.05], "log"),
        ([0, 1e-3, 1], "linear"),  # not all positive: no log of 0
        ([-1e-3, 1.0], "linear"),
        (["chat", "plain"], "categorical"),
        ([True, False], "categorical"),
        ([None, 1e-4], "categorical"),
        ([["q"], "all-linear"], "categorical"),
    ],
)
def test_knob_axis_kind(values, kind):
    points = sweep_points(["knob"], [_row(i + 1, float(i), knob=value) for i, value in enumerate(values)])
    assert knob_axis("knob", points).kind == kind


def test_category_keys_tell_types_apart():
    keys = {category_key(value) for value in [True, "True", 1, 1.5, None, "None", ["a"], "a", ("a",)]}
    assert len(keys) == 8  # a tuple and a list are the same JSON value; everything else is distinct


def test_parallel_coordinates_dimensions_and_run_ids():
    figure = parallel_coordinates_figure(KNOBS, _mixed_sweep(), "eval_loss", "min")
    _valid_plotly(figure)
    (trace,) = figure["data"]
    assert trace["type"] == "parcoords"
    run_ids = figure["layout"]["meta"]["run_ids"]
    assert run_ids == [1, 2, 3, 6]
    dims = {dim["label"]: dim for dim in trace["dimensions"]}
    assert [dim["label"] for dim in trace["dimensions"]] == [
        "log10 learning_rate", "lora_r", "formatting_func", "target_modules", "use_rslora", "best eval_loss",
    ]  # fmt: skip
    by_run = {run.run_id: run for run in _mixed_sweep()}

    # The learning rate as log10, its ticks naming the real values.
    lr = dims["log10 learning_rate"]
    assert lr["values"] == pytest.approx([-5, -4, -3, -4])
    assert [float(text) for text in lr["ticktext"]] == pytest.approx([10**v for v in lr["tickvals"]])
    assert lr["ticktext"] == ["1e-05", "0.0001", "0.001"]

    # The rank stays linear, ticks on its values.
    assert dims["lora_r"]["values"] == [4, 8, 16, 16]
    assert dims["lora_r"]["ticktext"] == ["4", "8", "16"]

    # Every categorical code names its run's value.
    for knob in ("formatting_func", "target_modules", "use_rslora"):
        dim = dims[knob]
        assert dim["tickvals"] == list(range(len(dim["ticktext"])))
        for run_id, code in zip(run_ids, dim["values"], strict=True):
            assert isinstance(code, int)
            value = by_run[run_id].knobs[knob]
            expected = "[" + ", ".join(value) + "]" if isinstance(value, list) else str(value)
            assert dim["ticktext"][code] == expected, (knob, run_id)
    assert dims["target_modules"]["ticktext"] == ["None", "all-linear", "[q_proj, v_proj]"]
    assert dims["use_rslora"]["ticktext"] == ["False", "True"]

    # The metric is the last dimension and the line colour, in run order.
    assert dims["best eval_loss"]["values"] == [0.9, 0.5, 0.3, 0.4]
    assert trace["line"]["color"] == [0.9, 0.5, 0.3, 0.4]


def test_parallel_coordinates_ticks_for_many_learning_rates_show_round_values():
    rates = [10 ** (-5 + 2 * i / 11) for i in range(12)]  # 1e-5 ... 1e-3, none of them round
    rows = [_row(i + 1, float(i), learning_rate=rate, lora_r=8 if i % 2 else 16) for i, rate in enumerate(rates)]
    (trace,) = parallel_coordinates_figure(["learning_rate", "lora_r"], rows, "eval_loss", "min")["data"]
    lr = trace["dimensions"][0]
    assert lr["ticktext"] == ["1e-05", "0.0001", "0.001"]
    assert lr["tickvals"] == pytest.approx([-5, -4, -3])
    assert lr["range"] == pytest.approx([-5, -3])


@pytest.mark.parametrize(("mode", "reversed_"), [("min", True), ("max", False)])
def test_parallel_coordinates_colour_the_better_runs_alike(mode, reversed_):
    (trace,) = parallel_coordinates_figure(KNOBS, _mixed_sweep(), "accuracy", mode)["data"]
    assert trace["line"]["reversescale"] is reversed_
    assert trace["line"]["colorscale"] == "Viridis"


@pytest.mark.parametrize(
    ("knobs", "rows", "message"),
    [
        (KNOBS, _mixed_sweep()[:1], "need 2 runs"),
        (KNOBS, _mixed_sweep()[3:5], "(0 so far)"),  # unmeasured and deleted: nothing left
        ([], [_row(1, 0.5), _row(2, 0.4)], "no knob varies"),
    ],
)
def test_parallel_coordinates_degenerate_inputs_give_the_empty_figure(knobs, rows, message):
    figure = parallel_coordinates_figure(knobs, rows, "eval_loss", "min")
    assert figure["data"] == []
    assert message in figure["layout"]["annotations"][0]["text"]


def test_knob_scatter_on_a_log_axis_with_run_ids_and_colours():
    figure = knob_scatter_figure(KNOBS, _mixed_sweep(), "eval_loss", "min", "learning_rate")
    _valid_plotly(figure)
    (trace,) = figure["data"]
    assert figure["layout"]["xaxis"]["type"] == "log"
    assert trace["customdata"] == [1, 2, 3, 6]
    assert trace["x"] == [1e-5, 1e-4, 1e-3, 1e-4]
    assert trace["y"] == [0.9, 0.5, 0.3, 0.4]
    assert trace["marker"]["color"] == [run_color(run_id) for run_id in (1, 2, 3, 6)]
    hover = trace["hovertext"][0]
    assert hover.startswith("<b>run 1</b> trial-1")
    assert "learning_rate=1e-05" in hover and "target_modules=[q_proj, v_proj]" in hover and "lora_r=4" in hover
    assert "best eval_loss 0.9" in hover


def test_knob_scatter_on_a_category_axis():
    figure = knob_scatter_figure(KNOBS, _mixed_sweep(), "eval_loss", "min", "target_modules")
    _valid_plotly(figure)
    (trace,) = figure["data"]
    xaxis = figure["layout"]["xaxis"]
    assert xaxis["type"] == "category"
    assert xaxis["categoryarray"] == ["None", "all-linear", "[q_proj, v_proj]"]
    assert trace["x"] == ["[q_proj, v_proj]", "all-linear", "None", "[q_proj, v_proj]"]
    assert knob_scatter_figure(KNOBS, _mixed_sweep(), "eval_loss", "min", "lora_r")["layout"]["xaxis"]["type"] == (
        "linear"
    )


def test_knob_scatter_hover_escapes_markup():
    rows = [_row(1, 0.5, fmt="<b>x</b>"), _row(2, 0.4, fmt="y")]
    hover = knob_scatter_figure(["fmt"], rows, "eval_loss", "min", "fmt")["data"][0]["hovertext"][0]
    assert "fmt=&lt;b&gt;x&lt;/b&gt;" in hover


@pytest.mark.parametrize(
    ("knob", "rows", "message"),
    [("not_a_knob", _mixed_sweep(), "does not vary"), ("learning_rate", _mixed_sweep()[3:5], "no run has")],
)
def test_knob_scatter_degenerate_inputs_give_the_empty_figure(knob, rows, message):
    figure = knob_scatter_figure(KNOBS, rows, "eval_loss", "min", knob)
    assert figure["data"] == [] and message in figure["layout"]["annotations"][0]["text"]


def _lr_driven_sweep(runs: int = 24, seed: int = 0) -> tuple[list[str], list[RunRow]]:
    """The metric is a bowl in log10(learning_rate) (best at 1e-4); the other knobs are drawn at random."""
    rng = random.Random(seed)
    rows = []
    for run_id in range(1, runs + 1):
        lr = rng.choice([1e-5, 3e-5, 1e-4, 3e-4, 1e-3])
        knobs = {
            "learning_rate": lr,
            "formatting_func": rng.choice(["chat", "plain", "alpaca"]),
            "target_modules": rng.choice([["q_proj", "v_proj"], "all-linear"]),
            "lora_r": rng.choice([4, 8, 16]),
        }
        rows.append(_row(run_id, (math.log10(lr) + 4) ** 2 + rng.gauss(0, 0.05), **knobs))
    return ["learning_rate", "formatting_func", "target_modules", "lora_r"], rows


def _method(name: str) -> str:
    if name == "fanova":
        pytest.importorskip("sklearn", reason="Optuna's fANOVA needs scikit-learn")
    return name


@pytest.mark.parametrize("method", ["fanova", "anova"])
@pytest.mark.parametrize("seed", [0, 1])
def test_importance_finds_the_knob_the_metric_depends_on(method, seed):
    knobs, rows = _lr_driven_sweep(seed=seed)
    importances = knob_importance(knobs, rows, "eval_loss", "min", method=_method(method))
    assert set(importances) == set(knobs)
    assert sum(importances.values()) == pytest.approx(1.0)
    assert all(share >= 0 for share in importances.values())
    assert next(iter(importances)) == "learning_rate"  # most important first
    assert importances["learning_rate"] > 0.5
    assert list(importances.values()) == sorted(importances.values(), reverse=True)


def test_fanova_importance_is_deterministic():
    knobs, rows = _lr_driven_sweep()
    method = _method("fanova")
    assert knob_importance(knobs, rows, "eval_loss", "min", method=method) == knob_importance(
        knobs, rows, "eval_loss", "max", method=method
    )


@pytest.mark.parametrize("method", ["fanova", "anova"])
def test_importance_of_degenerate_sweeps_is_empty(method):
    method = _method(method)
    knobs, rows = _lr_driven_sweep()
    assert knob_importance(knobs, rows[:3], "eval_loss", "min", method=method) == {}  # too few runs
    # Four rows, but one deleted and one unmeasured: two runs with a metric.
    few = [rows[0], rows[1], _row(30, 0.1, status="Deleted", learning_rate=1e-4), _row(31, None, learning_rate=1e-4)]
    assert knob_importance(knobs, few, "eval_loss", "min", method=method) == {}
    assert knob_importance([], rows, "eval_loss", "min", method=method) == {}  # no varying knob
    flat = [_row(run.run_id, 0.5, **run.knobs) for run in rows]
    assert knob_importance(knobs, flat, "eval_loss", "min", method=method) == {}  # nothing to explain


@pytest.mark.parametrize("method", ["fanova", "anova"])
def test_importance_leaves_out_knobs_constant_among_the_measured_runs(method):
    knobs, rows = _lr_driven_sweep()
    # warmup varies between the runs only through a run with no metric value yet.
    unmeasured = _row(99, None, warmup=20, **rows[0].knobs)
    rows = [*(_row(run.run_id, run.best_metric, warmup=10, **run.knobs) for run in rows), unmeasured]
    importances = knob_importance([*knobs, "warmup"], rows, "eval_loss", "min", method=_method(method))
    assert set(importances) == set(knobs)


def test_importance_rejects_an_unknown_method():
    knobs, rows = _lr_driven_sweep()
    with pytest.raises(ValueError, match="method"):
        knob_importance(knobs, rows, "eval_loss", "min", method="shap")  # type: ignore[arg-type]


def test_importance_figure_puts_the_most_important_knob_on_top():
    figure = importance_figure({"lora_r": 0.1, "learning_rate": 0.7, "formatting_func": 0.2})
    _valid_plotly(figure)
    (trace,) = figure["data"]
    assert trace["orientation"] == "h"
    assert trace["y"] == ["learning_rate", "formatting_func", "lora_r"]
    assert trace["x"] == [0.7, 0.2, 0.1]
    # Plotly draws a category array bottom-up: the top bar is its last entry.
    assert figure["layout"]["yaxis"]["categoryarray"][-1] == "learning_rate"


def test_importance_figure_of_nothing_is_the_empty_figure():
    figure = importance_figure({})
    assert figure["data"] == [] and "needs 4 runs" in figure["layout"]["annotations"][0]["text"]
    assert importance_figure({}, empty_message="waiting")["layout"]["annotations"][0]["text"] == "waiting"
