"""A user's script runs a fit as written: with or without `if __name__ == "__main__":`, its top level runs once.

Slot workers are spawned processes; they must never run the user's script again (a script without the guard used to
start a fit in every worker and die). Each script here is a real `python script.py` process with a real fit through
Prefect (the session's test server), slot worker processes and real training; its model factory is a function
defined in the script itself, as in a notebook, so it reaches the workers by value.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e_experiment import MODEL_CACHE_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[2]

BODY = """
import os

from rf_core import Experiment, List
from tests import e2e_experiment

print("top level of the script ran", os.getpid(), flush=True)
data = e2e_experiment.spec()


def create_model_fn(config):
    return e2e_experiment.create_model_fn(config)

"""
FIT = """snapshot = Experiment("script").run_fit(
    {"model_name_or_path": "rf-tiny-llama", "learning_rate": List([1e-3, 3e-3]), "r": 4, "max_length": 32},
    create_model_fn, data.train_dataset[:32], data.eval_dataset[:8], num_chunks=2, seed=1, cpu_slots=2,
    idle_timeout=1,
)
print("statuses", sorted(run["status"] for run in snapshot["runs"]), flush=True)
"""
GUARDED = "if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in FIT.splitlines())


@pytest.fixture(scope="module")
def prefect_api_url():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.mark.parametrize("form", ["no guard", "guard"])
def test_a_script_runs_its_fit_and_its_top_level_once(prefect_api_url: str, tmp_path: Path, form: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(BODY + (FIT if form == "no guard" else GUARDED))
    environment = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "RF_HOME": str(tmp_path / "home"),
        MODEL_CACHE_ENV: str(tmp_path / "models"),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    environment.pop("RF_SERVER_URL", None)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    top_level = [line for line in result.stdout.splitlines() if line.startswith("top level of the script ran")]
    assert len(top_level) == 1, result.stdout[-3000:]  # not once more in each of the two slot workers
    assert "statuses ['Completed', 'Completed']" in result.stdout, result.stdout[-3000:]


def test_the_rapidfire_notebook_port_runs_with_an_ic_op_mid_fit(prefect_api_url: str, tmp_path: Path) -> None:
    """`examples/rapidfire_sft_chatqa.py`: RapidFire AI's SFT tutorial through `rf_core.compat.rapidfire`, as a
    user runs it (a chat template, two prompt formats gridded, generation-based ROUGE-L, a clone mid-fit)."""
    environment = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "RF_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    environment.pop("RF_SERVER_URL", None)
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "examples" / "rapidfire_sft_chatqa.py")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [line for line in result.stdout.splitlines() if line.startswith("run ")]
    assert runs == [
        "run 1: Completed, formatting_func=sample_formatting_function, r=8",
        "run 2: Completed, formatting_func=plain_formatting_function, r=8",
        "run 3: Completed, formatting_func=sample_formatting_function, r=32",
        "run 4: Completed, formatting_func=plain_formatting_function, r=32",
        "run 5: Completed, formatting_func=plain_formatting_function, r=8",  # the clone of run 1
    ], result.stdout[-3000:]
    assert "policy:try-the-other-format  1       weights @ step 4" in result.stderr + result.stdout
    assert "rougeL 0." in result.stderr + result.stdout  # generated answers scored at evaluated boundaries
    # (the notebook's logging_steps=2 logs HF's interval-mean "loss" too)
    metrics = "metrics ['eval_loss', 'learning_rate', 'loss', 'rougeL', 'train_loss']"
    assert metrics in result.stdout, result.stdout[-2000:]
