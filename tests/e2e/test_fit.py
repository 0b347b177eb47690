"""End to end through the real parts: an `rf server` process, the Prefect fit flow, slot worker processes,
real LoRA training, and IC Ops typed into the real `rf` CLI while chunks are in flight."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rf_core import paths
from rf_core.client import RFClient
from rf_core.errors import InvalidRequest
from rf_core.planner import FitLoop
from rf_core.training.checkpoints import init_checkpoint_path, load_checkpoint, step_checkpoint_path
from rf_core.training.staging import default_staging_root, staged_path
from rf_core.training.worker import STEP_DELAY_ENV
from tests.e2e_experiment import MODEL_CACHE_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "e2e"


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def rf_server(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.setenv(STEP_DELAY_ENV, "0.4")
    process = subprocess.Popen(
        [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", "0"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not paths.server_info_path(home).exists():
        assert process.poll() is None, "rf server exited during start-up"
        assert time.monotonic() < deadline, "rf server did not start"
        time.sleep(0.1)
    url = json.loads(paths.server_info_path(home).read_text())["url"]
    yield home, url
    process.terminate()
    process.wait(15)


def rf(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RF_SERVER_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "rf_cli.main", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )


class Steerer(threading.Thread):
    """Plays the user: watches the experiment and types IC Ops into the CLI at the right moments."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.client = RFClient(url)
        self.tmp_path = tmp_path
        self.accepted: dict[str, subprocess.CompletedProcess[str]] = {}
        self.rejected: dict[str, tuple[subprocess.CompletedProcess[str], int, int]] = {}
        self.streamed_mid_chunk = False
        self.run_1_when_resumed: dict[str, Any] = {}
        self.run_1_chunks_started_when_resumed = -1
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            self._steer()
        except Exception as exc:  # surfaced by the test's assertions
            self.errors.append(repr(exc))

    def _reject(self, label: str, *args: str) -> None:
        before = len(self.client.list_ops(EXPERIMENT))
        result = rf(self.url, *args)
        self.rejected[label] = (result, before, len(self.client.list_ops(EXPERIMENT)))

    def _steer(self) -> None:
        while not self.stop_event.is_set():
            try:
                runs = {r["run_id"]: r for r in self.client.list_runs(EXPERIMENT, include_deleted=True)}
            except Exception:
                time.sleep(0.1)
                continue
            self._check_streaming()
            if "stop" not in self.accepted and runs.get(1, {}).get("chunks_done", 0) >= 1:
                self.accepted["stop"] = rf(self.url, "stop", EXPERIMENT, "1")
                self._reject("second stop", "stop", EXPERIMENT, "1")
                self._reject("resume ongoing", "resume", EXPERIMENT, "3")
            if "clone" not in self.accepted and runs.get(2, {}).get("chunks_done", 0) >= 1:
                self.accepted["clone"] = rf(
                    self.url, "clone", EXPERIMENT, "2", "--set", "learning_rate=3e-4", "--warm-start"
                )
                self._reject("warm clone other r", "clone", EXPERIMENT, "2", "--set", "r=8", "--warm-start")
                self._reject("unknown key", "clone", EXPERIMENT, "2", "--set", "learnin_rate=0.1")
                bad = self.tmp_path / "bad.json"
                bad.write_text('{"learning_rate": 0.1,')
                self._reject("malformed json", "clone", EXPERIMENT, "2", "--config", str(bad))
                self._reject(
                    "range low > high", "clone", EXPERIMENT, "2", "--set",
                    'learning_rate={"$range": {"low": 0.2, "high": 0.1}}',
                )  # fmt: skip
            others_done = all(runs.get(r, {}).get("status") == "Completed" for r in (2, 3, 4))
            if "resume" not in self.accepted and others_done and runs[1]["status"] == "Stopped":
                # Every other run is done: the fit now waits idle for an op, and a Resume wakes it.
                self.run_1_when_resumed = runs[1]
                timeline = self.client.timeline(EXPERIMENT)
                self.run_1_chunks_started_when_resumed = sum(entry["run_id"] == 1 for entry in timeline)
                self.accepted["resume"] = rf(self.url, "resume", EXPERIMENT, "1")
            time.sleep(0.1)

    def _check_streaming(self) -> None:
        if self.streamed_mid_chunk:
            return
        for entry in self.client.timeline(EXPERIMENT):
            if entry["end"] is None:
                rows = self.client.get_metrics(EXPERIMENT, run_ids=[entry["run_id"]], names=["train_loss"])
                still_open = any(e["id"] == entry["id"] and e["end"] is None for e in self.client.timeline(EXPERIMENT))
                if still_open and any(row["chunk"] == entry["chunk"] for row in rows):
                    self.streamed_mid_chunk = True


