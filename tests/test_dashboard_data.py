"""dash_app.data against a real DuckDB store: what the dashboard reads, and the IC Ops it submits."""

from __future__ import annotations

import time

import pytest

from dash_app import data
from rf_core.control import experiments, ops, timeline
from rf_core.control.store import DuckDBStore
from rf_core.states import OP_TABLE, RunStatus
from tests.dashboard_sample import seed_experiment


@pytest.fixture
def store(tmp_path):
    store = DuckDBStore(tmp_path / "rf.duckdb")
    seed_experiment(store, "exp", runs=4, points=400, num_chunks=4, chunks_done=2)
    yield store
    store.close()


def test_runs_table_has_a_row_per_run_and_a_column_per_varying_knob(store):
    ops.submit_op(store, "exp", "stop", 2)
    rows, columns = data.runs_table(store, "exp")
    fields = [column["field"] for column in columns]
    assert "knob:learning_rate" in fields and "knob:r" not in fields  # r is the same in every run
    assert {"run", "ic_ops", "status", "source", "parent", "warm_start", "progress", "pending_ops"} <= set(fields)
    by_run = {row["run"]: row for row in rows}
    assert sorted(by_run) == [1, 2, 3, 4]
    assert by_run[2]["pending_ops"] == "stop" and by_run[1]["pending_ops"] == ""
    assert by_run[1]["progress"] == "chunk 2/4 · epoch 1 · step 400"
    assert by_run[1]["ic_ops"] == data.IC_OPS_CELL
    assert by_run[1]["best_metric"] is not None and by_run[1]["source"] == "initial"
    assert data.runs_grid(None) == ([], []) and data.runs_table(store, "nope") == ([], [])
    assert "name" not in fields  # no run has a run_name


def test_runs_of_several_trainer_types_get_their_metric_in_columns_of_their_own_type(store):
    """An SFT run's eval loss and a DPO run's are not one quantity: a sort of the table ranks runs of one type."""
    for run_id in (2, 4):
        run = next(run for run in experiments.list_runs(store, "exp") if run["run_id"] == run_id)
        store.update_run("exp", run_id, {"config": {**run["config"], "trainer_type": "dpo"}})
    rows, columns = data.runs_table(store, "exp")
    headers = {column["field"]: column.get("headerName") for column in columns}
    assert "best_metric" not in headers and "latest_metric" not in headers
    assert headers["best_metric@sft"] == "best eval_loss (SFT)" and headers["best_metric@dpo"] == "best eval_loss (DPO)"
    fields = list(headers)
    assert fields.index("latest_metric@sft") < fields.index("latest_metric@dpo")
    by_run = {row["run"]: row for row in rows}
    assert by_run[1]["best_metric@sft"] == by_run[1]["best_metric"] is not None
    assert by_run[1].get("best_metric@dpo") is None and by_run[2].get("best_metric@sft") is None
    assert by_run[2]["best_metric@dpo"] == by_run[2]["best_metric"] is not None
    assert "knob:trainer_type" in headers  # and the type is a column to sort and filter by


def test_a_run_name_gets_a_pinned_column(store):
    ops.submit_op(store, "exp", "clone", 1, {"overrides": {"run_name": "lower lr", "learning_rate": 1e-4}})
    (applied,) = ops.apply_due_ops(store, "exp", [1])
    (created,) = applied["result"]["created_run_ids"]
    rows, columns = data.runs_table(store, "exp")
    assert [column["field"] for column in columns][:2] == ["run", "name"]
    assert "knob:run_name" not in {column["field"] for column in columns}
    assert {row["run"]: row["name"] for row in rows}[created] == "lower lr"


def test_header_counts_runs_chunks_and_busy_slots(store):
    timeline.record_chunk_start(store, "exp", 1, 2, 0, 4)
    summary = data.header_summary(data.snapshot(store, "exp"), data.timeline(store, "exp"))
    assert summary["runs_by_status"] == {"Ongoing": 4}
    assert (summary["chunks_done"], summary["chunks_planned"]) == (8, 16)
    assert (summary["slots_busy"], summary["slots_seen"]) == (1, 2)
    assert summary["status"] == "running" and summary["ended"] is None


def test_header_says_when_a_crashed_fit_was_last_seen(store, monkeypatch):
    from dash_app.callbacks import header_children
    from rf_core.control import leases

    monkeypatch.setenv(leases.LEASE_ENV, "0.2")
    store.opened_at -= 60
    leases.acquire_fit(store, "exp", "host:1")
    assert data.header_summary(data.snapshot(store, "exp"), [])["status_text"] == "running"
    time.sleep(0.3)
    summary = data.header_summary(data.snapshot(store, "exp"), [])
    assert summary["status"] == "crashed" and summary["status_text"].startswith("crashed, last seen 20")
    (status_span,) = [child for child in header_children(summary)[0].children if getattr(child, "id", None)]
    assert status_span.children == summary["status_text"] and status_span.className == "rf-status-crashed"
    assert data.experiment_options(store) == [{"label": "exp (crashed)", "value": "exp"}]


