from dataclasses import replace

from rf_core.messages import ChunkOutcome
from rf_core.report import RunRow, format_chunk_line, format_results_table, progress_text

SNAPSHOT = {
    "experiment": {"name": "exp", "metric": "eval_loss"},
    "runs": [
        {"run_id": 1, "status": "Completed", "source": "initial", "config": {"r": 4, "learning_rate": 1e-3},
         "chunks_done": 4, "total_chunks": 4, "step": 40, "latest_metric": 2.5, "best_metric": 2.4},
        {"run_id": 2, "status": "Stopped", "source": "cli", "parent_id": 1, "warm_start": "weights",
         "parent_step": 20, "config": {"r": 4, "learning_rate": 3e-4}, "chunks_done": 1, "total_chunks": 4,
         "step": 10, "latest_metric": None, "best_metric": None},
    ],
}  # fmt: skip


def test_results_table_shows_varying_knobs_lineage_and_metrics():
    lines = format_results_table(SNAPSHOT).strip().splitlines()
    header = lines[1].split()
    assert "learning_rate" in header and "r" not in header  # only knobs that differ between runs
    assert lines[3].split()[:2] == ["1", "Completed"] and "2.5000" in lines[3]
    assert "weights @ step 20" in lines[4] and "1/4" in lines[4]


def test_chunk_line_names_run_chunk_and_losses():
    ok = ChunkOutcome(1, 2, "completed", 40, 0, 320, eval_metrics={"eval_loss": 2.5}, last_train_loss=2.25)
    line = format_chunk_line(ok, 3, slot=1)
    assert "chunk 3/3" in line and "eval_loss 2.5000" in line and "(completed)" in line
    failed = ChunkOutcome(2, 0, "failed", 0, 0, 0, error="loss became nan at step 3")
    assert "FAILED: loss became nan at step 3" in format_chunk_line(failed, 3, slot=0)
    assert "warning" not in line
    cut = ChunkOutcome(4, 0, "ok", 10, 0, 80, truncated_rows=12)
    assert "warning: run 4: 12 training rows were cut to its max_length" in format_chunk_line(cut, 3, slot=0)
    later = ChunkOutcome(4, 1, "ok", 20, 0, 160, truncated_rows=12)
    assert "warning" not in format_chunk_line(later, 3, slot=0)  # said once per run, at its first chunk


def test_run_names_get_a_column_of_their_own_in_every_text_table():
    from rf_core.report import results_rows, runs_table

    named = {**SNAPSHOT, "runs": [dict(run) for run in SNAPSHOT["runs"]]}
    named["runs"][0]["config"] = {**named["runs"][0]["config"], "run_name": "baseline"}
    headers, rows = results_rows(named)
    assert headers[:3] == ["run", "name", "status"] and rows[0][:3] == [1, "baseline", "Completed"]
    assert rows[1][1] is None and "run_name" not in headers  # not a knob column besides
    knobs, table = runs_table(named)
    assert "run_name" not in knobs and [row.name for row in table] == ["baseline", None]
    assert results_rows(SNAPSHOT)[0][:2] == ["run", "status"]  # no names, no column


def test_progress_counts_a_run_s_chunks_across_epochs_and_epochs_from_one():
    row = RunRow(
        run_id=1, name=None, status="New", source="initial", parent_id=None, warm_start="off", parent_step=None,
        epoch=0, chunks_done=0, total_chunks=None, step=0, train_loss=None, latest_metric=None, best_metric=None,
        pending_op_kinds=(), knobs={},
    )  # fmt: skip
    assert progress_text(row) == "not started"
    assert progress_text(replace(row, total_chunks=8)) == "not started · 8 chunks"
    trained = replace(row, status="Ongoing", epoch=1, chunks_done=5, total_chunks=8, step=120)
    assert progress_text(trained) == "chunk 5/8 · epoch 2 · step 120"
