"""Start-up: from the start of the `rf demo` command to its first chunk (the first chunk-start record in the store's
timeline), with the services of `rf up` already running ("warm"), with none running ("cold": the demo starts them),
and with `--ephemeral` (the baseline: temporary rf and Prefect servers that exit with the fit, as every fit ran
before `rf up`), each the median of `--repeats` runs after a warm-up that builds the tiny models; plus where the
time goes, read from the fit's log lines.

    python bench/startup.py [--repeats 3] [--out bench/results/startup.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PROJECT_ROOT, isolated_environment
from rf_core.client import RFClient
from rf_core.server_process import ensure_server, find_live_server, stop_server

# Log lines that mark the phases, in the order they happen (Prefect prints "HH:MM:SS.mmm | LEVEL | ...").
PHASES = (
    ("flow run begins", "Beginning flow run"),
    ("experiment created", "runs, "),
    ("slot workers ready", "slot workers ready"),
)
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) \|")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rf(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "rf_cli.main", *args]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def demo_run(name: str, *extra: str) -> dict[str, Any]:
    """One `rf demo` (1 config, 2 chunks): seconds from the command's start to its first chunk, and each phase."""
    started = time.time()
    result = rf("demo", "--experiment", name, "--max-configs", "1", "--chunks", "2", "--idle-timeout", "0", *extra)
    if result.returncode != 0:
        raise RuntimeError(f"rf demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with _services_up() as url:
        first_chunk = min(float(entry["start"]) for entry in RFClient(url).timeline(name))
    phases = {"command starts": 0.0}
    output = result.stdout + result.stderr
    for phase, marker in PHASES:
        line = next((line for line in output.splitlines() if marker in line and STAMP.match(line)), None)
        if line is not None:
            phases[phase] = _seconds_of_day_since(STAMP.match(line).group(1), started)  # type: ignore[union-attr]
    phases["first chunk starts"] = first_chunk - started
    return {"to_first_chunk_s": first_chunk - started, "phases_s": phases, "services_started": "started now" in output}


@contextlib.contextmanager
def _services_up() -> Iterator[str]:
    """The rf server's URL; after an ephemeral run none is left, so one is started for the read and stopped."""
    live = find_live_server()
    if live:
        yield str(live["url"])
        return
    url, process = ensure_server()
    try:
        yield url
    finally:
        stop_server(process)


def _seconds_of_day_since(stamp: str, started: float) -> float:
    day = datetime.fromtimestamp(started).date()
    moment = datetime.combine(day, datetime.strptime(stamp, "%H:%M:%S.%f").time())
    return moment.timestamp() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "startup.json")
    arguments = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rf-startup-"))
    isolated_environment(scratch, RF_PORT=str(free_port()), RF_PREFECT_PORT=str(free_port()))
    os.environ.pop("RF_EPHEMERAL", None)
    (scratch / "prefect-home").mkdir(parents=True, exist_ok=True)
    try:
        print("warm-up (builds the tiny models, starts the services) ...", flush=True)
        demo_run("startup-warm-up")
        cold: list[dict[str, Any]] = []
        warm: list[dict[str, Any]] = []
        ephemeral: list[dict[str, Any]] = []
        for index in range(arguments.repeats):
            rf("down", "--force")
            cold.append(demo_run(f"startup-cold-{index}"))
            print(f"cold {index}: {cold[-1]['to_first_chunk_s']:.1f} s  {cold[-1]['phases_s']}", flush=True)
        for index in range(arguments.repeats):
            warm.append(demo_run(f"startup-warm-{index}"))
            print(f"warm {index}: {warm[-1]['to_first_chunk_s']:.1f} s  {warm[-1]['phases_s']}", flush=True)
        rf("down", "--force")
        for index in range(arguments.repeats):
            ephemeral.append(demo_run(f"startup-ephemeral-{index}", "--ephemeral"))
            print(f"ephemeral {index}: {ephemeral[-1]['to_first_chunk_s']:.1f} s  {ephemeral[-1]['phases_s']}",
                  flush=True)  # fmt: skip
    finally:
        rf("down", "--force")
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "cold_median_s": statistics.median(run["to_first_chunk_s"] for run in cold),
        "warm_median_s": statistics.median(run["to_first_chunk_s"] for run in warm),
        "ephemeral_median_s": statistics.median(run["to_first_chunk_s"] for run in ephemeral),
        "cold": cold,
        "warm": warm,
        "ephemeral": ephemeral,
    }
    results["warm_vs_ephemeral"] = results["warm_median_s"] / results["ephemeral_median_s"]
    results["cold_vs_ephemeral"] = results["cold_median_s"] / results["ephemeral_median_s"]
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(results, indent=1))
    print(f"to the first chunk, median: warm (services up) {results['warm_median_s']:.1f} s "
          f"({results['warm_vs_ephemeral']:.2f}x ephemeral), cold (services started by the demo) "
          f"{results['cold_median_s']:.1f} s ({results['cold_vs_ephemeral']:.2f}x), ephemeral (temporary servers) "
          f"{results['ephemeral_median_s']:.1f} s; written to {arguments.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
