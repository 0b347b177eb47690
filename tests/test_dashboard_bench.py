"""Keeps the dashboard benchmark working: its smoke mode, run as a user would (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_dashboard_benchmark_smoke(tmp_path):
    out = tmp_path / "dashboard.json"
    result = subprocess.run(
        [sys.executable, "bench/dashboard.py", "--smoke", "--out", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [case] = json.loads(out.read_text())["cases"]
    assert case["runs"] == 2 and case["refresh"]["requests"] == 7
    assert all(case["refresh"][kind]["median_ms"] > 0 for kind in ("static", "live", "table"))
