"""The orchestration benchmark's experiment, importable by slot workers as `bench.bench_experiment:spec`.

N LoRA configs (a learning-rate List) of the built-in `rf-tiny-llama` with no pretraining, on enough synthetic
prompt → completion examples that each chunk is a chosen number of optimizer steps. `bench/orchestration.py`
sets the sizes through environment variables (read when `spec()` is called, in the flow and in every worker):

- RF_BENCH_MODEL_CACHE: folder the base model is built into once (required).
- RF_BENCH_RUNS, RF_BENCH_CHUNKS, RF_BENCH_STEPS_PER_CHUNK: configs, chunks per run, optimizer steps per chunk.
- RF_BENCH_SHUFFLE: when "1", the learning rates come in a seeded random order (a policy that ranks runs sees
  better and worse ones arrive in turn, not each run better than the last).
- RF_BENCH_PROBE_DIR: when set, each slot worker process times the phases of every chunk it trains (setup,
  training loop, evaluation, checkpoint, metric hand-over) and appends them as JSON lines to a file in that folder.
  The probe only wraps methods to read the clock around them; what they do is unchanged.

`python -m bench.bench_experiment --calibrate` measures optimizer steps per second on one thread.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rf_core.experiment import ExperimentSpec
from rf_core.knobs import List

MODEL_CACHE_ENV = "RF_BENCH_MODEL_CACHE"
RUNS_ENV = "RF_BENCH_RUNS"
CHUNKS_ENV = "RF_BENCH_CHUNKS"
STEPS_PER_CHUNK_ENV = "RF_BENCH_STEPS_PER_CHUNK"
PROBE_DIR_ENV = "RF_BENCH_PROBE_DIR"
SHUFFLE_ENV = "RF_BENCH_SHUFFLE"

MODEL_NAME = "rf-tiny-llama"
BATCH_SIZE = 8
MAX_LENGTH = 64
EVAL_EXAMPLES = 16
DEFAULT_RUNS = 8
DEFAULT_CHUNKS = 8
DEFAULT_STEPS_PER_CHUNK = 60  # overridden by bench/orchestration.py from a calibration on this machine
WORKER_PROCESS_PREFIX = "rf-slot-"  # SlotWorker names its processes rf-slot-<slot>
_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def learning_rates(count: int) -> list[float]:
    """`count` learning rates spaced evenly in log scale from 1e-4 to 1e-2."""
    if count == 1:
        return [1e-3]
    return [10 ** (-4 + 2 * index / (count - 1)) for index in range(count)]


def bench_configs(num_runs: int, shuffled: bool = False) -> dict[str, Any]:
    rates = learning_rates(num_runs)
    if shuffled:
        random.Random(5).shuffle(rates)
    return {
        "model_name_or_path": MODEL_NAME,
        "learning_rate": List(rates),
        "r": 8,
        "lora_alpha": 16,
        "per_device_train_batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
    }


def create_model_fn(config: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rf_core.training.models import ensure_pretrained

    folder = ensure_pretrained(config["model_name_or_path"], Path(os.environ[MODEL_CACHE_ENV]), pretrain_steps=0)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True), tokenizer


def examples(count: int, offset: int) -> list[dict[str, str]]:
    """Synthetic prompt → completion pairs long enough to fill MAX_LENGTH tokens (tensors are padded to it)."""
    return [
        {
            "prompt": f"item {index}: ",
            "completion": " ".join(_WORDS[(index * 7 + position) % len(_WORDS)] for position in range(24)),
        }
        for index in range(offset, offset + count)
    ]


def _env_int(name: str, default: int) -> int:
    value = int(os.environ.get(name) or default)
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    return value


def spec() -> ExperimentSpec:
    num_runs = _env_int(RUNS_ENV, DEFAULT_RUNS)
    num_chunks = _env_int(CHUNKS_ENV, DEFAULT_CHUNKS)
    steps_per_chunk = _env_int(STEPS_PER_CHUNK_ENV, DEFAULT_STEPS_PER_CHUNK)
    return ExperimentSpec(
        config_group=bench_configs(num_runs, shuffled=os.environ.get(SHUFFLE_ENV) == "1"),
        create_model_fn=create_model_fn,
        train_dataset=examples(num_chunks * steps_per_chunk * BATCH_SIZE, 0),
        eval_dataset=examples(EVAL_EXAMPLES, 1_000_000),
        num_chunks=num_chunks,
        seed=11,
    )


# ------------------------------------------------------------------------------------ worker-side probe


class _ChunkProbe:
    """Per-process clock readings of the chunk being trained; one JSON line per chunk when it is flushed.

    Per thread: a boundary evaluated beside training is finished, and flushed, by the evaluating thread while the
    next chunk trains in the worker's main thread."""

    def __init__(self, output: Path, slot: int) -> None:
        self.output = output
        self.slot = slot
        self._local = threading.local()
        self._write_lock = threading.Lock()

    @property
    def current(self) -> dict[str, Any] | None:
        """This thread's chunk: the one it trained or finished last, until its metrics are flushed."""
        return getattr(self._local, "current", None)

    @current.setter
    def current(self, record: dict[str, Any] | None) -> None:
        self._local.current = record

    def add_seconds(self, key: str, seconds: float) -> None:
        if self.current is not None:
            self.current[key] = self.current.get(key, 0.0) + seconds

    def write(self, record: dict[str, Any]) -> None:
        with self._write_lock, open(self.output, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def _timed(probe: _ChunkProbe, key: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            probe.add_seconds(key, time.perf_counter() - started)

    return wrapper


def _install_worker_probe(probe_dir: Path) -> None:
    """Wrap the slot trainer's phases with clock readings, in a slot worker process only."""
    process_name = multiprocessing.current_process().name
    if not process_name.startswith(WORKER_PROCESS_PREFIX):
        return
    from rf_core.metric_writer import MetricWriter
    from rf_core.training.trainer import EvaluationBeside, SlotTrainer

    if getattr(SlotTrainer.train, "_bench_probe", False):
        return
    probe_dir.mkdir(parents=True, exist_ok=True)
    probe = _ChunkProbe(probe_dir / f"{process_name}-{os.getpid()}.jsonl", int(process_name.split("-")[-1]))
    original_train = SlotTrainer.train
    original_leaving = SlotTrainer.train_leaving_evaluation
    original_hand_over = MetricWriter.hand_over

    def timed_chunk(trainer: Callable[[], Any], task: Any) -> Any:
        record = probe.current = {
            "slot": probe.slot,
            "pid": os.getpid(),
            "run_id": task.run_id,
            "chunk_index": task.chunk.index,
            "trainer_start": time.time(),
        }
        started = time.perf_counter()

        def ended(outcome: Any) -> Any:
            record["trainer_seconds"] = time.perf_counter() - started
            record["trainer_end"] = time.time()
            record["train_seconds"] = outcome.train_seconds
            record["status"] = outcome.status
            return outcome

        outcome = trainer()
        if not isinstance(outcome, EvaluationBeside):
            return ended(outcome)
        probe.current = None  # finished, and flushed, by the evaluating thread
        record["evaluated_beside"] = True
        record["handed_seconds"] = time.perf_counter() - started  # the main thread is free for the next chunk

        def finish() -> Any:
            probe.current = record
            return ended(outcome.finish())

        return EvaluationBeside(outcome.run_id, finish)

    def train(self: SlotTrainer, task: Any, emit: Any, on_trained: Any = None) -> Any:
        return timed_chunk(lambda: original_train(self, task, emit, on_trained), task)

    def train_leaving_evaluation(self: SlotTrainer, task: Any, emit: Any, on_trained: Any = None) -> Any:
        return timed_chunk(lambda: original_leaving(self, task, emit, on_trained), task)

    def hand_over(self: MetricWriter) -> list[dict[str, Any]]:
        started = time.perf_counter()
        batches = original_hand_over(self)
        record, probe.current = probe.current, None
        if record is not None:  # after each chunk, before the worker answers the fit loop
            record["flush_seconds"] = time.perf_counter() - started
            record["flush_end"] = time.time()
            probe.write(record)
        return batches

    train._bench_probe = True  # type: ignore[attr-defined]
    SlotTrainer.train = train  # type: ignore[method-assign]
    SlotTrainer.train_leaving_evaluation = train_leaving_evaluation  # type: ignore[method-assign]
    MetricWriter.hand_over = hand_over  # type: ignore[method-assign]
    SlotTrainer._evaluate = _timed(probe, "eval_seconds", SlotTrainer._evaluate)  # type: ignore[method-assign]
    # What the main thread does to hand a boundary over to the evaluating thread (used for those records only).
    SlotTrainer._evaluation_twin = _timed(  # type: ignore[method-assign]
        probe, "handover_seconds", SlotTrainer._evaluation_twin
    )
    SlotTrainer._export_recipe = _timed(  # type: ignore[method-assign]
        probe, "handover_seconds", SlotTrainer._export_recipe
    )
    SlotTrainer._save = _timed(probe, "checkpoint_seconds", SlotTrainer._save)  # type: ignore[method-assign]
    SlotTrainer._base = _timed(probe, "base_model_seconds", SlotTrainer._base)  # type: ignore[method-assign]
    SlotTrainer._tokenized_data = _timed(  # type: ignore[method-assign]
        probe, "tokenize_seconds", SlotTrainer._tokenized_data
    )
    SlotTrainer._state_at_chunk_start = _timed(  # type: ignore[method-assign]
        probe, "run_state_seconds", SlotTrainer._state_at_chunk_start
    )


if os.environ.get(PROBE_DIR_ENV):
    _install_worker_probe(Path(os.environ[PROBE_DIR_ENV]))


# ---------------------------------------------------------------------------------------------- calibration


def measure_steps_per_second(steps: int, threads: int = 1) -> float:
    """Optimizer steps per second of one bench LoRA run on `threads` threads, after a warm-up chunk."""
    import torch

    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.knobs import expand_config_group
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer

    torch.set_num_threads(threads)
    if MODEL_CACHE_ENV not in os.environ:  # run alone: the tiny base model is built in a folder of its own
        os.environ[MODEL_CACHE_ENV] = tempfile.mkdtemp(prefix="rf-bench-models-")
    config = normalize_config(expand_config_group(bench_configs(1))[0])
    num_chunks = 2
    os.environ[CHUNKS_ENV], os.environ[STEPS_PER_CHUNK_ENV] = str(num_chunks), str(steps)
    experiment = spec()
    trainer = SlotTrainer(
        experiment.create_model_fn, experiment.train_dataset, experiment.eval_dataset, num_threads=threads
    )
    run_folder = Path(os.environ[MODEL_CACHE_ENV]) / f"calibration-run-{os.getpid()}"
    seconds = 0.0
    for chunk in plan_chunks(len(experiment.train_dataset), config, num_chunks):
        task = TrainTask("calibration", 1, config, chunk, str(run_folder), experiment.seed)
        outcome = trainer.train(task, lambda rows: None)
        if outcome.status == "failed":
            raise RuntimeError(f"calibration chunk failed: {outcome.error}")
        seconds = outcome.train_seconds  # the last chunk's: the first one pays one-off warm-up costs
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="print optimizer steps/s on --threads threads")
    parser.add_argument("--steps", type=int, default=40, help="steps in the timed calibration chunk")
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    if arguments.calibrate:
        print(json.dumps({"steps_per_second": measure_steps_per_second(arguments.steps, arguments.threads)}))


if __name__ == "__main__":
    main()
