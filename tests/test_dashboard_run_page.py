"""The run page's facts from a real DuckDB store (a seeded experiment, a clone, an op, a failure), and its addresses."""

from __future__ import annotations

import json

import pytest
from dash import html

from dash_app import run_page
from dash_app.data import chart_cache
from dash_app.routes import parse_run_path, run_page_path
from rf_core import paths
from rf_core.control import ops, timeline
from rf_core.control.store import DuckDBStore
from tests.dashboard_sample import seed_experiment


@pytest.fixture
def store(tmp_path):
    store = DuckDBStore(paths.db_path(tmp_path))
    seed_experiment(store, "exp", runs=3, points=100, ranks=(4, 8))
    ops.submit_op(store, "exp", "clone", 2, payload={"overrides": {"learning_rate": 5e-4}},
                  source="user", who="ana")  # fmt: skip
    ops.apply_due_ops(store, "exp", [2])
    timeline.fail_run(store, "exp", 3, "CUDA out of memory at step 7")
    yield store
    store.close()


def _render(component) -> str:
    return json.dumps(component.to_plotly_json(), default=lambda item: item.to_plotly_json())


@pytest.mark.parametrize("experiment", ["exp", "a b/c", "é"])
def test_a_run_page_path_round_trips(experiment):
    assert parse_run_path(run_page_path(experiment, 12)) == (experiment, 12)


@pytest.mark.parametrize("path", [None, "/", "/run/", "/run/exp", "/run/exp/x", "/run/exp/1/2", "/runs/exp/1"])
def test_other_paths_are_not_run_pages(path):
    assert parse_run_path(path) is None


def test_a_clone_s_page_diffs_it_against_its_parent_and_tells_its_history(store, tmp_path):
    view = run_page.run_view(store, "exp", 4)
    assert view is not None and view.run["parent_id"] == 2 and view.compare_to["run_id"] == 2
    assert ("learning_rate", 5e-4, view.compare_to["config"]["learning_rate"]) in view.config_diff
    assert [knob for knob, _, _ in view.config_diff] == ["learning_rate"]  # r=8 like its parent
    assert view.history[0][1] == "created as a clone of run 2 at step 100 (warm start off)"
    assert [run["run_id"] for run in view.ancestors] == [2] and view.children == []
    parent = run_page.run_view(store, "exp", 2)
    assert [child["run_id"] for child in parent.children] == [4]
    assert any(text.startswith("clone submitted (user by ana), op 1") for _, text in parent.history)
    assert [row["kind"] for row in parent.ops] == ["clone"]
    # Any run can be picked to compare with; an initial run has nothing to compare with until one is.
    assert run_page.run_view(store, "exp", 4, compare_to=1).compare_to["run_id"] == 1
    assert run_page.run_view(store, "exp", 1).compare_to is None


def test_a_failed_run_s_page_shows_its_error_and_files_with_their_sizes(store, tmp_path):
    checkpoints = paths.run_dir("exp", 3, tmp_path) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-50.pt").write_bytes(b"x" * 2048)
    view = run_page.run_view(store, "exp", 3)
    assert view.history[-1][1] == "failed: CUDA out of memory at step 7"
    assert view.files == [("checkpoint", str(checkpoints / "step-50.pt"), 2048)]
    page = _render(html.Div([*sum(run_page.run_page(view, "exp", 3, chart_cache(store), store), [])]))
    assert "CUDA out of memory at step 7" in page and "2.0 KiB" in page and '"id": "run-config"' in page
    assert run_page.view_signature(view) == run_page.view_signature(run_page.run_view(store, "exp", 3))


def test_a_missing_run_or_experiment_gets_a_clear_page(store):
    assert run_page.run_view(store, "exp", 99) is None and run_page.run_view(store, "nope", 1) is None
    page = _render(html.Div([*sum(run_page.run_page(None, "exp", 99, chart_cache(store), store), [])]))
    assert "No run 99 in experiment 'exp'" in page
