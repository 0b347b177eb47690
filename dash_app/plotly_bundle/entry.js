// The traces the dashboard draws: scatter (in core), bar (the device timeline, the knob importance), parcoords.
const Plotly = require("plotly.js/lib/core");

Plotly.register([require("plotly.js/lib/bar"), require("plotly.js/lib/parcoords")]);

module.exports = Plotly;