def test_fit_flow_with_ops_from_the_cli(prefect_harness, rf_server, tmp_path):
    from flows.fit import rf_fit

    home, url = rf_server
    steerer = Steerer(url, tmp_path)
    steerer.start()
    try:
        rf_fit(EXPERIMENT, entrypoint="tests.e2e_experiment:spec", cpu_slots=2, idle_timeout=6, server_url=url)
    finally:
        steerer.stop_event.set()
        steerer.join(10)
    client = RFClient(url)
    assert steerer.errors == []

    # Every op typed was either accepted (exit 0) or rejected with its reason, adding no op row.
    for label, result in steerer.accepted.items():
        assert result.returncode == 0, (label, result.stderr)
    # A second stop meets either the pending stop or, if the boundary came first, the Stopped run.
    expected_reasons = {
        "second stop": r"already be stopped by op \d+|cannot stop run 1: it is Stopped",
        "resume ongoing": "cannot resume run 3: it is (Ongoing|New)",
        "warm clone other r": "r differs",
        "unknown key": "learnin_rate",
        "malformed json": "JSON",
        "range low > high": "low",
    }
    assert set(steerer.rejected) == set(expected_reasons)
    for label, (result, before, after) in steerer.rejected.items():
        assert result.returncode != 0, label
        assert re.search(expected_reasons[label], result.stderr), (label, result.stderr)
        assert after == before, f"{label}: a rejected op added a row"

    runs = {run["run_id"]: run for run in client.list_runs(EXPERIMENT, include_deleted=True)}
    timeline = client.timeline(EXPERIMENT)

    # Run 1 stopped at a chunk boundary, having finished every chunk it started; resumed from the idle fit, it
    # trained its remaining chunks.
    stopped = steerer.run_1_when_resumed
    assert stopped["status"] == "Stopped"
    assert 1 <= stopped["chunks_done"] == steerer.run_1_chunks_started_when_resumed < 4
    assert runs[1]["status"] == "Completed" and runs[1]["chunks_done"] == 4
    assert [entry["outcome"] for entry in timeline if entry["run_id"] == 1] == ["ok"] * 3 + ["completed"]

    # The warm clone of run 2 records its lineage and starts from the parent's weights at that step.
    clone_id = max(runs)
    clone = runs[clone_id]
    assert clone_id == 4
    assert (clone["parent_id"], clone["warm_start"], clone["source"]) == (2, "weights", "cli")
    assert clone["config"]["learning_rate"] == 3e-4
    assert clone["status"] == "Completed"
    assert runs[2]["status"] == runs[3]["status"] == "Completed"
    parent_state = load_checkpoint(step_checkpoint_path(paths.run_dir(EXPERIMENT, 2, home), clone["parent_step"]))
    clone_start = load_checkpoint(init_checkpoint_path(paths.run_dir(EXPERIMENT, clone_id, home)))
    assert clone["parent_step"] > 0
    assert parent_state["trainable"].keys() == clone_start["trainable"].keys()
    for key, tensor in parent_state["trainable"].items():
        assert torch.equal(tensor, clone_start["trainable"][key]), key

    # Every run that trained left loadable exports of its latest and best chunk, listed with the run.
    for run in runs.values():
        assert Path(run["export_latest"], "adapter_model.safetensors").is_file(), run
        assert Path(run["export_best"], "adapter_model.safetensors").is_file(), run
        assert run["best_step"] is not None and run["best_value"] is not None

    # Every trained chunk has its metric rows, and some arrived while their chunk was still training.
    metrics = client.get_metrics(EXPERIMENT)
    for entry in timeline:
        rows = [m for m in metrics if m["run_id"] == entry["run_id"] and m["chunk"] == entry["chunk"]]
        assert {m["name"] for m in rows} >= {"train_loss", "learning_rate", "eval_loss"}, entry
        assert sum(m["name"] == "train_loss" for m in rows) == 3, entry  # 96 samples / batch 8 / 4 chunks
    assert steerer.streamed_mid_chunk

    # The ops log shows each accepted op and what became of it.
    ops = {op["kind"]: op for op in client.list_ops(EXPERIMENT)}
    assert ops["stop"]["status"] == "applied" and ops["stop"]["source"] == "cli"
    assert ops["resume"]["status"] == "applied"
    assert ops["clone"]["status"] == "applied"
    assert ops["clone"]["result"]["created_run_ids"] == [clone_id]
    assert client.get_experiment(EXPERIMENT)["status"] == "finished"


def test_run_fit_from_python_with_notebook_functions(prefect_harness, tmp_path, monkeypatch):
    """`Experiment.run_fit` with functions defined in place (sent to workers by cloudpickle) and a temporary
    server; a run whose model cannot be built fails alone, with its reason, while the other completes."""
    from rf_core import Experiment, List
    from tests import e2e_experiment

    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    broken_name = "no-such-model"

    def create_model_fn(config: dict) -> tuple:
        if config["model_name_or_path"] == broken_name:
            raise FileNotFoundError(f"model folder {broken_name!r} does not exist")
        return e2e_experiment.create_model_fn(config)

    data = e2e_experiment.spec()
    snapshot = Experiment("notebook").run_fit(
        {"model_name_or_path": List(["rf-tiny-llama", broken_name]), "r": 4, "max_length": 32},
        create_model_fn,
        data.train_dataset[:48],
        data.eval_dataset,
        num_chunks=3,
        seed=3,
        keep_checkpoints=1,
        cpu_slots=1,
        idle_timeout=1,
    )
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert runs[1]["status"] == "Completed" and runs[1]["chunks_done"] == 3
    assert runs[1]["latest_metric"] is not None
    # Retention: only the newest chunk checkpoint stays; the staging area holds nothing once the fit is over.
    checkpoints = paths.run_dir("notebook", 1, tmp_path / "home") / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == [Path(runs[1]["checkpoint"]).name]
    staging_root = default_staging_root()
    assert staging_root is None or not staged_path(staging_root, checkpoints).exists()
    assert runs[2]["status"] == "Failed" and runs[2]["chunks_done"] == 0
    assert broken_name in runs[2]["error"]
    # The temporary server went away with the fit.
    assert not paths.server_info_path(tmp_path / "home").exists()


