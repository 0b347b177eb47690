"""Chart downsampling: M4 (first, last, lowest and highest point per pixel bucket), kept up to date incrementally,
and EMA smoothing.

A line chart drawn in pixel columns shows, in each column, a vertical stroke from the column's lowest to its
highest point, entered at its first point and left at its last: those four points per column draw the same
picture as every point (Jugel et al., "M4", VLDB 2014). Buckets here are `step // width` with a power-of-two
width, so M4 aggregates merge exactly: two halves' firsts, lasts, lows and highs give the whole's. `M4Cache`
keeps each experiment's aggregates and, on every refresh, folds in only the points stored since the last one
(`Store.metric_buckets`): a refresh costs what arrived, not what is stored. `m4_reference` is the definition on
raw arrays that the rest is tested against.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rf_core.control.store import M4_COLUMNS  # the columns Store.metric_buckets returns
from rf_core.states import METRIC_MODES

M4_PARTS = ("first", "last", "min", "max")
CACHE_BUCKETS = 1024  # finest resolution kept per run and metric: above any chart's width in pixels
Series = tuple[np.ndarray, np.ndarray]  # (steps, values) of one run, sorted by step
Aggregates = dict[str, np.ndarray]  # M4_COLUMNS, one row per (name, run_id, bucket)
# (experiment, width, after_row) -> (aggregates of the points stored after that row, the last row read)
FetchBuckets = Callable[[str, int, int], tuple[Mapping[str, np.ndarray], int]]


def m4_reference(run_ids: np.ndarray, steps: np.ndarray, values: np.ndarray, width: int) -> dict[int, Series]:
    """M4 on raw points (any order; non-finite values dropped) with buckets `step // width`, per run: the kept
    points sorted by step."""
    run_ids, steps, values = np.asarray(run_ids), np.asarray(steps, dtype=np.int64), np.asarray(values, float)
    if len(steps) == 0:
        return {}
    bucket = steps // width
    finite = np.isfinite(values)
    run_ids, steps, values, bucket = run_ids[finite], steps[finite], values[finite], bucket[finite]
    kept: dict[int, Series] = {}
    for run_id in np.unique(run_ids):
        in_run = run_ids == run_id
        run_steps, run_values, run_buckets = steps[in_run], values[in_run], bucket[in_run]
        chosen = set()
        for b in np.unique(run_buckets):
            members = np.flatnonzero(run_buckets == b)
            by_step = members[np.argsort(run_steps[members], kind="stable")]
            chosen.update(
                int(run_steps[index])
                for index in (
                    by_step[0],
                    by_step[-1],
                    members[np.argmin(run_values[members])],
                    members[np.argmax(run_values[members])],
                )
            )
        order = sorted(chosen)
        value_at = dict(zip(run_steps.tolist(), run_values.tolist(), strict=True))
        kept[int(run_id)] = (np.array(order, dtype=np.int64), np.array([value_at[s] for s in order]))
    return kept


def m4_points(columns: Mapping[str, np.ndarray]) -> dict[int, Series]:
    """M4 aggregate rows of one metric (one per run and bucket) as each run's distinct points, sorted by step."""
    if len(columns["run_id"]) == 0:
        return {}
    run_ids = np.concatenate([np.asarray(columns["run_id"], dtype=np.int64)] * len(M4_PARTS))
    steps = np.concatenate([np.asarray(columns[f"{part}_step"], dtype=np.int64) for part in M4_PARTS])
    values = np.concatenate([np.asarray(columns[f"{part}_value"], dtype=np.float64) for part in M4_PARTS])
    order = np.lexsort((steps, run_ids))
    run_ids, steps, values = run_ids[order], steps[order], values[order]
    distinct = np.ones(len(steps), dtype=bool)
    distinct[1:] = (run_ids[1:] != run_ids[:-1]) | (steps[1:] != steps[:-1])
    run_ids, steps, values = run_ids[distinct], steps[distinct], values[distinct]
    starts = np.flatnonzero(np.r_[True, run_ids[1:] != run_ids[:-1]])
    ends = np.r_[starts[1:], len(run_ids)]
    return {int(run_ids[a]): (steps[a:b], values[a:b]) for a, b in zip(starts, ends, strict=True)}


def ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled towards 0).

    Applied to the downsampled points, as TensorBoard applies it to its sampled ones: a smoothed curve needs no
    more detail than a pixel.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"{smoothing=} must be in [0, 1)")
    values = np.asarray(values, dtype=np.float64)
    if smoothing == 0 or len(values) == 0:
        return values
    smoothed = np.empty_like(values)
    running, weight = 0.0, 1.0
    for index, value in enumerate(values.tolist()):
        running = running * smoothing + (1 - smoothing) * value
        weight *= smoothing
        smoothed[index] = running / (1 - weight)
    return smoothed


def empty_aggregates() -> Aggregates:
    return {
        column: np.array([], dtype=object if column == "name" else np.float64 if "value" in column else np.int64)
        for column in M4_COLUMNS
    }


