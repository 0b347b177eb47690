"""The head-to-head benchmark's fixed task, shared by every contestant (and importable without Ray or Prefect).

The demo's tiny pretrained LM (`rf-tiny-llama`) LoRA-fine-tuned on the demo data (standard-library docstrings),
16 configs: 4 learning rates spaced in log scale × LoRA rank {4, 16} × LR schedule {linear, cosine}; the metric
is eval loss. `train_in_chunks` is the one training function every contestant outside the engine's own fit
calls: the engine's `SlotTrainer`, one chunk at a time, with an eval after each chunk, so a Ray Tune trial
trains exactly what the engine trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rf_core.knobs import GridSearch, List

SEED = 42
NUM_CHUNKS = 8
SLOTS = 2
LEARNING_RATES = [3e-4, 1e-3, 3e-3, 1e-2]
RANKS = [4, 16]
SCHEDULES = ["linear", "cosine"]
VARYING_KNOBS = ("learning_rate", "r", "lr_scheduler_type")
FIXED_KNOBS: dict[str, Any] = {
    "model_name_or_path": "rf-tiny-llama",
    "lora_alpha": 16,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,
    "max_length": 64,
    "warmup_steps": 10,
}


@dataclass(frozen=True)
class TaskSize:
    """How big the task is: the full benchmark, or a smoke run that only checks the machinery works."""

    learning_rates: tuple[float, ...]
    ranks: tuple[int, ...]
    schedules: tuple[str, ...]
    num_chunks: int
    train_examples: int | None  # None: all of the demo's training examples
    eval_examples: int

    def config_group(self) -> GridSearch:
        return GridSearch(
            {
                **FIXED_KNOBS,
                "learning_rate": List(list(self.learning_rates)),
                "r": List(list(self.ranks)),
                "lr_scheduler_type": List(list(self.schedules)),
            }
        )

    def configs(self) -> list[dict[str, Any]]:
        from rf_core.knobs import expand_config_group

        return expand_config_group(self.config_group())

    def datasets(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        from rf_core.training.data import demo_datasets

        train, evaluation = demo_datasets()
        if self.train_examples is not None:
            train = train[: self.train_examples]
        return list(train), list(evaluation[: self.eval_examples])

    def to_dict(self) -> dict[str, Any]:
        return {
            "learning_rates": list(self.learning_rates),
            "ranks": list(self.ranks),
            "schedules": list(self.schedules),
            "num_chunks": self.num_chunks,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSize:
        return cls(
            learning_rates=tuple(data["learning_rates"]),
            ranks=tuple(data["ranks"]),
            schedules=tuple(data["schedules"]),
            num_chunks=int(data["num_chunks"]),
            train_examples=data["train_examples"],
            eval_examples=int(data["eval_examples"]),
        )

    def search_space(self) -> dict[str, Any]:
        """The same configs as a search space (every knob categorical), for searches that pick their own."""
        return {
            **FIXED_KNOBS,
            "learning_rate": List(list(self.learning_rates)),
            "r": List(list(self.ranks)),
            "lr_scheduler_type": List(list(self.schedules)),
        }


FULL = TaskSize(tuple(LEARNING_RATES), tuple(RANKS), tuple(SCHEDULES), NUM_CHUNKS, None, 128)
# Good configs are rare: 16 learning rates spaced in log scale over three and a half decades × 2 ranks, where only
# the top of the range gets near the best loss within one epoch.
RARE = TaskSize(
    tuple(float(f"{1e-5 * (3e-2 / 1e-5) ** (i / 15):.3g}") for i in range(16)), tuple(RANKS), ("linear",),
    NUM_CHUNKS, None, 128,
)  # fmt: skip
SMOKE = TaskSize((1e-3, 1e-2), (4,), ("linear", "cosine"), 2, 48, 16)
TASKS = {"full": FULL, "rare": RARE}


def config_key(config: dict[str, Any]) -> str:
    """The knobs that tell the benchmark's configs apart, as one stable string (PBT clones get their own)."""
    return json.dumps({knob: config.get(knob) for knob in VARYING_KNOBS}, sort_keys=True)


def train_in_chunks(
    config: dict[str, Any],
    size: TaskSize,
    run_folder: Path,
    report: Callable[[dict[str, Any]], bool | None],
    *,
    num_threads: int = 1,
    run_id: int = 1,
) -> None:
    """Train `config` straight through its chunks on this process, calling `report` after each chunk with
    {chunk, eval_loss, step, chunk_start, chunk_end, time}; `report` returning False stops the training."""
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.messages import TrainTask
    from rf_core.training.models import demo_create_model_fn
    from rf_core.training.staging import default_staging_root
    from rf_core.training.trainer import SlotTrainer

    normalized = normalize_config(config)
    train, evaluation = size.datasets()
    trainer = SlotTrainer(
        demo_create_model_fn, train, evaluation, num_threads=num_threads, staging_root=default_staging_root()
    )
    try:
        trainer.prepare([normalized])
        chunks: Sequence[Any] = plan_chunks(len(train), normalized, size.num_chunks)
        for chunk in chunks:
            started = time.time()
            task = TrainTask("head-to-head", run_id, normalized, chunk, str(run_folder), SEED, keep_checkpoints=1)
            outcome = trainer.train(task, lambda rows: None)
            if outcome.status not in ("ok", "completed"):
                raise RuntimeError(f"chunk {chunk.index} of {config_key(config)} failed: {outcome.error}")
            ended = time.time()
            keep_going = report(
                {
                    "chunk": chunk.index,
                    "eval_loss": float(outcome.eval_metrics["eval_loss"]),
                    "step": outcome.step,
                    "chunk_start": started,
                    "chunk_end": ended,
                    "time": ended,
                }
            )
            if keep_going is False or outcome.status == "completed":
                break
    finally:
        trainer.close()
