"""Swapping run state between slot workers: exactness, the staging area, write-behind, exports and retention.

The exactness matrix is the engine's central promise: a run's per-step losses and final weights do not depend on
how it was sliced (k chunks per epoch), what it was interleaved with, how many slots it moved across, or whether
its state travelled through the RAM staging area or through disk. Dropout stays on, so RNG state must travel too.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rf_core.chunks import plan_chunks
from rf_core.messages import ChunkOutcome, WarmStart
from rf_core.training import staging
from rf_core.training import trainer as trainer_module
from rf_core.training.artifacts import BEST, EXPORT_INFO_NAME, LATEST, export_dir, prune_checkpoints
from rf_core.training.checkpoints import CheckpointError, checkpoints_dir, load_checkpoint, step_checkpoint_path
from rf_core.training.models import load_base_model
from rf_core.training.staging import StateWriter, persist_staged, staged_path
from rf_core.training.trainer import SlotTrainer
from tests.training import test_trainer
from tests.training.test_trainer import (
    CONFIGS,
    FULL_FT,
    LORA,
    Recorder,
    assert_matches_reference,
    assert_same_weights,
    config_of,
    final_weights,
    straight_through,
    task_for,
    train_ok,
)

# The trainer tests' fixtures (tiny models built once, their data, straight-through references), reused here.
model_cache = test_trainer.model_cache
datasets = test_trainer.datasets
make_trainer = test_trainer.make_trainer
references = test_trainer.references

OTHER_RUNS = ("lora_all_linear", "full_llama")  # interleaved with the run under test


@pytest.fixture
def shm_root() -> Iterator[Path]:
    """A fresh staging root on the real tmpfs, as the engine uses it."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    root = Path(tempfile.mkdtemp(prefix="rf-test-", dir="/dev/shm"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("chunks_per_epoch", [3, 7])
@pytest.mark.parametrize("layout", ["1 slot", "2 slots via shm", "2 slots via disk"])
def test_chunked_interleaved_and_swapped_equals_straight_through(
    make_trainer, references, kind, chunks_per_epoch, layout, shm_root, tmp_path
) -> None:
    num_slots = 1 if layout == "1 slot" else 2
    through_shm = layout.endswith("shm")
    trainers = [make_trainer(staging_root=shm_root if through_shm else None) for _ in range(num_slots)]
    kinds = (kind, *OTHER_RUNS)
    configs = {name: config_of(CONFIGS[name]) for name in kinds}
    plans = {name: plan_chunks(64, configs[name], chunks_per_epoch) for name in kinds}
    recorders = {name: Recorder() for name in kinds}
    last: dict[str, ChunkOutcome] = {}
    swaps = 0
    for chunk_index in range(len(plans[kind])):
        for run_id, name in enumerate(kinds, start=1):
            # Run j's chunk i goes to slot (i + j) % slots: on 2 slots every boundary moves every run.
            slot = (chunk_index + run_id) % num_slots
            task = task_for(run_id, configs[name], plans[name][chunk_index], tmp_path / name)
            outcome = trainers[slot].train(task, recorders[name])
            assert outcome.status != "failed", outcome.traceback
            last[name] = outcome
            if num_slots == 2:
                trainers[slot].flush()
                trainers[1 - slot].release(run_id)
                swaps += 1
                if through_shm:
                    # The next worker must take the state from RAM: the disk copy is out of reach.
                    Path(outcome.checkpoint).unlink()
    for trainer in trainers:
        trainer.flush()
    if through_shm:
        persist_staged(shm_root, tmp_path)
    assert_matches_reference(references[kind], recorders[kind], last[kind])
    for name in OTHER_RUNS:
        assert_matches_reference(references[name], recorders[name], last[name])
    assert swaps == (0 if num_slots == 1 else 3 * len(plans[kind]))


