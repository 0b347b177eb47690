"""Sweep views: how the runs' knobs relate to the experiment's metric, as plain Plotly figure dicts (no Dash, no store).

Every view starts from `runs_table(snapshot)`'s `(knobs, rows)` and judges each run by its *best* value of the
experiment's metric (`RunRow.best_metric`), so a run stopped early is judged by what it reached, not by where it
stopped. Deleted runs and runs with no finite best value yet are left out (`sweep_points`).

How a knob is drawn (`knob_axis`), the same in every view:
- numeric (every value an int or float, not a bool, and finite): a linear axis, or a log10 axis when every value is
  positive and the largest is more than `LOG_RATIO` (20) times the smallest: learning rates 1e-5 ... 1e-3 go on a
  log axis, LoRA ranks {4, 8, 16} stay linear;
- anything else (strings, bools, None, lists, a mix of numbers and None): categorical, one integer code per distinct
  value in a stable order (None, bools, numbers, strings, then lists and the rest by their JSON text).
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dash_app.figures import MARGIN, empty_figure, run_color
from rf_core.report import RunRow
from rf_core.states import RunStatus

# A positive numeric knob whose largest value exceeds this many times its smallest is drawn on a log10 axis.
LOG_RATIO = 20.0
# Fewer runs than this with a metric value give no importance estimate: a forest fitted to 3 points says nothing.
MIN_RUNS_FOR_IMPORTANCE = 4
# Up to this many distinct values of a numeric knob, its axis ticks sit on exactly those values.
MAX_EXACT_TICKS = 8
_IMPORTANCE_SEED = 0

ImportanceMethod = Literal["auto", "fanova", "anova"]


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its knob values and its best value of the experiment's metric."""

    run_id: int
    name: str | None
    status: str
    knobs: dict[str, Any]  # the run's value of each knob that varies between the runs
    value: float  # the run's best value of the experiment's metric (RunRow.best_metric)


@dataclass(frozen=True)
class KnobAxis:
    """How one knob is drawn: `kind` is "linear", "log" (values shown as log10) or "categorical"."""

    knob: str
    kind: Literal["linear", "log", "categorical"]
    categories: tuple[str, ...] = ()  # categorical: each category's key (`category_key`), code = its index
    labels: tuple[str, ...] = ()  # categorical: each category's display text, in code order

    @property
    def is_numeric(self) -> bool:
        return self.kind != "categorical"

    def code(self, value: Any) -> int:
        """A categorical value's integer code."""
        return self.categories.index(category_key(value))


def sweep_points(knobs: Sequence[str], rows: Sequence[RunRow]) -> list[SweepPoint]:
    """The runs a sweep view shows, in the rows' order: not Deleted, and with a finite best metric value.

    The value is the run's best value of the experiment's metric (`best_metric`), not its latest: a stopped run is
    judged by what it reached.
    """
    points = []
    for row in rows:
        if row.status == RunStatus.DELETED or not _is_finite_number(row.best_metric):
            continue
        values = {knob: row.knobs.get(knob) for knob in knobs}
        points.append(
            SweepPoint(run_id=row.run_id, name=row.name, status=row.status, knobs=values, value=float(row.best_metric))
        )
    return points


def category_key(value: Any) -> str:
    """A hashable, type-preserving key for a knob value: its JSON text (so "true" != True, ["a"] != "a")."""
    return json.dumps(value, sort_keys=True, default=str)


def knob_label(value: Any) -> str:
    """A knob value as axis ticks and hovers show it."""
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(knob_label(item) for item in value) + "]"
    if isinstance(value, numbers.Number):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def knob_axis(knob: str, points: Sequence[SweepPoint]) -> KnobAxis:
    """How `knob` is drawn for these points (see the module docstring for the rule)."""
    values = [point.knobs.get(knob) for point in points]
    if values and all(_is_finite_number(value) for value in values):
        low, high = min(values), max(values)
        wide = low > 0 and high / low > LOG_RATIO
        return KnobAxis(knob, "log" if wide else "linear")
    by_key: dict[str, Any] = {}
    for value in values:
        by_key.setdefault(category_key(value), value)
    ordered = sorted(by_key, key=lambda key: _category_sort_key(by_key[key], key))
    labels: list[str] = []
    for key in ordered:
        label = knob_label(by_key[key])
        # Two values with the same display text (1 and 1.0, "None" and None) would share a category axis slot.
        labels.append(key if label in labels else label)
    return KnobAxis(knob, "categorical", tuple(ordered), tuple(labels))