def test_panel_allows_what_the_state_table_allows_after_pending_ops(store):
    state = data.panel_state(store, "exp", 1)
    assert state.status == "Ongoing" and state.will_be == "Ongoing"
    assert state.allowed == {op.value for op in OP_TABLE[RunStatus.ONGOING]}
    stop = ops.submit_op(store, "exp", "stop", 1)
    state = data.panel_state(store, "exp", 1)
    assert state.pending == [f"stop (op {stop['op_id']})"]
    assert state.will_be == "Stopped" and state.allowed == {op.value for op in OP_TABLE[RunStatus.STOPPED]}
    assert data.panel_state(store, "exp", 99) is None and data.panel_state(store, "nope", 1) is None


def test_clone_check_counts_generator_clones_before_submit(store):
    config = data.panel_state(store, "exp", 1).config
    grid = data.config_text({**config, "learning_rate": {"$list": [1e-4, 2e-4, 4e-4]}})
    check = data.check_clone(store, "exp", 1, grid, "weights")
    assert (check.problems, check.count) == ([], 3)
    assert check.payload["warm_start"] == "weights"
    sampled = data.config_text({"$random": {"config": {**config, "learning_rate": {"$range": {"low": 1e-5, "high": 1e-3,
                                "log": True}}}, "num_runs": 5, "seed": 0}})  # fmt: skip
    assert data.check_clone(store, "exp", 1, sampled, "off").count == 5


@pytest.mark.parametrize(
    ("text", "warm", "expected"),
    [
        ('{"learning_rate": 0.1,', "off", "malformed JSON at line 1"),
        ("[1, 2]", "off", "must be a JSON object"),
        ('{"learning_rate": -1}', "off", "learning_rate=-1: must be > 0"),
        ('{"learnin_rate": 0.1}', "off", "did you mean 'learning_rate'"),
        ('{"learning_rate": {"$range": {"low": 1e-4, "high": 1e-3}}}', "off", "wrap the config in RandomSearch"),
        ('{"r": 8}', "weights", "r differs"),
    ],
)
def test_clone_check_explains_every_problem(store, text, warm, expected):
    check = data.check_clone(store, "exp", 1, text, warm)
    assert check.count == 0 or warm != "off"
    assert any(expected in problem for problem in check.problems), check.problems


def test_problems_are_placed_under_the_line_of_their_key():
    text = '{\n  "learning_rate": -1,\n  "learnin_rate": 2,\n  "r": 4\n}'
    problems = ["learning_rate=-1: must be > 0 and <= 1", "unknown key 'learnin_rate' (did you mean 'learning_rate'?)",
                "the clone expands to no config at all"]  # fmt: skip
    lines, unplaced = data.annotate_problems(text, problems)
    notes = {line.strip(): messages for line, messages in lines if messages}
    assert notes == {'"learning_rate": -1,': [problems[0]], '"learnin_rate": 2,': [problems[1]]}
    assert unplaced == [problems[2]]
    malformed = data.read_clone_request('{\n  "r": 4,\n}', "off")
    lines, unplaced = data.annotate_problems('{\n  "r": 4,\n}', malformed.problems, malformed.bad_json_at)
    assert lines[2] == ("}", malformed.problems) and unplaced == []


def test_submit_queues_through_ops_and_a_rejection_writes_nothing(store):
    op, problems = data.submit(store, "exp", "stop", 3)
    assert problems == [] and op["source"] == "dashboard" and op["who"] is None
    assert data.accepted_message(op) == f"op {op['op_id']} (stop) queued: applies at run 3's next chunk boundary"
    again, problems = data.submit(store, "exp", "stop", 3)
    assert again is None and problems == [f"run 3 will already be stopped by op {op['op_id']}"]
    assert len(ops.list_ops(store, "exp")) == 1


def test_deleted_runs_leave_the_charts_as_soon_as_the_delete_is_accepted(store):
    ops.submit_op(store, "exp", "delete", 2)
    runs, knobs = data.chart_runs(store, "exp", include_deleted=False)
    assert [run["run_id"] for run in runs] == [1, 3, 4] and knobs == ["learning_rate"]
    everything, _ = data.chart_runs(store, "exp", include_deleted=True)
    assert [run["run_id"] for run in everything] == [1, 2, 3, 4]
    series = data.chart_series(data.chart_cache(store), "exp", [run["run_id"] for run in runs],
                               ["eval_loss", "train_loss", "learning_rate"])  # fmt: skip
    assert list(series) == ["train_loss", "learning_rate", "eval_loss"]
    assert set(series["train_loss"]) == {1, 3, 4}
    steps, values = series["train_loss"][1]
    assert steps[0] == 1 and steps[-1] == 400 and len(steps) == len(values)