def test_warm_start_from_memory_is_the_same_as_from_disk_and_never_reads_it(make_trainer, tmp_path) -> None:
    parent_config, clone_config = config_of(LORA), config_of(LORA, learning_rate=1e-3)
    parent_plan, clone_plan = plan_chunks(64, parent_config, 3), plan_chunks(64, clone_config, 3)
    holder = make_trainer()  # trains the parent and keeps it warm
    for chunk in parent_plan[:2]:
        parent = train_ok(holder, task_for(1, parent_config, chunk, tmp_path / "parent"), Recorder())
    warm = WarmStart(1, parent.checkpoint, parent.step, "weights+optimizer")

    from_disk = make_trainer()
    cold = train_ok(from_disk, task_for(2, clone_config, clone_plan[0], tmp_path / "cold", warm), Recorder())
    # With every copy of the parent's state gone from disk, the warm worker still starts the clone, from memory.
    shutil.rmtree(checkpoints_dir(tmp_path / "parent"))
    hot = train_ok(holder, task_for(3, clone_config, clone_plan[0], tmp_path / "hot", warm), Recorder())
    assert_same_weights(final_weights(hot), final_weights(cold))
    cold_moments = load_checkpoint(cold.checkpoint)["optimizer"]["state"]
    hot_moments = load_checkpoint(hot.checkpoint)["optimizer"]["state"]
    assert all(torch.equal(hot_moments[i]["exp_avg"], cold_moments[i]["exp_avg"]) for i in cold_moments)
    # The parent, still warm in the same worker, is untouched by its clone sharing its moments' values.
    follow = train_ok(holder, task_for(1, parent_config, parent_plan[2], tmp_path / "parent"), Recorder())
    assert follow.step == parent.step + parent_plan[2].num_steps


def test_runs_of_one_lora_shape_take_turns_in_one_slot_and_results_do_not_change(
    make_trainer, references, tmp_path
) -> None:
    config = config_of(LORA)
    trainer, recorder = make_trainer(), Recorder()
    others = [config_of(LORA, learning_rate=1e-3, seed=5 + index) for index in range(4)]
    for chunk in plan_chunks(64, config, 3):
        for index, other in enumerate(others, start=2):  # four more runs of the same shape stay in memory
            other_task = task_for(index, other, plan_chunks(64, other, 3)[chunk.index], tmp_path / f"o{index}")
            train_ok(trainer, other_task, Recorder())
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path / "run"), recorder)
        if chunk.index == 2:
            trainer.release(1)  # the next chunk is swapped in from its saved state
    assert_matches_reference(references["lora"], recorder, last)
    host = trainer._bases["rf-tiny-llama"].lora_host
    assert len(trainer._runs) == 5 and list(host.peft_config) == [trainer._runs[1].slot.name]
    # Each run owns its parameters; the slot holds the last one trained.
    key = next(iter(trainer._runs[1].trainable))
    assert len({id(state.trainable[key]) for state in trainer._runs.values()}) == 5


def test_runs_differing_in_lora_alpha_and_dropout_share_a_slot_and_train_as_alone(make_trainer, tmp_path) -> None:
    """Alpha and dropout are set on the slot's layers when a run binds it: a sweep over them uses one slot, and
    each run's losses, weights and export are those of the same run trained alone."""
    variants = [
        config_of(LORA, lora_alpha=32, lora_dropout=0.0, seed=7),
        config_of(LORA, lora_alpha=4, lora_dropout=0.2, seed=8),
        config_of(LORA),
    ]
    alone = [
        straight_through(make_trainer, config, tmp_path / f"alone{index}") for index, config in enumerate(variants)
    ]
    trainer = make_trainer()
    recorders = [Recorder() for _ in variants]
    last: list[ChunkOutcome] = [None] * len(variants)  # type: ignore[list-item]
    plans = [plan_chunks(64, config, 3) for config in variants]
    for chunk_index in range(len(plans[0])):
        for index, config in enumerate(variants):  # interleaved: each chunk binds the slot with other knobs
            chunk = plans[index][chunk_index]
            run_dir = tmp_path / f"shared{index}"
            last[index] = train_ok(trainer, task_for(index + 1, config, chunk, run_dir), recorders[index])
    assert len(trainer._bases["rf-tiny-llama"].lora_host.peft_config) == 1
    for index, config in enumerate(variants):
        assert_matches_reference(alone[index], recorders[index], last[index])
        exported = json.loads((export_dir(tmp_path / f"shared{index}", LATEST) / "adapter_config.json").read_text())
        assert (exported["lora_alpha"], exported["lora_dropout"]) == (config["lora_alpha"], config["lora_dropout"])


