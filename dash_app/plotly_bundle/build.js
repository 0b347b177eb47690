// Builds ../assets/plotly-rf.min.js with the settings of plotly.js's own esbuild config (esbuild-config.js in its
// repository): dcc.Graph uses a window.Plotly that is already there instead of loading its 4.8 MB full bundle.
const fs = require("fs");
const path = require("path");
const esbuild = require("esbuild");
const { environmentPlugin } = require("esbuild-plugin-environment");
const { glsl } = require("esbuild-plugin-glsl");
const InlineCSSPlugin = require("esbuild-plugin-inline-css");

const version = require("plotly.js/package.json").version;
const outfile = path.join(__dirname, "..", "assets", "plotly-rf.min.js");

esbuild
  .build({
    entryPoints: [path.join(__dirname, "entry.js")],
    outfile,
    format: "iife",
    globalName: "Plotly",
    bundle: true,
    minify: true,
    sourcemap: false,
    banner: {
      js: `/* plotly.js v${version} (MIT license, Copyright Plotly, Inc.): scatter, bar and parcoords only, built by dash_app/plotly_bundle */`,
    },
    plugins: [InlineCSSPlugin(), glsl({ minify: true }), environmentPlugin({ NODE_DEBUG: false })],
    alias: { regl: "@plotly/regl", stream: "stream-browserify" },
    define: { global: "window", "define.amd": "false" },
    target: "es2016",
    logLevel: "info",
  })
  .then(() => console.log(`${outfile}: ${fs.statSync(outfile).size} bytes`))
  .catch(() => process.exit(1));