def test_ops_log_says_what_each_op_did(store):
    clone = ops.submit_op(store, "exp", "clone", 1, payload={"overrides": {"learning_rate": {"$list": [1e-4, 2e-4]}}})
    ops.submit_op(store, "exp", "stop", 4)
    ops.apply_due_ops(store, "exp", [1])
    log = data.ops_log(store, "exp")
    assert [row["op"] for row in log] == [clone["op_id"] + 1, clone["op_id"]]  # newest first
    assert log[1]["detail"] == (
        '2 clone(s), warm start off; set learning_rate={"$list": [0.0001, 0.0002]}; created runs 5, 6'
    )
    assert log[1]["status"] == "applied"
    assert log[0]["status"] == "pending" and log[0]["applied"] == ""
    assert data.ops_log(store, None) == [] and data.ops_log(store, "nope") == []


@pytest.mark.parametrize(("runs", "buckets"), [(1, 400), (8, 400), (64, 187), (1000, 100)])
def test_buckets_shrink_when_many_runs_share_a_chart(runs, buckets):
    assert data.buckets_for(runs) == buckets


def test_runs_view_reads_the_metrics_the_snapshot_reads_without_scanning(store):
    ops.submit_op(store, "exp", "delete", 4)
    ops.submit_op(store, "exp", "stop", 1)
    cache = data.chart_cache(store)
    for include_deleted in (False, True):
        view = data.runs_view(store, cache, "exp", include_deleted)
        snap = experiments.experiment_snapshot(store, "exp", include_deleted=include_deleted)
        assert view["varying_knobs"] == snap["varying_knobs"] and view["experiment"] == snap["experiment"]
        assert len(view["runs"]) == len(snap["runs"]) == (4 if include_deleted else 3)
        for mine, theirs in zip(view["runs"], snap["runs"], strict=True):
            for key in ("run_id", "status", "pending_ops", "pending_op_kinds", "train_loss", "latest_metric",
                        "best_metric"):  # fmt: skip
                assert mine[key] == pytest.approx(theirs[key]), key
    assert data.runs_view(store, cache, "nope") is None and data.runs_view(store, cache, None) is None


def test_a_bad_tagged_value_is_written_under_its_knob_s_line(store):
    text = '{\n  "r": 4,\n  "learning_rate": {"$list": []}\n}'
    check = data.check_clone(store, "exp", 1, text, "off")
    assert check.problems == ['learning_rate={"$list": []}: "$list" takes a non-empty JSON list of values, got []']
    lines, unplaced = data.annotate_problems(text, check.problems, check.bad_json_at)
    assert unplaced == [] and lines[2][1] == check.problems


def test_the_page_is_told_once_of_each_op_that_applied_and_each_run_that_failed(store):
    from rf_core.control import ops, timeline

    events, seen = data.new_events(store, "exp", None)
    assert events == [] and seen == {"experiment": "exp", "ops": [], "failed": []}  # a first look is not news
    stop = ops.submit_op(store, "exp", "stop", 1)
    assert data.new_events(store, "exp", seen)[0] == []  # queued is not done yet
    ops.apply_due_ops(store, "exp", [1])
    timeline.fail_run(store, "exp", 3, "CUDA out of memory")
    events, seen = data.new_events(store, "exp", seen)
    assert events[0][0] == "ok" and events[0][1].startswith(f"op {stop['op_id']} (stop run 1) applied")
    assert events[1:] == [("bad", "run 3 failed: CUDA out of memory")]
    assert data.new_events(store, "exp", seen)[0] == []  # told once


def test_the_hover_says_which_runs_have_the_very_same_config():
    runs = [
        {"run_id": 1, "config": {"learning_rate": 1e-3, "r": 4}},
        {"run_id": 2, "config": {"learning_rate": 1e-3, "r": 4, "run_name": "again"}},
        {"run_id": 3, "config": {"learning_rate": 3e-3, "r": 4}},
    ]
    labels = data.hover_labels(runs, ["learning_rate"])
    assert labels[1] == "learning_rate=0.001\nsame config as run 2 (curves may overlap)"
    assert labels[2].endswith("same config as run 1 (curves may overlap)") and labels[3] == "learning_rate=0.003"


def test_the_url_keeps_the_x_axis_the_ticked_runs_and_each_chart_s_zoom():
    search = "?experiment=e&x=relative&runs=1,3,x&zoom=train_loss:120.5:210;eval:loss:1e2:3e2;bad:a:b"
    assert data.x_axis_in_query(search) == "relative" and data.x_axis_in_query("?x=sideways") is None
    assert data.ticks_in_query(search) == [1, 3] and data.ticks_in_query("") == []
    assert data.zoom_in_query(search) == {"train_loss": (120.5, 210.0), "eval:loss": (100.0, 300.0)}
