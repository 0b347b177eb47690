"""`rf demo`: the main job on the embedded default — a local DuckDB file, local Prefect, a tiny model on CPU."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

DEMO_ENTRYPOINT = "rf_core.demo:demo_experiment"
DEMO_ENTRYPOINTS = {
    "sft": DEMO_ENTRYPOINT,
    "dpo": "rf_core.demo:dpo_demo_experiment",
    "grpo": "rf_core.demo:grpo_demo_experiment",
}


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from flows.fit import run_flow

    trainer = getattr(args, "trainer", "sft")
    experiment = args.experiment or time.strftime(f"{'demo' if trainer == 'sft' else trainer + '-demo'}-%Y%m%d-%H%M%S")
    print(f"starting demo experiment {experiment!r}; steer it from another terminal, e.g.")
    print(f"  rf runs {experiment}")
    print(f"  rf stop {experiment} 1")
    print(f"  rf clone {experiment} 2 --set learning_rate=3e-4 --warm-start")
    if trainer == "sft":
        print(
            f"  rf clone {experiment} 1 --set trainer_type=dpo learning_rate=1e-3 --warm-start   "
            "(DPO, anchored to run 1's weights)"
        )
    snapshot = run_flow(
        experiment,
        ephemeral=args.ephemeral,
        entrypoint=DEMO_ENTRYPOINTS[trainer],
        cpu_slots=args.cpu_slots,
        idle_timeout=args.idle_timeout,
        num_chunks=args.chunks,
        max_configs=args.max_configs,
    )
    print({"sft": summary_line, "dpo": preference_summary_line, "grpo": reward_summary_line}[trainer](snapshot))
    return 0


def summary_line(snapshot: dict[str, Any]) -> str:
    finals = [run["latest_metric"] for run in snapshot["runs"] if run.get("latest_metric") is not None]
    if len(finals) < 2:
        return "fewer than two runs finished with an eval loss"
    best, worst = min(finals), max(finals)
    return f"best final eval_loss {best:.4f}, worst {worst:.4f}: the worst is {100 * (worst / best - 1):.1f} % higher"


def preference_summary_line(snapshot: dict[str, Any]) -> str:
    finals = [run["latest_metric"] for run in snapshot["runs"] if run.get("latest_metric") is not None]
    if not finals:
        return "no run finished with an eval reward accuracy"
    return (
        f"final eval reward accuracy (chosen rewarded above rejected): best {max(finals):.3f}, worst "
        f"{min(finals):.3f} (0.5 is chance)"
    )


def reward_summary_line(snapshot: dict[str, Any]) -> str:
    finals = [run["latest_metric"] for run in snapshot["runs"] if run.get("latest_metric") is not None]
    if not finals:
        return "no run finished with an eval reward"
    best, worst = max(finals), min(finals)
    return f"final eval reward (one sentence of about 12 words scores 2): best {best:.3f}, worst {worst:.3f}"
