"""`rf demo`: the main job on the embedded default — a local DuckDB file, local Prefect, a tiny model on CPU."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

DEMO_ENTRYPOINT = "rf_core.demo:demo_experiment"


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from flows.fit import run_flow

    experiment = args.experiment or time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"starting demo experiment {experiment!r}; steer it from another terminal, e.g.")
    print(f"  rf runs {experiment}")
    print(f"  rf stop {experiment} 1")
    print(f"  rf clone {experiment} 2 --set learning_rate=3e-4 --warm-start")
    snapshot = run_flow(
        experiment,
        ephemeral=args.ephemeral,
        entrypoint=DEMO_ENTRYPOINT,
        cpu_slots=args.cpu_slots,
        idle_timeout=args.idle_timeout,
        num_chunks=args.chunks,
        max_configs=args.max_configs,
    )
    print(summary_line(snapshot))
    return 0


def summary_line(snapshot: dict[str, Any]) -> str:
    finals = [run["latest_metric"] for run in snapshot["runs"] if run.get("latest_metric") is not None]
    if len(finals) < 2:
        return "fewer than two runs finished with an eval loss"
    best, worst = min(finals), max(finals)
    return f"best final eval_loss {best:.4f}, worst {worst:.4f}: the worst is {100 * (worst / best - 1):.1f} % higher"
