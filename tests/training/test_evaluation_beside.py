"""A boundary evaluated beside the next chunk's training: the same numbers, checkpoints and exports as evaluated
between the two chunks, and training beside it unchanged (the evaluation runs in another thread, on a twin of the
LoRA host that shares the base's weights)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import torch

from rf_core.chunks import plan_chunks
from rf_core.messages import ChunkOutcome, TrainTask
from rf_core.training.artifacts import BEST, LATEST, export_dir
from rf_core.training.checkpoints import load_checkpoint
from rf_core.training.trainer import EvaluationBeside, SlotTrainer
from tests.training import test_trainer
from tests.training.test_trainer import (
    FULL_FT,
    FULL_FT_LLAMA,
    LORA,
    LORA_ALL_LINEAR,
    Recorder,
    assert_same_weights,
    config_of,
    task_for,
)

model_cache = test_trainer.model_cache
datasets = test_trainer.datasets
make_trainer = test_trainer.make_trainer

# Two runs sharing one LoRA slot (they differ in alpha and dropout only), one of another shape, and two full
# fine-tunes (GPT-2 keeps its dropout on), one of them of the LoRA runs' base.
VARIANTS = [
    config_of(LORA),
    config_of(LORA, lora_alpha=32, lora_dropout=0.0, seed=8),
    config_of(LORA_ALL_LINEAR),
    config_of(FULL_FT),
    config_of(FULL_FT_LLAMA),
]


def interleaved(trainer: SlotTrainer, run_root: Path, beside: bool) -> tuple[list[Recorder], list[ChunkOutcome], int]:
    """Every run's chunks in turn on one trainer; `beside`: each boundary evaluated in a thread while the next
    chunk trains, joined when that chunk's steps are done (as a slot worker does). Returns how many were."""
    recorders = [Recorder() for _ in VARIANTS]
    plans = [plan_chunks(64, config, 3) for config in VARIANTS]
    outcomes: list[ChunkOutcome] = []
    evaluating: list[tuple[threading.Thread, list[ChunkOutcome]]] = []
    left_beside = 0

    def settle() -> None:
        while evaluating:
            thread, answer = evaluating.pop()
            thread.join()
            outcomes.extend(answer)

    for chunk_index in range(len(plans[0])):
        for index, config in enumerate(VARIANTS):
            task: TrainTask = replace(
                task_for(index + 1, config, plans[index][chunk_index], run_root / f"run{index}"),
                evaluation_may_wait=True,
            )
            if not beside:
                outcomes.append(trainer.train(task, recorders[index]))
                continue
            result = trainer.train_leaving_evaluation(task, recorders[index], settle)
            if isinstance(result, EvaluationBeside):
                left_beside += 1
                answer: list[ChunkOutcome] = []
                thread = threading.Thread(target=lambda r=result, a=answer: a.append(r.finish()))
                thread.start()
                evaluating.append((thread, answer))
            else:
                settle()
                outcomes.append(result)
    settle()
    trainer.flush()
    return recorders, outcomes, left_beside


def test_a_boundary_evaluated_beside_the_next_chunk_gives_what_it_gives_between_chunks(make_trainer, tmp_path) -> None:
    between, between_outcomes, _ = interleaved(make_trainer(), tmp_path / "between", beside=False)
    beside, beside_outcomes, left_beside = interleaved(
        make_trainer(evaluates_beside=True), tmp_path / "beside", beside=True
    )
    # Every boundary but each run's last (its result ends the run) was evaluated beside a chunk of another run.
    assert left_beside == sum(len(plan_chunks(64, config, 3)) - 1 for config in VARIANTS)
    assert all(outcome.status != "failed" for outcome in beside_outcomes), [o.error for o in beside_outcomes]
    for index in range(len(VARIANTS)):
        for name in ("train_loss", "learning_rate", "eval_loss"):
            assert beside[index].values(name) == between[index].values(name), (index, name)
        assert len(beside[index].values("eval_loss")) == len(plan_chunks(64, VARIANTS[index], 3))
    key = lambda outcome: (outcome.run_id, outcome.chunk_index)  # noqa: E731
    for left, right in zip(sorted(between_outcomes, key=key), sorted(beside_outcomes, key=key), strict=True):
        assert (left.step, left.status, left.eval_metrics) == (right.step, right.status, right.eval_metrics)
        assert (left.best_step, left.best_value) == (right.best_step, right.best_value)
        saved_left, saved_right = load_checkpoint(left.checkpoint), load_checkpoint(right.checkpoint)
        assert_same_weights(saved_left["trainable"], saved_right["trainable"])
        assert saved_left["best"] == saved_right["best"]
    for index in range(len(VARIANTS)):
        for export in (LATEST, BEST):
            left = export_dir(tmp_path / "between" / f"run{index}", export)
            right = export_dir(tmp_path / "beside" / f"run{index}", export)
            weights = sorted(path.name for path in left.glob("*.safetensors"))
            assert weights and weights == sorted(path.name for path in right.glob("*.safetensors"))
            for name in weights:
                assert (left / name).read_bytes() == (right / name).read_bytes(), (index, export, name)


def test_only_a_boundary_nothing_waits_for_is_left_to_evaluate_beside(make_trainer, tmp_path) -> None:
    trainer = make_trainer(evaluates_beside=True)
    config = VARIANTS[0]
    first = plan_chunks(64, config, 3)[0]
    waited_for = trainer.train_leaving_evaluation(task_for(1, config, first, tmp_path / "a"), Recorder())
    assert isinstance(waited_for, ChunkOutcome) and "eval_loss" in waited_for.eval_metrics
    drawing = config_of(LORA, predict_with_generate=True, compute_metrics="exact_match")
    task = replace(task_for(2, drawing, plan_chunks(64, drawing, 3)[0], tmp_path / "b"), evaluation_may_wait=True)
    assert isinstance(trainer.train_leaving_evaluation(task, Recorder()), ChunkOutcome)  # generation samples
    left = trainer.train_leaving_evaluation(
        replace(task_for(3, config, first, tmp_path / "c"), evaluation_may_wait=True), Recorder()
    )
    assert isinstance(left, EvaluationBeside)
    outcome = left.finish()
    assert outcome.status == "ok" and "eval_loss" in outcome.eval_metrics
    assert torch.isfinite(torch.tensor(outcome.eval_metrics["eval_loss"]))


def test_evaluating_beside_training_is_on_by_default_only_where_cores_are_left_for_it() -> None:
    from rf_core.training.worker import evaluates_beside_by_default

    # The evaluating thread computes with as many threads as the slot trains with.
    assert evaluates_beside_by_default([None, None], threads_per_slot=1, cpu_count=2) is False  # every core trains
    assert evaluates_beside_by_default([None], threads_per_slot=1, cpu_count=2) is True
    assert evaluates_beside_by_default([None, None], threads_per_slot=2, cpu_count=8) is True
    assert evaluates_beside_by_default([None, None], threads_per_slot=3, cpu_count=8) is False
    assert evaluates_beside_by_default(["cuda:0"], threads_per_slot=1, cpu_count=64) is False
