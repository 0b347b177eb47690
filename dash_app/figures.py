"""Figure builders: plain Plotly figure dicts from plain data (no Dash, no store), so they are unit-tested directly.

Point arrays travel as Plotly's typed-array spec ({"dtype", "bdata"}: base64 of little-endian numbers), about
5x smaller than JSON lists and serialised without a Python loop.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dash_app.downsample import Series, ema
from rf_core.states import EVAL_LOSS_METRIC, LEARNING_RATE_METRIC, LOGGED_LOSS_METRIC, TRAIN_LOSS_METRIC

# Plotly's and D3's category colours: run N keeps its colour in every chart and when runs come and go.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
STATUS_COLORS = {
    "New": "#9e9e9e",
    "Ongoing": "#1f77b4",
    "Stopped": "#ff7f0e",
    "Completed": "#2ca02c",
    "Failed": "#d62728",
    "Deleted": "#555555",
}
METRIC_TITLES = {
    TRAIN_LOSS_METRIC: "minibatch loss",
    LEARNING_RATE_METRIC: "learning rate",
    EVAL_LOSS_METRIC: "eval loss",
    LOGGED_LOSS_METRIC: "loss (mean over logging_steps)",
}
# What a chart's x means (the curves' x values are computed by dash_app.data.chart_x).
X_AXIS_TITLES = {
    "step": "step",
    "lineage": "step (a warm clone from its parent's step at the clone)",
    "relative": "minutes since the run's first step",
    "wall": "time (the rf server's clock)",
}
# Per-step training curves, the only ones smoothing applies to: a schedule or a per-chunk eval point is exact.
SMOOTHED_METRICS = frozenset({TRAIN_LOSS_METRIC, LOGGED_LOSS_METRIC})
# Learning rates of a sweep span decades (1e-5 ... 1e-3): on a linear axis the smaller ones lie flat on 0.
LOG_Y_METRICS = frozenset({LEARNING_RATE_METRIC})
MARGIN = {"l": 55, "r": 10, "t": 36, "b": 36}


def run_color(run_id: int) -> str:
    return PALETTE[(int(run_id) - 1) % len(PALETTE)]


def typed_array(values: Any, dtype: str) -> dict[str, str]:
    """Plotly's typed-array spec for `values` as `dtype` ("f4", "f8", "i4")."""
    array = np.ascontiguousarray(np.asarray(values), dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "bdata": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_typed_array(spec: Mapping[str, str] | Sequence[Any]) -> np.ndarray:
    """The inverse of `typed_array` (plain lists pass through): what the browser decodes."""
    if isinstance(spec, Mapping):
        return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
    return np.asarray(spec)


def default_y_scale(name: str) -> str:
    return "log" if name in LOG_Y_METRICS else "linear"


def metric_title(name: str) -> str:
    return METRIC_TITLES.get(name, name)


def metric_figure(
    name: str,
    series: Mapping[int, Series],
    hover_labels: Mapping[int, str],
    *,
    smoothing: float = 0.0,
    uirevision: str = "",
    deleted: frozenset[int] = frozenset(),
    x_axis: str = "step",
    runs_of: str | None = None,
) -> dict[str, Any]:
    """One metric's chart: a curve per run (x as `x_axis` says: X_AXIS_TITLES), hover naming the run and the knobs
    that vary.

    `uirevision` stays the same across refreshes so Plotly keeps the user's hidden curves (zoom is kept by
    refreshing the traces only: see `dash_app.callbacks`). `smoothing` applies to per-step training losses only;
    the raw curve stays as a faint line under the smoothed one. Each point carries its run id as customdata, which
    is how a click on a curve opens that run's IC Ops panel. The learning rate is on a log axis. `runs_of` names
    the trainer type of the runs shown, where the experiment's charts of this metric are one per type.
    """
    smoothing = smoothing if name in SMOOTHED_METRICS else 0.0
    traces: list[dict[str, Any]] = []
    for run_id in sorted(series):
        steps, values = series[run_id]
        color = run_color(run_id)
        # Few points (eval metrics: one per chunk) read better as markers joined by a line.
        mode = "lines+markers" if len(steps) <= 50 else "lines"
        # Each knob line escaped on its own: a value may hold "<", the line breaks are ours.
        knobs = "".join(f"<br>{html.escape(line)}" for line in hover_labels.get(run_id, "").splitlines())
        hover = f"<b>run {run_id}</b>{knobs}<br>step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"
        # A plain list: dcc.Graph reads a clicked point's customdata from the figure as given, not decoded.
        run_ids = [run_id] * len(steps)
        x = typed_array(steps, "i4" if np.asarray(steps).dtype.kind in "iu" else "f8")
        common = {"type": "scatter", "x": x, "customdata": run_ids, "legendgroup": str(run_id)}
        dash = "dot" if run_id in deleted else "solid"
        if smoothing > 0:
            traces.append(
                {
                    **common,
                    "y": typed_array(values, "f8"),
                    "mode": mode,
                    "line": {"color": color, "width": 1},
                    "opacity": 0.25,
                    "showlegend": False,
                    "hoverinfo": "skip",
                    "name": f"run {run_id} (raw)",
                }
            )
        traces.append(
            {
                **common,
                "y": typed_array(ema(values, smoothing), "f8"),
                "mode": mode,
                "line": {"color": color, "width": 1.6, "dash": dash},
                "marker": {"size": 5},
                "name": f"run {run_id}",
                "hovertemplate": hover,
            }
        )
    layout: dict[str, Any] = {
        "title": {
            "text": metric_title(name) + (f" ({runs_of.upper()} runs)" if runs_of else ""),
            "x": 0.01,
            "font": {"size": 14},
        },  # fmt: skip
        "uirevision": uirevision or name,
        "margin": MARGIN,
        "height": 300,
        "hovermode": "closest",
        "xaxis": {
            "title": {"text": X_AXIS_TITLES[x_axis]},
            "gridcolor": "#eee",
            "zeroline": False,
            **({"type": "date"} if x_axis == "wall" else {}),
        },  # fmt: skip
        "yaxis": {
            "gridcolor": "#eee",
            "zeroline": False,
            "exponentformat": "e",
            "type": default_y_scale(name),
        },
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        # Run colours are keyed in the runs table: a legend per chart needs its own scrollbar from 8 runs on.
        "showlegend": False,
    }
    return {"data": traces, "layout": layout}


def trace_digest(trace: Mapping[str, Any]) -> str:
    """A short digest of one curve. Its customdata (the run id once per point, a plain list: see `metric_figure`)
    is summed up by its first value and length, which its run and x already fix: encoding thousands of ints on
    every refresh costs more than all the rest."""
    custom = trace.get("customdata")
    if isinstance(custom, list):
        trace = {**trace, "customdata": [custom[0] if custom else None, len(custom)]}
    return digest(trace)


def digest(value: Any) -> str:
    """A short digest of a JSON-able value (a figure, table rows): equal digests, nothing to send again."""
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(encoded, digest_size=12).hexdigest()


# An idle stretch (no chunk on any slot) longer than this many seconds, and than IDLE_CHUNKS median chunks, is cut
# out of the timeline and marked: after a continue, the gap between two fits would make both slivers.
IDLE_GAP_S = 30.0
IDLE_CHUNKS = 5
CUT_GAP_WIDTH = 0.03  # a cut gap keeps this share of the active time's width, so the cut shows
MAX_TIMELINE_LEGEND = 24  # runs; more would crowd the chart out


def idle_cuts(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The idle stretches (start, end) to cut out: gaps between busy stretches longer than IDLE_GAP_S seconds and
    IDLE_CHUNKS times the median chunk."""
    if not intervals:
        return []
    durations = sorted(end - start for start, end in intervals)
    threshold = max(IDLE_GAP_S, IDLE_CHUNKS * durations[len(durations) // 2])
    cuts: list[tuple[float, float]] = []
    busy_until = None
    for start, end in sorted(intervals):
        if busy_until is not None and start - busy_until > threshold:
            cuts.append((busy_until, start))
        busy_until = end if busy_until is None else max(busy_until, end)
    return cuts


def squeeze_time(cuts: Sequence[tuple[float, float]], keep: float) -> Any:
    """x = f(t): the time axis with each cut gap shrunk to `keep` seconds (monotonic, continuous)."""

    def squeezed(t: float) -> float:
        removed = 0.0
        for start, end in cuts:
            if t >= end:
                removed += (end - start) - keep
            elif t > start:
                removed += min(t - start, end - start) * (1 - keep / (end - start))
        return t - removed

    return squeezed


def timeline_figure(entries: Sequence[Mapping[str, Any]], origin: float, now: float) -> dict[str, Any]:
    """The device timeline: a bar per chunk, on the row of the slot that trained it, coloured by run (a chunk in
    flight reaches `now`, drawn lighter). x is seconds since `origin`, with idle stretches between fits cut out
    and marked; the hover gives each chunk's real start, end and duration. Labels show only where they fit."""
    spans = [
        (float(entry["start"]) - origin, (float(entry["end"]) if entry["end"] is not None else now) - origin)
        for entry in entries
    ]
    cuts = idle_cuts(spans)
    active = max((end for _, end in spans), default=0.0) - sum(end - start for start, end in cuts)
    keep = max(active * CUT_GAP_WIDTH, 1.0)
    squeeze = squeeze_time(cuts, keep)
    by_run: dict[int, list[int]] = {}
    for index, entry in enumerate(entries):
        by_run.setdefault(int(entry["run_id"]), []).append(index)
    traces = []
    for run_id in sorted(by_run):
        chunks = [entries[index] for index in by_run[run_id]]
        real = [spans[index] for index in by_run[run_id]]
        starts = [squeeze(start) for start, _ in real]
        traces.append(
            {
                "type": "bar",
                "orientation": "h",
                "name": f"run {run_id}",
                "legendgroup": str(run_id),
                "y": [f"slot {entry['slot']}" for entry in chunks],
                "base": starts,
                "x": [max(squeeze(end) - start, 0.0) for start, (_, end) in zip(starts, real, strict=True)],
                "text": [f"r{run_id}·c{int(entry['chunk']) + 1}" for entry in chunks],
                "textposition": "inside",
                "insidetextanchor": "middle",
                "customdata": [
                    [run_id, int(entry["chunk"]) + 1, entry["outcome"] or "training", start, end, end - start]
                    for entry, (start, end) in zip(chunks, real, strict=True)
                ],
                "hovertemplate": "run %{customdata[0]} · chunk %{customdata[1]} · %{y}<br>"
                "from %{customdata[3]:.1f} s to %{customdata[4]:.1f} s (%{customdata[5]:.1f} s)"
                "<br>%{customdata[2]}<extra></extra>",
                "marker": {
                    "color": run_color(run_id),
                    "opacity": [1.0 if entry["end"] is not None else 0.5 for entry in chunks],
                    "line": {"color": "white", "width": 1},
                },
            }
        )
    slots = sorted({int(entry["slot"]) for entry in entries})
    shapes, annotations = [], []
    for start, end in cuts:
        left, right = squeeze(start), squeeze(end)
        shapes.append(
            {"type": "rect", "xref": "x", "yref": "paper", "x0": left, "x1": right, "y0": 0, "y1": 1,
             "fillcolor": "#ddd", "line": {"width": 0}, "layer": "below"}
        )  # fmt: skip
        annotations.append(
            {"x": (left + right) / 2, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom", "showarrow": False,
             "text": f"idle {_duration(end - start)}", "font": {"size": 10, "color": "#777"}}
        )  # fmt: skip
    title = "seconds since the experiment started" + (" (idle stretches cut out, shaded)" if cuts else "")
    layout = {
        "title": {"text": "device timeline", "x": 0.01, "font": {"size": 14}},
        "barmode": "overlay",
        "uirevision": "timeline",
        "margin": {**MARGIN, "t": 44},
        "height": max(180, 80 + 40 * len(slots)),
        "xaxis": {"title": {"text": title}, "gridcolor": "#eee", "zeroline": False},
        "yaxis": {
            "categoryorder": "array",
            "categoryarray": [f"slot {slot}" for slot in reversed(slots)],
            "fixedrange": True,  # zoom is in time only
        },
        # A label too small to read is left out (the hover has it): bars of 1-s chunks over an hour are slivers.
        "uniformtext": {"mode": "hide", "minsize": 9},
        "shapes": shapes,
        "annotations": annotations,
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "showlegend": len(by_run) <= MAX_TIMELINE_LEGEND,
        "legend": {"font": {"size": 10}, "itemclick": "toggleothers"},
    }
    return {"data": traces, "layout": layout}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def lineage_layout(runs: Sequence[Mapping[str, Any]]) -> dict[int, tuple[int, int]]:
    """(depth, row) of each run in its clone tree: roots at depth 0, each clone one deeper, rows in depth-first
    order so a parent's clones sit right below it."""
    ids = {int(run["run_id"]) for run in runs}
    children: dict[int | None, list[int]] = {}
    for run in sorted(runs, key=lambda run: int(run["run_id"])):
        parent = run.get("parent_id")
        children.setdefault(int(parent) if parent is not None and int(parent) in ids else None, []).append(
            int(run["run_id"])
        )
    placed: dict[int, tuple[int, int]] = {}
    stack = [(root, 0) for root in reversed(children.get(None, []))]
    while stack:
        run_id, depth = stack.pop()
        placed[run_id] = (depth, len(placed))
        stack.extend((child, depth + 1) for child in reversed(children.get(run_id, [])))
    return placed


def lineage_figure(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The clone tree: a node per run (coloured by status), an edge parent → clone, solid when warm-started."""
    placed = lineage_layout(runs)
    by_id = {int(run["run_id"]): run for run in runs}
    edges: dict[bool, tuple[list[Any], list[Any]]] = {True: ([], []), False: ([], [])}
    for run_id, (depth, row) in placed.items():
        parent = by_id[run_id].get("parent_id")
        if parent is not None and int(parent) in placed:
            parent_depth, parent_row = placed[int(parent)]
            xs, ys = edges[by_id[run_id].get("warm_start", "off") != "off"]
            xs.extend([parent_depth, parent_depth, depth, None])
            ys.extend([parent_row, row, row, None])
    traces: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines",
            "x": xs,
            "y": ys,
            "line": {"color": "#555", "width": 1.5, "dash": "solid" if warm else "dash"},
            "hoverinfo": "skip",
            "name": "warm start" if warm else "cold clone",
        }
        for warm, (xs, ys) in edges.items()
        if xs
    ]
    order = sorted(placed, key=lambda run_id: placed[run_id][1])
    traces.append(
        {
            "type": "scatter",
            "mode": "markers+text",
            "x": [placed[run_id][0] for run_id in order],
            "y": [placed[run_id][1] for run_id in order],
            "text": [f"run {run_id}" for run_id in order],
            "textposition": "middle right",
            "customdata": order,
            "marker": {
                "size": 16,
                "color": [STATUS_COLORS.get(by_id[run_id]["status"], "#999") for run_id in order],
                "line": {"color": [run_color(run_id) for run_id in order], "width": 3},
            },
            "hovertext": [_lineage_hover(by_id[run_id]) for run_id in order],
            "hoverinfo": "text",
            "name": "runs",
            "showlegend": False,
        }
    )
    depth = max((d for d, _ in placed.values()), default=0)
    layout = {
        "title": {"text": "lineage (click a run)", "x": 0.01, "font": {"size": 14}},
        "uirevision": "lineage",
        "margin": MARGIN,
        "height": max(200, 50 + 28 * len(placed)),
        "xaxis": {"visible": False, "range": [-0.3, depth + 1.2]},
        "yaxis": {"visible": False, "autorange": "reversed"},
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "legend": {"orientation": "h", "y": -0.02},
    }
    return {"data": traces, "layout": layout}


def _lineage_hover(run: Mapping[str, Any]) -> str:
    text = f"run {run['run_id']}: {run['status']} · source {run['source']}"
    if run.get("parent_id") is not None:
        text += f"<br>clone of run {run['parent_id']} at step {run.get('parent_step') or 0}"
        text += f" · warm start {run.get('warm_start', 'off')}"
    return text


def empty_figure(message: str) -> dict[str, Any]:
    return {
        "data": [],
        "layout": {
            "height": 160,
            "margin": MARGIN,
            "xaxis": {"visible": False},
            "yaxis": {"visible": False},
            "annotations": [{"text": message, "showarrow": False, "font": {"size": 13, "color": "#777"}}],
            "plot_bgcolor": "white",
            "paper_bgcolor": "white",
        },
    }