# -- parallel coordinates ----------------------------------------------------------------------------------------


def parallel_coordinates_figure(knobs: Sequence[str], rows: Sequence[RunRow], metric: str, mode: str) -> dict[str, Any]:
    """One `parcoords` trace: a dimension per varying knob, then one for the best `metric`; a line per run.

    Numeric knobs are drawn as values (log10 of them, labelled "log10 <knob>", on a wide positive range, with the
    ticks showing the real values); categorical knobs as integer codes whose `tickvals`/`ticktext` name the
    categories. The line colour is the best metric value on Viridis, reversed for mode "min", so the better runs
    are always the yellow end.

    Parcoords lines carry no customdata: `figure["layout"]["meta"]["run_ids"]` lists the run id of each line, in
    the order of every dimension's `values`. With fewer than 2 runs with a metric value, or no varying knob, it is
    `empty_figure` with a message saying why.
    """
    points = sweep_points(knobs, rows)
    if not knobs:
        return empty_figure("no knob varies between the runs: nothing to compare")
    if len(points) < 2:
        return empty_figure(f"parallel coordinates need 2 runs with a {metric} value ({len(points)} so far)")
    dimensions = [_dimension(knob_axis(knob, points), points) for knob in knobs]
    values = [point.value for point in points]
    dimensions.append({"label": f"best {metric}", "values": values})
    trace = {
        "type": "parcoords",
        "dimensions": dimensions,
        "line": {
            "color": values,
            "colorscale": "Viridis",
            "reversescale": mode == "min",
            "showscale": True,
            "colorbar": {"title": {"text": f"best {metric}"}, "thickness": 12},
        },
        "labelfont": {"size": 12},
        "tickfont": {"size": 10},
    }
    layout = {
        "title": {"text": f"sweep: knobs → best {metric} ({_better(mode)} is better)", "x": 0.01, "font": {"size": 14}},
        # Kept across refreshes so the axis ranges a user brushed stay brushed.
        "uirevision": "sweep-parcoords",
        # Room above for the dimension labels, to the left for the first axis's ticks.
        "margin": {**MARGIN, "l": 70, "t": 80, "r": 40},
        "height": 380,
        "meta": {"run_ids": [point.run_id for point in points]},
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
    }
    return {"data": [trace], "layout": layout}


def brush_update(brush: Mapping[str, Any] | None, restyle: Any) -> dict[str, Any]:
    """The brushed ranges after a parcoords restyle (`[{"dimensions[i].constraintrange": ranges}, [0]]`): one or
    several [low, high] per dimension; a null range clears that dimension."""
    ranges = dict(brush or {})
    changes = restyle[0] if isinstance(restyle, list) and restyle and isinstance(restyle[0], Mapping) else {}
    for key, value in changes.items():
        if not (key.startswith("dimensions[") and key.endswith("].constraintrange")):
            continue
        index = key[len("dimensions[") : -len("].constraintrange")]
        value = value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) and value[0] \
            and isinstance(value[0][0], list) else value  # fmt: skip
        if not value:
            ranges.pop(index, None)
        else:
            ranges[index] = [value] if isinstance(value[0], int | float) else [list(pair) for pair in value]
    return ranges


def runs_in_brush(figure: Mapping[str, Any], brush: Mapping[str, Any]) -> list[int]:
    """The runs of a `parallel_coordinates_figure` whose line passes inside every brushed range."""
    if not figure.get("data") or figure["data"][0].get("type") != "parcoords":
        return []
    dimensions = figure["data"][0]["dimensions"]
    run_ids = figure["layout"]["meta"]["run_ids"]
    inside = []
    for position, run_id in enumerate(run_ids):
        keep = True
        for index, ranges in brush.items():
            if int(index) >= len(dimensions):
                continue
            value = dimensions[int(index)]["values"][position]
            keep = keep and any(low <= value <= high for low, high in ranges)
        if keep:
            inside.append(int(run_id))
    return inside


