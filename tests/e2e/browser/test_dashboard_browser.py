"""The dashboard in headless Chromium (Playwright, Debian's /usr/bin/chromium), against a real `rf server` and a
real fit: a Prefect flow process training a tiny LoRA experiment on two slot workers, steered by clicking.

Screenshots of every step go to test-artifacts/dashboard/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rf_core import paths
from rf_core.client import RFClient
from rf_core.training.worker import STEP_DELAY_ENV
from tests.e2e.browser.chromium import PROJECT_ROOT, needs_chromium, shot, wait_until, watched_page
from tests.e2e_experiment import MODEL_CACHE_ENV

EXPERIMENT = "browser"

pytestmark = needs_chromium


# -- the live system --------------------------------------------------------------------------------------


class Live:
    """The rf server, the fit process and a client, for one test module."""

    def __init__(self, home: Path, url: str, fit: subprocess.Popen[bytes]) -> None:
        self.home, self.url, self.fit = home, url, fit
        self.client = RFClient(url)

    def runs(self, include_deleted: bool = True) -> dict[int, dict[str, Any]]:
        return {run["run_id"]: run for run in self.client.list_runs(EXPERIMENT, include_deleted=include_deleted)}

    def op_count(self) -> int:
        return len(self.client.list_ops(EXPERIMENT))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("dashboard-live")
    home = root / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API", "RF_SERVER"))}
    env.update(
        RF_HOME=str(home),
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_LOGGING_LEVEL="WARNING",
        **{MODEL_CACHE_ENV: str(root / "models"), STEP_DELAY_ENV: "0.6"},
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", "0"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("wb"),
    )
    fit = None
    try:
        wait_until(lambda: paths.server_info_path(home).exists() or server.poll() is not None, 60, "server start")
        assert server.poll() is None, (root / "server.log").read_text()
        url = json.loads(paths.server_info_path(home).read_text())["url"]
        launch = (
            "from flows.fit import rf_fit; "
            f"rf_fit({EXPERIMENT!r}, entrypoint='tests.e2e.browser.dash_experiment:spec', cpu_slots=2, "
            f"idle_timeout=4, server_url={url!r})"
        )
        fit = subprocess.Popen(
            [sys.executable, "-c", launch],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=(root / "fit.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its slot workers go with it at teardown
        )
        yield Live(home, url, fit)
    finally:
        if fit is not None:
            _end_fit(fit, url)
        server.terminate()
        server.wait(15)


def _end_fit(fit: subprocess.Popen[bytes], url: str) -> None:
    """Stop every run that could still train, so the fit ends on its own; kill it if it does not."""
    client = RFClient(url)
    try:
        for run in client.list_runs(EXPERIMENT):
            if run["status"] in ("New", "Ongoing"):
                try:
                    client.submit_op(EXPERIMENT, "stop", run["run_id"])
                except Exception:  # already stopping, or finished meanwhile
                    pass
        fit.wait(60)
    except Exception:
        os.killpg(fit.pid, signal.SIGTERM)
        fit.wait(15)


# -- the browser --------------------------------------------------------------------------------------------


@pytest.fixture
def page(browser: Any, live: Live) -> Iterator[Any]:
    with watched_page(browser) as page:
        page.goto(live.url)
        yield page


def graph_selector(metric: str) -> str:
    return f"[id='chart-{metric}'] .js-plotly-plot"


def curve_runs(page: Any, metric: str = "train_loss") -> set[int]:
    """The runs that have a curve in the chart, read from the figure Plotly drew."""
    names = page.evaluate(
        "(selector) => { const gd = document.querySelector(selector);"
        " return gd && gd.data ? gd.data.map(trace => trace.name) : []; }",
        graph_selector(metric),
    )
    return {int(name.split()[1]) for name in names if name.startswith("run ") and "raw" not in name}


def click_curve(page: Any, run_id: int, metric: str = "train_loss") -> None:
    """Click the middle point of run `run_id`'s curve, where Plotly drew it."""
    position = page.evaluate(
        """([selector, name]) => {
            const gd = document.querySelector(selector);
            const index = gd._fullData.findIndex(trace => trace.name === name);
            const trace = gd._fullData[index];
            const point = Math.floor(trace.x.length / 2);
            const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
            // c2p: data to pixels, through a log axis too (the learning rate's)
            return {x: box.left + gd._fullLayout.xaxis.c2p(trace.x[point]),
                    y: box.top + gd._fullLayout.yaxis.c2p(trace.y[point])};
        }""",
        [graph_selector(metric), f"run {run_id}"],
    )
    page.mouse.move(position["x"], position["y"])
    page.wait_for_timeout(300)  # Plotly computes hover on mouse move; the click uses it
    page.mouse.click(position["x"], position["y"])


