"""Scale benchmark: what the fit's bookkeeping costs per decision at 10, 100 and 1,000 runs, and a slot worker's
memory after that many runs passed through it.

    .venv/bin/python bench/scale.py [--runs 10 100 1000] [--chunks 4] [--ops 100] [--max-boundaries N] [--out F]
    .venv/bin/python bench/scale.py --smoke          # 10 runs, 10 ops, a 10-run worker: about a minute

Part 1, the orchestration at scale, without training: for each run count, a fresh RF_HOME with a real rf server
(`ensure_server`: DuckDB store, JSON API over HTTP) and an experiment of N configs (`RandomSearch` over learning rate
and LoRA rank) of `--chunks` chunks. The real `FitLoop` plans for 2 slots exactly as the fit flow's loop does
(picks made before each boundary, one request per boundary); a chunk it starts "ends" at its next boundary with an
ok outcome and the metric rows a chunk of 8 steps logs (train_loss and learning_rate per step, eval_loss at its end),
sent with it as a worker hands them over. The ASHA policy decides at every boundary as it does in a fit
(`flows.policy.boundary_policies`), and `--ops` IC Ops (stop, resume, clone) are submitted through the API, spread
over the fit. Timed with `time.perf_counter` in this process:
  - `FitLoop.plan` per decision (whole; its one request; the rest, planning here),
  - the policy step per boundary (snapshot read, decisions, their records),
  - every 20 boundaries: `GET runs`, the experiment snapshot (what `rf runs` and policies read), `rf runs`'s table
    (snapshot + formatting), and the dashboard's runs-table and chart refresh callbacks over HTTP (the requests
    `bench/dashboard.py` sends, as the page does),
  - each op's submission.
Each figure is reported at every run count with its growth factor per 10× runs.

Part 2, a slot worker's memory: one real `SlotWorker` process trains one chunk (2 steps) of each of N runs in turn
and the fit's release of each finished run follows, as the fit loop sends it; its resident memory (VmRSS) is read
after 10, 100 and 1,000 runs. Run state must leave memory with its run: the goal is flat.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script: make `bench`, `flows` and `rf_core` importable
    sys.path.insert(0, str(PROJECT_ROOT))

from bench.common import isolated_environment  # noqa: E402

EXPERIMENT = "bench"
SLOTS = 2
STEPS_PER_CHUNK = 8
READ_EVERY = 20  # boundaries between two samples of the reads
POLICY = {"template": "asha", "params": {"min_chunks": 1, "eta": 3}}
TARGET_DECISION_S = 0.050
TARGET_DASHBOARD_S = 0.300


def search_configs(num_runs: int, seed: int = 7) -> list[dict[str, Any]]:
    """RandomSearch over learning rate (log-uniform) and LoRA rank, on the bench experiment's base config."""
    from bench.bench_experiment import bench_configs
    from rf_core.knobs import List, RandomSearch, Range

    base = {**bench_configs(1), "learning_rate": Range(1e-5, 1e-2, log=True), "r": List([4, 8, 16, 32])}
    return RandomSearch(base, num_runs=num_runs, seed=seed).configs()


def describe(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "median_ms": round(1000 * statistics.median(ordered), 2),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], 2),
        "max_ms": round(1000 * ordered[-1], 2),
    }


