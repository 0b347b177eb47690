"""The chart downsampler: M4 aggregates from DuckDB (Store.metric_buckets), merged and kept current by M4Cache,
against M4's definition on raw arrays; and EMA smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from dash_app import data
from dash_app.downsample import M4Cache, coarsen, ema, empty_aggregates, m4_reference, merge_buckets, width_for
from rf_core.control import experiments, metrics
from rf_core.control.store import DuckDBStore


@pytest.fixture
def store(tmp_path):
    store = DuckDBStore(tmp_path / "rf.duckdb")
    experiments.create_experiment(
        store, "exp", [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}, {"learning_rate": 3e-3}], 2
    )
    experiments.create_experiment(store, "other", [{"learning_rate": 1e-3}], 2)
    yield store
    store.close()


def _random_curves(seed: int, lengths: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    run_ids = np.concatenate([np.full(length, run_id) for run_id, length in lengths.items()])
    steps = np.concatenate([np.arange(1, length + 1) for length in lengths.values()])
    values = rng.normal(size=len(steps)).cumsum()
    values[rng.choice(len(values), size=len(values) // 50, replace=False)] = np.nan  # a diverged step or two
    return run_ids, steps, values


def _log(store: DuckDBStore, batch: str, run_ids, steps, values, name: str = "train_loss", experiment="exp") -> None:
    rows = [
        {"experiment": experiment, "run_id": int(r), "step": int(s), "name": name,
         "value": None if np.isnan(v) else float(v)}
        for r, s, v in zip(run_ids, steps, values, strict=True)
    ]  # fmt: skip
    metrics.log_metrics(store, batch, rows)


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for run_id, (want_steps, want_values) in expected.items():
        np.testing.assert_array_equal(got[run_id][0], want_steps)
        np.testing.assert_array_equal(got[run_id][1], want_values)


def _final_width(run_ids, steps, values, run_filter, buckets) -> int:
    """The width the cache shows: its own power of two, doubled until the shown runs fit `buckets`."""
    shown = np.isin(run_ids, run_filter) & np.isfinite(values)
    return width_for(int(steps[shown].max()), buckets)


@pytest.mark.parametrize(
    ("lengths", "buckets"),
    [
        ({1: 5000, 2: 5000, 3: 5000}, 100),  # many points per pixel
        ({1: 5000, 2: 1200, 3: 37}, 64),  # runs of different lengths share the x axis
        ({1: 50, 2: 50}, 400),  # fewer points than pixels: every point stays
        ({1: 1}, 10),
        ({1: 3000, 2: 3000}, 2),
    ],
)
def test_cached_m4_from_the_store_matches_the_definition(store, lengths, buckets):
    run_ids, steps, values = _random_curves(sum(lengths.values()), lengths)
    _log(store, "one", run_ids, steps, values)
    _log(store, "other", [1], [10**6], [0.0], experiment="other")  # another experiment's points stay out
    got = data.chart_cache(store).series("exp", ["train_loss"], list(lengths), buckets)["train_loss"]
    width = _final_width(run_ids, steps, values, list(lengths), buckets)
    _assert_same(got, m4_reference(run_ids, steps, values, width))


def test_points_arriving_between_reads_are_folded_in_exactly(store):
    """Batches land between refreshes (and the step range grows 64x, forcing the cache to widen its buckets):
    every read equals M4 computed from scratch over everything stored so far."""
    run_ids, steps, values = _random_curves(5, {1: 6400, 2: 6400})
    cache = data.chart_cache(store)
    order = np.argsort(steps, kind="stable")  # the runs advance together, as in a fit
    for index, part in enumerate(np.array_split(order, 12)):
        _log(store, f"batch-{index}", run_ids[part], steps[part], values[part])
        got = cache.series("exp", ["train_loss"], [1, 2], 100)["train_loss"]
        seen = np.sort(np.concatenate(np.array_split(order, 12)[: index + 1]))
        width = _final_width(run_ids[seen], steps[seen], values[seen], [1, 2], 100)
        _assert_same(got, m4_reference(run_ids[seen], steps[seen], values[seen], width))
    # The cache holds at most its bucket count per run: its memory does not grow with the points.
    aggregates, _ = cache.read("exp")
    assert len(aggregates["bucket"]) <= 2 * cache.max_buckets


def test_m4_keeps_extremes_and_ends_with_at_most_four_points_a_bucket(store):
    lengths = {1: 20_000, 2: 8_000}
    run_ids, steps, values = _random_curves(7, lengths)
    _log(store, "one", run_ids, steps, values)
    buckets = 200
    got = data.chart_cache(store).series("exp", ["train_loss"], [1, 2], buckets)["train_loss"]
    width = _final_width(run_ids, steps, values, [1, 2], buckets)
    for run_id, length in lengths.items():
        in_run = (run_ids == run_id) & np.isfinite(values)
        run_steps, run_values = steps[in_run], values[in_run]
        kept_steps, kept_values = got[run_id]
        assert np.all(np.diff(kept_steps) > 0)
        assert kept_steps[0] == run_steps[0] and kept_steps[-1] == run_steps[-1]
        assert kept_values.min() == run_values.min() and kept_values.max() == run_values.max()
        assert np.bincount(kept_steps // width).max() <= 4
        for bucket in np.unique(run_steps // width)[::7]:  # every bucket's envelope survives, not only the run's
            kept, raw = kept_values[kept_steps // width == bucket], run_values[run_steps // width == bucket]
            assert (kept.min(), kept.max()) == (raw.min(), raw.max())
        assert len(kept_steps) <= 4 * buckets < length


def test_series_filters_runs_and_metrics(store):
    run_ids, steps, values = _random_curves(3, {1: 300, 2: 300, 3: 300})
    _log(store, "loss", run_ids, steps, values)
    _log(store, "eval", [1, 1], [150, 300], [2.0, 1.5], name="eval_loss")
    series = data.chart_cache(store).series("exp", ["train_loss", "eval_loss", "accuracy"], [1, 3], 50)
    assert set(series["train_loss"]) == {1, 3}
    np.testing.assert_array_equal(series["eval_loss"][1][0], [150, 300])
    assert series["accuracy"] == {}
    with pytest.raises(ValueError, match="width"):
        store.metric_buckets("exp", 0)


def test_merge_is_exact_for_any_split():
    rng = np.random.default_rng(1)
    steps = np.arange(0, 4096)
    values = rng.normal(size=len(steps))
    run_ids = np.ones(len(steps), dtype=np.int64)

    def aggregate(part: np.ndarray, width: int) -> dict[str, np.ndarray]:
        got = m4_reference(run_ids[part], steps[part], values[part], 1)[1]  # one bucket per step: the points
        return merge_buckets([{
            "name": np.array(["loss"] * len(got[0]), dtype=object), "run_id": np.ones(len(got[0]), dtype=np.int64),
            "bucket": got[0] // width, "first_step": got[0], "first_value": got[1], "last_step": got[0],
            "last_value": got[1], "min_step": got[0], "min_value": got[1], "max_step": got[0], "max_value": got[1],
        }])  # fmt: skip

    whole = aggregate(np.arange(len(steps)), 64)
    halves = merge_buckets([aggregate(np.arange(0, 1000), 16), aggregate(np.arange(1000, 4096), 16)], shift=2)
    for column, values_ in whole.items():
        np.testing.assert_array_equal(halves[column], values_, err_msg=column)
    assert len(merge_buckets([empty_aggregates(), empty_aggregates()])["bucket"]) == 0


def test_cache_rejects_a_bucket_count_it_cannot_keep():
    with pytest.raises(ValueError, match="max_buckets"):
        M4Cache(lambda *_: ({}, -1), lambda _: 1, max_buckets=1)
    assert [width_for(step, 100) for step in (0, 99, 100, 199, 200, 25_600)] == [1, 1, 2, 2, 4, 512]


def test_ema_debiases_the_start_and_matches_the_recurrence():
    values = np.array([4.0, 2.0, 3.0, 10.0, 1.0])
    np.testing.assert_array_equal(ema(values, 0.0), values)
    # A constant curve stays constant (no pull towards zero at the start).
    np.testing.assert_allclose(ema(np.full(20, 3.5), 0.9), np.full(20, 3.5))
    smoothing, running, expected = 0.6, 0.0, []
    for index, value in enumerate(values, start=1):
        running = smoothing * running + (1 - smoothing) * value
        expected.append(running / (1 - smoothing**index))
    np.testing.assert_allclose(ema(values, smoothing), expected)
    assert ema(np.array([]), 0.5).size == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="smoothing"):
            ema(values, bad)


@pytest.mark.parametrize("shift", [1, 3, 12])
def test_one_pass_coarsening_equals_the_general_merge(shift):
    rng = np.random.default_rng(shift)
    count = 3000
    steps = np.sort(rng.choice(50_000, size=count, replace=False))
    values = rng.normal(size=count)
    run_ids = rng.integers(1, 4, size=count)
    names = rng.choice(np.array(["a", "b"], dtype=object), size=count)
    width = 8
    fine = merge_buckets([{
        "name": names, "run_id": run_ids, "bucket": steps // width, "first_step": steps, "first_value": values,
        "last_step": steps, "last_value": values, "min_step": steps, "min_value": values, "max_step": steps,
        "max_value": values,
    }])  # fmt: skip
    one_pass, general = coarsen(fine, shift), merge_buckets([fine], shift)
    for column in general:
        np.testing.assert_array_equal(one_pass[column], general[column], err_msg=column)
