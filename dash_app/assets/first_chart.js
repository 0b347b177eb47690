/* The first chart, drawn from the figure the page's HTML carries (dash_app/page_shell.py) while Dash's scripts
   still load. It sits where the dashboard's chart of the same metric will be, and goes once that chart is drawn
   (or once the page has no such chart). A picture: no hover, no zoom. */
(function () {
  "use strict";

  const GIVE_UP_MS = 20000;
  const WATCH_EVERY_MS = 40;
  const source = document.getElementById("first-chart-figure");
  const holder = document.getElementById("first-chart-preview");
  if (!holder) {
    return;
  }
  const started = Date.now();
  let shown = null;

  function dropPicture() {
    if (window.Plotly && window.Plotly.purge) {
      window.Plotly.purge(holder);
    }
    holder.remove();
  }

  // Plotted, with or without curves (the URL's ticks may show none): either way the picture has had its use.
  function drawn(graph) {
    return Boolean(graph && graph._fullLayout && graph.querySelector(".main-svg"));
  }

  // Set up before drawing: whatever happens to the drawing, the picture never outstays the page's own chart.
  let placed = null;
  const watch = setInterval(function () {
    const cell = shown ? document.getElementById(shown.chart) : null;
    const charts = document.getElementById("charts");
    const graph = cell ? cell.querySelector(".js-plotly-plot") : null;
    if (!shown || drawn(graph) || (charts && !cell) || Date.now() - started > GIVE_UP_MS) {
      clearInterval(watch);
      dropPicture();
      return;
    }
    if (cell) {
      // Over the cell while the page builds around it (the header above it fills in, and moves it down).
      const box = cell.getBoundingClientRect();
      const where = [box.left + window.scrollX, box.top + window.scrollY].join(",");
      if (where !== placed) {
        placed = where;
        holder.style.left = box.left + window.scrollX + "px";
        holder.style.top = box.top + window.scrollY + "px";
      }
    }
  }, WATCH_EVERY_MS);

  try {
    shown = JSON.parse(source.textContent);
    // Until Dash builds the page, the cell's place is estimated as dashboard.css lays it out: the first cell of a
    // grid of columns at least 520 px wide, below the top bar.
    const inner = document.documentElement.clientWidth - 2 * 19; // .rf-page's side padding
    const gap = 10;
    const columns = Math.max(1, Math.floor((inner + gap) / (520 + gap)));
    holder.style.left = "19px";
    holder.style.width = Math.floor((inner - gap * (columns - 1)) / columns) + "px";
    const layout = Object.assign({}, shown.figure.layout, { width: holder.clientWidth - 2 });
    window.Plotly.newPlot(holder, shown.figure.data, layout, { staticPlot: true, displayModeBar: false });
    // When the frame with the curves has been painted (the benchmark reads it).
    window.requestAnimationFrame(function () {
      setTimeout(function () { window.rfFirstChartPaintedAt = performance.now(); }, 0);
    });
  } catch (error) {
    shown = null; // the next watch tick removes the holder; the page's own chart comes as before
    console.warn("the first chart's picture could not be drawn:", error);
  }
})();
