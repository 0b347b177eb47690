"""Op flood: many processes submit IC Ops at once to a real rf server while a reader keeps reading runs.

    .venv/bin/python bench/flood.py --out bench/results/flood.json     # 4 processes x 250 ops = 1,000 ops
    .venv/bin/python bench/flood.py --smoke                             # 2 x 20, seconds

Each process owns one run for Stop/Resume pairs (so whether each op is legal is known in advance, whatever the
interleaving with other processes) and sends, in a seeded random mix: the next op of its Stop/Resume sequence
(valid), a cold Clone-Modify of any initial run with a new learning rate (valid), a second Stop right after a
Stop (invalid: the run will already be stopped), a Resume of a New run it owns (invalid), an op on a run that
does not exist (invalid), and a clone with an invalid config (invalid).

Checked afterwards, from the store: each accepted op is recorded exactly once, each rejected op left no row,
every op was judged as expected, and applying the queue (one boundary) applies each run's ops in submission order.
Reported: ops/s, submit latency, and the latency of `GET runs` from a reader thread during the flood (p50 / p99).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_core.client import RFClient  # noqa: E402
from rf_core.errors import OpRejected  # noqa: E402
from rf_core.server_process import ensure_server, stop_server  # noqa: E402

EXPERIMENT = "flood"
CONFIG = {"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3, "r": 4, "lora_alpha": 8}


def submitter(url: str, process_index: int, count: int, seed: int, initial_runs: int) -> list[dict[str, Any]]:
    """One flooding process: returns what it sent, what it expected, and what came back."""
    client = RFClient(url, timeout=60)
    rng = random.Random(seed * 1000 + process_index)
    own_run = process_index + 1
    own_state = "New"  # the state its run will have once its queued ops apply
    log: list[dict[str, Any]] = []
    for _ in range(count):
        choice = rng.random()
        if choice < 0.35:
            kind = "stop" if own_state in ("New", "Ongoing") else "resume"
            request = (kind, own_run, None)
            valid = True
            own_state = "Stopped" if kind == "stop" else "Ongoing"
        elif choice < 0.65:
            overrides = {"learning_rate": round(rng.uniform(1e-5, 1e-2), 8)}
            request = ("clone", rng.randint(1, initial_runs), {"overrides": overrides})
            valid = True
        elif choice < 0.75:
            kind = "stop" if own_state == "Stopped" else "resume"  # repeats what it is: never legal
            request = (kind, own_run, None)
            valid = False
        elif choice < 0.85:
            request = ("delete", 10_000 + rng.randint(0, 99), None)
            valid = False
        else:
            request = ("clone", own_run, {"overrides": {"learning_rate": -1.0}})
            valid = False
        kind, run_id, payload = request
        began = time.perf_counter()
        try:
            op = client.submit_op(EXPERIMENT, kind, run_id, payload, source="cli", who=f"flood-{process_index}")
            outcome: dict[str, Any] = {"accepted": True, "op_id": op["op_id"]}
        except OpRejected as rejection:
            outcome = {"accepted": False, "problems": list(rejection.problems) or [str(rejection)]}
        log.append(
            {"kind": kind, "run_id": run_id, "expected_valid": valid, "seconds": time.perf_counter() - began, **outcome}
        )
    return log


def _submitter_entry(arguments: tuple[str, int, int, int, int]) -> list[dict[str, Any]]:
    return submitter(*arguments)


def run_flood(url: str, processes: int, ops_per_process: int, seed: int) -> dict[str, Any]:
    client = RFClient(url, timeout=60)
    initial_runs = max(processes, 4)
    client.create_experiment(EXPERIMENT, [CONFIG] * initial_runs, num_chunks=4, seed=seed)
    read_latencies: list[float] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            began = time.perf_counter()
            client.list_runs(EXPERIMENT)
            read_latencies.append(time.perf_counter() - began)

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    began = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        logs = pool.map(
            _submitter_entry, [(url, index, ops_per_process, seed, initial_runs) for index in range(processes)]
        )
    flood_seconds = time.perf_counter() - began
    done.set()
    reading.join()

    sent = [entry for log in logs for entry in log]
    accepted = [entry for entry in sent if entry["accepted"]]
    rows = client.list_ops(EXPERIMENT)
    violations: list[str] = []
    row_ids = [row["op_id"] for row in rows]
    if sorted(row_ids) != sorted(entry["op_id"] for entry in accepted):
        violations.append(f"{len(rows)} op rows for {len(accepted)} accepted ops")
    if len(set(row_ids)) != len(row_ids):
        violations.append("an op row appears twice")
    misjudged = [entry for entry in sent if entry["accepted"] != entry["expected_valid"]]
    violations += [
        f"{entry['kind']} run {entry['run_id']}: expected valid={entry['expected_valid']} ({entry.get('problems')})"
        for entry in misjudged
    ]

    applied = client.boundary_view(EXPERIMENT, [])["applied_ops"]
    by_run: dict[int, list[int]] = {}
    for op in applied:
        by_run.setdefault(int(op["run_id"]), []).append(int(op["op_id"]))
    out_of_order = [run_id for run_id, ids in by_run.items() if ids != sorted(ids)]
    if out_of_order:
        violations.append(f"ops applied out of submission order on runs {out_of_order}")
    if len(applied) != len(accepted):
        violations.append(f"{len(applied)} ops applied or skipped at the boundary, {len(accepted)} accepted")
    for index, log in enumerate(logs):
        sent_order = [entry["op_id"] for entry in log if entry["accepted"] and entry["kind"] in ("stop", "resume")]
        applied_order = [
            int(op["op_id"]) for op in applied if op["run_id"] == index + 1 and op["kind"] in ("stop", "resume")
        ]
        if sent_order != applied_order:
            violations.append(f"run {index + 1}: its Stop/Resume ops were not applied in the order they were sent")
    skipped = [op for op in applied if op["status"] != "applied"]
    if skipped:
        violations.append(f"{len(skipped)} accepted ops were skipped at apply: {skipped[0].get('reason')}")

    def percentiles(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max_ms": 1000 * ordered[-1],
            "count": len(ordered),
        }

    return {
        "processes": processes,
        "ops_sent": len(sent),
        "accepted": len(accepted),
        "rejected": len(sent) - len(accepted),
        "flood_seconds": flood_seconds,
        "ops_per_second": len(sent) / flood_seconds,
        "submit_latency": percentiles([entry["seconds"] for entry in sent]),
        "read_latency_during_flood": percentiles(read_latencies),
        "clones_created": sum(len((op.get("result") or {}).get("created_run_ids") or []) for op in applied),
        "violations": violations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--ops-per-process", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="2 processes x 20 ops")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    processes, per_process = (2, 20) if args.smoke else (args.processes, args.ops_per_process)
    with tempfile.TemporaryDirectory() as home:
        url, server = ensure_server(Path(home))
        try:
            results = run_flood(url, processes, per_process, args.seed)
        finally:
            if server is not None:
                stop_server(server)
    results.update(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        machine=f"{os.cpu_count()} cores, {platform.machine()}",
        python=platform.python_version(),
        command="python bench/flood.py" + (" --smoke" if args.smoke else ""),
    )
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if results["violations"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