def _dimension(axis: KnobAxis, points: Sequence[SweepPoint]) -> dict[str, Any]:
    raw = [point.knobs.get(axis.knob) for point in points]
    if axis.kind == "categorical":
        count = len(axis.categories)
        return {
            "label": axis.knob,
            "values": [axis.code(value) for value in raw],
            "tickvals": list(range(count)),
            "ticktext": list(axis.labels),
            # A single category would give a zero-width range.
            "range": [0, count - 1] if count > 1 else [-1, 1],
        }
    numbers_ = [float(value) for value in raw]
    if axis.kind == "log":
        ticks = _log_ticks(numbers_)
        low, high = math.log10(min(numbers_)), math.log10(max(numbers_))
        return {
            "label": f"log10 {axis.knob}",
            "values": [math.log10(value) for value in numbers_],
            "range": [low, high],
            "tickvals": [math.log10(tick) for tick in ticks],
            "ticktext": [f"{tick:g}" for tick in ticks],
        }
    dimension: dict[str, Any] = {"label": axis.knob, "values": numbers_}
    distinct = sorted(set(numbers_))
    if len(distinct) <= MAX_EXACT_TICKS:
        dimension["tickvals"] = distinct
        dimension["ticktext"] = [knob_label(_as_int_if_integral(value)) for value in distinct]
    return dimension


def _log_ticks(values: Sequence[float]) -> list[float]:
    """Ticks for a log axis: the values themselves when few, else 1-2-5 steps (decades only when many)."""
    distinct = sorted(set(values))
    if len(distinct) <= MAX_EXACT_TICKS:
        return distinct
    low, high = distinct[0], distinct[-1]
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for mantissas in ((1.0,), (1.0, 2.0, 5.0)):
        ticks = [
            float(f"{m * 10.0**exponent:g}")  # f"{:g}" drops float noise (3 * 1e-5 -> 3.0000000000000004e-05)
            for exponent in range(first, last + 1)
            for m in mantissas
            if low * (1 - 1e-9) <= m * 10.0**exponent <= high * (1 + 1e-9)
        ]
        if len(ticks) >= 3:
            return ticks
    return [low, high]


# -- one knob against the metric ---------------------------------------------------------------------------------


def knob_scatter_figure(
    knobs: Sequence[str], rows: Sequence[RunRow], metric: str, mode: str, knob: str
) -> dict[str, Any]:
    """Best `metric` (y) against `knob` (x): a marker per run in its run colour; a click gives the run id.

    Each point's `customdata` is its run id (a plain list, as `dash_app.figures.metric_figure` does, so a click
    selects the run). x is a log axis for a wide positive numeric knob, a category axis (in `knob_axis` order) for
    a categorical one. The hover names the run, its status, every varying knob's value and its best metric value.
    """
    if knob not in knobs:
        return empty_figure(f"{knob} does not vary between the runs")
    points = sweep_points(knobs, rows)
    if not points:
        return empty_figure(f"no run has a {metric} value yet")
    axis = knob_axis(knob, points)
    raw = [point.knobs.get(knob) for point in points]
    if axis.is_numeric:
        xs: list[Any] = [float(value) for value in raw]
        xaxis: dict[str, Any] = {"type": "log" if axis.kind == "log" else "linear", "exponentformat": "e"}
    else:
        xs = [axis.labels[axis.code(value)] for value in raw]
        xaxis = {"type": "category", "categoryorder": "array", "categoryarray": list(axis.labels)}
    run_ids = [point.run_id for point in points]
    trace = {
        "type": "scatter",
        "mode": "markers",
        "x": xs,
        "y": [point.value for point in points],
        "customdata": run_ids,
        "marker": {
            "size": 11,
            "color": [run_color(run_id) for run_id in run_ids],
            "line": {"color": "white", "width": 1},
        },
        "hovertext": [_point_hover(point, knobs, metric) for point in points],
        "hoverinfo": "text",
        "name": "runs",
    }
    layout = {
        "title": {"text": f"best {metric} vs {knob}", "x": 0.01, "font": {"size": 14}},
        "uirevision": f"sweep-scatter:{knob}",
        "margin": MARGIN,
        "height": 300,
        "hovermode": "closest",
        "xaxis": {**xaxis, "title": {"text": knob}, "gridcolor": "#eee", "zeroline": False},
        "yaxis": {
            "title": {"text": f"best {metric} ({_better(mode)} is better)"},
            "gridcolor": "#eee",
            "zeroline": False,
        },
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "showlegend": False,
    }
    return {"data": [trace], "layout": layout}


