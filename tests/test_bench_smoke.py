"""Keeps the orchestration benchmark working: its smoke mode, run as a user would (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_orchestration_benchmark_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [sys.executable, "bench/orchestration.py", "--smoke", "--out", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert figures["chunks"] == 4  # 2 runs x 2 chunks, every one recorded in the store
    assert 0 < figures["utilisation"]["overall"] <= 1
