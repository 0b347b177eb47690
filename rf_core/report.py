"""The runs table every view shows, and the plain-text lines and tables the fit and the CLI print.

`runs_table(snapshot)` is the one row builder: the dashboard's runs grid, `rf runs` and the fit's results table
each format its rows their own way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rf_core.config import varying_knobs
from rf_core.messages import ChunkOutcome
from rf_core.states import DEFAULT_METRIC


@dataclass(frozen=True)
class RunRow:
    """One run as a runs table shows it."""

    run_id: int
    name: str | None  # the config's run_name
    status: str
    source: str | None
    parent_id: int | None
    warm_start: str  # "off" for initial runs and cold clones
    parent_step: int | None
    epoch: int
    chunks_done: int
    total_chunks: int | None  # None until the run's first chunk is planned
    step: int
    train_loss: float | None
    latest_metric: float | None  # the experiment's metric
    best_metric: float | None
    pending_op_kinds: tuple[str, ...]
    knobs: dict[str, Any]  # the run's value of each knob that varies between the runs

    @property
    def is_clone(self) -> bool:
        return self.parent_id is not None

    @property
    def is_warm(self) -> bool:
        return self.is_clone and self.warm_start != "off"


def runs_table(snapshot: Mapping[str, Any]) -> tuple[list[str], list[RunRow]]:
    """An experiment snapshot's runs table: (the knobs that vary between its runs, one row per run)."""
    runs = list(snapshot.get("runs") or [])
    knobs = snapshot.get("varying_knobs")
    if knobs is None:
        knobs = varying_knobs([run["config"] for run in runs]) if runs else []
    knobs = [knob for knob in knobs if knob != "run_name"]  # every view shows the name in a column of its own
    rows = [run_row(run, knobs) for run in runs]
    return list(knobs), rows


def with_names(headers: list[str], rows: list[RunRow], cells: list[list[Any]]) -> tuple[list[str], list[list[Any]]]:
    """A text table with a "name" column after the run id, when any run has a name (run_name)."""
    if not any(row.name for row in rows):
        return headers, cells
    return [headers[0], "name", *headers[1:]], [
        [cell[0], row.name, *cell[1:]] for row, cell in zip(rows, cells, strict=True)
    ]


def run_row(run: Mapping[str, Any], knobs: Sequence[str] = ()) -> RunRow:
    """One run (a runs-table or snapshot row of the store) as a RunRow."""
    return RunRow(
        run_id=int(run["run_id"]),
        name=run["config"].get("run_name"),
        status=run["status"],
        source=run.get("source"),
        parent_id=run.get("parent_id"),
        warm_start=run.get("warm_start") or "off",
        parent_step=run.get("parent_step"),
        epoch=int(run.get("epoch") or 0),
        chunks_done=int(run.get("chunks_done") or 0),
        total_chunks=run.get("total_chunks") or None,
        step=int(run.get("step") or 0),
        train_loss=run.get("train_loss"),
        latest_metric=run.get("latest_metric"),
        best_metric=run.get("best_metric"),
        pending_op_kinds=tuple(run.get("pending_op_kinds") or ()),
        knobs={knob: run["config"].get(knob) for knob in knobs},
    )


def experiment_metric(snapshot: Mapping[str, Any]) -> str:
    return (snapshot.get("experiment") or {}).get("metric") or DEFAULT_METRIC


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def runs_text(run_ids: Sequence[int]) -> str:
    """ "run 5" or "runs 5, 6, 7"."""
    ids = ", ".join(str(run_id) for run_id in run_ids)
    return f"run {ids}" if len(run_ids) == 1 else f"runs {ids}"


def progress_text(row: RunRow) -> str:
    """A run's progress, worded the same in the dashboard and the CLI. A chunk is one slice of one run's training
    (num_chunks per epoch, so a run has num_chunks x epochs of them); epochs count from 1, as people count them."""
    total = row.total_chunks or "?"
    if row.chunks_done == 0 and row.step == 0:
        return "not started" if row.total_chunks is None else f"not started · {total} chunks"
    return f"chunk {row.chunks_done}/{total} · epoch {row.epoch + 1} · step {row.step}"


def format_chunk_line(outcome: ChunkOutcome, total_chunks: int, slot: int) -> str:
    head = f"run {outcome.run_id:>3}  chunk {outcome.chunk_index + 1}/{total_chunks}"
    if outcome.status == "failed":
        return f"{head}  FAILED: {outcome.error}"
    if outcome.status == "interrupted":
        return f"{head}  INTERRUPTED, run stopped (resume it when fixed): {outcome.error}"
    metrics = "  ".join(f"{name} {_num(value)}" for name, value in sorted(outcome.eval_metrics.items()))
    done = "  (completed)" if outcome.status == "completed" else ""
    line = (
        f"{head}  epoch {outcome.epoch + 1}  step {outcome.step:>5}  train_loss {_num(outcome.last_train_loss)}"
        f"  {metrics}  [slot {slot}, {outcome.train_seconds:.1f} s]{done}"
    )
    if outcome.chunk_index == 0 and outcome.truncated_rows:
        line += f"\n  warning: run {outcome.run_id}: {outcome.truncated_rows} training rows were cut to its max_length"
    return line


def format_op_line(op: Mapping[str, Any]) -> str:
    """One line for an op the fit applied or skipped at a boundary."""
    verb = "applied" if op.get("status") == "applied" else f"skipped ({op.get('reason')})"
    created = (op.get("result") or {}).get("created_run_ids")
    extra = f" -> new runs {created}" if created else ""
    return f"op {op['op_id']} {op['kind']} run {op['run_id']} from {op.get('source')}: {verb}{extra}"


def fit_state_text(experiment: Mapping[str, Any]) -> str:
    """The experiment's status as every view prints it; a crashed fit's says when it was last seen."""
    status = str(experiment["status"])
    seen = experiment.get("last_seen_at")
    if status == "crashed" and seen:
        return f"crashed, last seen {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seen))}"
    return status


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_rows(snapshot: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The final results table: one row per run, the knobs that vary between runs, and its metrics."""
    metric = experiment_metric(snapshot)
    knobs, runs = runs_table(snapshot)
    headers = ["run", "status", "source", "parent", "warm start", *knobs, "chunks", "step", f"final {metric}",
               f"best {metric}"]  # fmt: skip
    rows = [
        [
            row.run_id,
            row.status,
            row.source,
            row.parent_id,
            f"{row.warm_start} @ step {row.parent_step}" if row.is_warm else "-",
            *[format_knob(row.knobs[knob]) for knob in knobs],
            f"{row.chunks_done}/{row.total_chunks or '-'}",
            row.step,
            _num(row.latest_metric),
            _num(row.best_metric),
        ]
        for row in runs
    ]
    return with_names(headers, runs, rows)


def format_knob(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_results_table(snapshot: Mapping[str, Any]) -> str:
    headers, rows = results_rows(snapshot)
    name = snapshot.get("experiment", {}).get("name", "")
    return f"\nresults of experiment {name!r}:\n" + format_table(headers, rows)