def test_runs_moved_between_workers_in_a_real_fit_end_bitwise_as_trained_straight_through(
    prefect_harness, tmp_path, monkeypatch
):
    """Exactness through every real part: Prefect, two slot worker processes, the store server, state handed
    between workers through the staging area. A run's final weights equal the same config trained straight
    through (one chunk per epoch) in this process with the workers' thread count."""
    from rf_core import Experiment
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.control import timeline
    from rf_core.control.store import DuckDBStore
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer
    from tests import e2e_experiment

    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    early_plans: list[set[int]] = []  # what each planning step was told is still evaluating on a free slot
    plan = FitLoop.plan

    def observed_plan(loop: FitLoop, in_flight: Any, ended: Any = (), finishing: Any = ()) -> Any:
        early_plans.append(set(finishing))
        return plan(loop, in_flight, ended, finishing)

    monkeypatch.setattr(FitLoop, "plan", observed_plan)
    data = e2e_experiment.spec()
    snapshot = Experiment("exact").run_fit(
        data.config_group, e2e_experiment.create_model_fn, data.train_dataset, data.eval_dataset,
        num_chunks=4, seed=data.seed, cpu_slots=2, idle_timeout=1,
    )  # fmt: skip
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert all(run["status"] == "Completed" for run in runs.values())
    store = DuckDBStore(paths.db_path(tmp_path / "home"))  # the fit's temporary server is gone
    try:
        entries = timeline.timeline(store, "exact")
        slots_per_run = {run_id: {entry["slot"] for entry in entries if entry["run_id"] == run_id} for run_id in runs}
    finally:
        store.close()
    assert any(len(slots) == 2 for slots in slots_per_run.values()), slots_per_run  # some run changed workers
    attempts = [(entry["run_id"], entry["chunk"]) for entry in entries]
    assert len(attempts) == len(set(attempts)), attempts  # every chunk trained once: none abandoned and redone
    assert {entry["outcome"] for entry in entries} <= {"ok", "completed"}
    # Some slots were planned while their chunk evaluated (the run still on them left alone), through the real loop,
    # Prefect and workers; the timeline shows when the workers began and ended each chunk: one at a time per slot.
    assert any(finishing for finishing in early_plans), early_plans
    on_slot = {slot: sorted((e for e in entries if e["slot"] == slot), key=lambda e: e["start"]) for slot in (0, 1)}
    pairs = [pair for chunks in on_slot.values() for pair in zip(chunks, chunks[1:], strict=False)]
    assert all(earlier["end"] <= later["start"] for earlier, later in pairs)
    threads = max(1, (os.cpu_count() or 1) // 2)  # what the fit gave each of its two slot workers
    trainer = SlotTrainer(e2e_experiment.create_model_fn, data.train_dataset, None, num_threads=threads)
    for run_id, run in runs.items():
        config = normalize_config(run["config"])
        for chunk in plan_chunks(len(data.train_dataset), config, 1):
            task = TrainTask("reference", run_id, config, chunk, str(tmp_path / f"ref-{run_id}"), seed=data.seed)
            reference = trainer.train(task, lambda rows: None)
            assert reference.status != "failed", reference.traceback
        trainer.flush()
        got = load_checkpoint(run["checkpoint"])["trainable"]
        want = load_checkpoint(reference.checkpoint)["trainable"]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), f"run {run_id} differs"
    trainer.close()


def test_run_fit_with_a_policy_object_defined_in_place(prefect_harness, tmp_path, monkeypatch):
    """A Policy written in a notebook, attached with `run_fit(policies=[...])`, acts at chunk boundaries."""
    from rf_core import Experiment, List
    from rf_core.control import ops
    from rf_core.control.store import DuckDBStore
    from rf_core.policies import ExperimentSnapshot, Policy, PolicyOp, Stop
    from tests import e2e_experiment

    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)

    class StopTheSlowLearner(Policy):
        name = "stop-slow-learner"

        def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
            return [
                Stop(run.run_id, "the smallest learning rate")
                for run in snapshot.trainable()
                if run.config["learning_rate"] == 1e-5 and run.chunks_done >= 1
            ]

    data = e2e_experiment.spec()
    snapshot = Experiment("policy-object").run_fit(
        {"model_name_or_path": "rf-tiny-llama", "learning_rate": List([1e-5, 1e-3]), "r": 4, "max_length": 32},
        e2e_experiment.create_model_fn, data.train_dataset[:48], data.eval_dataset,
        num_chunks=3, seed=3, policies=[StopTheSlowLearner()], cpu_slots=1, idle_timeout=1,
    )  # fmt: skip
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert runs[1]["status"] == "Stopped" and 1 <= runs[1]["chunks_done"] < 3
    assert runs[2]["status"] == "Completed"
    store = DuckDBStore(paths.db_path(tmp_path / "home"))
    try:
        (stop,) = ops.list_ops(store, "policy-object")
    finally:
        store.close()
    assert (stop["kind"], stop["run_id"], stop["status"]) == ("stop", 1, "applied")
    assert stop["source"] == "policy:stop-slow-learner"


def test_successive_halving_on_two_real_slots_finishes_the_best_run(prefect_harness, tmp_path, monkeypatch):
    """The case that used to stop every run: run 4 is slow and holds rung 1 open while the others train on, and
    run 3 improves after rung 1 eliminated it. The rung 2 ranking must not see run 3: run 1 finishes."""
    from rf_core import Experiment, List, evaluation_context
    from rf_core.control import decisions
    from rf_core.control.store import DuckDBStore
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    curves = {1: [1.0] * 4, 2: [2.0] * 4, 3: [3.0, 0.5, 0.5, 0.5], 4: [4.0] * 4}

    def scripted(model, tokenizer, eval_examples) -> dict:  # the engine's form: learns its run and chunk
        context = evaluation_context()
        time.sleep(6.0 if (context.run_id, context.chunk_index) == (4, 0) else 1.0)
        return {"scripted": curves[context.run_id][context.chunk_index]}

    data = e2e_experiment.spec()
    config = {"model_name_or_path": "rf-tiny-llama", "r": 4, "max_length": 32, "per_device_train_batch_size": 8,
              "learning_rate": List([1e-3, 2e-3, 3e-3, 4e-3]), "compute_metrics": scripted}  # fmt: skip
    snapshot = Experiment("halving").run_fit(
        config, e2e_experiment.create_model_fn, data.train_dataset[:48], data.eval_dataset[:4], num_chunks=4,
        metric="scripted", mode="min", cpu_slots=2, idle_timeout=1,
        policies=[{"template": "successive-halving", "params": {"eta": 2, "min_chunks": 1}}],
    )  # fmt: skip
    statuses = {run["run_id"]: run["status"] for run in snapshot["runs"]}
    assert statuses == {1: "Completed", 2: "Stopped", 3: "Stopped", 4: "Stopped"}, snapshot["runs"]
    store = DuckDBStore(paths.db_path(home))
    try:
        recorded = decisions.list_policy_decisions(store, "halving")
    finally:
        store.close()
    verdicts = sorted((row["boundary"], row["run_id"], row["kind"], row["status"]) for row in recorded)
    assert verdicts == [
        (1, 1, "promote", "noted"), (1, 2, "promote", "noted"), (1, 3, "stop", "submitted"),
        (1, 4, "stop", "submitted"), (2, 1, "promote", "noted"), (2, 2, "stop", "submitted"),
    ]  # fmt: skip