def grid_row(page: Any, run_id: int) -> Any:
    return page.locator(f"#runs-grid .ag-center-cols-container .ag-row[row-id='{run_id}']")


def grid_rows(page: Any) -> set[int]:
    ids = page.eval_on_selector_all(
        "#runs-grid .ag-center-cols-container .ag-row", "rows => rows.map(row => row.getAttribute('row-id'))"
    )
    return {int(row_id) for row_id in ids}


def open_panel_from_grid(page: Any, run_id: int) -> None:
    page.locator(f"#runs-grid .ag-row[row-id='{run_id}'] [col-id='ic_ops']").first.click()
    page.wait_for_function("(title) => document.querySelector('#panel-title').innerText === title", arg=f"Run {run_id}")


def edit_config(page: Any, **changes: Any) -> dict[str, Any]:
    config = json.loads(page.input_value("#clone-json"))
    config.update(changes)
    page.fill("#clone-json", json.dumps(config, indent=2))
    return config


def button(page: Any, name: str) -> Any:
    return page.get_by_role("button", name=name, exact=True)


# -- the tests ----------------------------------------------------------------------------------------------


def test_steering_a_live_fit_from_the_browser(page: Any, live: Live) -> None:
    # Charts appear as the runs train; a click on run 1's curve opens its IC Ops panel. (On the learning-rate
    # chart: the runs' rates differ from the first step, while their first losses coincide.)
    wait_until(lambda: {1, 2} <= curve_runs(page, "learning_rate"), 150, "curves for runs 1 and 2")
    assert live.runs()[1]["status"] in ("New", "Ongoing")
    shot(page, "01-charts")
    click_curve(page, 1, "learning_rate")
    page.wait_for_selector("#ic-panel", state="visible")
    assert page.inner_text("#panel-title") == "Run 1"
    assert json.loads(page.input_value("#clone-json"))["learning_rate"] == 1e-3
    assert button(page, "Resume").is_disabled() and button(page, "Stop").is_enabled()
    shot(page, "02-panel-from-curve")

    # Stop: the op is queued and shown pending; the run finishes its chunk, then is Stopped.
    button(page, "Stop").click()
    page.wait_for_selector("text=applies at run 1's next chunk boundary")
    result = page.inner_text("#op-result")
    stop_op = int(result.split()[1])
    page.wait_for_selector("#panel-pending")
    assert f"stop (op {stop_op})" in page.inner_text("#panel-pending")
    shot(page, "03-stop-pending")
    wait_until(lambda: page.inner_text("#panel-run-status") == "Stopped", 60, "run 1 to be Stopped")
    run_1 = live.runs()[1]
    chunks_started = [entry for entry in live.client.timeline(EXPERIMENT) if entry["run_id"] == 1]
    assert all(entry["end"] is not None for entry in chunks_started)
    assert run_1["chunks_done"] == len(chunks_started) >= 1  # the chunk in flight was finished, not cut
    assert button(page, "Resume").is_enabled() and button(page, "Stop").is_disabled()
    shot(page, "04-stopped")

    # Clone-Modify run 2 with another learning rate, warm-started: a new row with its parent, which trains.
    wait_until(lambda: live.runs()[2]["chunks_done"] >= 1, 60, "run 2's first checkpoint")
    open_panel_from_grid(page, 2)
    edit_config(page, learning_rate=5e-4)
    page.check("#warm-start input[value='weights']")
    page.wait_for_selector("#clone-count >> text=Submit creates 1 clone (warm start: weights)")
    button(page, "Submit Clone-Modify").click()
    page.wait_for_selector("text=applies at run 2's next chunk boundary")
    shot(page, "05-clone-submitted")
    warm_clone = wait_until(lambda: max(live.runs()) if max(live.runs()) > 2 else None, 60, "the clone")
    clone = live.runs()[warm_clone]
    assert (clone["parent_id"], clone["warm_start"], clone["config"]["learning_rate"]) == (2, "weights", 5e-4)
    wait_until(lambda: warm_clone in grid_rows(page), 10, "the clone's row")
    row = grid_row(page, warm_clone)
    assert row.locator("[col-id='parent']").inner_text() == "2"
    assert row.locator("[col-id='warm_start']").inner_text().startswith("weights of run 2")
    wait_until(lambda: warm_clone in curve_runs(page), 60, "the clone's curve")
    shot(page, "06-clone-trains")

    # A generator: three learning rates in one Clone-Modify make three clones, counted before Submit.
    before = set(live.runs())
    edit_config(page, learning_rate={"$list": [1e-4, 2e-4, 4e-4]})
    page.check("#warm-start input[value='off']")
    page.wait_for_selector("text=Submit creates 3 clones (warm start: off)")
    shot(page, "07-generator-preview")
    button(page, "Submit Clone-Modify").click()
    page.wait_for_selector("text=(clone ×3) queued")
    new_runs = wait_until(lambda: set(live.runs()) - before if len(set(live.runs()) - before) == 3 else None, 60,
                          "three clones")  # fmt: skip
    runs = live.runs()
    assert sorted(runs[run_id]["config"]["learning_rate"] for run_id in new_runs) == [1e-4, 2e-4, 4e-4]
    assert {runs[run_id]["parent_id"] for run_id in new_runs} == {2}
    wait_until(lambda: new_runs <= grid_rows(page), 10, "the three clones' rows")
    shot(page, "08-generator-clones")

    # Delete the warm clone: its row and curves vanish as soon as the Delete is accepted; its files stay.
    wait_until(lambda: live.runs()[warm_clone]["chunks_done"] >= 1, 60, "the clone's first checkpoint")
    open_panel_from_grid(page, warm_clone)
    button(page, "Delete").click()
    clicked = time.monotonic()
    wait_until(lambda: warm_clone not in curve_runs(page), 10, "the deleted run's curves to go")
    wait_until(lambda: warm_clone not in grid_rows(page), 10, "the deleted run's row to go")
    assert time.monotonic() - clicked < 10
    shot(page, "09-deleted")
    files = [path for path in paths.run_dir(EXPERIMENT, warm_clone, live.home).rglob("*") if path.is_file()]
    assert files, "a deleted run keeps its checkpoints"
    page.check("#show-deleted input")
    wait_until(lambda: warm_clone in grid_rows(page), 10, "the deleted run back under 'show deleted'")
    shot(page, "10-show-deleted")


