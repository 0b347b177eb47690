/* The page's own behaviour that must work without the server: whether the server answers, what a click does
   when it does not, the Esc key, and the URL that records what is on screen. */
(function () {
  "use strict";

  const HEALTH_EVERY_MS = 1000;
  const HEALTH_TIMEOUT_MS = 2500;
  const STALE_AFTER_S = 6; // three refresh ticks without an answer

  const state = { reachable: true, lastAnswer: Date.now(), downSince: null };
  // The run panel a loaded URL names opens once the page knows the experiment's runs; until then the URL keeps its
  // run, or a write before the panel opened would drop it and the panel would never open.
  const initialQuery = new URLSearchParams(window.location.search);
  let runToRestore = initialQuery.get("run");

  // Every callback answer the page gets is a sign of life: note when the last one came.
  const plainFetch = window.fetch.bind(window);
  window.fetch = function (resource, options) {
    const url = typeof resource === "string" ? resource : (resource && resource.url) || "";
    return plainFetch(resource, options).then(function (response) {
      if (url.indexOf("_dash-update-component") !== -1 && response.ok) {
        state.lastAnswer = Date.now();
      }
      return response;
    });
  };

  function checkHealth() {
    const controller = new AbortController();
    const timer = setTimeout(function () { controller.abort(); }, HEALTH_TIMEOUT_MS);
    plainFetch("/api/health", { cache: "no-store", signal: controller.signal })
      .then(function (response) { setReachable(response.ok); })
      .catch(function () { setReachable(false); })
      .finally(function () { clearTimeout(timer); showLiveness(); });
  }

  function setReachable(reachable) {
    if (reachable) {
      state.downSince = null;
    } else if (state.reachable || state.downSince === null) {
      state.downSince = Date.now();
    }
    state.reachable = reachable;
  }

  function secondsSince(time) {
    return Math.max(0, Math.round((Date.now() - time) / 1000));
  }

  function showLiveness() {
    const element = document.getElementById("liveness");
    if (!element) {
      return;
    }
    const age = secondsSince(state.lastAnswer);
    let text;
    let kind;
    if (!state.reachable) {
      text = "disconnected: the rf server does not answer (last updated " + age + " s ago)";
      kind = "down";
    } else if (age >= STALE_AFTER_S) {
      text = "last updated " + age + " s ago";
      kind = "stale";
    } else {
      text = "live";
      kind = "live";
    }
    if (element.textContent !== text) {
      element.textContent = text;
    }
    element.className = "rf-liveness rf-liveness-" + kind;
    element.title = "the rf server: " + text;
    element.dataset.state = kind;
  }

  // An op clicked while the server is gone would fail in the console only: refuse it where the user looks.
  document.addEventListener(
    "click",
    function (event) {
      const target = event.target instanceof Element ? event.target.closest(".rf-op, #continue-experiment") : null;
      if (!target || state.reachable) {
        return;
      }
      event.preventDefault();
      event.stopImmediatePropagation();
      const where = document.getElementById(target.id === "continue-experiment" ? "continue-result" : "op-result");
      if (where) {
        where.innerHTML = "";
        const message = document.createElement("div");
        message.className = "rf-bad";
        message.id = "op-offline";
        message.textContent =
          "Not sent: the rf server cannot be reached (since " + secondsSince(state.downSince || Date.now()) +
          " s); nothing was queued. Start it again (rf up) and retry.";
        where.appendChild(message);
      }
    },
    true
  );

  // Esc closes the IC Ops panel (it covers the right of the page).
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") {
      return;
    }
    const panel = document.getElementById("ic-panel");
    const close = document.getElementById("panel-close");
    if (panel && close && panel.style.display !== "none") {
      close.click();
    }
  });

  // The sweep's parallel coordinates: Plotly emits a line's hover with its index and no points, which dcc.Graph's
  // hover handler cannot read (it throws), and no click at all. The hovered line is kept here instead, and a click
  // on it opens its run's panel.
  let hoveredLine = null;
  function watchParallelCoordinates(event) {
    const container = event.target instanceof Element ? event.target.closest("#sweep-parcoords") : null;
    const gd = container ? container.querySelector(".js-plotly-plot") : null;
    if (!gd || !gd.emit || gd.rfLineWatch) {
      return gd;
    }
    const emit = gd.emit;
    gd.emit = function (name, data) {
      if ((name === "plotly_hover" || name === "plotly_unhover") && data && !data.points) {
        hoveredLine = name === "plotly_hover" && typeof data.curveNumber === "number" ? data.curveNumber : null;
        return undefined;
      }
      return emit.apply(this, arguments);
    };
    gd.rfLineWatch = true;
    return gd;
  }
  document.addEventListener("mousemove", watchParallelCoordinates, true);
  document.addEventListener("click", function (event) {
    const gd = watchParallelCoordinates(event);
    const runs = gd && gd.layout && gd.layout.meta ? gd.layout.meta.run_ids : null;
    if (hoveredLine === null || !runs || runs[hoveredLine] === undefined || !window.dash_clientside.set_props) {
      return;
    }
    window.dash_clientside.set_props("sweep-line", { data: { run: runs[hoveredLine], at: Date.now() } });
  });

  // The runs table fills once the first charts are drawn (or, at the latest, after CHARTS_WAIT_MS): drawn first,
  // its rows would hold the charts back (see dash_app.callbacks.refresh_runs).
  const CHARTS_WAIT_MS = 4000;
  const pageStart = Date.now();
  const chartsWatch = setInterval(function () {
    const charts = document.getElementById("charts");
    const graph = charts ? charts.querySelector(".js-plotly-plot") : null;
    // Drawn: the first chart plotted, or no chart to draw (the experiment has no metric yet).
    const cells = charts ? charts.querySelectorAll(".rf-chart").length : 0;
    const drawn = graph ? Boolean(graph._fullLayout) : Boolean(charts && charts.children.length && !cells);
    if (!window.dash_clientside || !window.dash_clientside.set_props) {
      return;
    }
    if (drawn || Date.now() - pageStart > CHARTS_WAIT_MS) {
      clearInterval(chartsWatch);
      window.dash_clientside.set_props("charts-drawn", { data: true });
    }
  }, 50);

  setInterval(checkHealth, HEALTH_EVERY_MS);

  // AG Grid's built-in theme follows the page: dark when the browser prefers it (dashboard.css does the rest).
  const darkQuery = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  function followColorScheme() {
    document.body.dataset.agThemeMode = darkQuery && darkQuery.matches ? "dark" : "light";
  }
  if (darkQuery) {
    if (document.body) {
      followColorScheme();
    } else {
      document.addEventListener("DOMContentLoaded", followColorScheme);
    }
    darkQuery.addEventListener("change", followColorScheme);
  }

  // The runs table's id cell: a link to the run's page.
  const gridComponents = (window.dashAgGridComponentFunctions = window.dashAgGridComponentFunctions || {});
  gridComponents.RunLink = function (props) {
    return React.createElement(
      "a",
      { href: props.data.page, title: "open run " + props.value + "'s page", className: "rf-run-link" },
      String(props.value)
    );
  };

  // The URL records the view (experiment, open run, smoothing, x, ticks, zoom, y scales), so a reload or a shared
  // link shows the same.
  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    rf: {
      // A curve hovered: its run's row in the table scrolls into view and flashes.
      highlight_row: function (hovers) {
        const hovered = (hovers || []).find(function (hover) { return hover && hover.points && hover.points.length; });
        const run = hovered ? hovered.points[0].customdata : null;
        const api = window.dash_ag_grid && window.dash_ag_grid.getApi ? window.dash_ag_grid.getApi("runs-grid") : null;
        if (run === null || run === undefined || !api) {
          return window.dash_clientside.no_update;
        }
        const node = api.getRowNode(String(Array.isArray(run) ? run[0] : run));
        if (node) {
          api.ensureNodeVisible(node);
          api.flashCells({ rowNodes: [node] });
        }
        return node ? node.id : null;
      },
      write_url: function (experiment, run, smoothing, xAxis, ticked, relayouts, yScales, graphIds, scaleIds, logY) {
        if (window.location.pathname.indexOf("/run/") === 0) {
          return window.dash_clientside.no_update; // a run page's URL names its run already
        }
        const params = new URLSearchParams(window.location.search);
        if (run !== null && run !== undefined) {
          runToRestore = null; // restored, or another run chosen: the page's own choice rules from here
        } else if (runToRestore !== null && experiment === initialQuery.get("experiment")) {
          run = runToRestore;
        } else {
          runToRestore = null; // another experiment was picked: the link's run is not of it
        }
        const set = function (name, value) {
          if (value === null || value === undefined || value === "" || value === 0) {
            params.delete(name);
          } else {
            params.set(name, String(value));
          }
        };
        set("experiment", experiment);
        set("run", run);
        set("smoothing", smoothing);
        set("x", xAxis === "step" ? null : xAxis);
        set("runs", (ticked || []).map(function (row) { return row.run; }).join(","));
        // Each chart's x zoom, "metric:low:high" (numbers only: a clock axis is not kept), from its last relayout.
        const zoom = new Map();
        (params.get("zoom") || "").split(";").forEach(function (item) {
          const parts = item.split(":");
          if (parts.length >= 3) {
            zoom.set(parts.slice(0, -2).join(":"), parts.slice(-2).join(":"));
          }
        });
        (relayouts || []).forEach(function (relayout, index) {
          const metric = graphIds && graphIds[index] ? graphIds[index].metric : null;
          if (!relayout || !metric) {
            return;
          }
          const low = relayout["xaxis.range[0]"];
          const high = relayout["xaxis.range[1]"];
          if (typeof low === "number" && typeof high === "number") {
            zoom.set(metric, low.toPrecision(6) + ":" + high.toPrecision(6));
          } else if (relayout["xaxis.autorange"]) {
            zoom.delete(metric);
          }
        });
        set("zoom", Array.from(zoom, function (entry) { return entry[0] + ":" + entry[1]; }).join(";"));
        // Each chart's y scale where it is not the metric's default, "metric:log" (a reload builds the page with it).
        const changed = [];
        (yScales || []).forEach(function (scale, index) {
          const metric = scaleIds && scaleIds[index] ? scaleIds[index].metric : null;
          const usual = (logY || []).indexOf(metric) !== -1 ? "log" : "linear";
          if (metric && scale && scale !== usual) {
            changed.push(metric + ":" + scale);
          }
        });
        set("y", changed.join(";"));
        const query = params.toString();
        const url = window.location.pathname + (query ? "?" + query : "");
        if (url !== window.location.pathname + window.location.search) {
          window.history.replaceState(null, "", url);
        }
        return window.dash_clientside.no_update;
      },
    },
  });
})();