def merge_buckets(parts: Iterable[Mapping[str, np.ndarray]], shift: int = 0) -> Aggregates:
    """Merge M4 aggregate rows that share (name, run_id, bucket >> shift) into one row each, in key order.

    Exact: a group's first point is the earliest of its rows' firsts, its last the latest of their lasts, its
    lowest the lowest of their lows, its highest the highest of their highs. `shift` k widens buckets 2^k times.
    """
    parts = [part for part in parts if len(part["bucket"])]
    if not parts:
        return empty_aggregates()
    rows = {column: np.concatenate([np.asarray(part[column]) for part in parts]) for column in M4_COLUMNS}
    names, name_codes = np.unique(rows["name"], return_inverse=True)
    run_ids = rows["run_id"].astype(np.int64)
    buckets = rows["bucket"].astype(np.int64) >> shift

    def leaders(rank: np.ndarray) -> np.ndarray:
        """Per group (in key order), the row whose `rank` is smallest."""
        order = np.lexsort((rank, buckets, run_ids, name_codes))
        keys = np.stack([name_codes[order], run_ids[order], buckets[order]])
        starts = np.flatnonzero(np.r_[True, np.any(keys[:, 1:] != keys[:, :-1], axis=0)])
        return order[starts]

    first, last = leaders(rows["first_step"]), leaders(-rows["last_step"])
    low, high = leaders(rows["min_value"]), leaders(-rows["max_value"])
    return {
        "name": names[name_codes[first]],
        "run_id": run_ids[first],
        "bucket": buckets[first],
        **_take(rows, "first", first),
        **_take(rows, "last", last),
        **_take(rows, "min", low),
        **_take(rows, "max", high),
    }


def coarsen(rows: Mapping[str, np.ndarray], shift: int) -> Aggregates:
    """`merge_buckets(rows, shift)` for rows already in key order, in one pass (no sort): what every refresh
    does to bring the cached resolution down to the chart's."""
    if shift == 0 or len(rows["bucket"]) == 0:
        return dict(rows)
    names, run_ids, buckets = rows["name"], rows["run_id"], np.asarray(rows["bucket"]) >> shift
    count = len(buckets)
    changes = (names[1:] != names[:-1]) | (run_ids[1:] != run_ids[:-1]) | (buckets[1:] != buckets[:-1])
    starts = np.flatnonzero(np.r_[True, changes])
    ends = np.r_[starts[1:], count] - 1
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, count]))

    def first_where(hit: np.ndarray) -> np.ndarray:
        """Per group, the first row where `hit` holds (every group has one)."""
        rows_hit = np.flatnonzero(hit)
        return rows_hit[np.r_[True, group[rows_hit][1:] != group[rows_hit][:-1]]]

    low = first_where(rows["min_value"] == np.minimum.reduceat(rows["min_value"], starts)[group])
    high = first_where(rows["max_value"] == np.maximum.reduceat(rows["max_value"], starts)[group])
    return {
        "name": names[starts],
        "run_id": run_ids[starts],
        "bucket": buckets[starts],
        **_take(rows, "first", starts),  # rows are in bucket order: a group's first row holds its first point
        **_take(rows, "last", ends),
        **_take(rows, "min", low),
        **_take(rows, "max", high),
    }


def _take(rows: Mapping[str, np.ndarray], part: str, index: np.ndarray) -> Aggregates:
    return {
        f"{part}_step": np.asarray(rows[f"{part}_step"])[index].astype(np.int64),
        f"{part}_value": np.asarray(rows[f"{part}_value"])[index].astype(np.float64),
    }


def select_rows(aggregates: Mapping[str, np.ndarray], mask: np.ndarray) -> Aggregates:
    return {column: np.asarray(values)[mask] for column, values in aggregates.items()}


def width_for(max_step: int, buckets: int) -> int:
    """The smallest power-of-two bucket width that puts steps 0..max_step into at most `buckets` buckets."""
    width = 1
    while max_step // width >= buckets:
        width *= 2
    return width


@dataclass(frozen=True)
class _Entry:
    width: int
    after_row: int
    rows: Aggregates  # in key order, with names as codes into M4Cache._names


