"""The dashboard's view state and liveness in headless Chromium, against a real `rf server` on a store written
through rf_core.control (no training: curves grow by metric rows sent through the API, as a fit sends them).

Zoom survives refreshes and new points, the hover names each varying knob on its own line, Esc closes the IC Ops
panel, the URL restores the view, and a page whose server is gone says so and refuses ops visibly. The server is
stopped by the last test. Screenshots go to test-artifacts/dashboard/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rf_core import paths
from rf_core.client import RFClient
from rf_core.control import ops
from rf_core.control.store import DuckDBStore
from tests.dashboard_sample import more_points, seed_experiment
from tests.e2e.browser.chromium import PROJECT_ROOT, VIEWPORT, needs_chromium, shot, wait_until, watched_page

EXPERIMENT = "view"
POINTS = 300

pytestmark = needs_chromium


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, home: Path) -> None:
        self.process, self.url, self.home = process, url, home
        self.client = RFClient(url)
        self.last_step = POINTS

    def grow(self, run_id: int, steps: int = 40) -> None:
        """Run `run_id` logs `steps` more points, sent as a fit sends them."""
        new_steps = np.arange(self.last_step + 1, self.last_step + 1 + steps)
        self.last_step += steps
        self.client.log_metrics(uuid.uuid4().hex, more_points(EXPERIMENT, run_id, new_steps))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("dashboard-view") / "home"
    home.mkdir()
    store = DuckDBStore(paths.db_path(home))
    seed_experiment(store, EXPERIMENT, runs=4, points=POINTS, ranks=(4, 8))
    seed_experiment(store, "other", runs=2, points=50)
    store.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", "0"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(home.parent / "server.log").open("wb"),
    )
    try:
        wait_until(lambda: paths.server_info_path(home).exists() or process.poll() is not None, 60, "server start")
        assert process.poll() is None
        yield Server(process, json.loads(paths.server_info_path(home).read_text())["url"], home)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(15)


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    with watched_page(browser) as page:
        yield page


def graph_selector(metric: str, experiment: str = EXPERIMENT) -> str:
    """The chart's plot, once the page shows `experiment` (a graph's id names the experiment it was drawn for)."""
    return f"""[id='chart-{metric}'] [id*='"experiment":"{experiment}"'] .js-plotly-plot"""


def open_view(page: Any, server: Server, query: str = f"?experiment={EXPERIMENT}") -> None:
    """The page, once its charts are drawn and then its runs table filled (the table waits for the charts)."""
    page.goto(f"{server.url}/{query}")
    page.wait_for_function(
        "(selector) => { const gd = document.querySelector(selector); return gd && gd.data && gd.data.length; }",
        arg=graph_selector("train_loss"),
    )
    page.wait_for_selector("#runs-grid .ag-row[row-id='1'] [col-id='ic_ops']")


def x_range(page: Any, metric: str = "train_loss") -> list[float]:
    return page.evaluate("(s) => document.querySelector(s)._fullLayout.xaxis.range.slice()", graph_selector(metric))


def x_title(page: Any, metric: str = "train_loss") -> str:
    return page.evaluate("(s) => document.querySelector(s).layout.xaxis.title.text", graph_selector(metric))


def points_of(page: Any, run_id: int, metric: str = "train_loss") -> int:
    return page.evaluate(
        "([s, name]) => document.querySelector(s)._fullData.find(trace => trace.name === name).x.length",
        [graph_selector(metric), f"run {run_id}"],
    )


def drag_zoom(page: Any, metric: str = "train_loss") -> None:
    page.locator(graph_selector(metric)).scroll_into_view_if_needed()  # (a tick in the table scrolls it away)
    box = page.locator(f"{graph_selector(metric)} .nsewdrag").first.bounding_box()
    left, top = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
    page.mouse.move(left, top)
    page.mouse.down()
    page.mouse.move(left + box["width"] * 0.25, top + box["height"] * 0.3, steps=8)
    page.mouse.up()


def test_a_drag_zoom_survives_refreshes_and_new_points(page: Any, server: Server) -> None:
    open_view(page, server)
    full = x_range(page)
    drag_zoom(page)
    zoomed = x_range(page)
    assert zoomed[1] - zoomed[0] < 0.5 * (full[1] - full[0])
    page.wait_for_timeout(4500)  # two refresh ticks with nothing new
    assert x_range(page) == zoomed
    before = points_of(page, 1)
    server.grow(1)
    wait_until(lambda: points_of(page, 1) > before, 15, "run 1's new points on the chart")
    page.wait_for_timeout(2500)
    assert x_range(page) == zoomed
    shot(page, "view-01-zoom-kept")
    # The chart's own lin/log switch changes its y axis only: the zoom on x stays.
    page.locator("#chart-train_loss .rf-y-scale input[value='log']").check()
    wait_until(
        lambda: (
            page.evaluate("(s) => document.querySelector(s)._fullLayout.yaxis.type", graph_selector("train_loss"))
            == "log"
        ),
        10,
        "a log y axis",
    )
    assert x_range(page) == zoomed
    page.dblclick(f"{graph_selector('train_loss')} .nsewdrag")  # Plotly's reset: the whole range again
    wait_until(lambda: x_range(page)[1] >= server.last_step - 1, 10, "the zoom reset to every point")


def test_the_hover_names_each_varying_knob_on_its_own_line(page: Any, server: Server) -> None:
    open_view(page, server)
    selector = graph_selector("learning_rate")
    page.wait_for_function(
        "(s) => { const gd = document.querySelector(s); return gd && gd._fullData && "
        "gd._fullData.some(trace => trace.name === 'run 2'); }",
        arg=selector,
    )
    # Plotly's own hover call draws the label a mouse would (a mouse can miss under load, as the page redraws).
    hover = page.locator(f"{selector} .hoverlayer .hovertext")
    wait_until(
        lambda: page.evaluate(
            """(s) => { const gd = document.querySelector(s);
                const curve = gd._fullData.findIndex(trace => trace.name === 'run 2');
                window.Plotly.Fx.hover(gd, [{curveNumber: curve, pointNumber: 10}]);
                return gd.querySelectorAll('.hoverlayer .hovertext').length; }""",
            selector,
        ),
        10,
        "the hover label",
    )
    # An SVG text: one <tspan class="line"> per line of the hover.
    lines = hover.first.evaluate("node => [...node.querySelectorAll('tspan.line')].map(line => line.textContent)")
    assert "run 2" in lines[0]
    assert any(line.startswith("learning_rate=") for line in lines) and "r=8" in lines
    assert not any("<br>" in line for line in lines)
    shot(page, "view-02-hover")


def test_esc_closes_the_ic_ops_panel_and_the_url_restores_the_view(page: Any, server: Server) -> None:
    open_view(page, server)
    page.locator("#runs-grid .ag-row[row-id='3'] [col-id='ic_ops']").first.click()
    page.wait_for_selector("#ic-panel", state="visible")
    page.wait_for_function("() => window.location.search.includes('run=3')")
    page.keyboard.press("Escape")
    page.wait_for_selector("#ic-panel", state="hidden")
    page.wait_for_function("() => !window.location.search.includes('run=')")

    # The view goes into the URL; a reload of a shared link brings it back: experiment, open run, smoothing.
    page.goto(f"{server.url}/?experiment=other")
    wait_until(lambda: "other" in page.inner_text("#header"), 20, "the other experiment")
    page.goto(f"{server.url}/?experiment={EXPERIMENT}&run=2&smoothing=0.6")
    page.wait_for_function("() => document.querySelector('#panel-title')?.innerText === 'Run 2'")
    assert EXPERIMENT in page.inner_text("#header")
    wait_until(
        lambda: "run 1 (raw)" in page.evaluate("(s) => document.querySelector(s).data.map(t => t.name)",
                                               graph_selector("train_loss")),
        20,
        "the smoothed curves over the raw ones",
    )  # fmt: skip
    assert page.evaluate("() => window.location.search") == f"?experiment={EXPERIMENT}&run=2&smoothing=0.6"
    page.reload()
    page.wait_for_function("() => document.querySelector('#panel-title')?.innerText === 'Run 2'")
    shot(page, "view-03-url-restored")

    # The x axis, the ticked runs and a chart's zoom go into the URL too, and come back with it.
    page.keyboard.press("Escape")
    page.locator("#x-axis input[value='relative']").check()
    page.locator("#runs-grid .ag-row[row-id='3'] .ag-selection-checkbox input").first.check()
    wait_until(lambda: curve_runs(page) == [3], 10, "run 3's curve alone")
    wait_until(lambda: x_title(page) == "minutes since the run's first step", 10, "x in minutes")
    drag_zoom(page)
    zoomed = x_range(page)
    page.wait_for_function("() => window.location.search.includes('zoom=train_loss')")
    shared = page.url
    assert "x=relative" in shared and "runs=3" in shared
    page.goto(shared)
    wait_until(lambda: curve_runs(page) == [3], 20, "the link's ticked run alone")
    assert x_title(page) == "minutes since the run's first step"
    restored = x_range(page)
    assert restored == pytest.approx(zoomed, rel=1e-4)

    # Each chart's y scale, where it is not its metric's default, goes into the URL and comes back with it.
    page.locator("#chart-train_loss .rf-y-scale input[value='log']").check()
    page.locator("#chart-learning_rate .rf-y-scale input[value='linear']").check()
    page.wait_for_function("() => window.location.search.includes('y=')")
    shared = page.url
    assert "train_loss%3Alog" in shared and "learning_rate%3Alinear" in shared
    page.goto(shared)
    wait_until(lambda: y_type(page, "train_loss") == "log" and y_type(page, "learning_rate") == "linear", 20,
               "the link's y scales")  # fmt: skip
    assert page.locator("#chart-train_loss .rf-y-scale input[value='log']").is_checked()
    assert x_range(page) == pytest.approx(zoomed, rel=1e-4)
    shot(page, "view-04-y-scales-restored")


def y_type(page: Any, metric: str) -> str | None:
    return page.evaluate(
        "(s) => { const gd = document.querySelector(s); return gd && gd._fullLayout && gd._fullLayout.yaxis.type; }",
        graph_selector(metric),
    )


def test_the_first_curves_come_with_the_page_itself(browser: Any, server: Server) -> None:
    """The charts are drawn from the page's layout: with every callback request held back, the URL's experiment
    shows its curves, on the URL's scales and ticks (so first paint waits on no callback round trip)."""
    with watched_page(browser) as page:
        fetched: list[str] = []
        page.on("request", lambda request: fetched.append(request.url))
        page.route("**/_dash-update-component", lambda route: route.abort())
        page.goto(f"{server.url}/?experiment={EXPERIMENT}&runs=2,3&y=train_loss:log")
        page.wait_for_function(
            "(s) => { const gd = document.querySelector(s); return gd && gd.data && gd.data.length; }",
            arg=graph_selector("train_loss"),
        )
        assert curve_runs(page) == [2, 3]
        assert y_type(page, "train_loss") == "log" and y_type(page, "learning_rate") == "log"
        shot(page, "view-08-first-curves-without-callbacks")
        # The page's plotly.js is the partial bundle from its assets, not Dash's 4.8 MB full one.
        assert any("plotly-rf.min.js" in url for url in fetched)
        assert not any(url.split("?")[0].endswith("/plotly.min.js") for url in fetched)
        page.unroute("**/_dash-update-component")


