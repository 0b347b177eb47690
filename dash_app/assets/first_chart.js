/* The first chart, drawn from the figure the page's HTML carries (dash_app/page_shell.py) while Dash's scripts
   still load. It sits where the dashboard's chart of the same metric will be, and goes once that chart is drawn
   (or once the page has no such chart). A picture: no hover, no zoom. */
(function () {
  "use strict";

  const GIVE_UP_MS = 20000;
  const source = document.getElementById("first-chart-figure");
  const holder = document.getElementById("first-chart-preview");
  if (!source || !holder || !window.Plotly) {
    return;
  }
  const shown = JSON.parse(source.textContent);
  const started = Date.now();

  // Until Dash builds the page, the chart cell's place is estimated as dashboard.css lays it out: the first cell
  // of a grid of columns at least 520 px wide, below the top bar.
  const page = document.documentElement.clientWidth;
  const inner = page - 2 * 19; // .rf-page's side padding
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

  // Plotted, with or without curves (the URL's ticks may show none): either way the picture has had its use.
  function drawn(graph) {
    return Boolean(graph && graph._fullLayout && graph.querySelector(".main-svg"));
  }

  const watch = setInterval(function () {
    const cell = document.getElementById(shown.chart);
    const charts = document.getElementById("charts");
    const graph = cell ? cell.querySelector(".js-plotly-plot") : null;
    if (drawn(graph) || (charts && !cell) || Date.now() - started > GIVE_UP_MS) {
      clearInterval(watch);
      holder.remove();
      return;
    }
    if (cell) {
      const box = cell.getBoundingClientRect();
      holder.style.left = box.left + window.scrollX + "px";
      holder.style.top = box.top + window.scrollY + "px";
    }
  }, 25);
})();