class M4Cache:
    """Each experiment's M4 aggregates at a power-of-two width (at most `max_buckets` buckets per run and metric),
    brought up to date at every read with only the points stored since the previous one. Thread-safe.

    Args:
        fetch: (experiment, width, after_row) -> (aggregates of the points stored after that row, last row read);
            `rf_core.control.metrics.metric_buckets` over the store.
        first_width: experiment -> the width to start from (from its highest step so far), so the first read
            aggregates straight to about `max_buckets` buckets.
    """

    def __init__(
        self, fetch: FetchBuckets, first_width: Callable[[str], int], max_buckets: int = CACHE_BUCKETS
    ) -> None:
        if max_buckets < 2:
            raise ValueError(f"{max_buckets=} must be >= 2")
        self._fetch = fetch
        self._first_width = first_width
        self.max_buckets = max_buckets
        self._entries: dict[str, _Entry] = {}
        self._codes: dict[str, int] = {}  # metric name -> the small integer the cached rows hold
        self._lock = threading.Lock()

    def read(self, experiment: str) -> tuple[Aggregates, int]:
        """(every run's aggregates in key order, names as codes; their bucket width), up to date."""
        with self._lock:
            entry = self._entries.get(experiment)
            if entry is None:
                entry = _Entry(self._first_width(experiment), -1, _coded(empty_aggregates()))
            new, last_row = self._fetch(experiment, entry.width, entry.after_row)
            rows, width = entry.rows, entry.width
            if len(new["bucket"]):
                new = {**new, "name": np.array([self._code(name) for name in new["name"]], dtype=np.int64)}
                # Only the cached rows that new points fall into are merged; the rest stand as they are.
                touched = np.isin(_keys(rows), _keys(new))
                merged = merge_buckets([select_rows(rows, touched), new])
                untouched = select_rows(rows, ~touched)
                rows = _sorted({column: np.concatenate([untouched[column], merged[column]]) for column in M4_COLUMNS})
            # Steps grew past the widest bucket: halve the resolution (exactly) until they fit again.
            while len(rows["bucket"]) and int(rows["bucket"].max()) >= self.max_buckets:
                rows, width = coarsen(rows, 1), width * 2
            self._entries[experiment] = _Entry(width, last_row, rows)
            return rows, width

    def version(self, experiment: str) -> tuple[int, int]:
        """(the last metric row read, the bucket width) once up to date: while both hold, every series reads the
        same."""
        _, width = self.read(experiment)
        with self._lock:
            return self._entries[experiment].after_row, width

    def series(
        self, experiment: str, names: Sequence[str], run_ids: Iterable[int], buckets: int, up_to_date: bool = False
    ) -> dict[str, dict[int, Series]]:
        """Per metric in `names`, each of `run_ids`' points downsampled to at most `buckets` buckets a run.
        `up_to_date`: the caller has just read (`version`), so the store is not asked again."""
        with self._lock:
            entry = self._entries.get(experiment) if up_to_date else None
        rows, width = (entry.rows, entry.width) if entry is not None else self.read(experiment)
        shown = select_rows(rows, np.isin(rows["run_id"], np.fromiter(run_ids, dtype=np.int64)))
        if len(shown["bucket"]):
            # Coarsen the cached resolution to the chart's: whole powers of two, so the merge stays exact.
            max_step, shift = int(shown["last_step"].max()), 0
            while max_step // (width << shift) >= buckets:
                shift += 1
            shown = coarsen(shown, shift)
        with self._lock:
            codes = {name: self._codes.get(name, -1) for name in names}
        return {name: m4_points(select_rows(shown, shown["name"] == codes[name])) for name in names}

    def summary(self, experiment: str, train_name: str, metric: str, mode: str) -> dict[int, dict[str, float]]:
        """Per run: the latest `train_name` value, and the latest and best (`mode` min or max) `metric` value, from
        the aggregates (every finite point is in them), without a scan of the points."""
        if mode not in METRIC_MODES:
            raise ValueError(f"{mode=} must be 'min' or 'max'")
        rows, _ = self.read(experiment)
        with self._lock:
            codes = {name: self._codes.get(name, -1) for name in (train_name, metric)}
        summary: dict[int, dict[str, float]] = {}
        for name, latest_key in ((train_name, "train_loss"), (metric, "latest_metric")):
            one = select_rows(rows, rows["name"] == codes[name])
            if not len(one["bucket"]):
                continue
            starts = np.flatnonzero(np.r_[True, one["run_id"][1:] != one["run_id"][:-1]])
            ends = np.r_[starts[1:], len(one["bucket"])] - 1  # rows are in bucket order: the last holds the latest
            for run_id, latest in zip(one["run_id"][starts].tolist(), one["last_value"][ends].tolist(), strict=True):
                summary.setdefault(run_id, {})[latest_key] = latest
            if name == metric:
                best = (np.minimum.reduceat(one["min_value"], starts) if mode == "min"
                        else np.maximum.reduceat(one["max_value"], starts))  # fmt: skip
                for run_id, value in zip(one["run_id"][starts].tolist(), best.tolist(), strict=True):
                    summary[run_id]["best_metric"] = value
        return summary

    def _code(self, name: str) -> int:
        return self._codes.setdefault(str(name), len(self._codes))


def _coded(rows: Aggregates) -> Aggregates:
    return {**rows, "name": rows["name"].astype(np.int64)}


def _keys(rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """(name code, run id, bucket) packed in one int64 (up to 2^15 names, 2^24 runs and 2^24 buckets)."""
    return (rows["name"].astype(np.int64) << 48) | (rows["run_id"].astype(np.int64) << 24) | rows["bucket"]


def _sorted(rows: Aggregates) -> Aggregates:
    return select_rows(rows, np.argsort(_keys(rows), kind="stable"))