def test_the_page_s_html_draws_the_first_chart_before_dash_s_scripts_and_gives_way_to_it(
    browser: Any, server: Server
) -> None:
    """With none of Dash's scripts loaded, the page's HTML still draws the first chart (a picture: the URL's runs
    on its y scale); on a normal load the picture goes once the dashboard's own chart is drawn where it stood."""
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.route("**/_dash-component-suites/**", lambda route: route.abort())
        page.goto(f"{server.url}/?experiment={EXPERIMENT}&runs=2,3&y=train_loss:log")
        page.wait_for_function("window.rfFirstChartPaintedAt !== undefined")
        names = page.evaluate("() => document.getElementById('first-chart-preview').data.map(trace => trace.name)")
        assert sorted(names) == ["run 2", "run 3"]
        assert page.evaluate("() => document.getElementById('first-chart-preview')._fullLayout.yaxis.type") == "log"
        assert page.locator("#first-chart-preview .scatterlayer .trace").count() == 2
        shot(page, "view-09-first-chart-picture-without-dash-scripts")
    finally:
        page.close()

    with watched_page(browser) as page:
        page.goto(f"{server.url}/?experiment={EXPERIMENT}")
        page.wait_for_function("window.rfFirstChartPaintedAt !== undefined")
        page.wait_for_selector(graph_selector("train_loss") + " .scatterlayer .trace")
        page.wait_for_selector("#first-chart-preview", state="detached")
        assert sorted(curve_runs(page)) == [1, 2, 3, 4]
        assert page.locator(".js-plotly-plot").filter(has=page.locator(".scatterlayer")).count() >= 3
        shot(page, "view-10-first-chart-picture-gave-way")


