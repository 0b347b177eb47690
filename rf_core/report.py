"""Plain-text lines and tables the fit prints: one line per chunk, one results table at the end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rf_core.config import varying_knobs
from rf_core.tasks import ChunkOutcome


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def format_chunk_line(outcome: ChunkOutcome, total_chunks: int, slot: int) -> str:
    head = f"run {outcome.run_id:>3}  chunk {outcome.chunk_index + 1}/{total_chunks}"
    if outcome.status == "failed":
        return f"{head}  FAILED: {outcome.error}"
    if outcome.status == "interrupted":
        return f"{head}  INTERRUPTED, run stopped (resume it when fixed): {outcome.error}"
    metrics = "  ".join(f"{name} {_num(value)}" for name, value in sorted(outcome.eval_metrics.items()))
    done = "  (completed)" if outcome.status == "completed" else ""
    return (
        f"{head}  epoch {outcome.epoch}  step {outcome.step:>5}  train_loss {_num(outcome.last_train_loss)}"
        f"  {metrics}  [slot {slot}, {outcome.train_seconds:.1f} s]{done}"
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_rows(snapshot: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The final results table: one row per run, the knobs that vary between runs, and its metrics."""
    runs = list(snapshot.get("runs", []))
    metric = snapshot.get("experiment", {}).get("metric", "eval_loss")
    knobs = varying_knobs([run["config"] for run in runs]) if runs else []
    headers = [
        "run",
        "status",
        "source",
        "parent",
        "warm start",
        *knobs,
        "chunks",
        "step",
        f"final {metric}",
        f"best {metric}",
    ]
    rows = []
    for run in runs:
        rows.append(
            [
                run["run_id"],
                run["status"],
                run.get("source"),
                run.get("parent_id"),
                _warm(run),
                *[_knob(run["config"].get(k)) for k in knobs],
                f"{run.get('chunks_done', 0)}/{run.get('total_chunks') or '-'}",
                run.get("step"),
                _num(run.get("latest_metric")),
                _num(run.get("best_metric")),
            ]
        )
    return headers, rows


def _warm(run: Mapping[str, Any]) -> str:
    mode = run.get("warm_start") or "off"
    return "-" if mode == "off" else f"{mode} @ step {run.get('parent_step')}"


def _knob(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_results_table(snapshot: Mapping[str, Any]) -> str:
    headers, rows = results_rows(snapshot)
    name = snapshot.get("experiment", {}).get("name", "")
    return f"\nresults of experiment {name!r}:\n" + format_table(headers, rows)
