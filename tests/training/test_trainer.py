"""SlotTrainer: chunked training is bitwise the same as straight-through, warm starts, failures, metric rows.

All runs use tiny random-init models (no pretraining), 64 training examples and max_length 32, so each run is
16 optimizer steps and the whole file stays well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rf_core.chunks import plan_chunks
from rf_core.config import normalize_config
from rf_core.messages import ChunkOutcome, ChunkSpec, TrainTask, WarmStart
from rf_core.training.checkpoints import (
    CheckpointError,
    capture_rng_state,
    init_checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_path,
)
from rf_core.training.data import stdlib_sft_examples
from rf_core.training.models import ensure_pretrained, load_base_model
from rf_core.training.trainer import SlotTrainer

NUM_THREADS = 2  # bitwise equality holds for a fixed thread count
EXPERIMENT_SEED = 1234
LORA = {
    "model_name_or_path": "rf-tiny-llama",
    "use_peft": True,
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "learning_rate": 5e-3,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "num_train_epochs": 2,
    "lr_scheduler_type": "linear",
    "warmup_steps": 2,
    "max_grad_norm": 1.0,
    "max_length": 32,
    "seed": 7,
}
# GPT-2 keeps its 0.1 dropout: full fine-tuning with dropout on is the case most sensitive to RNG handling.
FULL_FT = {
    **LORA,
    "model_name_or_path": "rf-tiny-gpt2",
    "use_peft": False,
    "learning_rate": 1e-3,
    "seed": None,
}
# Same base as LORA: shares its frozen copy through a second adapter, or copies it for a full fine-tune.
LORA_ALL_LINEAR = {**LORA, "target_modules": "all-linear", "r": 2, "lora_dropout": 0.0, "seed": None}
FULL_FT_LLAMA = {**LORA, "use_peft": False, "learning_rate": 1e-3, "seed": 11}
CONFIGS = {"lora": LORA, "full": FULL_FT, "lora_all_linear": LORA_ALL_LINEAR, "full_llama": FULL_FT_LLAMA}

Rows = list[dict[str, Any]]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    for name in ("rf-tiny-llama", "rf-tiny-gpt2"):
        ensure_pretrained(name, cache, pretrain_steps=0)
    return cache


@pytest.fixture(scope="module")
def datasets() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    examples = stdlib_sft_examples(limit=80)
    return examples[:64], examples[64:]


@pytest.fixture(scope="module")
def make_trainer(model_cache: Path, datasets) -> Callable[..., SlotTrainer]:
    def create_model_fn(config: dict[str, Any]):
        return load_base_model(config["model_name_or_path"], model_cache)

    def make(**kwargs: Any) -> SlotTrainer:
        kwargs.setdefault("create_model_fn", create_model_fn)
        kwargs.setdefault("train_dataset", datasets[0])
        kwargs.setdefault("eval_dataset", datasets[1])
        return SlotTrainer(num_threads=NUM_THREADS, **kwargs)

    return make


def config_of(base: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return normalize_config({**base, **overrides})


def task_for(run_id: int, config: dict, chunk: ChunkSpec, run_dir: Path, warm: WarmStart | None = None):
    return TrainTask(
        experiment="test",
        run_id=run_id,
        config=config,
        chunk=chunk,
        run_dir=str(run_dir),
        seed=EXPERIMENT_SEED,
        warm_start=warm,
    )


class Recorder:
    """Collects emitted rows; `train(...)` trains one chunk and checks it did not fail."""

    def __init__(self) -> None:
        self.rows: Rows = []

    def __call__(self, rows: Rows) -> None:
        self.rows.extend(rows)

    def values(self, name: str) -> list[tuple[int, float]]:
        return [(row["step"], row["value"]) for row in self.rows if row["name"] == name]


def train_ok(trainer: SlotTrainer, task: TrainTask, recorder: Recorder) -> ChunkOutcome:
    outcome = trainer.train(task, recorder)
    assert outcome.status != "failed", outcome.traceback
    trainer.flush()  # the state is written behind; these tests read the files
    return outcome


def final_weights(outcome: ChunkOutcome) -> dict[str, torch.Tensor]:
    assert outcome.checkpoint is not None
    return load_checkpoint(outcome.checkpoint)["trainable"]


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def straight_through(make_trainer, config: dict, run_dir: Path) -> tuple[Recorder, ChunkOutcome]:
    """k = 1: one chunk per epoch, one trainer."""
    trainer, recorder = make_trainer(), Recorder()
    for chunk in plan_chunks(64, config, 1):
        outcome = train_ok(trainer, task_for(1, config, chunk, run_dir), recorder)
    return recorder, outcome


@pytest.fixture(scope="module")
def references(make_trainer, tmp_path_factory) -> dict[str, tuple[Recorder, ChunkOutcome]]:
    root = tmp_path_factory.mktemp("reference")
    return {kind: straight_through(make_trainer, config_of(config), root / kind) for kind, config in CONFIGS.items()}


def assert_matches_reference(reference: tuple[Recorder, ChunkOutcome], recorder: Recorder, last: ChunkOutcome):
    ref_recorder, ref_outcome = reference
    assert recorder.values("train_loss") == ref_recorder.values("train_loss")
    assert recorder.values("learning_rate") == ref_recorder.values("learning_rate")
    assert (last.step, last.samples, last.status) == (ref_outcome.step, ref_outcome.samples, "completed")
    assert_same_weights(final_weights(last), final_weights(ref_outcome))


# ------------------------------------------------------------------------------------------- exactness


def test_chunked_in_memory_interleaved_equals_straight_through(make_trainer, references, tmp_path) -> None:
    trainer = make_trainer()
    # Each reference run had a trainer to itself. Here two LoRA adapters share one llama copy, the llama full
    # fine-tune is copied from that adapter-wrapped base, and all four runs take turns on one trainer.
    configs = {kind: config_of(CONFIGS[kind]) for kind in ("lora", "full_llama", "lora_all_linear", "full")}
    plans = {kind: plan_chunks(64, config, 3) for kind, config in configs.items()}
    assert len(plans["lora"]) == 6  # 3 chunks x 2 epochs
    recorders = {kind: Recorder() for kind in configs}
    last: dict[str, ChunkOutcome] = {}
    for chunk_index in range(len(plans["lora"])):
        for run_id, kind in enumerate(configs, start=1):
            task = task_for(run_id, configs[kind], plans[kind][chunk_index], tmp_path / kind)
            last[kind] = train_ok(trainer, task, recorders[kind])
    for kind in configs:
        assert_matches_reference(references[kind], recorders[kind], last[kind])
    base = trainer._bases["rf-tiny-llama"]
    assert base.lora_host is not None and len(base.lora_host.peft_config) == 2  # one slot per LoRA shape, one base
    assert {trainer._runs[1].slot.name, trainer._runs[3].slot.name} == set(base.lora_host.peft_config)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_chunked_through_disk_equals_straight_through(make_trainer, references, kind, tmp_path) -> None:
    config = config_of(LORA if kind == "lora" else FULL_FT)
    # Chunk i goes to trainer i % 2: a fresh trainer first, then one whose in-memory state is stale.
    trainers = [make_trainer(), make_trainer()]
    recorder = Recorder()
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainers[chunk.index % 2], task_for(1, config, chunk, tmp_path), recorder)
    assert_matches_reference(references[kind], recorder, last)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(
        f"step-{step}.pt"
        for step in (3, 6, 8, 11, 14, 16)  # 8 steps per epoch in chunks of 3, 3, 2
    )


# --------------------------------------------------------------------------------------- metric rows


def test_metric_rows_and_outcomes(make_trainer, tmp_path) -> None:
    config = config_of(LORA)
    trainer, recorder = make_trainer(), Recorder()
    chunk = plan_chunks(64, config, 3)[1]  # steps 4..6 (1-based); needs chunk 0 first
    first = train_ok(trainer, task_for(1, config, plan_chunks(64, config, 3)[0], tmp_path), Recorder())
    outcome = train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder)

    assert (first.step, first.samples, first.status, first.epoch) == (3, 24, "ok", 0)
    assert (outcome.step, outcome.samples, outcome.status, outcome.chunk_index) == (6, 48, "ok", 1)
    assert outcome.checkpoint == str(step_checkpoint_path(tmp_path, 6))
    assert recorder.values("train_loss")[-1][1] == outcome.last_train_loss
    assert [step for step, _ in recorder.values("train_loss")] == [4, 5, 6]
    assert [step for step, _ in recorder.values("learning_rate")] == [4, 5, 6]
    assert recorder.values("eval_loss") == [(6, outcome.eval_metrics["eval_loss"])]
    assert all(set(row) == {"step", "name", "value", "chunk", "time"} for row in recorder.rows)
    assert {row["chunk"] for row in recorder.rows} == {1}
    assert outcome.train_seconds > 0 and 5 < outcome.eval_metrics["eval_loss"] < 10


def test_compute_metrics_is_reported_and_cannot_disturb_training(make_trainer, references, tmp_path) -> None:
    def compute_metrics(model, tokenizer, examples) -> dict[str, float]:
        torch.rand(100)  # draws random numbers: training must not notice
        return {"num_eval_examples": float(len(examples))}

    trainer, recorder = make_trainer(compute_metrics=compute_metrics), Recorder()
    config = config_of(LORA)
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder)
    assert last.eval_metrics["num_eval_examples"] == 16.0
    assert len(recorder.values("num_eval_examples")) == 6
    assert_matches_reference(references["lora"], recorder, last)


def test_max_steps_ends_inside_a_chunk_as_completed(make_trainer, tmp_path) -> None:
    config = config_of(LORA, max_steps=5)
    plan = plan_chunks(64, config, 3)
    trainer, recorder = make_trainer(), Recorder()
    outcomes = [train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder) for chunk in plan]
    assert outcomes[-1].status == "completed" and outcomes[-1].step == 5
    assert all(outcome.status == "ok" for outcome in outcomes[:-1])
    assert [step for step, _ in recorder.values("train_loss")] == [1, 2, 3, 4, 5]
    assert recorder.values("learning_rate")[-1][1] > 0  # linear decay over 5 steps, last update not at zero


# ---------------------------------------------------------------------------------------- warm start


@pytest.mark.parametrize("mode", ["weights", "weights+optimizer"])
def test_warm_start_initial_state_is_the_parents_checkpoint(make_trainer, tmp_path, mode) -> None:
    parent_config = config_of(LORA)
    trainer = make_trainer()
    parent = train_ok(
        trainer, task_for(1, parent_config, plan_chunks(64, parent_config, 3)[0], tmp_path / "p"), Recorder()
    )
    parent_state = load_checkpoint(parent.checkpoint)

    clone_config = config_of(LORA, learning_rate=1e-3)
    warm = WarmStart(parent_run_id=1, parent_checkpoint=parent.checkpoint, parent_step=parent.step, mode=mode)
    clone_dir = tmp_path / "clone"
    first = plan_chunks(64, clone_config, 3)[0]
    outcome = train_ok(trainer, task_for(2, clone_config, first, clone_dir, warm), Recorder())

    init = load_checkpoint(init_checkpoint_path(clone_dir))
    assert_same_weights(init["trainable"], parent_state["trainable"])
    assert init["step"] == 0 and init["scheduler"]["last_epoch"] == 0  # a fresh schedule
    assert init["optimizer"]["param_groups"][0]["lr"] == 0.0  # the clone's own warmup starts at 0
    if mode == "weights+optimizer":
        assert init["optimizer"]["state"].keys() == parent_state["optimizer"]["state"].keys()
        for index, moments in init["optimizer"]["state"].items():
            assert torch.equal(moments["exp_avg"], parent_state["optimizer"]["state"][index]["exp_avg"])
    else:
        assert init["optimizer"]["state"] == {}
    assert outcome.step == 3
    # The parent is untouched and continues as if the clone had never happened.
    assert load_checkpoint(parent.checkpoint)["step"] == 3
    train_ok(trainer, task_for(1, parent_config, plan_chunks(64, parent_config, 3)[1], tmp_path / "p"), Recorder())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"r": 8}, "shape mismatches"),
        ({"target_modules": "all-linear"}, "missing keys"),
        ({"use_peft": False}, "unexpected keys"),
    ],
)
def test_warm_start_that_does_not_fit_is_a_clear_failure(make_trainer, tmp_path, overrides, message) -> None:
    config = config_of(LORA)
    trainer = make_trainer()
    parent = train_ok(trainer, task_for(1, config, plan_chunks(64, config, 3)[0], tmp_path / "p"), Recorder())
    clone_config = config_of(LORA, **overrides)
    warm = WarmStart(parent_run_id=1, parent_checkpoint=parent.checkpoint, parent_step=3, mode="weights")
    chunk = plan_chunks(64, clone_config, 3)[0]
    outcome = trainer.train(task_for(2, clone_config, chunk, tmp_path / "clone", warm), Recorder())
    assert outcome.status == "failed"
    assert message in outcome.error and "parent run 1" in outcome.error and "\n" not in outcome.error
    assert "Traceback" in outcome.traceback
    assert not init_checkpoint_path(tmp_path / "clone").exists()


# ------------------------------------------------------------------------------------------- failures


def test_nan_loss_fails_the_run_keeps_its_checkpoint_and_spares_others(
    make_trainer, model_cache, references, tmp_path
) -> None:
    poison = {"on": False}

    def create_model_fn(config: dict[str, Any]):
        model, tokenizer = load_base_model(config["model_name_or_path"], model_cache)
        if config["model_name_or_path"] == "rf-tiny-llama":
            # While poisoned, the final norm returns NaN: the model itself produces a NaN loss.
            model.model.norm.register_forward_hook(
                lambda module, args, output: output * float("nan") if poison["on"] else None
            )
        return model, tokenizer

    trainer = make_trainer(create_model_fn=create_model_fn)
    lora, full = config_of(LORA), config_of(FULL_FT)
    lora_plan, full_plan = plan_chunks(64, lora, 3), plan_chunks(64, full, 3)
    lora_rows, full_rows = Recorder(), Recorder()
    train_ok(trainer, task_for(1, lora, lora_plan[0], tmp_path / "lora"), lora_rows)
    train_ok(trainer, task_for(2, full, full_plan[0], tmp_path / "full"), full_rows)
    good_checkpoint = step_checkpoint_path(tmp_path / "lora", 3)
    good_bytes = good_checkpoint.read_bytes()

    poison["on"] = True
    failed = trainer.train(task_for(1, lora, lora_plan[1], tmp_path / "lora"), Recorder())
    poison["on"] = False
    assert failed.status == "failed"
    assert failed.error == "NonFiniteLossError: loss became nan at step 4"
    assert (failed.step, failed.samples, failed.chunk_index, failed.checkpoint) == (3, 24, 1, None)
    assert good_checkpoint.read_bytes() == good_bytes
    assert latest_checkpoint(tmp_path / "lora") == good_checkpoint

    # The other run carries on, and the failed run's retry resumes from its last good checkpoint.
    for chunk in full_plan[1:]:
        full_last = train_ok(trainer, task_for(2, full, chunk, tmp_path / "full"), full_rows)
    for chunk in lora_plan[1:]:
        lora_last = train_ok(trainer, task_for(1, lora, chunk, tmp_path / "lora"), lora_rows)
    assert_matches_reference(references["full"], full_rows, full_last)
    assert_matches_reference(references["lora"], lora_rows, lora_last)


def test_huge_learning_rate_fails_cleanly(make_trainer, tmp_path) -> None:
    # Beyond what config validation accepts (lr <= 1): the trainer must still fail cleanly, not raise.
    config = {
        **config_of(FULL_FT, max_grad_norm=0.0, warmup_steps=0, lr_scheduler_type="constant"),
        "learning_rate": 1e30,
    }
    trainer = make_trainer()
    outcome = trainer.train(task_for(1, config, plan_chunks(64, config, 1)[0], tmp_path), Recorder())
    assert outcome.status == "failed" and "loss became" in outcome.error
    assert latest_checkpoint(tmp_path) is None


def test_missing_resume_checkpoint_and_bad_config_fail_without_raising(make_trainer, tmp_path) -> None:
    config = config_of(LORA)
    trainer = make_trainer()
    outcome = trainer.train(task_for(1, config, plan_chunks(64, config, 3)[1], tmp_path), Recorder())
    assert outcome.status == "failed" and "no checkpoint" in outcome.error and str(tmp_path) in outcome.error
    bad = config_of(LORA, model_name_or_path=str(tmp_path / "nowhere"))
    outcome = trainer.train(task_for(2, bad, plan_chunks(64, bad, 3)[0], tmp_path / "bad"), Recorder())
    assert outcome.status == "failed" and "nowhere" in outcome.error


def test_release_drops_the_run_state_and_the_run_resumes_from_disk(make_trainer, references, tmp_path) -> None:
    config = config_of(LORA)
    trainer, recorder = make_trainer(), Recorder()
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder)
        trainer.release(1)
        assert 1 not in trainer._runs
    assert_matches_reference(references["lora"], recorder, last)


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_with_rng(tmp_path) -> None:
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    rng = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    state = {"config": {"a": 1}, "step": 4, "trainable": {"w": torch.arange(3.0)}, "rng": rng}
    path = save_checkpoint(state, tmp_path / "checkpoints" / "step-4.pt")
    loaded = load_checkpoint(path)
    assert loaded["format"] == 2 and loaded["step"] == 4 and torch.equal(loaded["trainable"]["w"], torch.arange(3.0))
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert [p.name for p in path.parent.iterdir()] == ["step-4.pt"]  # no temp files left


def test_checkpoint_keeps_every_value_type_bit_for_bit_and_tied_tensors_once(tmp_path) -> None:
    shared = torch.randn(4, 3)
    state = {
        "trainable": {"embed.weight": shared, "lm_head.weight": shared.detach(), "half": torch.ones(2).half()},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "foreach": None, "maximize": False}],
        },
        "values": [float("inf"), -0.0, 2**40, "text", True, None],
        "view": shared[1:],  # another view of a stored buffer: written as its own copy
    }
    loaded = load_checkpoint(save_checkpoint(state, tmp_path / "state.pt"))
    assert torch.equal(loaded["trainable"]["embed.weight"], shared)
    assert loaded["trainable"]["embed.weight"] is loaded["trainable"]["lm_head.weight"]  # stored once
    assert loaded["trainable"]["half"].dtype == torch.float16
    assert loaded["optimizer"]["state"][0]["step"].item() == 3.0  # integer keys survive
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert loaded["values"] == [float("inf"), -0.0, 2**40, "text", True, None]
    assert torch.equal(loaded["view"], shared[1:])
    with pytest.raises(TypeError, match="tensors and JSON values only"):
        save_checkpoint({"bad": object()}, tmp_path / "bad.pt")


def test_format_1_checkpoints_still_load(tmp_path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "step": 7, "trainable": {"w": torch.arange(2.0)}}, path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["trainable"]["w"], torch.arange(2.0))


def test_latest_checkpoint_orders_numerically_and_falls_back_to_init(tmp_path) -> None:
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint({}, init_checkpoint_path(tmp_path))
    assert latest_checkpoint(tmp_path) == init_checkpoint_path(tmp_path)
    for step in (9, 10, 2):
        save_checkpoint({"step": step}, step_checkpoint_path(tmp_path, step))
    assert latest_checkpoint(tmp_path) == step_checkpoint_path(tmp_path, 10)


def test_missing_or_corrupt_checkpoint_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt\.pt is unreadable or corrupt"):
        load_checkpoint(corrupt)


EXIT_SCRIPT = """
import sys
from pathlib import Path

