"""Keeps the benchmarks working: their smoke modes, run as a user would (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_smoke(script: str, tmp_path: Path, timeout: float = 600, extra: tuple[str, ...] = ()) -> Any:
    """Run `script --smoke --out FILE` from the project root; return the JSON it wrote."""
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [sys.executable, script, "--smoke", "--out", str(out), *extra],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_orchestration_benchmark_smoke(tmp_path):
    results = run_smoke("bench/orchestration.py", tmp_path, extra=("--policy", "noop"))
    figures = results["figures"]
    assert figures["chunks"] == 4  # 2 runs x 2 chunks, every one recorded in the store
    assert 0 < figures["utilisation"]["overall"] <= 1
    # Prefect's side, counted through its API: the fit's flow run, and a task run per chunk.
    assert results["prefect_api"]["flow_runs"] >= 1 and results["prefect_api"]["task_runs"] >= 4
    assert results["settings"]["policies"] == [{"template": "noop"}] and results["ops"]["sent"] == {}


def test_swapping_benchmark_smoke(tmp_path):
    figures = run_smoke("bench/swapping.py", tmp_path)
    assert {case["through"] for case in figures["swap"].values()} == {"/dev/shm", "disk"}
    assert all(case["swaps"] == 3 and case["median_swap_fraction"] > 0 for case in figures["swap"].values())
    assert figures["vs_hf_trainer"]["median_ratio"] > 0
    assert figures["memory_8_lora_runs"]["runs_warm"] == 8
    assert figures["memory_8_lora_runs"]["base_models_loaded"] == 1  # 8 LoRA runs share one base copy


def test_flood_benchmark_smoke(tmp_path):
    """Concurrent op submissions from several processes: each valid op recorded once and applied in order."""
    figures = run_smoke("bench/flood.py", tmp_path)
    assert figures["violations"] == []
    assert figures["ops_sent"] == 40 and 0 < figures["accepted"] < 40
    assert figures["read_latency_during_flood"]["count"] > 0


def test_dashboard_benchmark_smoke(tmp_path):
    [case] = run_smoke("bench/dashboard.py", tmp_path, timeout=300)["cases"]
    assert case["runs"] == 2 and case["refresh"]["requests"] == 7
    assert all(case["refresh"][kind]["median_ms"] > 0 for kind in ("static", "live", "table"))


@pytest.mark.slow  # 2 minutes on CI's 2 cores; the analysis it feeds is tested on its own (test_head_to_head_analysis)
def test_head_to_head_benchmark_smoke(tmp_path):
    """Ground truth, the time-sliced engine alone and with the ASHA and optuna templates, and HF Trainer on 4 tiny
    configs; Ray Tune is left out (it lives in the benchmark's own environment, not the project's)."""
    results = run_smoke("bench/head_to_head.py", tmp_path, extra=("--contestants", "engine,asha,optuna,hf"))
    assert set(results["contestants"]) == {"engine", "asha", "optuna", "hf"} and results["task"]["configs"] == 4
    optuna = results["contestants"]["optuna"]
    assert optuna["runs"] == 16 and optuna["clones"] == 12  # 4 sampled first, 12 replacements: the trial budget
    # Time-sliced training ends exactly where straight-through training does.
    assert results["ground_truth"]["max_abs_diff_vs_time_sliced_finals"] == 0.0
    engine = results["contestants"]["engine"]
    assert engine["configs_without_signal"] == 0 and engine["time_to_target_seconds"] is not None
    assert engine["best_eval_loss"] <= results["target"]["value"]
    assert results["sequential"]["median"]["time_to_target_seconds"] > 0
    assert 0 < results["engine_overheads"]["engine"]["slot_utilisation"] <= 1


def test_sft_vs_trl_benchmark_smoke(tmp_path):
    results = run_smoke("bench/sft_vs_trl.py", tmp_path)
    assert results["tokens"]["engine"] == results["tokens"]["trl"] > 0  # both train on the same tokens
    assert results["ratio_engine_over_trl"] > 0
    assert len(results["losses"]["engine"]) == len(results["losses"]["trl"]) > 0
    assert results["eval_cost"]["subset"]["eval_rows"] < results["eval_cost"]["all"]["eval_rows"]


def test_dpo_vs_trl_benchmark_smoke(tmp_path):
    results = run_smoke("bench/dpo_vs_trl.py", tmp_path)
    assert results["steps"]["engine"] == results["steps"]["trl"] == results["steps"]["engine_4_chunks_swapped"] > 0
    assert results["ratio_engine_over_trl"] > 0 and results["swap_seconds_per_chunk"] > 0
    # The same data, model and settings: both start at the reference, where the DPO loss is log 2.
    assert abs(results["losses"]["engine"][0] - results["losses"]["trl"][0]) < 1e-4
    assert results["losses"]["engine"] == results["losses"]["engine_4_chunks_swapped"]


def test_grpo_vs_trl_benchmark_smoke(tmp_path):
    results = run_smoke("bench/grpo_vs_trl.py", tmp_path)
    assert results["steps"]["engine"] == results["steps"]["trl"] == 4  # 8 prompts, 2 per step
    assert results["ratio_engine_over_trl"] > 0
    assert len(results["rewards"]["engine"]) == len(results["rewards"]["trl"]) == 4


@pytest.mark.slow
def test_scale_benchmark_smoke(tmp_path):
    results = run_smoke("bench/scale.py", tmp_path)
    (case,) = results["orchestration"]
    assert case["runs"] == 10 and case["chunks"] > 0 and case["plan_per_decision"]["count"] == case["boundaries"]
    assert case["ops_sent"] > 0 and case["dashboard_refresh"]["count"] > 0
    memory = results["worker_memory"]["resident_mib_after_runs"]
    assert set(memory) == {"0", "2", "10"} and all(mib > 0 for mib in memory.values())
