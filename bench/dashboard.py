"""Dashboard benchmark: server time of the chart refresh callback, and page load to the first chart in Chromium.

    .venv/bin/python bench/dashboard.py [--runs 8 64] [--points 20000] [--repeats 9] [--out FILE.json]
    .venv/bin/python bench/dashboard.py --smoke          # 2 runs x 500 points, no browser: a few seconds

For each run count:

1. Writes a synthetic experiment into a fresh store through rf_core.control (`tests.dashboard_sample.seed_experiment`):
   every run has `--points` minibatch-loss points, as many learning-rate points, and an eval loss per chunk.
2. Builds the real Dash app on that store and posts the chart refresh callback's request exactly as the page sends
   it on each refresh tick (all three charts), through Flask's test client: the time measured is the server's
   whole answer (Dash dispatch, reading the store, M4 downsampling, figure building, JSON encoding), without the
   network. "cold": the first request after start (it aggregates every stored point once); "static": later
   ticks with nothing new; "live": ticks after every run logged 25 more steps (written untimed, as training
   would); then the answer's size when two runs log (a fit on two slots). Each request carries what the
   previous answer stored (chart-signatures), as the page does, so a tick with nothing new is answered with no
   figure at all. The runs table's callback ("table") is timed on the same ticks.
3. Unless `--no-browser`: starts `python -m dash_app.server` on the store and opens the page in headless Chromium
   (Playwright, /usr/bin/chromium) `--page-loads` times, each in a fresh browser context (empty caches): time
   from navigation to the first curve on screen and to every run's curve on screen in the first chart (the
   picture the page's HTML draws counts once its frame is painted: dash_app/page_shell.py), and to the
   dashboard's own chart drawn with every curve ("interactive"); then reloads the page (scripts cached) and
   times the first curve and the interactive chart again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np  # noqa: E402

from dash_app.server import build_app  # noqa: E402
from rf_core import paths  # noqa: E402
from rf_core.control.store import DuckDBStore  # noqa: E402
from tests.dashboard_sample import append_points, seed_experiment  # noqa: E402

EXPERIMENT = "bench"
CHARTS = ("train_loss", "learning_rate", "eval_loss")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
TARGET_MS = 300
# Curves on screen: the dashboard's first chart, or the picture of it the page's HTML draws before Dash's scripts
# run (dash_app/page_shell.py; it marks when its frame was painted).
CURVES_ON_SCREEN = """(runs) => {
  const preview = document.getElementById("first-chart-preview");
  const painted = window.rfFirstChartPaintedAt !== undefined && preview;
  const pictured = painted ? preview.querySelectorAll(".scatterlayer .trace").length : 0;
  const gd = document.querySelector(".rf-chart .js-plotly-plot");
  return Math.max(pictured, gd ? gd.querySelectorAll(".scatterlayer .trace").length : 0) >= runs;
}"""
# The dashboard's own first chart (hover, zoom, clicks) with every run's curve.
DASH_CHART_CURVES = """(runs) => {
  const gd = document.querySelector(".rf-chart .js-plotly-plot");
  return Boolean(gd) && gd.querySelectorAll(".scatterlayer .trace").length >= runs;
}"""


GRAPH_IDS = [{"cells": 0, "experiment": EXPERIMENT, "metric": name, "type": "metric-graph"} for name in CHARTS]
FIGURES_OUTPUT = '{"cells":["ALL"],"experiment":["ALL"],"metric":["ALL"],"type":"metric-graph"}.figure'


def refresh_request(tick: int, sent: Any = None) -> dict[str, Any]:
    """The body the page posts to /_dash-update-component when the refresh interval ticks; `sent` is what the
    previous answer stored as chart-signatures (None: the page's first request)."""
    graph_ids = GRAPH_IDS
    return {
        "output": f"..{FIGURES_OUTPUT}...chart-signatures.data..",
        "outputs": [
            [{"id": graph_id, "property": "figure"} for graph_id in graph_ids],
            {"id": "chart-signatures", "property": "data"},
        ],
        "inputs": [
            [{"id": graph_id, "property": "id", "value": graph_id} for graph_id in graph_ids],
            {"id": "refresh", "property": "n_intervals", "value": tick},
            {"id": "show-deleted", "property": "value", "value": []},
            {"id": "smoothing", "property": "value", "value": 0},
            {"id": "ops-changed", "property": "data", "value": 0},
            {"id": "visible-runs", "property": "data", "value": None},
            {"id": "x-axis", "property": "value", "value": "step"},
        ],
        "changedPropIds": ["refresh.n_intervals"],
        "state": [
            {"id": "experiment-select", "property": "value", "value": EXPERIMENT},
            {"id": "chart-signatures", "property": "data", "value": sent},
            {"id": "url", "property": "search", "value": f"?experiment={EXPERIMENT}"},
            [{"id": {**graph_id, "type": "y-scale"}, "property": "value", "value": None} for graph_id in graph_ids],
            [
                {"id": {**graph_id, "type": "y-scale"}, "property": "id", "value": {**graph_id, "type": "y-scale"}}
                for graph_id in graph_ids
            ],  # fmt: skip
        ],
    }


def table_request(tick: int) -> dict[str, Any]:
    """The body the page posts for the header and runs table on each refresh tick."""
    outputs = [("header", "children"), ("continue-experiment", "style"), ("runs-grid", "rowData"),
               ("runs-grid", "columnDefs"), ("hidden-columns", "options"), ("runs-grid", "style")]  # fmt: skip
    return {
        "output": "".join(f"..{component}.{prop}.." for component, prop in outputs).replace("....", "..."),
        "outputs": [{"id": component, "property": prop} for component, prop in outputs],
        "inputs": [
            {"id": "experiment-select", "property": "value", "value": EXPERIMENT},
            {"id": "refresh", "property": "n_intervals", "value": tick},
            {"id": "show-deleted", "property": "value", "value": []},
            {"id": "ops-changed", "property": "data", "value": 0},
            {"id": "hidden-columns", "property": "value", "value": []},
            {"id": "charts-drawn", "property": "data", "value": True},
        ],
        "changedPropIds": ["refresh.n_intervals"],
        "state": [{"id": "runs-grid", "property": "columnDefs", "value": None}],
    }


def _post(client: Any, body: dict[str, Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    response = client.post("/_dash-update-component", json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"the callback answered {response.status_code}: {response.data[:500]!r}")
    return elapsed_ms, response


def _summary(timings: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(timings), 1), "max_ms": round(max(timings), 1)}


def _kept(response: Any, sent: Any) -> Any:
    """The chart signatures the page holds after `response` (an answer leaves them as they were when unchanged)."""
    return response.get_json()["response"].get("chart-signatures", {}).get("data", sent)


def time_refresh(store: DuckDBStore, runs: int, points: int, repeats: int) -> dict[str, Any]:
    """Chart refresh requests: cold (first after start), then `repeats` with no new points, then `repeats` each
    after every run logged 25 more steps (untimed), as during training."""
    client = build_app(store).server.test_client()
    cold_ms, response = _post(client, refresh_request(0))
    answer = response.get_json()["response"]
    curves = answer[json.dumps(GRAPH_IDS[0], separators=(",", ":"))]["figure"]["data"]
    if len(curves) != runs:
        raise RuntimeError(f"expected {runs} curves in the loss chart, got {len(curves)}")
    sent = answer["chart-signatures"]["data"]  # what the page keeps and sends back on the next tick
    static, live, sizes, live_sizes, table = [], [], [], [], []
    for tick in range(1, repeats + 1):
        elapsed, response = _post(client, refresh_request(tick, sent))
        static.append(elapsed)
        sizes.append(len(response.data))
        table.append(_post(client, table_request(tick))[0])
    step = points
    for tick in range(repeats + 1, 2 * repeats + 1):
        new_steps = np.arange(step + 1, step + 26)
        step += 25
        for run_id in range(1, runs + 1):
            append_points(store, EXPERIMENT, run_id, new_steps)
        elapsed, response = _post(client, refresh_request(tick, sent))
        sent = _kept(response, sent)
        live.append(elapsed)
        live_sizes.append(len(response.data))
    # As in a fit on two slots: two runs train at a time, the others' curves stand still.
    two_sizes = []
    for tick in range(2 * repeats + 1, 3 * repeats + 1):
        new_steps = np.arange(step + 1, step + 26)
        step += 25
        for run_id in (1, 2):
            append_points(store, EXPERIMENT, run_id, new_steps)
        _, response = _post(client, refresh_request(tick, sent))
        sent = _kept(response, sent)
        two_sizes.append(len(response.data))
    return {
        "cold_ms": round(cold_ms, 1),
        "static": _summary(static),
        "live": _summary(live),
        "table": _summary(table),
        "response_kb": round(statistics.median(sizes) / 1024, 1),
        "live_response_kb": round(statistics.median(live_sizes) / 1024, 1),
        "two_training_response_kb": round(statistics.median(two_sizes) / 1024, 1),
        "requests": 1 + 3 * repeats,
    }


def time_page_loads(home: Path, runs: int, loads: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    server = subprocess.Popen(
        [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", "0"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not paths.server_info_path(home).exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the rf server did not start")
            time.sleep(0.1)
        url = json.loads(paths.server_info_path(home).read_text())["url"]
        timings: dict[str, list[float]] = {
            name: []
            for name in ("first_chart", "all_curves", "interactive", "reload_first_chart", "reload_interactive")
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            for _ in range(loads):
                # A fresh context: an empty HTTP and code cache, as a first visit.
                context = browser.new_context(viewport={"width": 1500, "height": 1000})
                page = context.new_page()
                started = time.perf_counter()
                page.goto(url, wait_until="commit")  # not the load event: it waits for every script
                page.wait_for_function(CURVES_ON_SCREEN, arg=1, timeout=60_000, polling=10)
                timings["first_chart"].append((time.perf_counter() - started) * 1000)
                page.wait_for_function(CURVES_ON_SCREEN, arg=runs, timeout=60_000, polling=10)
                timings["all_curves"].append((time.perf_counter() - started) * 1000)
                page.wait_for_function(DASH_CHART_CURVES, arg=runs, timeout=60_000, polling=10)
                timings["interactive"].append((time.perf_counter() - started) * 1000)
                # A reload: scripts come from the cache, as when a user comes back to the tab.
                started = time.perf_counter()
                page.reload(wait_until="commit")
                page.wait_for_function(CURVES_ON_SCREEN, arg=1, timeout=60_000, polling=10)
                timings["reload_first_chart"].append((time.perf_counter() - started) * 1000)
                page.wait_for_function(DASH_CHART_CURVES, arg=runs, timeout=60_000, polling=10)
                timings["reload_interactive"].append((time.perf_counter() - started) * 1000)
                context.close()
            browser.close()
    finally:
        server.terminate()
        server.wait(15)
    return {**{f"{name}_ms": round(statistics.median(values)) for name, values in timings.items()}, "loads": loads}


def run_case(runs: int, points: int, repeats: int, page_loads: int, browser: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rf-dash-bench-") as folder:
        home = Path(folder)
        store = DuckDBStore(paths.db_path(home))
        started = time.perf_counter()
        seed_experiment(store, EXPERIMENT, runs=runs, points=points, num_chunks=4, chunks_done=4)
        seeded_s = time.perf_counter() - started
        try:
            case: dict[str, Any] = {"runs": runs, "points_per_run_and_metric": points, "seed_s": round(seeded_s, 1)}
            case["refresh"] = time_refresh(store, runs, points, repeats)
        finally:
            store.close()  # the server below must own the file
        if browser:
            case["page_load"] = time_page_loads(home, runs, page_loads)
    return case


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "dash": metadata.version("dash"),
        "duckdb": metadata.version("duckdb"),
        "plotly": metadata.version("plotly"),
        "chromium": _chromium_version(),
    }


def _chromium_version() -> str | None:
    if not CHROMIUM.exists():
        return None
    result = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7, help="static and live refresh requests per case")
    parser.add_argument("--page-loads", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium page-load measurement")
    parser.add_argument("--smoke", action="store_true", help="2 runs x 500 points, 3 requests, no browser")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.points, args.repeats, args.no_browser = [2], 500, 2, True
    browser = not args.no_browser and CHROMIUM.exists()
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "target_refresh_ms": TARGET_MS,
        "cases": [run_case(runs, args.points, args.repeats, args.page_loads, browser) for runs in args.runs],
    }
    for case in results["cases"]:
        refresh = case["refresh"]
        line = (
            f"{case['runs']:>3} runs x {case['points_per_run_and_metric']:,} points: chart refresh median "
            f"{refresh['live']['median_ms']} ms with new points (max {refresh['live']['max_ms']}), "
            f"{refresh['static']['median_ms']} ms without, cold {refresh['cold_ms']} ms; "
            f"answer {refresh['response_kb']} KB without new points, {refresh['live_response_kb']} KB with "
            f"({refresh['two_training_response_kb']} KB when 2 runs train); "
            f"table {refresh['table']['median_ms']} ms"
        )
        if "page_load" in case:
            load = case["page_load"]
            line += f"; page load: first chart {load['first_chart_ms']:.0f} ms"
            line += f", every curve {load['all_curves_ms']:.0f} ms, interactive {load['interactive_ms']:.0f} ms"
            line += (
                f"; reload {load['reload_first_chart_ms']:.0f} ms, interactive {load['reload_interactive_ms']:.0f} ms"
            )
        print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