def timed(seconds: list[float], call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    started = time.perf_counter()
    try:
        return call(*args, **kwargs)
    finally:
        seconds.append(time.perf_counter() - started)


# ------------------------------------------------------------------------------------- part 1: orchestration


class _TimedClient:
    """The RFClient the planner uses, with its boundary request timed."""

    def __init__(self, client: Any, seconds: list[float]) -> None:
        self._client = client
        self._seconds = seconds

    def boundary_view(self, *args: Any, **kwargs: Any) -> Any:
        return timed(self._seconds, self._client.boundary_view, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def chunk_outcome(task: Any, attempt: int, total_chunks: int) -> Any:
    """What a worker would answer for `task`: ok (completed on the run's last chunk), with its metric rows."""
    from rf_core.messages import ChunkOutcome
    from rf_core.planner import EndedChunk

    chunk = task.chunk
    rate = float(task.config["learning_rate"])
    loss = 7.0 / (1.0 + 200.0 * rate * (chunk.index + 1))  # a higher learning rate learns faster here
    tags = {"experiment": EXPERIMENT, "run_id": task.run_id, "chunk": chunk.index, "attempt": attempt}
    rows = [
        {**tags, "step": step + 1, "name": name, "value": value}
        for step in range(chunk.start_step, chunk.end_step)
        for name, value in (("train_loss", loss), ("learning_rate", rate))
    ]
    rows.append({**tags, "step": chunk.end_step, "name": "eval_loss", "value": loss})
    outcome = ChunkOutcome(
        run_id=task.run_id,
        chunk_index=chunk.index,
        status="completed" if chunk.index + 1 == total_chunks else "ok",
        step=chunk.end_step,
        epoch=chunk.epoch,
        samples=chunk.end_sample,
        eval_metrics={"eval_loss": loss},
        metric_batches=[{"batch_id": uuid.uuid4().hex, "rows": rows}],
    )
    return EndedChunk(task.run_id, chunk.index, attempt, outcome)


def dashboard_request(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url + "/_dash-update-component", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def orchestration_case(
    num_runs: int, num_chunks: int, num_ops: int, max_boundaries: int | None = None, seed: int = 3
) -> dict[str, Any]:
    """One simulated fit of `num_runs` configs on a fresh rf server (cut after `max_boundaries` boundaries, when
    given); the timings of part 1."""
    from bench import dashboard
    from bench.bench_experiment import BATCH_SIZE, examples
    from flows.policy import boundary_policies, build_policies
    from rf_cli.main import format_runs
    from rf_core import paths
    from rf_core.client import RFClient
    from rf_core.experiment import ExperimentSpec
    from rf_core.planner import FitLoop
    from rf_core.server_process import ensure_server, stop_server

    rng = random.Random(seed)
    home = paths.rf_home()
    url, process = ensure_server(home)
    try:
        client = RFClient(url)
        configs = search_configs(num_runs)
        spec = ExperimentSpec(
            config_group={},
            create_model_fn=lambda config: (None, None),
            train_dataset=examples(num_chunks * STEPS_PER_CHUNK * BATCH_SIZE, 0),
            eval_dataset=examples(8, 1_000_000),
            num_chunks=num_chunks,
            seed=11,
        )
        create_seconds: list[float] = []
        timed(create_seconds, client.create_experiment, EXPERIMENT, configs=configs, num_chunks=num_chunks)
        boundary_seconds: list[float] = []
        loop = FitLoop(_TimedClient(client, boundary_seconds), EXPERIMENT, spec, SLOTS, home)
        policies = build_policies([POLICY])
        readers: dict[int, Any] = {}  # the fit keeps one PolicyReader per policy across boundaries
        timings: dict[str, list[float]] = {name: [] for name in (
            "plan", "policy", "get_runs", "snapshot", "cli_runs_table", "dashboard_table", "dashboard_refresh", "op",
        )}  # fmt: skip
        in_flight: dict[int, Any] = {}  # slot -> (task, attempt)
        ended: list[Any] = []
        boundaries, chunks_trained, ops_sent, signatures = 0, 0, 0, None
        expected_chunks = min(num_runs * num_chunks, max_boundaries or num_runs * num_chunks)
        op_every = max(1, expected_chunks // max(1, num_ops))
        while True:
            boundaries += 1
            if boundaries % READ_EVERY == 1:
                timed(timings["get_runs"], client.list_runs, EXPERIMENT)
                timed(timings["snapshot"], client.experiment_snapshot, EXPERIMENT)
                timed(timings["cli_runs_table"], _cli_runs_table, client, format_runs)
                timed(timings["dashboard_table"], dashboard_request, url, _table_request(dashboard))
                refresh = _refresh_request(dashboard, boundaries, signatures)
                answer = timed(timings["dashboard_refresh"], dashboard_request, url, refresh)
                signatures = answer["response"]["chart-signatures"]["data"]
            if ended:
                loop.record(ended)  # policies read the table with the chunks that ended in it, as in the fit
            timed(timings["policy"], boundary_policies, client, EXPERIMENT, policies, boundaries, readers)
            busy = {slot: task.run_id for slot, (task, _) in in_flight.items()}
            plan = timed(timings["plan"], loop.plan, busy, [])
            ended = []
            for slot, task in plan.tasks:
                attempt = task.attempt
                if attempt is None:
                    total = len(loop.chunk_plan({"run_id": task.run_id, "config": task.config}))
                    attempt = client.chunk_start(EXPERIMENT, task.run_id, task.chunk.index, slot, total)
                in_flight[slot] = (task, attempt)
            for run_id, reason in plan.unplannable.items():
                client.fail_run(EXPERIMENT, run_id, reason)
            if not in_flight:
                if plan.all_final or not plan.tasks:
                    break
                continue
            if max_boundaries is not None and boundaries >= max_boundaries:
                break
            # The chunk that started first ends first; the other slot trains on.
            slot = min(in_flight, key=lambda busy_slot: in_flight[busy_slot][1])
            task, attempt = in_flight.pop(slot)
            total = len(loop.chunk_plan({"run_id": task.run_id, "config": task.config}))
            ended.append(chunk_outcome(task, attempt, total))
            chunks_trained += 1
            if ops_sent < num_ops and chunks_trained % op_every == 0:
                ops_sent += _send_op(client, rng, timings["op"])
        snapshot = client.experiment_snapshot(EXPERIMENT, include_deleted=True)
        decisions = client.list_policy_decisions(EXPERIMENT)
    finally:
        if process is not None:
            stop_server(process)
    plan_seconds, request_seconds = timings["plan"], boundary_seconds[-len(timings["plan"]) :]
    statuses: dict[str, int] = {}
    for run in snapshot["runs"]:
        statuses[run["status"]] = statuses.get(run["status"], 0) + 1
    return {
        "runs": num_runs,
        "runs_at_end": len(snapshot["runs"]),
        "statuses_at_end": statuses,
        "boundaries": boundaries,
        "chunks": chunks_trained,
        "ops_sent": ops_sent,
        "policy_decisions": len(decisions),
        "create_experiment": describe(create_seconds),
        "plan_per_decision": describe(plan_seconds),
        "boundary_request": describe(request_seconds),
        "plan_less_request": describe(
            [whole - part for whole, part in zip(plan_seconds, request_seconds, strict=True)]
        ),
        **{name: describe(values) for name, values in timings.items() if name != "plan"},
    }


def _cli_runs_table(client: Any, format_runs: Callable[[Any], str]) -> str:
    return format_runs(client.experiment_snapshot(EXPERIMENT))


def _table_request(dashboard: Any) -> dict[str, Any]:
    body = dashboard.table_request(1)
    return _for_experiment(body)


def _refresh_request(dashboard: Any, tick: int, signatures: Any) -> dict[str, Any]:
    return _for_experiment(dashboard.refresh_request(tick, signatures))


def _for_experiment(body: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(body).replace(f'"{dashboard_experiment()}"', f'"{EXPERIMENT}"'))


def dashboard_experiment() -> str:
    from bench import dashboard

    return dashboard.EXPERIMENT


def _send_op(client: Any, rng: random.Random, seconds: list[float]) -> int:
    """One IC Op on a run it applies to: stop a trainable run, resume a stopped one, or clone one (cold)."""
    from rf_core.errors import OpRejected

    runs = client.list_runs(EXPERIMENT)
    trainable = [run for run in runs if run["status"] in ("New", "Ongoing")]
    stopped = [run for run in runs if run["status"] == "Stopped"]
    choices = [("stop", trainable), ("resume", stopped), ("clone", trainable)]
    kind, candidates = rng.choice([choice for choice in choices if choice[1]] or [("stop", [])])
    if not candidates:
        return 0
    run = rng.choice(candidates)
    payload = {"overrides": {"learning_rate": 1e-3}, "warm_start": "off"} if kind == "clone" else None
    try:
        timed(seconds, client.submit_op, EXPERIMENT, kind, run["run_id"], payload)
    except OpRejected:
        return 0  # e.g. a stop already queued for that run
    return 1


# --------------------------------------------------------------------------------------- part 2: worker memory


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def worker_memory_case(checkpoints: Sequence[int], model_cache: Path) -> dict[str, Any]:
    """A real slot worker trains one 2-step chunk of each of max(checkpoints) runs in turn, each released after it
    as the fit does for a finished run; its resident memory is read after each count in `checkpoints`."""
    from bench.bench_experiment import CHUNKS_ENV, MODEL_CACHE_ENV, RUNS_ENV, STEPS_PER_CHUNK_ENV
    from rf_core import paths
    from rf_core.chunks import plan_chunks
    from rf_core.client import RFClient
    from rf_core.config import with_defaults
    from rf_core.messages import TrainTask
    from rf_core.server_process import ensure_server, stop_server
    from rf_core.training.worker import SlotWorker, SpecSource

    total = max(checkpoints)
    os.environ.update({MODEL_CACHE_ENV: str(model_cache), RUNS_ENV: "1", CHUNKS_ENV: "1", STEPS_PER_CHUNK_ENV: "2"})
    from bench.bench_experiment import spec as bench_spec

    spec = bench_spec()
    home = paths.rf_home()
    url, process = ensure_server(home)
    worker = SlotWorker(0, SpecSource(entrypoint="bench.bench_experiment:spec"), url, home / "spool", 1)
    readings: dict[int, float] = {}
    try:
        client = RFClient(url)
        client.create_experiment("memory", configs=search_configs(total), num_chunks=1)
        worker.start()
        worker.wait_ready()
        readings[0] = resident_mib(worker._process.pid)  # type: ignore[union-attr]
        for run in client.list_runs("memory"):
            run_id = int(run["run_id"])
            config = with_defaults(run["config"])
            chunk = plan_chunks(spec.num_train_rows(config), config, 1)[0]
            attempt = client.chunk_start("memory", run_id, 0, 0, 1)
            task = TrainTask("memory", run_id, config, chunk, str(paths.run_dir("memory", run_id, home)), 11,
                             attempt=attempt)  # fmt: skip
            outcome = worker.train_once(task)
            if outcome.status == "failed":
                raise RuntimeError(f"run {run_id} failed: {outcome.error}")
            client.chunk_end("memory", attempt, {k: v for k, v in outcome.to_dict().items() if k != "metric_batches"})
            worker.release([run_id])  # the run completed: its state leaves the worker
            if run_id in checkpoints:
                readings[run_id] = resident_mib(worker._process.pid)  # type: ignore[union-attr]
    finally:
        worker.close()
        if process is not None:
            stop_server(process)
    return {"runs_passed_through": total, "resident_mib_after_runs": readings}


# -------------------------------------------------------------------------------------------------- report


def growth(cases: Sequence[dict[str, Any]], figure: str) -> str:
    """How a median grows per 10x runs, from the first case to the last."""
    first, last = cases[0], cases[-1]
    low, high = first[figure].get("median_ms"), last[figure].get("median_ms")
    if not low or not high or last["runs"] == first["runs"]:
        return "n/a"
    decades = math.log10(last["runs"] / first["runs"])
    return f"x{(high / low) ** (1 / decades):.2f} per 10x runs"


def summary(results: dict[str, Any]) -> str:
    cases = results["orchestration"]
    lines = ["== scale benchmark: the fit's bookkeeping per decision (no training), 2 slots, one ASHA policy"]
    header = f"{'figure (median / p95 / max ms)':<34}" + "".join(f"{case['runs']:>8} runs{'':>14}" for case in cases)
    lines.append(header + "  growth")
    figures = ["plan_per_decision", "boundary_request", "plan_less_request", "policy", "get_runs", "snapshot",
               "cli_runs_table", "dashboard_table", "dashboard_refresh", "op"]  # fmt: skip
    for figure in figures:
        cells = "".join(
            f"{case[figure].get('median_ms', 'n/a'):>8} / {case[figure].get('p95_ms', 'n/a'):>6} / "
            f"{case[figure].get('max_ms', 'n/a'):>6}"
            for case in cases
        )
        lines.append(f"{figure:<34}{cells}  {growth(cases, figure)}")
    for case in cases:
        lines.append(
            f"{case['runs']} runs: {case['boundaries']} boundaries, {case['chunks']} chunks, {case['ops_sent']} ops, "
            f"{case['policy_decisions']} policy decisions; runs at the end {case['statuses_at_end']}"
        )
    memory = results.get("worker_memory")
    if memory:
        readings = ", ".join(f"{count} runs {mib:.0f} MiB" for count, mib in memory["resident_mib_after_runs"].items())
        lines.append(f"slot worker resident memory after runs passed through it: {readings}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--memory-runs", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--max-boundaries", type=int, help="cut each simulated fit after this many boundaries")
    parser.add_argument("--smoke", action="store_true", help="10 runs, 10 ops, a 10-run worker")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.ops, args.memory_runs = [10], 10, [2, 10]
    started = time.time()
    results: dict[str, Any] = {"orchestration": [], "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="rf-bench-scale-") as scratch:
        for count in args.runs:
            isolated_environment(Path(scratch) / f"runs-{count}", PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore")
            print(f"orchestration at {count} runs ...", flush=True)
            results["orchestration"].append(orchestration_case(count, args.chunks, args.ops, args.max_boundaries))
        isolated_environment(Path(scratch) / "memory")
        print(f"slot worker memory over {max(args.memory_runs)} runs ...", flush=True)
        results["worker_memory"] = worker_memory_case(args.memory_runs, Path(scratch) / "model-cache")
    results["machine"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds": round(time.time() - started, 1),
    }
    text = summary(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