def test_lora_shapes_beyond_the_slot_limit_evict_each_other_and_results_do_not_change(
    make_trainer, references, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(trainer_module, "MAX_LORA_SLOTS", 1)
    trainer = make_trainer()
    kinds = ("lora", "lora_all_linear")
    configs = {kind: config_of(CONFIGS[kind]) for kind in kinds}
    plans = {kind: plan_chunks(64, configs[kind], 3) for kind in kinds}
    recorders = {kind: Recorder() for kind in kinds}
    last: dict[str, ChunkOutcome] = {}
    for chunk_index in range(len(plans["lora"])):
        for run_id, kind in enumerate(kinds, start=1):  # each chunk takes the one slot from the other shape
            last[kind] = train_ok(
                trainer, task_for(run_id, configs[kind], plans[kind][chunk_index], tmp_path / kind), recorders[kind]
            )
            assert len(trainer._bases["rf-tiny-llama"].lora_host.peft_config) == 1
    for kind in kinds:
        assert_matches_reference(references[kind], recorders[kind], last[kind])


def test_a_released_full_copy_is_reused_by_the_next_full_run_swapped_in(make_trainer, references, tmp_path) -> None:
    config = config_of(FULL_FT)
    trainer, recorder = make_trainer(), Recorder()
    models = []
    for chunk in plan_chunks(64, config, 3):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder)
        models.append(trainer._runs[1].model)
        trainer.release(1)
    assert_matches_reference(references["full"], recorder, last)
    assert all(model is models[0] for model in models)  # one deep copy of the base, then weights loaded over it


def test_warm_clone_replayed_from_the_op_log_reproduces_its_weights(make_trainer, tmp_path) -> None:
    parent_config, clone_config = config_of(LORA), config_of(LORA, learning_rate=2e-3, seed=99)
    parent_plan, clone_plan = plan_chunks(64, parent_config, 3), plan_chunks(64, clone_config, 3)
    # Live: the parent trains 3 chunks interleaved with its clone, which is made at the parent's chunk-2 boundary.
    live = make_trainer()
    for chunk in parent_plan[:2]:
        parent = train_ok(live, task_for(1, parent_config, chunk, tmp_path / "live-parent"), Recorder())
    op = {"parent_run_id": 1, "parent_step": parent.step, "mode": "weights"}  # what the ops log records
    warm = WarmStart(parent_checkpoint=parent.checkpoint, **op)
    clone_recorder = Recorder()
    for index, chunk in enumerate(clone_plan):
        clone_task = task_for(2, clone_config, chunk, tmp_path / "live-clone", warm if index == 0 else None)
        live_clone = train_ok(live, clone_task, clone_recorder)
        if index + 2 < len(parent_plan):
            train_ok(live, task_for(1, parent_config, parent_plan[index + 2], tmp_path / "live-parent"), Recorder())

    # Replay on a fresh worker: the parent up to the logged step, then the clone straight through (k = 1).
    replay = make_trainer()
    for chunk in parent_plan[:2]:
        replayed_parent = train_ok(replay, task_for(1, parent_config, chunk, tmp_path / "replay-parent"), Recorder())
    assert replayed_parent.step == op["parent_step"]
    replay_warm = WarmStart(parent_checkpoint=replayed_parent.checkpoint, **op)
    replay_recorder = Recorder()
    for index, chunk in enumerate(plan_chunks(64, clone_config, 1)):
        replayed_clone = train_ok(
            replay,
            task_for(2, clone_config, chunk, tmp_path / "replay-clone", replay_warm if index == 0 else None),
            replay_recorder,
        )
    assert replay_recorder.values("train_loss") == clone_recorder.values("train_loss")
    assert_same_weights(final_weights(replayed_clone), final_weights(live_clone))


# ----------------------------------------------------------------------------- staging and write-behind