def test_hovering_a_curve_brings_its_row_into_view_and_flashes_it(page: Any, server: Server) -> None:
    open_view(page, server)
    # AG Grid's flash is a class on the row's cells for about a second: note every row that gets it.
    page.evaluate(
        """() => { window.flashedRows = new Set();
            new MutationObserver(changes => changes.forEach(change => {
                const cell = change.target;
                if (cell.className && String(cell.className).includes('ag-cell-data-changed')) {
                    window.flashedRows.add(cell.closest('.ag-row').getAttribute('row-id'));
                }
            })).observe(document.querySelector('#runs-grid'), {subtree: true, attributes: true,
                                                               attributeFilter: ['class']}); }"""
    )
    # A real mouse on one of run 3's points (Plotly sends no hover event for its own programmatic hover). The
    # page may redraw under it while loaded: the mouse comes back until the row flashes.
    selector = graph_selector("train_loss")
    page.locator(selector).scroll_into_view_if_needed()

    def hover_run_3() -> bool:
        point = page.evaluate(
            """(s) => { const gd = document.querySelector(s);
                const trace = gd._fullData.find(trace => trace.name === 'run 3');
                const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
                const index = Math.floor(trace.x.length / 2);
                return {x: box.left + gd._fullLayout.xaxis.l2p(trace.x[index]),
                        y: box.top + gd._fullLayout.yaxis.l2p(trace.y[index])}; }""",
            selector,
        )
        page.mouse.move(point["x"] - 3, point["y"])
        page.mouse.move(point["x"], point["y"], steps=3)
        page.wait_for_timeout(400)
        return page.evaluate("() => window.flashedRows.has('3')")

    wait_until(hover_run_3, 15, "run 3's row to flash")
    assert len(page.evaluate("() => [...window.flashedRows]")) < 4  # the hovered run's row, not every row
    assert page.locator("#runs-grid .ag-row[row-id='3']").first.is_visible()
    shot(page, "view-09-hover-flashes-the-row")