from rf_core.chunks import plan_chunks
from rf_core.config import normalize_config
from rf_core.messages import TrainTask
from rf_core.training.trainer import SlotTrainer
from tests import e2e_experiment

spec = e2e_experiment.spec()
config = normalize_config({**spec.config_group, "learning_rate": 1e-3, "num_train_epochs": 1})
trainer = SlotTrainer(spec.create_model_fn, spec.train_dataset, spec.eval_dataset, num_threads=1)
for chunk in plan_chunks(len(spec.train_dataset), config, spec.num_chunks):
    outcome = trainer.train(TrainTask("exit", 1, config, chunk, sys.argv[1], seed=1), lambda rows: None)
    assert outcome.status in ("ok", "completed"), outcome.error
print(outcome.checkpoint)
# No trainer.close(): the process just ends, its last state still being written in the background.
"""


def test_a_process_that_trains_and_exits_without_closing_exits_0_with_its_state_on_disk(
    model_cache: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from tests.e2e_experiment import MODEL_CACHE_ENV

    project = Path(__file__).resolve().parents[2]
    environment = {**os.environ, MODEL_CACHE_ENV: str(model_cache), "PYTHONPATH": str(project)}
    environment["RF_STAGING_DIR"] = str(tmp_path / "staging")  # a RAM copy first, the disk copy in the background
    for attempt in range(3):  # the abort this guards against was a race: about one exit in three
        run_folder = tmp_path / f"run-{attempt}"
        result = subprocess.run(
            [sys.executable, "-c", EXIT_SCRIPT, str(run_folder)],
            capture_output=True,
            text=True,
            env=environment,
            cwd=project,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        last_checkpoint = Path(result.stdout.strip().splitlines()[-1])
        assert last_checkpoint.is_file(), f"{last_checkpoint} was not written before the process ended"
        assert run_folder in last_checkpoint.parents


# ------------------------------------------------------------------------------ precision and memory knobs


def test_bf16_chunked_equals_straight_through_and_differs_from_float32(make_trainer, references, tmp_path) -> None:
    config = config_of({**LORA, "bf16": True})
    reference = straight_through(make_trainer, config, tmp_path / "straight")
    trainer, recorder = make_trainer(), Recorder()
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path / "chunked"), recorder)
    assert_matches_reference(reference, recorder, last)  # bitwise, as for float32
    assert recorder.values("train_loss") != references["lora"][0].values("train_loss")  # autocast did something
    assert all(tensor.dtype == torch.float32 for tensor in final_weights(last).values())  # master weights stay fp32


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fp16_loss_scale_is_the_runs_state_chunked_equals_straight_through(
    make_trainer, references, kind, tmp_path
) -> None:
    # fp16 is refused on CPU slots by the fit (tests/test_planner.py); the trainer itself runs it wherever torch
    # does, so its loss scaler can be checked here with torch's CPU float16 autocast and GradScaler.
    config = config_of({**(LORA if kind == "lora" else FULL_FT), "fp16": True})
    reference = straight_through(make_trainer, config, tmp_path / "straight")
    # Chunk i on trainer i % 2: the scaler's state must come back from the checkpoint, not from memory.
    trainers, recorder = [make_trainer(), make_trainer()], Recorder()
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainers[chunk.index % 2], task_for(1, config, chunk, tmp_path / "chunked"), recorder)
    assert_matches_reference(reference, recorder, last)
    scaler = load_checkpoint(last.checkpoint)["grad_scaler"]
    assert scaler == load_checkpoint(reference[1].checkpoint)["grad_scaler"]
    assert scaler["scale"] <= 65536.0 and scaler["_growth_tracker"] > 0  # it scaled every step since its last skip
    assert recorder.values("train_loss") != references[kind][0].values("train_loss")  # autocast did something
    assert all(tensor.dtype == torch.float32 for tensor in final_weights(last).values())
    assert load_checkpoint(references[kind][1].checkpoint)["grad_scaler"] is None  # float32 runs have no scaler


def test_logged_loss_intervals_span_chunk_boundaries_through_disk(make_trainer, references, tmp_path) -> None:
    config = config_of(LORA, logging_steps=5)  # 16 steps in 6 chunks: intervals 1-5, 6-10, 11-15 cross boundaries
    trainers, recorder = [make_trainer(), make_trainer()], Recorder()
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainers[chunk.index % 2], task_for(1, config, chunk, tmp_path), recorder)
    assert_matches_reference(references["lora"], recorder, last)
    losses = [loss for _, loss in recorder.values("train_loss")]
    assert [step for step, _ in recorder.values("loss")] == [5, 10, 15]
    expected = [sum(losses[step - 5 : step]) / 5 for step in (5, 10, 15)]
    assert [loss for _, loss in recorder.values("loss")] == pytest.approx(expected, rel=1e-12)
    assert load_checkpoint(last.checkpoint)["unlogged_losses"] == [losses[15]]  # step 16 awaits its interval


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_the_scale_backs_off() -> None:
    from rf_core.training.gang import PlainStep

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    stepper = PlainStep(model=None)
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stepper.backward((weight * torch.tensor([1.0, float("inf")])).sum(), 0, 1)
    assert stepper.update(optimizer, [weight], max_norm=1.0) is False
    assert torch.equal(weight.detach(), torch.ones(2)) and stepper.scaler.get_scale() == 512.0
    optimizer.zero_grad()
    stepper.backward(weight.sum(), 0, 1)
    assert stepper.update(optimizer, [weight], max_norm=1.0) is True
    assert not torch.equal(weight.detach(), torch.ones(2)) and stepper.scaler.get_scale() == 512.0


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradient_checkpointing_trains_the_same_run(make_trainer, references, kind, tmp_path) -> None:
    config = config_of({**(LORA if kind == "lora" else FULL_FT), "gradient_checkpointing": True})
    trainer, recorder = make_trainer(), Recorder()
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder)
    reference_recorder, reference_outcome = references[kind]
    losses, reference_losses = recorder.values("train_loss"), reference_recorder.values("train_loss")
    assert [step for step, _ in losses] == [step for step, _ in reference_losses]
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in reference_losses], rel=1e-5)
    for name, tensor in final_weights(last).items():
        torch.testing.assert_close(tensor, final_weights(reference_outcome)[name], rtol=1e-5, atol=1e-6)
    base = trainer._bases[config["model_name_or_path"]]
    model = base.lora_host if kind == "lora" else trainer._runs[1].model
    assert model.is_activation_checkpointing  # it was on for this run


def sampled_words(eval_prediction: Any) -> dict[str, float]:
    predictions, _ = eval_prediction
    return {"words": float(sum(len(text.split()) for text in predictions))}


@pytest.mark.parametrize(
    ("cadence", "eval_steps"),
    [
        ({"eval_strategy": "steps", "eval_steps": 3}, [3, 6, 9, 12, 15, 16]),  # 9, 12, 15 inside chunks
        ({"eval_strategy": "epoch"}, [8, 16]),
        ({"eval_strategy": "no"}, []),
    ],
)
def test_any_eval_cadence_trains_bitwise_as_straight_through(
    make_trainer, references, cadence, eval_steps, tmp_path
) -> None:
    # Sampled generation and dropout both draw random numbers: evaluating between steps must not shift training's.
    config = config_of(
        {**LORA, **cadence, "compute_metrics": "sampled_words", "predict_with_generate": True,
         "generation_config": {"do_sample": True, "top_k": 0, "max_new_tokens": 2}, "eval_subset": 4}
    )  # fmt: skip
    assert LORA["lora_dropout"] > 0
    trainer, recorder = make_trainer(functions={"sampled_words": sampled_words}), Recorder()
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path / "chunked"), recorder)
    assert_matches_reference(references["lora"], recorder, last)
    assert [step for step, _ in recorder.values("eval_loss")] == eval_steps
    assert [step for step, _ in recorder.values("words")] == eval_steps
    straight = make_trainer(functions={"sampled_words": sampled_words}), Recorder()
    for chunk in plan_chunks(64, config, 1):
        train_ok(straight[0], task_for(1, config, chunk, tmp_path / "straight"), straight[1])
    assert straight[1].values("eval_loss") == recorder.values("eval_loss")  # evaluated at the same steps
    assert straight[1].values("words") == recorder.values("words")  # sampling seeded by run and step


def test_a_datasets_dataset_is_kept_as_arrow_and_trains_as_its_list(make_trainer, datasets, references, tmp_path):
    import datasets as hf_datasets

    train, evaluation = (hf_datasets.Dataset.from_list(rows) for rows in datasets)
    trainer, recorder = make_trainer(train_dataset=train, eval_dataset=evaluation), Recorder()
    assert trainer._train_sets[None] is train  # no Python list of the rows in the worker
    config = config_of(LORA, eval_subset=5)
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder)
    assert_matches_reference(references["lora"], recorder, last)
    listed = make_trainer(eval_dataset=datasets[1][:5]), Recorder()
    for chunk in plan_chunks(64, config_of(LORA), 3):
        train_ok(listed[0], task_for(1, config_of(LORA), chunk, tmp_path / "listed"), listed[1])
    assert recorder.values("eval_loss") == listed[1].values("eval_loss")  # eval_subset took the first 5 rows
