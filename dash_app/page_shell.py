"""The page's HTML before Dash's scripts run: plotly.js ahead of them, and the first chart drawn from a figure the
HTML carries (assets/first_chart.js).

On a 2-core machine Dash's scripts take about two seconds to load, build the page and draw its first chart. The
picture drawn here shows the same curves within about a second; the dashboard's own chart replaces it once drawn.
It is a picture only (no hover, no zoom): it never outlives the scripts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from plotly.utils import PlotlyJSONEncoder

from dash_app.layout import chart_id

PLOTLY_ASSET = "plotly-rf.min.js"
FIRST_CHART_ASSET = "first_chart.js"
# Past this many curves the picture costs about what it gives, or more, since it is drawn before Dash's scripts run
# (bench/dashboard.py): at 64 runs it put the curves on screen 0.8 s earlier on a cold load, but a reload's
# interactive chart 0.3 s later for 0.3 s gained; at 256 runs it held the interactive chart back 0.4 s (0.75 s on a
# reload).
PICTURE_MAX_TRACES = 32
# Left out of the scripts Dash lists itself: the shell loads them ahead of those.
ASSETS_LOADED_FIRST = r"^(plotly-rf\.min|first_chart)\.js$"  # Dash matches it against each file's name


def shell_html(asset_url: Callable[[str], str], metric: str | None = None, figure: Any = None) -> str:
    """HTML to follow the page's app entry: plotly.js, and with a `figure`, the first chart (`metric`'s) drawn
    from it."""
    parts = []
    if metric is not None and isinstance(figure, Mapping) and len(figure.get("data") or []) <= PICTURE_MAX_TRACES:
        shown = script_safe(json.dumps({"chart": chart_id(metric), "figure": figure}, cls=PlotlyJSONEncoder))
        parts.append('<div id="first-chart-preview" class="rf-first-chart" aria-hidden="true"></div>')
        parts.append(f'<script type="application/json" id="first-chart-figure">{shown}</script>')
    parts.append(f'<script src="{asset_url(PLOTLY_ASSET)}"></script>')
    if len(parts) > 1:
        parts.append(f'<script src="{asset_url(FIRST_CHART_ASSET)}"></script>')
    return "".join(parts)


def script_safe(text: str) -> str:
    """JSON text that cannot end or change the <script> element holding it: a metric's or a run's name can hold
    "</script>" or "<!--<script>" (which makes the parser ignore the element's own end tag). JSON reads the
    escapes as the same characters."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