def grid_ticks(page: Any) -> set[int]:
    ids = page.eval_on_selector_all(
        "#runs-grid .ag-center-cols-container .ag-row.ag-row-selected",
        "rows => rows.map(r => r.getAttribute('row-id'))",
    )
    return {int(row_id) for row_id in ids}


def curve_runs(page: Any, metric: str = "train_loss") -> list[int]:
    names = page.evaluate(
        "(s) => { const gd = document.querySelector(s); return gd && gd.data ? gd.data.map(t => t.name) : []; }",
        graph_selector(metric),
    )
    return sorted(int(name.split()[1]) for name in names if "raw" not in name)


def test_the_table_s_ticks_and_filters_decide_which_curves_show(page: Any, server: Server) -> None:
    open_view(page, server)
    wait_until(lambda: curve_runs(page) == [1, 2, 3, 4], 20, "every run's curve")
    assert "rf-run-ongoing" in page.locator("#runs-grid .ag-row[row-id='2'] [col-id='status']").first.get_attribute(
        "class"
    )  # the status is coloured as in the lineage
    page.locator("#runs-grid .ag-row[row-id='2'] .ag-selection-checkbox input").first.check()
    wait_until(lambda: curve_runs(page) == [2], 20, "run 2's curve alone")
    wait_until(lambda: curve_runs(page, "eval_loss") == [2], 20, "run 2 alone on every chart")
    shot(page, "view-05-ticked-run")
    page.locator("#runs-grid .ag-row[row-id='2'] .ag-selection-checkbox input").first.uncheck()
    wait_until(lambda: curve_runs(page) == [1, 2, 3, 4], 20, "every run's curve again")