def _point_hover(point: SweepPoint, knobs: Sequence[str], metric: str) -> str:
    # Each piece escaped on its own: a name or a value may hold "<", the tags are ours.
    title = f"<b>run {point.run_id}</b>" + (f" {html.escape(point.name)}" if point.name else "")
    lines = [title, html.escape(point.status)]
    lines += [f"{html.escape(knob)}={html.escape(knob_label(point.knobs.get(knob)))}" for knob in knobs]
    lines.append(f"best {html.escape(metric)} {point.value:.4g}")
    return "<br>".join(lines)


# -- knob importance ---------------------------------------------------------------------------------------------


def importance_method() -> str:
    """The estimator `knob_importance(method="auto")` uses here: "fanova" when scikit-learn (which Optuna's fANOVA
    needs; a dependency of rf) is importable, else "anova" (an installation without it still gets an estimate)."""
    return "fanova" if importlib.util.find_spec("sklearn") is not None else "anova"


def knob_importance(
    knobs: Sequence[str], rows: Sequence[RunRow], metric: str, mode: str, *, method: ImportanceMethod = "auto"
) -> dict[str, float]:
    """How much of the spread of the runs' best metric values each knob explains: {knob: share}, most important
    first, the shares summing to 1.

    method "fanova": Optuna's fANOVA (`FanovaImportanceEvaluator`, seeded, so the same runs give the same answer)
    over an in-memory study with one complete trial per run. It needs scikit-learn. method "anova": a one-way
    ANOVA per knob (omega squared: the variance between the knob's groups beyond what noise alone would give;
    numeric knobs with many values are cut into quantile bins) normalised to shares; first-order effects only,
    numpy only. "auto" (default) is fANOVA when scikit-learn is importable, else ANOVA (`importance_method()`).

    Empty when it cannot be estimated: fewer than `MIN_RUNS_FOR_IMPORTANCE` (4) runs with a metric value, no knob
    that varies among them, or all of them equal (fANOVA raises "zero total variance": there is nothing to
    explain). Knobs with one value among the measured runs are left out (no evidence either way, not zero).
    `mode` only sets the study's direction: the importance of a knob does not depend on it.
    """
    points = sweep_points(knobs, rows)
    if len(points) < MIN_RUNS_FOR_IMPORTANCE:
        return {}
    axes = [knob_axis(knob, points) for knob in knobs]
    axes = [axis for axis in axes if len({category_key(point.knobs.get(axis.knob)) for point in points}) > 1]
    if not axes:
        return {}
    chosen = importance_method() if method == "auto" else method
    if chosen == "fanova":
        shares = _fanova_importance(axes, points, mode)
    elif chosen == "anova":
        shares = _anova_importance(axes, points)
    else:
        raise ValueError(f"method must be 'auto', 'fanova' or 'anova', got {method!r}")
    total = sum(shares.values())
    if not shares or not math.isfinite(total) or total <= 0:
        return {}
    return dict(sorted(((knob, share / total) for knob, share in shares.items()), key=lambda item: -item[1]))


def _fanova_importance(axes: Sequence[KnobAxis], points: Sequence[SweepPoint], mode: str) -> dict[str, float]:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import create_trial

    distributions: dict[str, Any] = {}
    for axis in axes:
        values = [point.knobs.get(axis.knob) for point in points]
        log = axis.kind == "log"
        if axis.kind == "categorical":
            distributions[axis.knob] = CategoricalDistribution(list(axis.categories))
        elif all(isinstance(value, int) for value in values):
            distributions[axis.knob] = IntDistribution(min(values), max(values), log=log)
        else:
            distributions[axis.knob] = FloatDistribution(float(min(values)), float(max(values)), log=log)

    def param(axis: KnobAxis, value: Any) -> Any:
        if axis.kind == "categorical":
            return category_key(value)  # Optuna's choices must be hashable scalars: lists go in as JSON text
        return value if isinstance(distributions[axis.knob], IntDistribution) else float(value)

    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" per refresh
    try:
        # Not thread-safe (the warnings filters are process-wide): at worst another thread sees a warning hidden.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
            study.add_trials(
                [
                    create_trial(
                        params={axis.knob: param(axis, point.knobs.get(axis.knob)) for axis in axes},
                        distributions=distributions,
                        value=point.value,
                        user_attrs={"run_id": point.run_id},
                    )
                    for point in points
                ]
            )
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=_IMPORTANCE_SEED)
            try:
                importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
            except (RuntimeError, ValueError, ZeroDivisionError):
                return {}  # degenerate (e.g. every run has the same value: "zero total variance")
    finally:
        optuna.logging.set_verbosity(previous_verbosity)
    return {knob: float(share) for knob, share in importances.items()}