def test_staged_state_reaches_disk_in_the_background_and_leaves_ram(make_trainer, shm_root, tmp_path) -> None:
    config = config_of(LORA)
    trainer = make_trainer(staging_root=shm_root)
    outcomes = [
        train_ok(trainer, task_for(1, config, chunk, tmp_path), Recorder()) for chunk in plan_chunks(64, config, 3)[:3]
    ]
    staged = staged_path(shm_root, outcomes[-1].checkpoint)
    assert staged.is_file() and Path(outcomes[-1].checkpoint).is_file()
    assert staged.read_bytes() == Path(outcomes[-1].checkpoint).read_bytes()
    # Only the newest state of a run stays staged once older ones are durable.
    assert sorted(path.name for path in staged.parent.iterdir()) == [staged.name]
    assert persist_staged(shm_root, tmp_path) == []  # everything was already on disk
    assert not staged.exists()


def test_persist_staged_finishes_what_a_dead_worker_left_in_ram(shm_root, tmp_path) -> None:
    disk = step_checkpoint_path(tmp_path / "run", 12)
    staged = staged_path(shm_root, disk)
    staged.parent.mkdir(parents=True)
    torch.save({"format": 1, "step": 12}, staged)
    (staged.parent / ".step-15.pt.abc.tmp").write_bytes(b"torn")  # a write the crash cut short
    assert persist_staged(shm_root, tmp_path) == [disk]
    assert load_checkpoint(disk)["step"] == 12
    assert list(shm_root.iterdir()) == []  # nothing left in RAM, not even empty folders


def test_full_disk_interrupts_the_chunk_with_the_path_and_bytes_and_the_run_resumes(
    make_trainer, references, monkeypatch, shm_root, tmp_path
) -> None:
    config = config_of(LORA)
    plan = plan_chunks(64, config, 3)
    trainer, recorder = make_trainer(staging_root=shm_root), Recorder()
    train_ok(trainer, task_for(1, config, plan[0], tmp_path), recorder)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    interrupted = trainer.train(task_for(1, config, plan[1], tmp_path), Recorder())
    assert interrupted.status == "interrupted", interrupted.traceback
    assert "not enough space" in interrupted.error and str(step_checkpoint_path(tmp_path, 6)) in interrupted.error
    assert "bytes" in interrupted.error and "1,000 free" in interrupted.error
    assert not staged_path(shm_root, step_checkpoint_path(tmp_path, 6)).exists()  # no RAM held for it
    monkeypatch.setattr(staging.shutil, "disk_usage", real_usage)
    # Space is back: the chunk is retried from the last good state and the run ends as if nothing happened.
    recorder.rows = [row for row in recorder.rows if row["step"] <= 3]
    for chunk in plan[1:]:
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path), recorder)
    assert_matches_reference(references["lora"], recorder, last)


def test_a_failed_background_write_keeps_the_staged_state_and_is_reported(monkeypatch, shm_root, tmp_path) -> None:
    def disk_full(source: Path, path: Path) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(staging, "atomic_copy", disk_full)
    writer = StateWriter(shm_root)
    disk = step_checkpoint_path(tmp_path, 3)
    writer.save({"step": 3}, disk)
    with pytest.raises(CheckpointError, match=r"could not write .*step-3\.pt.*kept at"):
        writer.flush()
    assert staged_path(shm_root, disk).is_file() and not disk.exists()
    # The run's next save reports it too (once), so the chunk that follows says why, not only the fit's end.
    with pytest.raises(CheckpointError, match="an earlier write of this run's state failed: could not write"):
        writer.save({"step": 6}, step_checkpoint_path(tmp_path, 6))
    assert not staged_path(shm_root, step_checkpoint_path(tmp_path, 6)).exists()
    writer.save({"step": 6}, step_checkpoint_path(tmp_path, 6))


def test_a_full_staging_area_falls_back_to_memory_and_says_so(monkeypatch, capfd, shm_root, tmp_path) -> None:
    real_write = staging.atomic_write_path

    def staging_full(path: Path, write_to: Any, durable: bool = True) -> int:
        if str(path).startswith(str(shm_root)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, write_to, durable)

    monkeypatch.setattr(staging, "atomic_write_path", staging_full)
    writer = StateWriter(shm_root)
    disk = step_checkpoint_path(tmp_path, 3)
    writer.save({"step": 3, "weights": torch.ones(10)}, disk)
    writer.flush()
    assert load_checkpoint(disk)["step"] == 3 and not staged_path(shm_root, disk).exists()
    message = capfd.readouterr().err
    assert f"staging area {shm_root} is full" in message and "bytes needed" in message and str(disk) in message