def test_the_sweep_views_draw_the_knobs_against_the_metric_and_a_point_opens_its_run(page: Any, server: Server) -> None:
    open_view(page, server)
    page.check("#sweep-show input")  # drawn when asked for
    parcoords = "#sweep-parcoords .js-plotly-plot"
    page.wait_for_function("(s) => { const gd = document.querySelector(s); return gd && gd.data && gd.data.length; }",
                           arg=parcoords)  # fmt: skip
    labels = page.evaluate("(s) => document.querySelector(s).data[0].dimensions.map(d => d.label)", parcoords)
    assert labels == ["r", "log10 learning_rate", "best eval_loss"]
    assert page.evaluate("(s) => document.querySelector(s).layout.meta.run_ids", parcoords) == [1, 2, 3, 4]
    scatter = "#sweep-scatter .js-plotly-plot"
    page.wait_for_function("(s) => { const gd = document.querySelector(s); return gd && gd._fullData && "
                           "gd._fullData.length; }", arg=scatter)  # fmt: skip
    page.locator("#sweep").scroll_into_view_if_needed()
    position = page.evaluate(
        """(selector) => {
            const gd = document.querySelector(selector);
            const trace = gd._fullData[0];
            const index = trace.customdata.indexOf(3);
            const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
            return {x: box.left + gd._fullLayout.xaxis.c2p(trace.x[index]),
                    y: box.top + gd._fullLayout.yaxis.c2p(trace.y[index])};
        }""",
        scatter,
    )
    page.mouse.move(position["x"], position["y"])
    page.wait_for_timeout(300)
    page.mouse.click(position["x"], position["y"])
    page.wait_for_function("() => document.querySelector('#panel-title')?.innerText === 'Run 3'")
    shot(page, "view-06-sweep")
    page.keyboard.press("Escape")

    # A line of the parallel coordinates clicked opens its run. Plotly finds the line under the mouse by WebGL
    # picking, which headless Chromium here (no GPU) does not give: the hover is the event Plotly's parcoords emits
    # for a line (its index, no points; dcc.Graph's own handler used to throw on it), then a real click.
    page.locator(parcoords).hover(position={"x": 300, "y": 120})
    page.evaluate(
        "(s) => document.querySelector(s).emit('plotly_hover', {x: 300, y: 120, clientX: 300, clientY: 120, "
        "dataIndex: 0, curveNumber: 1})",
        parcoords,
    )  # line 1 is run 2 (layout.meta.run_ids)
    page.locator(parcoords).click(position={"x": 300, "y": 120})
    page.wait_for_function("() => document.querySelector('#panel-title')?.innerText === 'Run 2'")
    page.keyboard.press("Escape")

    # Brushing an axis of the parallel coordinates ticks the runs inside it: every view follows; clearing it
    # unticks them. (Plotly's restyle is what a drag on the axis does.)
    brush = "(range) => window.Plotly.restyle(document.querySelector('#sweep-parcoords .js-plotly-plot'), " \
            "{'dimensions[1].constraintrange': range})"  # fmt: skip
    page.evaluate(brush, [[-2.8, -1.9]])  # log10 learning_rate: runs 3 (2.2e-3) and 4 (1e-2)
    wait_until(lambda: curve_runs(page) == [3, 4], 10, "the brushed runs' curves only")
    assert grid_ticks(page) == {3, 4}
    page.evaluate(brush, None)
    wait_until(lambda: curve_runs(page) == [1, 2, 3, 4], 10, "every curve again")