def test_optuna_search_replaces_ended_runs_with_the_samplers_configs_in_a_real_fit(
    prefect_harness, tmp_path, monkeypatch
):
    """OptunaSearch starts two runs; the optuna policy replaces each run that ends with a sampled config (a
    Clone-Modify with its reason in the ops log) until four trials exist."""
    from rf_core import Experiment, OptunaSearch, Range
    from rf_core.control import ops
    from rf_core.control.store import DuckDBStore
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    search = OptunaSearch(
        {"model_name_or_path": "rf-tiny-llama", "r": 4, "max_length": 32, "per_device_train_batch_size": 8,
         "learning_rate": Range(1e-4, 1e-2, log=True)},
        num_runs=4, max_concurrent=2, pruner={"name": "median", "n_startup_trials": 1}, seed=3,
    )  # fmt: skip
    data = e2e_experiment.spec()
    snapshot = Experiment("optuna").run_fit(
        search, e2e_experiment.create_model_fn, data.train_dataset[:32], data.eval_dataset[:8], num_chunks=2,
        cpu_slots=2, idle_timeout=1, policies=[search.policy()],
    )  # fmt: skip
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert sorted(runs) == [1, 2, 3, 4], runs
    assert all(runs[i]["source"] == "policy:optuna" and runs[i]["parent_id"] in runs for i in (3, 4))
    assert all(1e-4 <= run["config"]["learning_rate"] <= 1e-2 for run in runs.values())
    assert all(run["status"] in ("Completed", "Stopped") for run in runs.values()), runs
    store = DuckDBStore(paths.db_path(home))
    try:
        clones = [op for op in ops.list_ops(store, "optuna") if op["kind"] == "clone"]
    finally:
        store.close()
    assert len(clones) == 2 and all(op["source"] == "policy:optuna" for op in clones)
    assert all("TPESampler trial" in op["payload"]["policy"]["reason"] for op in clones)


def test_multi_device_runs_gang_schedule_next_to_single_ones_with_ic_ops(prefect_harness, tmp_path, monkeypatch):
    """A 2-process DDP run (gloo, two slot workers) trains next to single-slot runs in a real fit, and a
    Clone-Modify of it onto one device (warm-started with its optimizer state) lands at a chunk boundary. The gang's
    final weights equal the same config trained by one process over the same global batch."""
    from rf_core import Experiment
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.control import timeline
    from rf_core.control.store import DuckDBStore
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.setenv(STEP_DELAY_ENV, "0.2")
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    base = {"model_name_or_path": "rf-tiny-llama", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "max_length": 32,
            "per_device_train_batch_size": 4}  # fmt: skip
    group = [
        {**base, "learning_rate": 3e-3, "num_devices": 2},
        {**base, "learning_rate": 1e-3, "gradient_accumulation_steps": 2},
        {**base, "learning_rate": 1e-2, "gradient_accumulation_steps": 2},
    ]
    clone_result: dict[str, Any] = {}

    def clone_the_gang_run_once_it_has_a_chunk() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if paths.server_info_path(home).exists():
                client = RFClient(json.loads(paths.server_info_path(home).read_text())["url"])
                try:
                    run = client.get_run("gangs", 1)
                except Exception:
                    time.sleep(0.2)
                    continue
                if run["chunks_done"] >= 1:
                    overrides = {"num_devices": 1, "gradient_accumulation_steps": 2}
                    payload = {"overrides": overrides, "warm_start": "weights+optimizer"}
                    clone_result.update(client.submit_op("gangs", "clone", 1, payload))
                    return
            time.sleep(0.2)

    steering = threading.Thread(target=clone_the_gang_run_once_it_has_a_chunk, daemon=True)
    steering.start()
    data = e2e_experiment.spec()
    snapshot = Experiment("gangs").run_fit(
        group, e2e_experiment.create_model_fn, data.train_dataset[:64], data.eval_dataset,
        num_chunks=4, seed=data.seed, cpu_slots=2, idle_timeout=1,
    )  # fmt: skip
    steering.join(5)
    assert clone_result.get("op_id"), clone_result
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert len(runs) == 4 and all(run["status"] == "Completed" for run in runs.values()), runs
    assert runs[4]["parent_id"] == 1 and runs[4]["config"]["num_devices"] == 1
    store = DuckDBStore(paths.db_path(home))
    try:
        timeline = timeline.timeline(store, "gangs")
    finally:
        store.close()
    assert {entry["outcome"] for entry in timeline if entry["run_id"] == 1} == {"ok", "completed"}

    threads = max(1, (os.cpu_count() or 1) // 2)
    trainer = SlotTrainer(e2e_experiment.create_model_fn, data.train_dataset[:64], None, num_threads=threads)
    config = normalize_config(runs[1]["config"])  # num_devices 2, trained here by one process: the same batches
    for chunk in plan_chunks(64, config, 1):
        reference = trainer.train(TrainTask("reference", 1, config, chunk, str(tmp_path / "ref"), seed=data.seed),
                                  lambda rows: None)  # fmt: skip
        assert reference.status != "failed", reference.traceback
    trainer.close()
    got = load_checkpoint(runs[1]["checkpoint"])["trainable"]
    want = load_checkpoint(reference.checkpoint)["trainable"]
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-7) for key in want)


@pytest.fixture
def api_token(monkeypatch) -> str:
    """Every request to the rf server started after this needs the token (and the test's clients send it)."""
    token = "ray-workers-token-0123456789"
    monkeypatch.setenv("RF_API_TOKEN", token)
    return token