def _anova_importance(axes: Sequence[KnobAxis], points: Sequence[SweepPoint]) -> dict[str, float]:
    values = [point.value for point in points]
    mean = sum(values) / len(values)
    total_ss = sum((value - mean) ** 2 for value in values)
    if total_ss <= 0:
        return {}
    return {axis.knob: _omega_squared(_groups(axis, points), total_ss) for axis in axes}


def _groups(axis: KnobAxis, points: Sequence[SweepPoint]) -> list[list[float]]:
    """The points' metric values grouped by the knob: by value, or by quantile bin for a many-valued numeric knob."""
    raw = [point.knobs.get(axis.knob) for point in points]
    if axis.is_numeric:
        positions = [math.log10(value) if axis.kind == "log" else float(value) for value in raw]
        distinct = sorted(set(positions))
        bins = max(2, round(math.sqrt(len(points))))
        if len(distinct) > bins:
            # Equal-count bins over the sorted distinct positions: a group per value would leave no within-group
            # spread to compare against.
            edges = [distinct[(len(distinct) * i) // bins] for i in range(1, bins)]
            labels = [sum(position >= edge for edge in edges) for position in positions]
        else:
            labels = [distinct.index(position) for position in positions]
    else:
        labels = [axis.code(value) for value in raw]
    grouped: dict[int, list[float]] = {}
    for label, point in zip(labels, points, strict=True):
        grouped.setdefault(label, []).append(point.value)
    return list(grouped.values())


def _omega_squared(groups: Sequence[Sequence[float]], total_ss: float) -> float:
    """One-way ANOVA's omega squared, clipped at 0: the share of variance the grouping explains beyond chance."""
    count = sum(len(group) for group in groups)
    within_df = count - len(groups)
    if within_df <= 0:
        return 0.0  # a group per run: nothing to tell the knob's effect from noise with
    within_ss = sum(sum((value - sum(group) / len(group)) ** 2 for value in group) for group in groups)
    within_ms = within_ss / within_df
    between_ss = total_ss - within_ss
    return max(0.0, (between_ss - (len(groups) - 1) * within_ms) / (total_ss + within_ms))


def importance_figure(importances: Mapping[str, float], *, empty_message: str | None = None) -> dict[str, Any]:
    """Horizontal bars of `knob_importance`'s shares, the most important knob on top; `empty_figure` when empty."""
    if not importances:
        return empty_figure(
            empty_message
            or f"knob importance needs {MIN_RUNS_FOR_IMPORTANCE} runs with a metric value that differ, "
            "and a knob that varies between them"
        )
    ranked = sorted(importances.items(), key=lambda item: -item[1])
    knobs = [knob for knob, _ in ranked]
    shares = [float(share) for _, share in ranked]
    trace = {
        "type": "bar",
        "orientation": "h",
        "x": shares,
        "y": knobs,
        "text": [f"{share:.0%}" for share in shares],
        "textposition": "auto",
        "marker": {"color": "#1f77b4"},
        "hovertemplate": "%{y}: %{x:.1%}<extra></extra>",
        "name": "importance",
    }
    layout = {
        "title": {"text": "knob importance (share of the metric's spread)", "x": 0.01, "font": {"size": 14}},
        "uirevision": "sweep-importance",
        "margin": {**MARGIN, "l": 120},
        "height": max(160, 70 + 28 * len(knobs)),
        "xaxis": {"range": [0, 1], "tickformat": ".0%", "gridcolor": "#eee", "zeroline": False},
        # Plotly draws the first category at the bottom: reversed, the most important is on top.
        "yaxis": {"type": "category", "categoryorder": "array", "categoryarray": knobs[::-1], "automargin": True},
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "showlegend": False,
    }
    return {"data": [trace], "layout": layout}


# -- helpers -----------------------------------------------------------------------------------------------------


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _as_int_if_integral(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _better(mode: str) -> str:
    return "lower" if mode == "min" else "higher"


def _category_sort_key(value: Any, key: str) -> tuple[int, float, str]:
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool):
        return (1, float(value), "")
    if isinstance(value, numbers.Real):
        return (2, float(value) if math.isfinite(value) else math.inf, key)
    if isinstance(value, str):
        return (3, 0.0, value)
    return (4, 0.0, key)