def test_a_run_s_page_opens_from_the_table_and_the_panel_and_compares_configs(page: Any, server: Server) -> None:
    open_view(page, server)
    page.locator("#runs-grid .ag-row[row-id='2'] [col-id='run'] a").first.click()
    page.wait_for_selector("#run-page #run-title")
    assert page.url.endswith(f"/run/{EXPERIMENT}/2") and page.is_hidden("#dashboard-page")
    assert page.inner_text("#run-title").startswith("Run 2")
    assert json.loads(page.inner_text("#run-config"))["r"] == 8
    assert "an initial run: pick a run to compare with" in page.inner_text("#run-page")
    page.click("#run-compare")
    page.locator("#run-page").get_by_text("run 1", exact=True).click()
    page.wait_for_selector("#run-diff")
    diff = page.inner_text("#run-diff")
    assert "learning_rate" in diff and "r\t8\t4" in diff  # run 2 has r=8, run 1 r=4
    page.wait_for_selector("#run-page .rf-chart .js-plotly-plot")  # its curves
    shot(page, "view-07-run-page")
    back = page.locator("#run-page a.rf-back").first
    assert back.inner_text() == f"← experiment {EXPERIMENT}"
    assert back.get_attribute("href") == f"/?experiment={EXPERIMENT}&run=2"
    page.goto(f"{server.url}{back.get_attribute('href')}")
    page.wait_for_selector("#ic-panel", state="visible", timeout=40_000)  # the dashboard, the run's panel open
    assert page.inner_text("#panel-title") == "Run 2"
    assert page.get_attribute("#panel-run-page", "href") == f"/run/{EXPERIMENT}/2"
    page.keyboard.press("Escape")


def test_a_dark_page_for_a_dark_browser_and_a_toast_when_a_run_fails(browser: Any, server: Server) -> None:
    page = browser.new_page(viewport={"width": 1500, "height": 1000}, color_scheme="dark")
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        open_view(page, server)
        background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(21, 23, 27)"
        assert page.evaluate("() => document.body.dataset.agThemeMode") == "dark"
        page.wait_for_timeout(2500)  # the page has looked once: what happens next is news
        server.client.fail_run(EXPERIMENT, 4, "CUDA out of memory at step 12")
        toast = page.locator(".rf-toast-bad", has_text="run 4 failed: CUDA out of memory at step 12")
        toast.wait_for()
        shot(page, "view-10-dark-and-toast")
    finally:
        page.close()
    assert errors == []


def test_a_page_whose_server_is_gone_says_so_and_refuses_ops(page: Any, server: Server) -> None:
    open_view(page, server)
    wait_until(lambda: page.get_attribute("#liveness", "data-state") == "live", 10, "the page to say live")
    page.locator("#runs-grid .ag-row[row-id='1'] [col-id='ic_ops']").first.click()
    page.wait_for_selector("#ic-panel", state="visible")
    server.stop()
    wait_until(lambda: page.get_attribute("#liveness", "data-state") == "down", 10, "the page to say disconnected")
    assert "disconnected" in page.inner_text("#liveness")
    page.get_by_role("button", name="Delete", exact=True).click()
    page.wait_for_selector("#op-offline")
    assert "Not sent: the rf server cannot be reached" in page.inner_text("#op-offline")
    assert "nothing was queued" in page.inner_text("#op-offline")
    shot(page, "view-04-disconnected")
    store = DuckDBStore(paths.db_path(server.home))  # the server is gone: its file is free to read
    try:
        assert ops.list_ops(store, EXPERIMENT) == []
    finally:
        store.close()