@pytest.fixture
def ray_cluster(monkeypatch):
    """A real local Ray cluster (`ray start --head` on 127.0.0.1) with 2 CPUs: the fit joins it by address."""
    # Ray swaps 127.0.0.1 for the machine's network address unless told this is a single-machine cluster: the
    # test's traffic stays on the loopback interface.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own token authentication, as the README recommends: the cluster and the fit share the token.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    pytest.importorskip("ray", reason="the ray extra is installed by make install")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ)
    started = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_slot_workers_on_a_ray_cluster_with_ic_ops(prefect_harness, api_token, rf_server, ray_cluster, capsys):
    """The fit's slot workers are Ray actors on a local Ray cluster; they reach the token-protected rf server for
    metrics, and Stop, Resume and Clone-Modify typed into the CLI land at chunk boundaries; a clone onto 2 devices
    trains as a DDP gang of both actors."""
    from flows.fit import rf_fit

    home, url = rf_server
    client = RFClient(url)
    with pytest.raises(Exception, match="401|token"):
        RFClient(url, token="wrong-token-0123456789").list_experiments()
    typed: dict[str, subprocess.CompletedProcess[str]] = {}
    stop_watching = threading.Event()

    def steer() -> None:
        while not stop_watching.is_set():
            try:
                runs = {run["run_id"]: run for run in client.list_runs("ray")}
            except Exception:
                time.sleep(0.2)
                continue
            if "stop" not in typed and runs.get(1, {}).get("chunks_done", 0) >= 1:
                typed["stop"] = rf(url, "stop", "ray", "1")
            if "clone" not in typed and runs.get(2, {}).get("chunks_done", 0) >= 1:
                typed["clone"] = rf(url, "clone", "ray", "2", "--set", "learning_rate=3e-4", "--warm-start")
                typed["gang clone"] = rf(url, "clone", "ray", "3", "--set", "num_devices=2")
            others_done = all(runs.get(run_id, {}).get("status") == "Completed" for run_id in (2, 3, 4, 5))
            if "resume" not in typed and others_done and runs[1]["status"] == "Stopped":
                typed["resume"] = rf(url, "resume", "ray", "1")
            time.sleep(0.2)

    steering = threading.Thread(target=steer, daemon=True)
    steering.start()
    try:
        rf_fit("ray", entrypoint="tests.e2e_experiment:spec", idle_timeout=6, server_url=url,
               ray_address=ray_cluster, ray_slots=2)  # fmt: skip
    finally:
        stop_watching.set()
        steering.join(10)
    printed = capsys.readouterr().out
    assert "2 slot workers ready (cpu, cpu; 1 CPU threads each) on Ray nodes" in printed, printed[-3000:]
    assert set(typed) == {"stop", "clone", "gang clone", "resume"}
    assert all(result.returncode == 0 for result in typed.values()), {k: r.stderr for k, r in typed.items()}
    runs = {run["run_id"]: run for run in client.list_runs("ray")}
    assert all(run["status"] == "Completed" for run in runs.values()), runs
    # Clones get their ids when they are applied, at their parents' boundaries: in either order.
    clones = {run["parent_id"]: run for run in runs.values() if run["parent_id"] is not None}
    assert set(clones) == {2, 3} and {run["run_id"] for run in clones.values()} == {4, 5}
    assert clones[2]["warm_start"] == "weights" and clones[3]["config"]["num_devices"] == 2
    assert sorted((op["kind"], op["status"]) for op in client.list_ops("ray")) == [
        ("clone", "applied"), ("clone", "applied"), ("resume", "applied"), ("stop", "applied"),
    ]  # fmt: skip
    # The actors' metric batches reached the token-protected server: every chunk's steps, once each (96 samples,
    # batch 8: 12 steps; the 2-device clone's steps take 16 samples: 6 steps).
    metrics = client.get_metrics("ray", names=["train_loss"])
    for run_id, run in runs.items():
        steps = [row["step"] for row in metrics if row["run_id"] == run_id]
        assert sorted(steps) == list(range(1, 12 // run["config"]["num_devices"] + 1)), (run_id, sorted(steps))


def test_fit_rides_out_an_rf_server_killed_and_restarted(prefect_harness, rf_server, tmp_path):
    """kill -9 the rf server once chunks are being recorded; a new one starts on the same port 4 s later. The fit
    waits and goes on; the workers spool metric batches meanwhile and replay them: every step's metrics are stored
    exactly once, and every run completes. (The warnings the user sees are checked on `rf fit`'s output by the
    server kill trials in tests/e2e/test_kill_trials.py.)"""
    import signal
    import urllib.parse

    from flows.fit import rf_fit

    home, url = rf_server
    port = urllib.parse.urlsplit(url).port
    client = RFClient(url, outage_wait_s=60)
    replacement: list[subprocess.Popen[bytes]] = []
    killed_at: dict[str, Any] = {}

    def kill_and_restart_the_server() -> None:
        deadline = time.monotonic() + 180
        runs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if any(experiment["name"] == "restart" for experiment in client.list_experiments()):
                runs = client.list_runs("restart")
                if any(run["chunks_done"] >= 1 for run in runs):
                    break
            time.sleep(0.2)
        killed_at["chunks_done"] = sum(run["chunks_done"] for run in runs)
        os.kill(int(json.loads(paths.server_info_path(home).read_text())["pid"]), signal.SIGKILL)
        time.sleep(4)
        replacement.append(subprocess.Popen(
            [sys.executable, "-m", "dash_app.server", "--rf-home", str(home), "--port", str(port)],
            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip

    chaos = threading.Thread(target=kill_and_restart_the_server, daemon=True)
    chaos.start()
    try:
        rf_fit("restart", entrypoint="tests.e2e_experiment:spec", cpu_slots=2, idle_timeout=2, server_url=url)
        chaos.join(10)
        assert killed_at and killed_at["chunks_done"] < 12, killed_at  # killed mid-fit, not after it
        runs = client.list_runs("restart")
        assert [run["status"] for run in runs] == ["Completed"] * 3
        rows = client.get_metrics("restart", names=["train_loss", "eval_loss"])
        keys = [(row["run_id"], row["name"], row["step"]) for row in rows]
        assert len(keys) == len(set(keys)), "a metric row was stored twice"
        for run in runs:
            steps = sorted(step for run_id, name, step in keys if run_id == run["run_id"] and name == "train_loss")
            assert steps == list(range(1, 13)), (run["run_id"], steps)
            evals = sorted(step for run_id, name, step in keys if run_id == run["run_id"] and name == "eval_loss")
            assert evals == [3, 6, 9, 12], (run["run_id"], evals)
    finally:
        for process in replacement:
            process.terminate()
            process.wait(15)


def test_a_fit_whose_every_run_cannot_be_planned_fails_them_and_ends(prefect_harness, rf_server):
    # 96 examples at batch 8 are 12 steps an epoch: 500 chunks an epoch cannot be planned. The fit used to sleep
    # forever here; now each run fails through the fail-run route, with the reason, and the fit ends.
    from flows.fit import rf_fit

    _, url = rf_server
    outcome: dict[str, Any] = {}
    fit = threading.Thread(
        target=lambda: outcome.update(
            snapshot=rf_fit(
                "unplannable",
                entrypoint="tests.e2e_experiment:spec",
                cpu_slots=1,
                idle_timeout=60,
                server_url=url,
                num_chunks=500,
            )
        ),
        daemon=True,
    )
    fit.start()
    fit.join(timeout=240)
    assert not fit.is_alive(), "the fit did not end although no run can train"
    runs = outcome["snapshot"]["runs"]
    assert runs and all(run["status"] == "Failed" and run["ended_by"] == "failed" for run in runs)
    assert all("cannot split run" in run["error"] and "500" in run["error"] for run in runs), runs
    assert RFClient(url).timeline("unplannable") == []  # no chunk was faked to record the failure


def test_run_fit_refuses_data_it_cannot_train_on_before_anything_starts(prefect_harness, tmp_path, monkeypatch):
    from rf_core import Experiment
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}]  # a turn without content
    data = e2e_experiment.spec()
    with pytest.raises(ValueError, match=r"train_dataset row 48 has messages message 1 \(assistant\) without"):
        Experiment("chat").run_fit(
            {"model_name_or_path": "rf-tiny-llama"},
            e2e_experiment.create_model_fn,
            data.train_dataset[:48] + chat,
            data.eval_dataset,
            num_chunks=2,
            cpu_slots=1,
        )
    assert not paths.db_path(home).exists() and not paths.server_info_path(home).exists()  # no server, no store


def test_a_fit_on_conversational_data_from_a_datasets_dataset(prefect_harness, tmp_path, monkeypatch):
    """TRL's conversational formats, as a `datasets.Dataset`, through a real fit: `messages` rows to train on, and
    `prompt`/`completion` message lists to evaluate on, rendered with the tiny model's chat template."""
    import datasets

    from rf_core import Experiment
    from tests import e2e_experiment

    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()

    def turn(i: int) -> tuple[dict[str, str], dict[str, str]]:
        return {"role": "user", "content": f"item {i}?"}, {"role": "assistant", "content": " ".join(words[i % 8 :])}

    train = datasets.Dataset.from_list([{"messages": list(turn(i))} for i in range(32)])
    evaluation = datasets.Dataset.from_list(
        [{"prompt": [turn(i)[0]], "completion": [turn(i)[1]]} for i in range(100, 108)]
    )
    config = {"model_name_or_path": "rf-tiny-llama", "r": 4, "max_length": 48, "per_device_train_batch_size": 8}
    snapshot = Experiment("chat").run_fit(
        # The newer knobs in a real fit too: precision and memory, transformers 4's warm-up ratio, PEFT's names,
        # HF's logged loss; fp16 on these CPU slots fails with the reason, and the others train on.
        [
            {**config, "logging_steps": 2},
            {**config, "bf16": True, "gradient_checkpointing": True, "warmup_ratio": 0.5, "bias": "none"},
            {**config, "fp16": True},
        ],
        e2e_experiment.create_model_fn,
        train,
        evaluation,
        num_chunks=2,
        cpu_slots=1,
        idle_timeout=1,
    )
    plain, mixed, half = snapshot["runs"]
    for run in (plain, mixed):
        assert run["status"] == "Completed", run.get("error")
        assert run["chunks_done"] == 2 and run["latest_metric"] is not None and run["latest_metric"] > 0
    assert mixed["config"]["bf16"] and mixed["latest_metric"] != plain["latest_metric"]
    assert half["status"] == "Failed" and "fp16=true but this fit's slots are CPUs" in half["error"]
    logged = Experiment("chat").metrics(names=["loss", "train_loss"])
    assert sorted(logged[logged["name"] == "loss"]["run_id"]) == [1, 1]  # 4 steps, logged every 2, run 1 only


def test_functions_per_config_gridded_scored_by_generation_and_switched_by_a_clone(
    prefect_harness, tmp_path, monkeypatch
):
    """Two prompt formats gridded in one experiment (functions defined in place, sent by value), scored by a
    generation-based built-in ROUGE-L; a policy clones a run mid-fit switching its format and metric by name."""
    from rf_core import Experiment, GridSearch, List
    from rf_core.control import metrics as metric_rows
    from rf_core.control.store import DuckDBStore
    from rf_core.policies import CloneModify, ExperimentSnapshot, Policy, PolicyOp
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rows = [{"question": f"item {i}?", "answer": " ".join(words[i % 8 :][:3])} for i in range(48)]

    def qa_format(row: dict) -> dict:
        return {"prompt": f"Q: {row['question']}\nA:", "completion": " " + row["answer"]}

    def chat_format(row: dict) -> dict:
        return {
            "prompt": [{"role": "user", "content": row["question"]}],
            "completion": [{"role": "assistant", "content": row["answer"]}],
        }

    def answer_words(eval_prediction) -> dict:  # HF's form, registered by name only
        predictions, references = eval_prediction
        return {"answer_words": sum(len(text.split()) for text in predictions) / len(predictions)}

    class SwitchToChat(Policy):
        name = "switch-to-chat"

        def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
            if len(snapshot.runs) > 2:
                return []
            return [
                CloneModify(
                    run.run_id, "try chat",
                    overrides={"formatting_func": "chat_format", "compute_metrics": "answer_words"},
                    warm_start="weights",
                )
                for run in snapshot.trainable()
                if run.config["formatting_func"] == "qa_format" and run.chunks_done >= 1
            ]  # fmt: skip

    config = GridSearch(
        {
            "model_name_or_path": "rf-tiny-llama", "r": 4, "max_length": 32, "per_device_train_batch_size": 8,
            "formatting_func": List([qa_format, chat_format]),
            "compute_metrics": "rougeL", "predict_with_generate": True, "generation_config": {"max_new_tokens": 4},
        }
    )  # fmt: skip
    snapshot = Experiment("formats").run_fit(
        config, e2e_experiment.create_model_fn, rows[:40], rows[40:], num_chunks=2,
        functions={"answer_words": answer_words}, metric="rougeL", mode="max",
        policies=[SwitchToChat()], cpu_slots=1, idle_timeout=1,
    )  # fmt: skip
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert [runs[i]["config"]["formatting_func"] for i in (1, 2, 3)] == ["qa_format", "chat_format", "chat_format"]
    assert runs[3]["config"]["compute_metrics"] == "answer_words" and runs[3]["parent_id"] == 1
    assert all(run["status"] == "Completed" for run in runs.values()), runs
    # The chat template's tokens make the same rows longer than max_length=32: cut, and counted per run.
    assert runs[1]["truncated_rows"] == 0 and runs[2]["truncated_rows"] == runs[3]["truncated_rows"] > 0
    store = DuckDBStore(paths.db_path(home))
    try:
        rouge = metric_rows.metrics(store, "formats", names=["rougeL"])
        answer = metric_rows.metrics(store, "formats", names=["answer_words"])
        experiment = store.get_experiment("formats")
    finally:
        store.close()
    assert {row["run_id"] for row in rouge} == {1, 2} and all(0 <= row["value"] <= 1 for row in rouge)
    assert len([row for row in rouge if row["run_id"] == 1]) == 2  # one per chunk boundary
    assert [row["run_id"] for row in answer] == [3, 3] and all(0 <= row["value"] <= 4 for row in answer)
    assert experiment["functions"] == ["answer_words", "chat_format", "qa_format"]
    best_rouge_of_run_1 = max(row["value"] for row in rouge if row["run_id"] == 1)
    assert runs[1]["best_value"] == pytest.approx(best_rouge_of_run_1)  # the experiment's metric, mode max
    # Results out, after the fit and its server are gone: a temporary server answers for the call.
    import pandas as pd

    results = Experiment("formats").results()
    assert results["run_id"].tolist() == [1, 2, 3] and results["status"].tolist() == ["Completed"] * 3
    assert results["formatting_func"].tolist() == ["qa_format", "chat_format", "chat_format"]
    assert results.loc[0, "rougeL_best"] == pytest.approx(best_rouge_of_run_1)
    assert pd.isna(results.loc[2, "rougeL_best"]) and results.loc[2, "answer_words_latest"] == answer[-1]["value"]
    points = Experiment("formats").metrics(names=["rougeL"])
    assert sorted(points["value"].tolist()) == sorted(row["value"] for row in rouge)
    written = Experiment("formats").to_parquet(tmp_path / "out")
    assert pd.read_parquet(written["results"])["run_id"].tolist() == [1, 2, 3]
    assert len(pd.read_parquet(written["metrics"])) == len(Experiment("formats").metrics())
    assert not paths.server_info_path(home).exists()  # the temporary server went with the call


def stop_run_two() -> Any:
    """A policy, as a notebook writes one, that stops run 2 once it has trained a chunk."""
    from rf_core.policies import ExperimentSnapshot, Policy, PolicyOp, Stop

    class StopRunTwo(Policy):
        name = "stop-run-2"

        def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
            run = snapshot.run(2)
            return [Stop(2, "hold it")] if run is not None and run.status == "Ongoing" else []

    return StopRunTwo()


def test_a_notebook_experiment_goes_on_with_resume_and_applies_the_ops_queued_after_its_fit(
    prefect_harness, tmp_path, monkeypatch
):
    """A fit from Python ends with a run stopped; an op queued afterwards waits; `run_fit(..., resume=True)` trains
    the experiment on with the ops applied, and without `resume` the name is refused with that hint."""
    from rf_core import Experiment, List
    from rf_core.errors import ExperimentExists
    from rf_core.server_process import ensure_server, stop_server
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)

    data = e2e_experiment.spec()
    config = {"model_name_or_path": "rf-tiny-llama", "learning_rate": List([1e-3, 3e-3]), "r": 4, "max_length": 32}
    arguments = (config, e2e_experiment.create_model_fn, data.train_dataset[:32], data.eval_dataset[:8])
    first = Experiment("notebook-resume").run_fit(*arguments, num_chunks=2, cpu_slots=1, idle_timeout=1,
                                                  policies=[stop_run_two()])  # fmt: skip
    assert [run["status"] for run in first["runs"]] == ["Completed", "Stopped"]
    url, server = ensure_server(home)  # the fit's server went with it; the user's `rf resume` finds this one
    try:
        RFClient(url).submit_op("notebook-resume", "resume", 2, source="cli")
    finally:
        stop_server(server)
    with pytest.raises(ExperimentExists, match=r"call run_fit\(\.\.\., resume=True\)"):
        Experiment("notebook-resume").run_fit(*arguments, num_chunks=2, cpu_slots=1, idle_timeout=1)
    again = Experiment("notebook-resume").run_fit(*arguments, num_chunks=2, cpu_slots=1, idle_timeout=1, resume=True)
    runs = {run["run_id"]: run for run in again["runs"]}
    assert set(runs) == {1, 2}  # the config group added no runs
    assert runs[2]["status"] == "Completed" and runs[2]["chunks_done"] == 2
    assert runs[1]["chunks_done"] == 2 and runs[1]["step"] == first["runs"][0]["step"]  # nothing trained twice


def test_rf_continue_trains_on_an_experiment_a_notebook_started(prefect_harness, tmp_path, monkeypatch):
    """The spec of a fit from in-memory functions is kept under RF_HOME (owner-only): after the fit ended, an op
    queued with `rf resume` is applied by `rf continue` in another process, which loads that spec."""
    from prefect.settings import PREFECT_API_URL

    from rf_core import Experiment, List
    from rf_core.kept_specs import spec_path
    from rf_core.server_process import ensure_server, stop_server
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)

    def create_model_fn(config: dict) -> tuple:  # defined here, as in a notebook: kept by value
        return e2e_experiment.create_model_fn(config)

    data = e2e_experiment.spec()
    config = {"model_name_or_path": "rf-tiny-llama", "learning_rate": List([1e-3, 3e-3]), "r": 4, "max_length": 32}
    first = Experiment("kept").run_fit(
        config, create_model_fn, data.train_dataset[:32], data.eval_dataset[:8],
        num_chunks=2, cpu_slots=1, idle_timeout=1, policies=[stop_run_two()],
    )  # fmt: skip
    assert [run["status"] for run in first["runs"]] == ["Completed", "Stopped"]
    kept = spec_path("kept", home)
    assert kept.is_file() and kept.stat().st_mode & 0o077 == 0  # the owner's only
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(PROJECT_ROOT)}
    url, server = ensure_server(home)
    try:
        resumed = subprocess.run([sys.executable, "-m", "rf_cli.main", "resume", "kept", "2"], env=environment,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        continued = subprocess.run(
            [sys.executable, "-m", "rf_cli.main", "continue", "kept", "--cpu-slots", "1", "--idle-timeout", "1"],
            env=environment, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert continued.returncode == 0, continued.stdout[-2000:] + continued.stderr[-3000:]
        runs = {run["run_id"]: run for run in RFClient(url).experiment_snapshot("kept")["runs"]}
    finally:
        stop_server(server)
    assert runs[2]["status"] == "Completed" and runs[2]["chunks_done"] == 2
    assert runs[1]["step"] == first["runs"][0]["step"]  # the completed run trained no further
    kept.write_bytes(b"\x80\x04\x95")  # a damaged or foreign file: refused with the reason, nothing started
    refused = subprocess.run([sys.executable, "-m", "rf_cli.main", "continue", "kept"], env=environment,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr


def test_an_ended_experiment_continues_from_the_server_as_the_dashboard_does(prefect_harness, rf_server):
    home, url = rf_server
    client = RFClient(url)
    fitted = rf(url, "fit", "continued", "--entrypoint", "tests.e2e_experiment:spec", "--cpu-slots", "1",
                "--chunks", "2", "--max-configs", "1", "--idle-timeout", "0")  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert client.get_experiment("continued")["status"] == "finished"
    first_epoch = client.get_experiment("continued")["fit_epoch"]
    clone = client.submit_op("continued", "clone", 1, {"overrides": {"learning_rate": 3e-4}}, who="tester")
    # What the page's Continue experiment button calls: the same engine function, through the server.
    started = client.continue_experiment("continued")
    with pytest.raises(InvalidRequest, match="has a fit running already"):
        client.continue_experiment("continued")  # a second click starts no second fit
    deadline = time.monotonic() + 300
    while client.get_experiment("continued")["status"] != "finished":
        assert time.monotonic() < deadline, Path(started["log"]).read_text()[-3000:]
        time.sleep(0.5)
    (op,) = [op for op in client.list_ops("continued") if op["op_id"] == clone["op_id"]]
    assert op["status"] == "applied", op
    runs = {run["run_id"]: run for run in client.list_runs("continued")}
    assert runs[2]["status"] == "Completed" and runs[2]["parent_id"] == 1
    assert client.get_experiment("continued")["fit_epoch"] > first_epoch  # a new fit (reserved, then taken)
    assert "experiment 'continued' continues" in Path(started["log"]).read_text()


def test_boundaries_evaluated_beside_training_in_a_real_fit_store_the_numbers_evaluated_between_chunks(
    prefect_harness, tmp_path, monkeypatch
):
    """Through Prefect, a slot worker process and the store server: with a core to spare, a slot trains its next
    chunk while the last one's boundary is evaluated in a thread of its own. Every eval_loss row is stored, equal to
    the one the same chunks give evaluated between chunks in this process, and so are the runs' best chunks."""
    from rf_core import Experiment
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.control import timeline
    from rf_core.control.store import DuckDBStore
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer
    from tests import e2e_experiment

    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    data = e2e_experiment.spec()
    snapshot = Experiment("beside").run_fit(
        data.config_group, e2e_experiment.create_model_fn, data.train_dataset, data.eval_dataset,
        num_chunks=4, seed=data.seed, cpu_slots=1, cpu_threads_per_slot=1, evaluate_beside_training=True,
        idle_timeout=1,
    )  # fmt: skip
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert all(run["status"] == "Completed" for run in runs.values())
    store = DuckDBStore(paths.db_path(tmp_path / "home"))  # the fit's temporary server is gone
    try:
        entries = sorted(timeline.timeline(store, "beside"), key=lambda entry: entry["start"])
        stored = store.query_metrics("beside", names=["eval_loss"])
    finally:
        store.close()
    # A chunk's entry ends when its answer left the worker: after the next chunk began, for those evaluated beside.
    assert any(earlier["end"] > later["start"] for earlier, later in zip(entries, entries[1:], strict=False))
    trainer = SlotTrainer(e2e_experiment.create_model_fn, data.train_dataset, data.eval_dataset, num_threads=1)
    for run_id, run in runs.items():
        config = normalize_config(run["config"])
        emitted: list[dict[str, Any]] = []
        for chunk in plan_chunks(len(data.train_dataset), config, 4):
            task = TrainTask("reference", run_id, config, chunk, str(tmp_path / f"ref-{run_id}"), seed=data.seed)
            reference = trainer.train(task, emitted.extend)
            assert reference.status != "failed", reference.traceback
        expected = [(row["step"], row["value"]) for row in emitted if row["name"] == "eval_loss"]
        got = [(row["step"], row["value"]) for row in stored if row["run_id"] == run_id]
        assert len(got) == 4 and got == expected, run_id
        assert (run["best_step"], run["best_value"]) == (reference.best_step, reference.best_value)
    trainer.close()


def test_a_fit_refuses_a_thread_count_below_one_before_anything_starts(tmp_path, monkeypatch):
    from flows.fit import rf_fit

    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="cpu_threads_per_slot must be >= 1, got 0"):
        rf_fit.fn("refused", entrypoint="tests.e2e_experiment:spec", cpu_threads_per_slot=0)
    assert not (tmp_path / "home").exists()  # no server, store or experiment was made