def test_writer_without_staging_buffers_in_memory_and_bounds_pending_writes(tmp_path) -> None:
    writer = StateWriter(None, max_pending=1)
    for step in range(1, 6):
        writer.save({"step": step, "payload": torch.zeros(1000)}, step_checkpoint_path(tmp_path, step))
    writer.flush()
    assert [load_checkpoint(step_checkpoint_path(tmp_path, step))["step"] for step in range(1, 6)] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="max_pending"):
        StateWriter(None, max_pending=0)


def test_default_staging_root_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(staging.STAGING_ENV, str(tmp_path))
    assert staging.default_staging_root() == tmp_path
    monkeypatch.setenv(staging.STAGING_ENV, "off")
    assert staging.default_staging_root() is None
    monkeypatch.delenv(staging.STAGING_ENV)
    expected = Path("/dev/shm").is_dir()
    assert (staging.default_staging_root() is not None) == expected


# ------------------------------------------------------------------------------- exports and retention


def test_lora_exports_latest_and_best_load_with_peft(make_trainer, model_cache, tmp_path) -> None:
    config = config_of(LORA)
    trainer = make_trainer()
    outcomes = [
        train_ok(trainer, task_for(1, config, chunk, tmp_path), Recorder()) for chunk in plan_chunks(64, config, 3)
    ]
    evals = [outcome.eval_metrics["eval_loss"] for outcome in outcomes]
    best = outcomes[evals.index(min(evals))]
    assert (outcomes[-1].best_step, outcomes[-1].best_value) == (best.step, min(evals))
    assert outcomes[-1].exports == {LATEST: str(export_dir(tmp_path, LATEST)), BEST: str(export_dir(tmp_path, BEST))}

    for which, source in ((LATEST, outcomes[-1]), (BEST, best)):
        folder = export_dir(tmp_path, which)
        base, _ = load_base_model("rf-tiny-llama", model_cache)
        loaded = PeftModel.from_pretrained(base, folder)
        exported = {
            name.replace(".default", ""): parameter for name, parameter in loaded.named_parameters() if "lora_" in name
        }
        assert_same_weights(exported, load_state_trainable(source))
        assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
        assert f'"step": {source.step}' in (folder / EXPORT_INFO_NAME).read_text()


def test_full_fine_tune_export_loads_with_auto_model(make_trainer, tmp_path) -> None:
    config = config_of(FULL_FT)
    trainer = make_trainer()
    for chunk in plan_chunks(64, config, 1):
        last = train_ok(trainer, task_for(1, config, chunk, tmp_path), Recorder())
    loaded = AutoModelForCausalLM.from_pretrained(export_dir(tmp_path, LATEST))
    expected = load_state_trainable(last)
    state = loaded.state_dict()
    assert expected.keys() == state.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_retention_keeps_the_newest_checkpoints_and_the_pinned_ones(make_trainer, tmp_path) -> None:
    config = config_of(LORA)
    trainer = make_trainer()
    for chunk in plan_chunks(64, config, 3):
        task = replace(task_for(1, config, chunk, tmp_path), keep_checkpoints=2, pinned_steps=(3,))
        last = train_ok(trainer, task, Recorder())
    assert last.step == 16
    assert sorted(path.name for path in checkpoints_dir(tmp_path).iterdir()) == [
        "step-14.pt",
        "step-16.pt",
        "step-3.pt",
    ]
    assert prune_checkpoints(tmp_path, None) == []
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, 0)


def load_state_trainable(outcome: ChunkOutcome) -> dict[str, Any]:
    assert outcome.checkpoint is not None
    return load_checkpoint(outcome.checkpoint)["trainable"]


def test_trainer_prepare_loads_bases_and_tokenizes_ahead(make_trainer) -> None:
    trainer: SlotTrainer = make_trainer()
    trainer.prepare([config_of(LORA), config_of(FULL_FT)])
    assert set(trainer._bases) == {"rf-tiny-llama", "rf-tiny-gpt2"}
    assert len(trainer._tokenized) == 4  # train and eval, for each tokenizer at max_length 32