def test_malformed_json_is_explained_inline_and_nothing_is_queued(page: Any, live: Live) -> None:
    wait_until(lambda: 1 in grid_rows(page), 60, "run 1's row")
    open_panel_from_grid(page, 1)
    ops_before = live.op_count()
    submit = button(page, "Submit Clone-Modify")
    page.fill("#clone-json", '{\n  "learning_rate": 0.001,\n  "r": 4,\n}')
    page.wait_for_selector("#clone-preview .rf-json-error")
    annotated = page.inner_text("#clone-preview .rf-annotated")
    # The message sits under the line with the stray comma's consequence: the closing brace on line 4.
    assert "malformed JSON at line 4" in annotated
    assert annotated.index('"r": 4,') < annotated.index("malformed JSON")
    wait_until(submit.is_disabled, 10, "Submit to wait for a valid request")

    # An invalid value is explained under its key, and Submit stays disabled: nothing can be queued.
    page.fill("#clone-json", '{\n  "learning_rate": -1,\n  "lora_alpha": 8\n}')
    page.wait_for_selector("#clone-preview .rf-annotated >> text=learning_rate=-1: must be > 0 and <= 1")
    lines = page.inner_text("#clone-preview .rf-annotated").split("\n")
    error_line = next(index for index, line in enumerate(lines) if "must be > 0" in line)
    assert '"learning_rate": -1' in lines[error_line - 1]
    assert submit.is_disabled() and page.locator("#op-result .rf-annotated").count() == 0  # written once
    shot(page, "11-invalid-config-inline")
    page.fill("#clone-json", '{\n  "learning_rate": 0.0005\n}')
    page.wait_for_selector("#clone-count")
    wait_until(submit.is_enabled, 10, "Submit enabled for a valid request")
    assert live.op_count() == ops_before
    page.keyboard.press("Escape")


def test_the_link_a_fit_prints_opens_its_experiment(page: Any, live: Live) -> None:
    client = RFClient(live.url)
    client.create_experiment("newer", [{"model_name_or_path": "rf-tiny-llama", "learning_rate": 1e-3}], num_chunks=2)
    try:
        page.goto(f"{live.url}/?experiment=newer")
        wait_until(lambda: "newer" in page.inner_text("#header"), 20, "the linked experiment's header")
        page.goto(f"{live.url}/?experiment={EXPERIMENT}")  # the older one, not the default (newest) choice
        wait_until(lambda: EXPERIMENT in page.inner_text("#header"), 20, "the linked experiment's header")
        assert "newer" not in page.inner_text("#header")
        shot(page, "12-experiment-link")
    finally:
        client.delete_experiment("newer", force=True)
