"""Training one chunk of one run inside a slot worker, exactly resumable at every chunk boundary.

A `SlotTrainer` lives in one worker process for a whole experiment. It caches base models and tokenized
data, and keeps the state of the runs it trained (adapter or full weights, optimizer, LR schedule, RNG) in
memory, so the next chunk of a run it trained last needs no disk read. Any other chunk starts from the run's
checkpoint on disk, a warm-start parent's checkpoint, or a fresh seed.

Exactness contract: with a fixed thread count on CPU, training a config in k chunks (state kept in memory,
interleaved with other runs, or swapped to another trainer through the staging area or disk) gives bitwise the
same per-step losses and final weights as one chunk. That is why every chunk restores the run's RNG state, why the data
order is a pure function of (seed, epoch), and why the LR schedule spans the whole run.

LoRA runs on the same base share one frozen copy of it: a single PEFT model per base (the LoRA host) holds one
adapter per LoRA shape, a slot that the runs of that shape take turns in. Each run owns its adapter parameters and
puts them into the slot's modules when it trains, so switching runs costs a pointer per LoRA weight, whatever the
number of runs in memory. A full fine-tune run trains its own copy of the base.

At each boundary the state is snapshotted into the staging area and persisted, exported and pruned by a
background `StateWriter` (see `rf_core.training.staging`), so saving costs the chunk a memory copy, not a disk write.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import EvalPrediction, get_scheduler

from rf_core import chunks
from rf_core.config import KNOBS
from rf_core.data_forms import dataset_for, formatted_example, is_keyed_by_trainer_type
from rf_core.functions import EvaluationContext, resolve
from rf_core.messages import ChunkOutcome, ChunkSpec, Gang, TrainTask, WarmStart
from rf_core.states import EVAL_LOSS_METRIC, LEARNING_RATE_METRIC, LOGGED_LOSS_METRIC, TRAIN_LOSS_METRIC
from rf_core.training import zero
from rf_core.training.artifacts import (
    BEST,
    LATEST,
    ExportRecipe,
    copy_export,
    export_dir,
    prune_checkpoints,
    write_export,
)
from rf_core.training.checkpoints import (
    capture_rng_state,
    init_checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_path,
    step_of,
)
from rf_core.training.data import IGNORE_INDEX, GenerationSet, TokenizedData, generation_set, tokenize_examples
from rf_core.training.evaluation import (
    BUILTIN_METRICS,
    call_metrics,
    evaluates_after_step,
    evaluates_at_boundary,
    generate_texts,
    metrics_function,
    stacked_logits,
    takes_eval_prediction,
)
from rf_core.training.gang import DeepSpeedStep, GangSession, PlainStep, free_address, gang_session
from rf_core.training.grpo import (
    Generation,
    PromptData,
    completion_token_logps,
    generate_completions,
    group_advantages,
    grpo_loss,
    reward_table,
    tokenize_prompts,
)
from rf_core.training.preference import PreferenceData, completion_logps, dpo_loss, tokenize_preferences
from rf_core.training.staging import AfterPersist, StateWriter, StorageFull, load_state, state_exists

CreateModelFn = Callable[[dict[str, Any]], tuple[Any, Any]]
ComputeMetricsFn = Callable[[Any, Any, Any], Mapping[str, float]]
EmitFn = Callable[[list[dict[str, Any]]], None]

_MAX_LISTED_KEYS = 5  # how many mismatching keys an error message names before summarising
MAX_LORA_SLOTS = 8  # per base: more LoRA shapes in turn evict the slot used longest ago (runs keep their weights)
MAX_FREE_FULL_COPIES = 1  # per base: a full copy costs the base model's size in memory
_LORA_REFERENCE_KNOBS = ("r", "lora_alpha", "target_modules")  # what a frozen reference adapter is rebuilt from
STATE_WAIT_S = 120.0  # how long a chunk waits for its start state that another worker is still writing


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a micro-batch loss was NaN or infinite."""


@dataclass
class _LoraSlot:
    """An adapter of a LoRA host that the runs of one LoRA shape take turns in.

    A run's own parameters are put into the slot's modules when it trains (`bind`), so PEFT's per-adapter loops
    (activating an adapter, train/eval mode, requires_grad) run over a handful of slots, not over every run in memory.
    """

    name: str
    places: dict[str, tuple[torch.nn.Module, str]]  # parameter key -> (the module holding it, its attribute)
    layers: list[Any] = field(default_factory=list)  # PEFT's LoRA layers holding it: scaling and dropout per run
    last_bound: int = 0  # when a run last trained in it, to evict the slot used longest ago
    evicted: bool = False
    scaling_knobs: tuple[float, float] | None = None  # (lora_alpha, lora_dropout) its layers are set to

    @classmethod
    def of(cls, host: PeftModel, name: str) -> _LoraSlot:
        places: dict[str, tuple[torch.nn.Module, str]] = {}
        for full_name, _ in host.named_parameters():
            parts = full_name.split(".")
            if name in parts:
                key = ".".join(part for part in parts if part != name)
                places[key] = (host.get_submodule(".".join(parts[:-1])), parts[-1])
        if not places:
            raise ValueError(f"adapter {name!r} has no parameters: do its target_modules match the model?")
        layers = [module for module in host.modules() if isinstance(module, LoraLayer) and name in module.lora_A]
        return cls(name=name, places=places, layers=layers)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return {key: module._parameters[attribute] for key, (module, attribute) in self.places.items()}

    def bind(self, parameters: Mapping[str, torch.nn.Parameter], clock: int, config: Mapping[str, Any]) -> None:
        """Put a run's parameters into the slot, with its own alpha and dropout: runs that differ only in those
        share the slot, and each trains as in an adapter of its own (PEFT's scaling alpha / r and dropout)."""
        for key, (module, attribute) in self.places.items():
            module._parameters[attribute] = parameters[key]
        knobs = (float(config["lora_alpha"]), float(config["lora_dropout"]))
        if knobs != self.scaling_knobs:
            alpha, dropout = knobs
            for layer in self.layers:
                layer.lora_alpha[self.name] = alpha
                layer.scaling[self.name] = alpha / layer.r[self.name]
                # As PEFT builds it; a module without parameters, so replacing it leaves optimizers untouched.
                layer.lora_dropout[self.name] = torch.nn.Dropout(p=dropout) if dropout > 0.0 else torch.nn.Identity()
            self.scaling_knobs = knobs
        self.last_bound = clock


@dataclass
class _BaseEntry:
    """One base model: the single copy of its weights, its tokenizer, and the LoRA host wrapping it."""

    model: Any
    tokenizer: Any
    lora_host: PeftModel | None = None
    lora_slots: dict[tuple[Any, ...], _LoraSlot] = field(default_factory=dict)  # by LoRA shape
    # Likewise a released full fine-tune's model: the next full run swapped in loads its weights over it
    # instead of deep-copying the base again.
    free_full_copies: list[Any] = field(default_factory=list)


@dataclass
class _RunState:
    """Everything needed to continue a run at its next chunk boundary without touching disk."""

    run_id: int
    base_key: str
    model: Any  # what to call: the shared LoRA host, or the run's own full copy
    slot: _LoraSlot | None  # the LoRA host's adapter the run trains in; None for a full fine-tune
    trainable: dict[str, torch.nn.Parameter]  # checkpoint key -> parameter, in the optimizer's order
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0
    epoch: int = 0
    samples: int = 0
    chunk_index: int = -1
    rng: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # {"value", "step"}: the run's best chunk by the experiment's metric
    chunk_started: tuple[int, int] | None = None  # (chunk index, step) of the chunk being trained
    samples_at_chunk_start: int = 0
    engine: Any = None  # a DeepSpeed run's engine, for the chunk being trained; it holds the optimizer state
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale: the run's, swapped and checkpointed with it
    # logging_steps: the train losses since the last logged `loss`; an interval may span a chunk boundary.
    unlogged_losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # A DPO run's reference when it is not the base: {"key": what it is, "path": its weights file in the run's folder}.
    reference: dict[str, str] | None = None

    @property
    def is_lora(self) -> bool:
        return self.slot is not None


@dataclass(frozen=True)
class _ParentState:
    """What a warm start takes from its parent."""

    weights: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any]
    config: Mapping[str, Any]
    reference: dict[str, str] | None
    source: str  # where it came from, for error messages


@dataclass(frozen=True)
class EvaluationBeside:
    """A chunk whose steps are done and whose boundary evaluation waits to be run beside the next chunk's training.

    `finish()` evaluates the boundary, keeps the run's best, saves its state and returns the chunk's outcome (a
    failure comes back as status "failed", as from `SlotTrainer.train`). Until it has, the run must not train."""

    run_id: int
    finish: Callable[[], ChunkOutcome]


@dataclass(frozen=True)
class _TrainedChunk:
    """A chunk whose optimizer steps are done: what evaluating and saving its boundary need."""

    task: TrainTask
    base: _BaseEntry
    state: _RunState
    seed: int
    run_total_steps: int
    swap_in_seconds: float
    train_seconds: float
    last_train_loss: float | None
    device: torch.device
    truncated_rows: int


@dataclass
class _EvaluationTwin:
    """A second LoRA host over the same base weights (shared, not copied): it evaluates one run while the first
    host trains another."""

    host: Any
    slots: dict[str, _LoraSlot] = field(default_factory=dict)


def reference_path(run_dir: Path) -> Path:
    """The weights a DPO run is anchored to when they are not the base (written once, at its warm start)."""
    return run_dir / "reference.ckpt"


class SlotTrainer:
    """Trains chunks of many runs in one process; see the module docstring for the exactness contract.

    Args:
        create_model_fn: config -> (base_model, tokenizer); called once per distinct `model_name_or_path`.
        train_dataset: examples with "text", or "prompt" and "completion" (list, `datasets.Dataset`, ...).
        eval_dataset: same forms; evaluated at every chunk end. None or empty: no evaluation.
        compute_metrics: the experiment's metric function for configs whose `compute_metrics` knob is null: HF's
            `(eval_prediction) -> {name: value}` or the engine's `(model, tokenizer, eval_dataset)`; see
            `rf_core.training.evaluation`.
        functions: the experiment's registry, {name: function}, for the `formatting_func` and `compute_metrics`
            names configs hold.
        num_threads: torch intra-op threads for this process. Fix it: float sums differ across thread counts.
        step_delay_s: sleep after every optimizer step (tests use it so operations arrive mid-chunk).
        device: where base models and run state live ("cpu", "cuda:1", ...); None keeps the model's own.
        staging_root: RAM-backed folder for state snapshots (`rf_core.training.staging.default_staging_root()`);
            None snapshots into this process's memory. Either way disk writes happen in the background.
        max_pending_writes: how many states may wait for the disk before a save blocks.
        evaluates_beside: `train_leaving_evaluation` may leave a boundary's evaluation to be run in another thread,
            beside the next chunk's training (see `evaluates_beside`).
    """

    def __init__(
        self,
        create_model_fn: CreateModelFn,
        train_dataset: Iterable[Mapping[str, Any]],
        eval_dataset: Iterable[Mapping[str, Any]] | None,
        compute_metrics: ComputeMetricsFn | None = None,
        *,
        functions: Mapping[str, Callable[..., Any]] | None = None,
        num_threads: int | None = None,
        step_delay_s: float = 0.0,
        device: str | None = None,
        staging_root: Path | None = None,
        max_pending_writes: int = 2,
        evaluates_beside: bool = False,
    ) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"{num_threads=} must be >= 1")
        if step_delay_s < 0:
            raise ValueError(f"{step_delay_s=} must be >= 0")
        self._create_model_fn = create_model_fn
        # Rows per trainer type; key None: one dataset for every trainer type.
        self._train_sets = _datasets(train_dataset)
        self._eval_sets = _datasets(eval_dataset) if eval_dataset is not None else {}
        for key, rows in self._train_sets.items():
            if len(rows) == 0:
                raise ValueError("train_dataset is empty" if key is None else f"train_dataset[{key!r}] is empty")
        self._compute_metrics = compute_metrics
        self._functions = dict(functions or {})
        self._formatted: dict[tuple[str, str, int], list[Any]] = {}
        self._generation_sets: dict[tuple[Any, ...], GenerationSet] = {}
        self._step_delay_s = step_delay_s
        self._device = torch.device(device) if device is not None else None
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._bases: dict[str, _BaseEntry] = {}
        self._tokenized: dict[tuple[Any, ...], TokenizedData | PreferenceData | PromptData] = {}
        self._runs: dict[int, _RunState] = {}
        self._adapters_made = 0
        self._binds = 0  # a clock for the slots' least-recently-used eviction
        # DPO references other than the base, by (base, reference key): an adapter's name in the LoRA host, or a
        # frozen full copy. Runs anchored to the same weights share one.
        self._reference_adapters: dict[tuple[str, str], str] = {}
        self._reference_copies: dict[tuple[str, str], Any] = {}
        self._writer = StateWriter(staging_root, max_pending_writes)
        self._staging_root = staging_root
        self._evaluates_beside = evaluates_beside
        self._twins: dict[str, _EvaluationTwin] = {}  # by base key

    # ----------------------------------------------------------------------------------------------- public

    def train(self, task: TrainTask, emit: EmitFn, on_trained: Callable[[], None] | None = None) -> ChunkOutcome:
        """Train `task.chunk` of run `task.run_id`. Never raises: a failure comes back as status "failed".

        `on_trained` is called when the chunk's optimizer steps are done, before its evaluation and checkpoint, for a
        run that trains alone: the fit can plan this slot's next chunk meanwhile."""
        outcome = self._guarded(task, lambda: self._train_chunk(task, emit, on_trained, may_leave_evaluation=False))
        assert isinstance(outcome, ChunkOutcome)
        return outcome

    def train_leaving_evaluation(
        self, task: TrainTask, emit: EmitFn, on_trained: Callable[[], None] | None = None
    ) -> ChunkOutcome | EvaluationBeside:
        """As `train`, but a boundary whose evaluation may be run beside the next chunk (`evaluates_beside`) comes
        back unevaluated and unsaved: the caller runs its `finish()` in another thread and trains on meanwhile. For
        such a chunk `on_trained` is called as its last optimizer step begins, so the next one is planned and on its
        way by the time the step is done."""
        return self._guarded(task, lambda: self._train_chunk(task, emit, on_trained, may_leave_evaluation=True))

    def _guarded(
        self, task: TrainTask, work: Callable[[], ChunkOutcome | EvaluationBeside]
    ) -> ChunkOutcome | EvaluationBeside:
        try:
            return work()
        except Exception as error:
            state = self._runs.get(task.run_id)
            samples = 0  # unknown unless the chunk got as far as starting
            if state is not None and state.chunk_started == (task.chunk.index, task.chunk.start_step):
                samples = state.samples_at_chunk_start
            details = traceback.format_exc()
            # The in-memory state may be half-updated: drop it; a retry resumes from the last good checkpoint.
            with contextlib.suppress(Exception):
                self.release(task.run_id)
            if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the next run on this device the memory this one could not use
            return ChunkOutcome(
                run_id=task.run_id,
                chunk_index=task.chunk.index,
                status="interrupted" if isinstance(error, StorageFull) else "failed",
                step=task.chunk.start_step,
                epoch=task.chunk.epoch,
                samples=samples,
                error=_one_line(error),
                traceback=details,
            )

    def prepare(self, configs: Iterable[Mapping[str, Any]]) -> None:
        """Load the base models and tokenize the data these configs need, ahead of their first chunk."""
        for config in configs:
            base = self._base(config)
            self._tokenized_data("train", base.tokenizer, config)
            if self._has_eval(config):
                self._tokenized_data("eval", base.tokenizer, config)

    def flush(self) -> None:
        """Wait until every state saved so far is on disk (its exports and pruning done too)."""
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def release(self, run_id: int) -> None:
        """Forget a run's in-memory state (stopped, deleted, completed or failed); its checkpoints stay."""
        state = self._runs.pop(run_id, None)
        if state is not None and not state.is_lora:
            base = self._bases[state.base_key]
            if len(base.free_full_copies) < MAX_FREE_FULL_COPIES:
                base.free_full_copies.append(state.model)
        if state is not None and state.reference is not None:
            self._drop_unused_reference(state.base_key, state.reference["key"])

    # --------------------------------------------------------------------------------------- the chunk loop

    def _train_chunk(
        self,
        task: TrainTask,
        emit: EmitFn,
        on_trained: Callable[[], None] | None,
        may_leave_evaluation: bool = False,
    ) -> ChunkOutcome | EvaluationBeside:
        gang = task.gang
        if gang is None and task.config["strategy"] == "deepspeed":
            gang = Gang(rank=0, world_size=1, address=free_address(), slots=(0,), strategy="deepspeed")
        with gang_session(gang, self._device or torch.device("cpu")) as session:
            if session is not None:
                return self._train_chunk_in(task, emit, session)
            return self._train_chunk_in(task, emit, None, on_trained, may_leave_evaluation)

    def _train_chunk_in(
        self,
        task: TrainTask,
        emit: EmitFn,
        session: GangSession | None,
        on_trained: Callable[[], None] | None = None,
        may_leave_evaluation: bool = False,
    ) -> ChunkOutcome | EvaluationBeside:
        """The chunk loop; `session` is this process's gang for multi-process runs (None: trains alone)."""
        config, chunk = task.config, task.chunk
        leads = session is None or session.is_leader  # evaluates, logs and checkpoints
        base = self._base(config)
        train_data = self._tokenized_data("train", base.tokenizer, config)
        run_total_steps = chunks.total_steps(len(train_data), config)
        if not 0 <= chunk.start_step < chunk.end_step <= run_total_steps:
            raise ValueError(
                f"chunk {chunk.index} spans steps {chunk.start_step}-{chunk.end_step}, "
                f"outside the run's {run_total_steps} steps"
            )
        seed = _run_seed(task)

        # 1. Get the run's state at the chunk's first step, and make it the one the model trains.
        swap_in_started = time.perf_counter()
        state = self._state_at_chunk_start(task, base, seed, run_total_steps, writes=leads)
        swap_in_seconds = time.perf_counter() - swap_in_started
        if state.step != chunk.start_step:
            raise ValueError(
                f"run {task.run_id} is at step {state.step} but chunk {chunk.index} starts at step {chunk.start_step}"
            )
        state.chunk_started, state.samples_at_chunk_start = (chunk.index, chunk.start_step), state.samples
        model = self._activate(state)
        _set_gradient_checkpointing(model, config["gradient_checkpointing"])  # the base may serve other runs too
        grpo = config["trainer_type"] == "grpo"
        _set_dropout(model, enabled=config["trainer_type"] != "dpo")  # as TRL's DPO (disable_dropout)
        parameters = list(state.trainable.values())
        stepper = self._stepper(task, state, model, session)
        leaves_evaluation = may_leave_evaluation and self.evaluates_beside(task, state, run_total_steps)

        # 2. Train: this chunk's slice of the epoch's order, in optimizer steps of accumulated micro-batches
        # (a gang member trains its share of each step's micro-batches; DDP or DeepSpeed averages the gradients).
        order = chunks.epoch_order(len(train_data), seed, chunk.epoch)
        if grpo:  # a step's prompts, which become per_device_train_batch_size x accumulation completions
            step_batches = _step_batches(order, chunk, chunks.samples_per_step(config), 1)
        else:
            step_batches = _step_batches(
                order, chunk, config["per_device_train_batch_size"], chunks.micro_batches_per_step(config)
            )
        device = _model_device(model)
        last_train_loss: float | None = None
        loop_started = time.perf_counter()
        for micro_batches in step_batches:
            step_number = state.step + 1  # 1-based number of the update being computed
            if leaves_evaluation and step_number == chunk.end_step and on_trained is not None:
                # Nothing after the last step waits for the fit: it plans the slot's next chunk during that step.
                told = time.perf_counter()
                on_trained()  # may wait for the last boundary evaluated beside: not training time
                loop_started += time.perf_counter() - told
                on_trained = None
            state.optimizer.zero_grad(set_to_none=True)
            mine = micro_batches if session is None else session.my_micro_batches(micro_batches)
            if grpo:
                assert isinstance(train_data, PromptData)
                micro_losses, micro_metrics = self._grpo_step(
                    stepper, state, base, train_data, micro_batches[0], config, device, step_number
                )
            else:
                micro_losses, micro_metrics = self._accumulate(
                    stepper, state, base, train_data, mine, config, device, step_number, alone=session is None
                )
            if session is not None:
                # Every member must see the same losses, so all of them stop together on a bad one.
                loss_sum, count = session.sum([sum(micro_losses), len(micro_losses)])
                micro_losses = [loss_sum / count]
                if not np.isfinite(micro_losses[0]):
                    raise NonFiniteLossError(f"loss became {micro_losses[0]} at step {step_number}")
                names = sorted(micro_metrics)
                sums = session.sum([sum(micro_metrics[name]) for name in names]) if names else []
                micro_metrics = {name: [total / count] for name, total in zip(names, sums, strict=True)}
            learning_rate = state.optimizer.param_groups[0]["lr"]  # the rate this update uses
            if stepper.update(state.optimizer, parameters, config["max_grad_norm"]):
                state.scheduler.step()  # as HF: a step fp16's scaler skipped (gradients overflowed) moves no schedule
            state.optimizer.zero_grad(set_to_none=True)
            state.step = step_number
            state.samples += sum(len(indices) for indices in micro_batches)
            last_train_loss = sum(micro_losses) / len(micro_losses)
            now = time.time()
            rows = [
                _metric_row(state.step, TRAIN_LOSS_METRIC, last_train_loss, chunk.index, now),
                _metric_row(state.step, LEARNING_RATE_METRIC, learning_rate, chunk.index, now),
            ]
            rows += [
                _metric_row(state.step, name, sum(values) / len(values), chunk.index, now)
                for name, values in micro_metrics.items()
            ]
            if config["logging_steps"] is not None:
                state.unlogged_losses.append(last_train_loss)
                if state.step % config["logging_steps"] == 0:
                    logged = sum(state.unlogged_losses) / len(state.unlogged_losses)
                    rows.append(_metric_row(state.step, LOGGED_LOSS_METRIC, logged, chunk.index, now))
                    state.unlogged_losses = []
            if leads:
                emit(rows)
            if state.step < chunk.end_step and evaluates_after_step(config, state.step):
                # Between two steps of a chunk: the training RNG must come out as it went in.
                rng = capture_rng_state()
                self._evaluate_and_log(model, base, task, state, session, seed, emit)
                restore_rng_state(rng)
            if self._step_delay_s > 0:
                time.sleep(self._step_delay_s)
        train_seconds = time.perf_counter() - loop_started
        state.epoch = chunk.epoch
        state.chunk_index = chunk.index
        # Captured before evaluation so a compute_metrics that draws random numbers can't change training.
        state.rng = capture_rng_state()
        if on_trained is not None:
            on_trained()

        trained = _TrainedChunk(
            task, base, state, seed, run_total_steps, swap_in_seconds, train_seconds, last_train_loss, device,
            train_data.truncated,
        )  # fmt: skip
        if leaves_evaluation:
            # A full fine-tune's model is its own; LoRA runs take turns in the host, so theirs is evaluated in a twin.
            evaluator = self._evaluation_twin(base, state) if state.is_lora else state.model
            # Tokenized here: a tokenizer must not be used by two threads at once.
            self._tokenized_data("eval", base.tokenizer, config)
            # Read now: the host's adapters may change while the boundary is evaluated beside the next chunk.
            recipe = self._export_recipe(base, state, config)

            def finish() -> ChunkOutcome:
                outcome = self._guarded(task, lambda: self._finish_chunk(trained, evaluator, emit, None, recipe))
                assert isinstance(outcome, ChunkOutcome)
                return outcome

            return EvaluationBeside(task.run_id, finish)
        return self._finish_chunk(trained, model, emit, session)

    def evaluates_beside(self, task: TrainTask, state: _RunState, run_total_steps: int) -> bool:
        """Whether this chunk's boundary may be evaluated in another thread while the slot trains its next chunk.

        Only where that thread can neither slow nor change the training beside it: the fit does not wait for the
        result (`task.evaluation_may_wait`), an SFT run alone on a CPU slot (LoRA or full), a loss and metrics that
        draw no random numbers (a built-in one or none: torch's generator is the training thread's), and not the
        run's last boundary, whose result ends the run."""
        config = task.config
        metric_name = config.get("compute_metrics")
        draws_nothing = metric_name in BUILTIN_METRICS or (metric_name is None and self._compute_metrics is None)
        return (
            self._evaluates_beside
            and task.evaluation_may_wait
            and state.engine is None
            and _model_device(state.model).type == "cpu"
            and config["trainer_type"] == "sft"
            and not config["predict_with_generate"]
            and draws_nothing
            and task.chunk.end_step < run_total_steps
            and evaluates_at_boundary(config, task.chunk, run_total_steps)
            and self._has_eval(config)
        )

    def _evaluation_twin(self, base: _BaseEntry, state: _RunState) -> Any:
        """The base's evaluation twin with the run's adapter in it, ready to evaluate while the host trains on."""
        assert state.slot is not None and base.lora_host is not None
        name = state.slot.name
        twin = self._twins.get(state.base_key)
        if twin is None or name not in twin.host.peft_config:
            host = base.lora_host
            # The frozen base weights are shared; the adapters, small, and the modules are the twin's own.
            shared = {id(parameter): parameter for parameter in host.parameters() if not parameter.requires_grad}
            twin = self._twins[state.base_key] = _EvaluationTwin(copy.deepcopy(host, memo=shared))
        if name not in twin.slots:
            twin.slots[name] = _LoraSlot.of(twin.host, name)
        twin.slots[name].bind(state.trainable, 0, state.config)
        twin.host.set_adapter(name)
        return twin.host

    def _finish_chunk(
        self,
        trained: _TrainedChunk,
        model: Any,
        emit: EmitFn,
        session: GangSession | None,
        recipe: ExportRecipe | None = None,
    ) -> ChunkOutcome:
        """Evaluate the chunk's boundary, then checkpoint it. `session` None and `recipe` given: evaluated beside the
        next chunk's training, whose random numbers are then left alone."""
        task, base, state = trained.task, trained.base, trained.state
        config, chunk = task.config, task.chunk
        leads = session is None or session.is_leader
        eval_started = time.perf_counter()
        eval_metrics = {}
        if evaluates_at_boundary(config, chunk, trained.run_total_steps):
            eval_metrics = self._evaluate_and_log(model, base, task, state, session, trained.seed, emit)
        eval_seconds = time.perf_counter() - eval_started
        if recipe is None:
            restore_rng_state(state.rng)
        improved = _improves(state.best, eval_metrics.get(task.metric), task.mode)
        if improved:
            state.best = {"value": float(eval_metrics[task.metric]), "step": state.step}
        swap_out_started = time.perf_counter()
        checkpoint = step_checkpoint_path(task.run_dir, state.step)
        if state.engine is not None:
            zero.save_shards(state.engine, task.run_dir, state.step)  # every member writes its shard
        readable = list(state.trainable.values()) if state.is_lora else list(state.model.parameters())
        with zero.gathered(state.engine, readable):  # ZeRO-3 holds a shard of each weight per member
            if leads:
                follow_ups = self._follow_ups(task, base, state, improved, recipe)
                self._save(state, config, checkpoint, follow_ups)
        state_seconds = trained.swap_in_seconds + time.perf_counter() - swap_out_started
        exports = {LATEST: str(export_dir(task.run_dir, LATEST))}
        if state.best is not None:
            exports[BEST] = str(export_dir(task.run_dir, BEST))
        device = trained.device
        return ChunkOutcome(
            run_id=task.run_id,
            chunk_index=chunk.index,
            status="completed" if chunk.end_step == trained.run_total_steps else "ok",
            step=state.step,
            epoch=state.epoch,
            samples=state.samples,
            checkpoint=str(checkpoint),
            eval_metrics=eval_metrics,
            last_train_loss=trained.last_train_loss,
            train_seconds=trained.train_seconds,
            state_seconds=state_seconds,
            eval_seconds=eval_seconds,
            exports=exports,
            best_step=None if state.best is None else int(state.best["step"]),
            best_value=None if state.best is None else float(state.best["value"]),
            device=str(device),
            device_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            truncated_rows=trained.truncated_rows,
        )

    def _stepper(self, task: TrainTask, state: _RunState, model: Any, session: GangSession | None) -> PlainStep:
        """How this process computes each step of the chunk: alone, as a DDP member, or through DeepSpeed."""
        if task.config["strategy"] == "deepspeed":
            assert session is not None  # _train_chunk forms a gang of one when the task came without one
            state.engine = zero.start_engine(model, state.optimizer, task.config, session.gang, session.device)
            if task.chunk.index > 0:
                zero.load_shards(state.engine, task.run_dir, task.chunk.start_step)
            restore_rng_state(state.rng)  # starting the engine must not move the run's random streams
            return DeepSpeedStep(state.engine)
        stepper = PlainStep(model) if session is None else session.wrap_ddp(model, list(state.trainable.values()))
        stepper.scaler = state.scaler
        return stepper

    def _follow_ups(
        self, task: TrainTask, base: _BaseEntry, state: _RunState, improved: bool, recipe: ExportRecipe | None = None
    ) -> list[AfterPersist]:
        """Once the boundary's state is on disk: export it as the latest (and best), prune old checkpoints."""
        recipe = recipe or self._export_recipe(base, state, task.config)
        latest, best = export_dir(task.run_dir, LATEST), export_dir(task.run_dir, BEST)
        info = {"run_id": task.run_id, "metric": task.metric, "best": state.best}

        def export(checkpoint: Path) -> None:
            write_export(checkpoint, recipe, latest, info)
            if improved:
                copy_export(latest, best)

        def prune(_: Path) -> None:
            deleted = prune_checkpoints(task.run_dir, task.keep_checkpoints, task.pinned_steps)
            if task.config["strategy"] == "deepspeed":
                zero.prune_shards(task.run_dir, [step for path in deleted if (step := step_of(path)) is not None])

        return [export, prune]

    def _export_recipe(self, base: _BaseEntry, state: _RunState, config: dict[str, Any]) -> ExportRecipe:
        base_name = str(getattr(base.model.config, "_name_or_path", "") or config["model_name_or_path"])
        if state.is_lora:
            assert state.slot is not None
            # The slot's config, with the run's own alpha and dropout (runs differing in those share the slot).
            lora_config = copy.copy(state.model.peft_config[state.slot.name])
            lora_config.lora_alpha, lora_config.lora_dropout = config["lora_alpha"], config["lora_dropout"]
            return ExportRecipe.for_lora(base.tokenizer, lora_config, base_name)
        return ExportRecipe(tokenizer=base.tokenizer, model_config=state.model.config)

    # ---------------------------------------------------------------------------------------- run state

    def _state_at_chunk_start(
        self, task: TrainTask, base: _BaseEntry, seed: int, run_total_steps: int, writes: bool = True
    ) -> _RunState:
        """The run's state at the chunk's first step: from memory, its checkpoint, a warm-start parent or the seed.

        `writes`: this process saves the run's state (False for gang members other than rank 0). A DeepSpeed run's
        engine takes its module over, so it trains a private copy of the base, rebuilt every chunk, and its
        optimizer state comes later, from the run's ZeRO shards once the engine exists.
        """
        chunk = task.chunk
        deepspeed = task.config["strategy"] == "deepspeed"
        if deepspeed:
            copy_of_base = self._full_copy(base)
            # A full fine-tune trains the copy itself; a LoRA run wraps it in an adapter of its own.
            base = _BaseEntry(model=copy_of_base, tokenizer=base.tokenizer, free_full_copies=[copy_of_base])
        else:
            in_memory = self._runs.get(task.run_id)
            if in_memory is not None and self._is_current(in_memory, task):
                return in_memory
            self.release(task.run_id)  # stale or absent: rebuild from disk, the parent, or the seed

        if chunk.index > 0:
            path = step_checkpoint_path(task.run_dir, chunk.start_step)
            self._wait_for_state(path, f"run {task.run_id}: chunk {chunk.index} starts at step {chunk.start_step}")
            state = self._new_state(task, base, seed, run_total_steps, weights_follow=True)
            self._restore(state, load_state(path, self._staging_root), str(path))
        elif task.warm_start is not None and task.warm_start.mode != "off":
            warm = task.warm_start
            if deepspeed and warm.mode == "weights+optimizer":
                raise ValueError(
                    f"run {task.run_id} trains with DeepSpeed, whose optimizer state is sharded its own way: "
                    "warm-start it with weights only"
                )
            state = self._new_state(task, base, seed, run_total_steps, weights_follow=True)
            parent = self._parent_state(warm)
            _load_trainable(state, parent.weights, parent.source)
            # Optimizer moments never cross trainer types: they are the statistics of another objective's gradients.
            same_objective = parent.config.get("trainer_type", "sft") == task.config["trainer_type"]
            if warm.mode == "weights+optimizer" and same_objective:
                _load_optimizer_moments(state, parent.optimizer, parent.source)
            state.reference = self._warm_reference(task, parent, writes)
            # The schedule stays fresh: the clone's own warmup and decay over its own total steps. The RNG
            # starts from the seed, whichever way the adapter came to be (new, or reused).
            _seed_everything(seed)
            state.rng = capture_rng_state()
            if writes:
                self._save(state, task.config, init_checkpoint_path(task.run_dir))
        else:
            # A DeepSpeed full fine-tune trains its private copy of the base as it is: nothing to initialise.
            fresh_copy = deepspeed and not task.config["use_peft"]
            state = self._new_state(task, base, seed, run_total_steps, weights_follow=fresh_copy)
            state.rng = capture_rng_state()
        if not deepspeed:  # a DeepSpeed run's state is the private copy's, gone with the chunk
            self._runs[task.run_id] = state
        return state

    def _is_current(self, state: _RunState, task: TrainTask) -> bool:
        """True when the in-memory state is the one the chunk starts from.

        Training is deterministic, so a state at the chunk's start step is the state, whoever else also
        computed it; a state at any other step is stale (the run moved on elsewhere, or failed and went back).
        """
        chunk = task.chunk
        return chunk.index > 0 and state.chunk_index == chunk.index - 1 and state.step == chunk.start_step

    def _parent_state(self, warm: WarmStart) -> _ParentState:
        """A warm start's weights, optimizer state, config and reference: from the parent's in-memory state when
        this worker holds it at the clone's step (no disk at all), else from its checkpoint (staged copy first)."""
        parent = self._runs.get(warm.parent_run_id)
        if parent is not None and parent.step == warm.parent_step:
            weights = (
                {key: parameter.detach() for key, parameter in parent.trainable.items()}
                if parent.is_lora
                else parent.model.state_dict()
            )
            source = f"parent run {warm.parent_run_id} (in memory)"
            return _ParentState(weights, parent.optimizer.state_dict(), parent.config, parent.reference, source)
        self._wait_for_state(Path(warm.parent_checkpoint), f"parent run {warm.parent_run_id}'s state")
        checkpoint = load_state(warm.parent_checkpoint, self._staging_root)
        source = f"parent run {warm.parent_run_id} checkpoint {warm.parent_checkpoint}"
        return _ParentState(
            checkpoint["trainable"],
            checkpoint["optimizer"],
            dict(checkpoint.get("config") or {}),
            checkpoint.get("reference"),
            source,
        )

    def _warm_reference(self, task: TrainTask, parent: _ParentState, writes: bool) -> dict[str, str] | None:
        """A warm-started DPO or GRPO run's reference (None: the base). With ref_model "parent", a clone of an SFT run
        is anchored to the weights it starts from; a clone of a run that has a reference keeps it."""
        config, warm = task.config, task.warm_start
        assert warm is not None
        anchored = (config["trainer_type"] == "dpo" and not config["reference_free"]) or (
            config["trainer_type"] == "grpo" and bool(config["beta"])
        )
        if not anchored or config["ref_model"] == "base":
            return None
        path = reference_path(Path(task.run_dir))
        if parent.config.get("trainer_type", "sft") in ("dpo", "grpo"):
            if parent.reference is None:
                return None
            if writes:
                save_checkpoint(load_checkpoint(parent.reference["path"]), path)  # the parent may be deleted
            return {"key": parent.reference["key"], "path": str(path)}
        lora = None
        if parent.config.get("use_peft", True):
            lora = {name: parent.config.get(name, KNOBS[name].default) for name in _LORA_REFERENCE_KNOBS}
        if writes:
            weights = {key: tensor.detach().clone() for key, tensor in parent.weights.items()}
            save_checkpoint({"weights": weights, "lora": lora}, path)
        return {"key": f"run {warm.parent_run_id} at step {warm.parent_step}", "path": str(path)}

    def _wait_for_state(self, path: Path, what: str) -> None:
        """Another worker may still be writing the state (without a staging area, its disk write is behind)."""
        deadline = time.monotonic() + STATE_WAIT_S
        while not state_exists(path, self._staging_root):
            if time.monotonic() > deadline or not _being_written(path):
                raise FileNotFoundError(
                    f"{what} but there is no checkpoint {path} (latest: {latest_checkpoint(path.parent.parent)})"
                )
            time.sleep(0.01)

    def _new_state(
        self, task: TrainTask, base: _BaseEntry, seed: int, run_total_steps: int, weights_follow: bool = False
    ) -> _RunState:
        """A run with its adapter (or full copy), optimizer and LR schedule.

        `weights_follow`: the caller loads every trainable weight next (a swap in, a warm start), so a LoRA run's
        parameters need no init. Otherwise they are initialised from the seed, as PEFT initialises a new adapter.
        """
        config = task.config
        slot: _LoraSlot | None = None
        if config["use_peft"]:
            slot = self._lora_slot(base, config)
            model = base.lora_host
            if weights_follow:
                trainable = {
                    key: torch.nn.Parameter(torch.empty_like(parameter)) for key, parameter in slot.parameters().items()
                }
            else:
                trainable = self._seeded_adapter_parameters(base, config, seed)
        else:
            _seed_everything(seed)
            model = base.free_full_copies.pop() if weights_follow and base.free_full_copies else self._full_copy(base)
            trainable = dict(model.named_parameters())
        optimizer = torch.optim.AdamW(
            list(trainable.values()), lr=config["learning_rate"], weight_decay=config["weight_decay"]
        )
        scheduler_type = config["lr_scheduler_type"]
        warmup_steps = config["warmup_steps"] or math.ceil(run_total_steps * config["warmup_ratio"])
        if scheduler_type == "constant" and warmup_steps > 0:
            # transformers' "constant" drops num_warmup_steps without a word; the user asked for a warm-up.
            scheduler_type = "constant_with_warmup"
        scheduler = get_scheduler(
            scheduler_type,
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=run_total_steps,
        )
        return _RunState(
            run_id=task.run_id,
            base_key=_base_key(config),
            model=model,
            slot=slot,
            trainable=trainable,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=torch.amp.GradScaler(_model_device(model).type) if config["fp16"] else None,
            config=config,
        )

    def _restore(self, state: _RunState, checkpoint: dict[str, Any], source: str) -> None:
        _load_trainable(state, checkpoint["trainable"], source)
        # Optimizer before scheduler: the optimizer's state carries the current learning rate. A DeepSpeed run's
        # checkpoint has none: its optimizer state is in the ZeRO shards.
        if checkpoint["optimizer"] is not None:
            state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
        state.step = int(checkpoint["step"])
        state.epoch = int(checkpoint["epoch"])
        state.samples = int(checkpoint["samples"])
        state.chunk_index = int(checkpoint["chunk_index"])
        state.rng = checkpoint["rng"]
        state.best = checkpoint.get("best")
        state.unlogged_losses = list(checkpoint.get("unlogged_losses", []))
        state.reference = checkpoint.get("reference")
        if state.scaler is not None and checkpoint.get("grad_scaler") is not None:
            state.scaler.load_state_dict(checkpoint["grad_scaler"])

    def _activate(self, state: _RunState) -> Any:
        """Make `state` the one that trains: its adapter active and alone trainable, train mode, its RNG."""
        model = state.model
        if state.slot is not None:
            if state.slot.evicted:  # other shapes took turns since: the run's shape gets a slot again
                state.slot = self._lora_slot(self._bases[state.base_key], state.config)
            self._binds += 1
            state.slot.bind(state.trainable, self._binds, state.config)
            _train_only(state)
        model.train()
        restore_rng_state(state.rng)
        return model

    def _save(self, state: _RunState, config: dict[str, Any], path: Path, follow_ups: list[AfterPersist] = ()) -> Path:
        return self._writer.save(
            {
                "config": config,
                "step": state.step,
                "epoch": state.epoch,
                "samples": state.samples,
                "chunk_index": state.chunk_index,
                "trainable": {key: parameter.detach() for key, parameter in state.trainable.items()}
                if state.is_lora
                else state.model.state_dict(),
                "optimizer": state.optimizer.state_dict() if state.engine is None else None,
                "scheduler": state.scheduler.state_dict(),
                "rng": state.rng,
                "best": state.best,
                "grad_scaler": None if state.scaler is None else state.scaler.state_dict(),
                "unlogged_losses": list(state.unlogged_losses),
                "reference": state.reference,
            },
            path,
            follow_ups,
        )

    # ------------------------------------------------------------------------------------ preference runs

    def _preference_loss(
        self,
        policy_logits: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        state: _RunState,
        base: _BaseEntry,
        batch: dict[str, torch.Tensor],
        config: dict[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """TRL's DPO loss of one micro-batch and its metrics. The reference goes first: on a LoRA host it switches
        adapters, which must not happen between the policy's forward and its backward."""
        reference = self._reference_logps(state, base, batch, config, device)
        with _precision(config, device):
            logits = policy_logits(batch)
        logps = completion_logps(logits, batch["input_ids"], batch["completion_mask"])
        return dpo_loss(logps, reference, batch["completion_mask"], config)

    def _reference_logps(
        self, state: _RunState, base: _BaseEntry, batch: dict[str, torch.Tensor], config: dict[str, Any], device: Any
    ) -> torch.Tensor:
        if config["reference_free"]:
            return torch.zeros(batch["input_ids"].shape[0], device=device)
        with torch.no_grad(), self._reference_model(state, base) as reference, _precision(config, device):
            logits = reference(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            return completion_logps(logits, batch["input_ids"], batch["completion_mask"])

    @contextlib.contextmanager
    def _reference_model(self, state: _RunState, base: _BaseEntry) -> Iterator[Any]:
        """The run's reference, ready to call in eval mode: the base (a LoRA host with its adapters off), a frozen
        reference adapter in the run's LoRA host, or a frozen full copy."""
        reference = state.reference
        context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if reference is None:
            model = state.model if state.is_lora else base.lora_host or base.model
            if isinstance(model, PeftModel):
                context = model.disable_adapter()
        elif state.is_lora:
            model = state.model
            context = _adapter_active(state, self._reference_adapter(base, state, reference))
        else:
            model = self._reference_copy(base, state, reference)
        was_training = model.training
        model.eval()
        try:
            with context:
                yield model
        finally:
            model.train(was_training)

    def _reference_adapter(self, base: _BaseEntry, state: _RunState, reference: dict[str, str]) -> str:
        key = (state.base_key, reference["key"])
        if key not in self._reference_adapters:
            payload = self._reference_payload(reference)
            lora = payload["lora"]
            if lora is None:
                raise ValueError(
                    f"run {state.run_id} is a LoRA run but its reference ({reference['key']}) is a full model"
                )
            self._adapters_made += 1
            name = f"reference-{self._adapters_made}"
            settings = {**lora, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}
            host = self._add_adapter(base, name, settings)
            parameters = _adapter_parameters(host, name)
            with torch.no_grad():
                for parameter_key, parameter in parameters.items():
                    parameter.copy_(payload["weights"][parameter_key])
                    parameter.requires_grad_(False)
            self._reference_adapters[key] = name
        return self._reference_adapters[key]

    def _reference_copy(self, base: _BaseEntry, state: _RunState, reference: dict[str, str]) -> Any:
        key = (state.base_key, reference["key"])
        if key not in self._reference_copies:
            payload = self._reference_payload(reference)
            model = self._full_copy(base)
            model.load_state_dict(payload["weights"], strict=True)
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self._reference_copies[key] = model
        return self._reference_copies[key]

    def _drop_unused_reference(self, base_key: str, reference_key: str) -> None:
        """A reference no run in memory is anchored to leaves memory (a run swapped back in loads it again), so a
        worker's memory does not grow with the number of references it has served."""
        in_use = any(
            state.reference is not None and (state.base_key, state.reference["key"]) == (base_key, reference_key)
            for state in self._runs.values()
        )
        if in_use:
            return
        self._reference_copies.pop((base_key, reference_key), None)
        adapter_name = self._reference_adapters.pop((base_key, reference_key), None)
        base = self._bases[base_key]
        if adapter_name is not None and base.lora_host is not None:
            self._delete_adapter(base, adapter_name)

    def _reference_payload(self, reference: dict[str, str]) -> dict[str, Any]:
        path = Path(reference["path"])
        deadline = time.monotonic() + STATE_WAIT_S
        while not path.exists() and time.monotonic() < deadline:  # a gang's leader may still be writing it
            time.sleep(0.01)
        return load_checkpoint(path)

    def _evaluate_preferences(
        self, model: Any, base: _BaseEntry, state: _RunState, config: dict[str, Any]
    ) -> dict[str, float]:
        """TRL's DPO evaluation: eval_loss is the mean over pairs, each other metric the mean of its batch means."""
        data = self._tokenized_data("eval", base.tokenizer, config)
        assert isinstance(data, PreferenceData)
        device = _model_device(model)
        batch_size = config["per_device_eval_batch_size"]
        loss_sum, pairs = 0.0, 0
        sums: dict[str, float] = {}
        batches = 0
        model.eval()

        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                indices = list(range(start, min(start + batch_size, len(data))))
                batch = {name: tensor.to(device) for name, tensor in data.batch(indices).items()}
                loss, values = self._preference_loss(_logits_of(model), state, base, batch, config, device)
                model.eval()  # the reference may have been the same module, put back in the mode it had
                loss_sum += float(loss) * len(indices)
                pairs += len(indices)
                batches += 1
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
        model.train()
        return {EVAL_LOSS_METRIC: loss_sum / max(pairs, 1)} | {
            f"eval_{name}": total / batches for name, total in sums.items()
        }

    def _accumulate(
        self,
        stepper: PlainStep,
        state: _RunState,
        base: _BaseEntry,
        train_data: TokenizedData | PreferenceData,
        micro_batches: list[list[int]],
        config: dict[str, Any],
        device: torch.device,
        step_number: int,
        alone: bool,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Forward and backward of this process's micro-batches of one step (SFT or DPO): their losses and the
        objective's metrics."""
        losses: list[float] = []
        metrics: dict[str, list[float]] = {}
        for position, indices in enumerate(micro_batches):
            batch = {name: tensor.to(device) for name, tensor in train_data.batch(indices).items()}
            with stepper.micro_batch(position, len(micro_batches)):
                if config["trainer_type"] == "dpo":
                    loss, values = self._preference_loss(stepper.logits, state, base, batch, config, device)
                    for name, value in values.items():
                        metrics.setdefault(name, []).append(value)
                else:
                    with _precision(config, device):
                        loss = stepper.forward(batch)
                if alone and not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss became {loss.item()} at step {step_number}")
                stepper.backward(loss, position, len(micro_batches))
            losses.append(loss.item())
        return losses, metrics

    # -------------------------------------------------------------------------------------------- GRPO runs

    def _grpo_step(
        self,
        stepper: PlainStep,
        state: _RunState,
        base: _BaseEntry,
        data: PromptData,
        prompt_indices: list[int],
        config: dict[str, Any],
        device: torch.device,
        step_number: int,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """One GRPO optimizer step, as TRL's: generate num_generations completions per prompt, score them, and train
        on them in micro-batches of per_device_train_batch_size completions. Returns the step's loss (TRL's, summed
        over its micro-batches as HF logs it) and its metrics."""
        rows = [index for index in prompt_indices for _ in range(config["num_generations"])]
        generation, advantages, metrics = self._scored_generation(state, base, data, rows, config, device)
        micro_size, accumulation = config["per_device_train_batch_size"], config["gradient_accumulation_steps"]
        tokens = float(generation.completion_mask.sum())
        total = 0.0
        micro_metrics: dict[str, list[float]] = {name: [value] for name, value in metrics.items()}
        for position in range(accumulation):
            selection = slice(position * micro_size, (position + 1) * micro_size)
            batch = {name: tensor.to(device) for name, tensor in generation.rows(selection).items()}
            with stepper.micro_batch(position, accumulation):
                loss, values = self._grpo_loss(
                    stepper.logits, state, base, batch, advantages[selection].to(device), config, device, tokens,
                    accumulation,
                )  # fmt: skip
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss became {loss.item()} at step {step_number}")
                # TRL's loss is already scaled for the accumulation; the stepper divides by it again.
                stepper.backward(loss * accumulation, position, accumulation)
            total += loss.item()
            for name, value in values.items():
                micro_metrics.setdefault(name, []).append(value)
        return [total], micro_metrics

    def _scored_generation(
        self,
        state: _RunState,
        base: _BaseEntry,
        data: PromptData,
        rows: list[int],
        config: dict[str, Any],
        device: torch.device,
    ) -> tuple[Generation, torch.Tensor, dict[str, float]]:
        """Completions for `rows` (a prompt's index once per completion), their rewards and advantages."""
        from trl.data_utils import is_conversational

        generation = generate_completions(
            state.model, base.tokenizer, [data.prompt_ids[row] for row in rows], config, device
        )
        prompts = [data.prompts[row] for row in rows]
        completions: list[Any] = list(generation.texts)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        completion_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(generation.completion_ids, generation.completion_mask, strict=True)
        ]
        names = list(config["reward_funcs"])
        functions = [(name, resolve(self._functions, "reward_funcs", name)) for name in names]
        rewards = reward_table(functions, prompts, completions, completion_ids, [data.columns[row] for row in rows])
        weights = config["reward_weights"] or [1.0] * len(names)
        advantages, metrics = group_advantages(
            rewards, weights, config["num_generations"], config["scale_rewards"], names
        )
        return generation, advantages, metrics

    def _grpo_loss(
        self,
        policy_logits: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        state: _RunState,
        base: _BaseEntry,
        batch: dict[str, torch.Tensor],
        advantages: torch.Tensor,
        config: dict[str, Any],
        device: torch.device,
        tokens: float,
        accumulation: int,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        temperature = float(config["temperature"])
        reference = None
        if config["beta"]:  # the reference first: on a LoRA host it switches adapters (see _preference_loss)
            with torch.no_grad(), self._reference_model(state, base) as model, _precision(config, device):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
                reference, _ = completion_token_logps(logits, batch["completion_ids"], temperature)
        with _precision(config, device):
            logits = policy_logits(batch)
        logps, entropies = completion_token_logps(logits, batch["completion_ids"], temperature)
        return grpo_loss(
            logps, reference, batch["completion_mask"], advantages, config, tokens_in_generation_batch=tokens,
            accumulation=accumulation, max_completion_length=int(config["max_completion_length"]),
            entropies=entropies,
        )  # fmt: skip

    def _evaluate_grpo(
        self, model: Any, base: _BaseEntry, state: _RunState, config: dict[str, Any], seed: int, step: int
    ) -> dict[str, float]:
        """TRL's GRPO evaluation: num_generations completions per eval prompt, scored; eval_loss is the GRPO loss
        on them. Sampling is seeded by run and step, so evaluating never moves the training RNG."""
        data = self._tokenized_data("eval", base.tokenizer, config)
        assert isinstance(data, PromptData)
        device = _model_device(model)
        rows = [index for index in range(len(data)) for _ in range(config["num_generations"])]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + step)
            generation, advantages, metrics = self._scored_generation(state, base, data, rows, config, device)
        tokens = float(generation.completion_mask.sum())
        model.eval()
        with torch.no_grad():
            batch = {name: tensor.to(device) for name, tensor in generation.rows(slice(None)).items()}

            loss, values = self._grpo_loss(
                _logits_of(model), state, base, batch, advantages.to(device), config, device, tokens, 1
            )
        model.train()
        return {EVAL_LOSS_METRIC: float(loss)} | {f"eval_{name}": value for name, value in (metrics | values).items()}

    # ------------------------------------------------------------------------------------ models and data

    def _base(self, config: dict[str, Any]) -> _BaseEntry:
        key = _base_key(config)
        if key not in self._bases:
            model, tokenizer = self._create_model_fn(config)
            if self._device is not None:
                model = model.to(self._device)
            if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
                tokenizer.pad_token = tokenizer.eos_token
            self._bases[key] = _BaseEntry(model=model, tokenizer=tokenizer)
        return self._bases[key]

    def _add_adapter(self, base: _BaseEntry, adapter_name: str, config: dict[str, Any]) -> PeftModel:
        lora_config = LoraConfig(
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=config["lora_dropout"],
            target_modules=config["target_modules"],
            bias=config["bias"],
            task_type=config["task_type"],
        )
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers API that transformers 5 deprecates; nothing for us to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if base.lora_host is None:
                # Wraps the base in place: from here on it is the one frozen copy all LoRA runs on it share.
                base.lora_host = get_peft_model(base.model, lora_config, adapter_name=adapter_name)
            else:
                base.lora_host.add_adapter(adapter_name, lora_config)
        return base.lora_host

    def _lora_slot(self, base: _BaseEntry, config: dict[str, Any]) -> _LoraSlot:
        """The slot for the config's LoRA shape, added to the host when missing (its own weights are never trained:
        a run's are bound over them). Past MAX_LORA_SLOTS the slot used longest ago leaves the host."""
        shape = _lora_shape(config)
        if shape not in base.lora_slots:
            if len(base.lora_slots) >= MAX_LORA_SLOTS:
                oldest = min(base.lora_slots, key=lambda key: base.lora_slots[key].last_bound)
                evicted = base.lora_slots.pop(oldest)
                evicted.evicted = True
                self._delete_adapter(base, evicted.name)
            self._adapters_made += 1
            name = f"slot-{self._adapters_made}"
            base.lora_slots[shape] = _LoraSlot.of(self._add_adapter(base, name, config), name)
        return base.lora_slots[shape]

    def _seeded_adapter_parameters(
        self, base: _BaseEntry, config: dict[str, Any], seed: int
    ) -> dict[str, torch.nn.Parameter]:
        """A new run's adapter parameters as PEFT initialises a new adapter after the seed, wherever it trains: made
        by a passing adapter of the host, which leaves it again and lets the run keep them."""
        self._adapters_made += 1
        name = f"init-{self._adapters_made}"
        _seed_everything(seed)  # adapter init draws random numbers: seed first so it is the same everywhere
        parameters = _adapter_parameters(self._add_adapter(base, name, config), name)
        self._delete_adapter(base, name)
        return parameters

    @staticmethod
    def _delete_adapter(base: _BaseEntry, name: str) -> None:
        assert base.lora_host is not None
        # PEFT warns when the deleted adapter was the active one; each chunk activates its own anyway.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
            base.lora_host.delete_adapter(name)

    def _full_copy(self, base: _BaseEntry) -> Any:
        if base.lora_host is None:
            model = copy.deepcopy(base.model)
        else:
            # Base weights under the LoRA layers are never trained, so unloading a copy gives the original.
            model = copy.deepcopy(base.lora_host).unload()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def _split_rows(self, split: str, config: Mapping[str, Any]) -> Any:
        """The split's rows for this config's trainer type."""
        sets = self._train_sets if split == "train" else self._eval_sets
        if None in sets or not sets:
            return sets.get(None, [])
        return dataset_for(sets, config["trainer_type"], f"{split}_dataset")

    def _has_eval(self, config: Mapping[str, Any]) -> bool:
        return len(self._split_rows("eval", config)) > 0

    def _raw_examples(self, split: str, config: Mapping[str, Any]) -> list[Any]:
        rows = self._split_rows(split, config)
        subset = config["eval_subset"]
        return rows if split == "train" or subset is None else _head(rows, subset)

    def _examples(self, split: str, config: Mapping[str, Any]) -> list[Any]:
        """The split's rows as this config trains or evaluates on them: its subset, its formatting function."""
        raw = self._raw_examples(split, config)
        formatting_func = config["formatting_func"]
        if formatting_func is None:
            return raw
        key = (split, config["trainer_type"], formatting_func, len(raw))
        if key not in self._formatted:
            function = resolve(self._functions, "formatting_func", formatting_func)
            self._formatted[key] = [formatted_example(function, example) for example in raw]
        return self._formatted[key]

    def _data_key(self, split: str, tokenizer: Any, config: Mapping[str, Any]) -> tuple[Any, ...]:
        # Keyed by tokenizer identity: tokenizers live as long as their base entry, i.e. as long as self.
        rows = len(self._raw_examples(split, config))
        losses = (config["completion_only_loss"], config["assistant_only_loss"])
        max_length, formatting = int(config["max_length"]), config["formatting_func"]
        return (split, config["trainer_type"], id(tokenizer), max_length, formatting, rows, losses)

    def _tokenized_data(
        self, split: str, tokenizer: Any, config: Mapping[str, Any]
    ) -> TokenizedData | PreferenceData | PromptData:
        key = self._data_key(split, tokenizer, config)
        if key in self._tokenized:
            return self._tokenized[key]
        if config["trainer_type"] == "dpo":
            self._tokenized[key] = tokenize_preferences(
                self._examples(split, config), tokenizer, int(config["max_length"])
            )
        elif config["trainer_type"] == "grpo":
            self._tokenized[key] = tokenize_prompts(self._examples(split, config), tokenizer)
        else:
            self._tokenized[key] = tokenize_examples(
                self._examples(split, config),
                tokenizer,
                int(config["max_length"]),
                completion_only_loss=config["completion_only_loss"],
                assistant_only_loss=config["assistant_only_loss"],
            )
        return self._tokenized[key]

    def _generation_set(self, tokenizer: Any, config: Mapping[str, Any]) -> GenerationSet:
        key = self._data_key("eval", tokenizer, config)
        if key not in self._generation_sets:
            examples = self._examples("eval", config)
            self._generation_sets[key] = generation_set(examples, tokenizer, int(config["max_length"]))
        return self._generation_sets[key]

    def _evaluate_and_log(
        self,
        model: Any,
        base: _BaseEntry,
        task: TrainTask,
        state: _RunState,
        session: GangSession | None,
        seed: int,
        emit: EmitFn,
    ) -> dict[str, float]:
        """Evaluate the run where it stands and log the metrics at its step; every gang member gets them."""
        config, chunk = task.config, task.chunk
        leads = session is None or session.is_leader
        evaluates = leads or zero.partitions_parameters(config)  # ZeRO-3: every member's forward takes part
        context = EvaluationContext(task.experiment, task.run_id, state.step, chunk.index, chunk.epoch, config)
        eval_metrics = self._evaluate(model, base, state, context, seed) if evaluates else {}
        if session is not None:
            eval_metrics = session.from_leader(eval_metrics)  # every member keeps the run's best chunk right
        if eval_metrics and leads:
            now = time.time()
            emit([_metric_row(state.step, name, value, chunk.index, now) for name, value in eval_metrics.items()])
        return eval_metrics

    def _evaluate(
        self, model: Any, base: _BaseEntry, state: _RunState, context: EvaluationContext, seed: int
    ) -> dict[str, float]:
        if not self._has_eval(context.config):
            return {}
        config, tokenizer = context.config, base.tokenizer
        if config["trainer_type"] == "dpo":
            return self._evaluate_preferences(model, base, state, config)
        if config["trainer_type"] == "grpo":
            return self._evaluate_grpo(model, base, state, config, seed, context.step)
        eval_data = self._tokenized_data("eval", tokenizer, config)
        metrics_fn = metrics_function(config, self._functions, self._compute_metrics)
        generates = bool(config["predict_with_generate"])
        # HF's compute_metrics without generation gets every logit, as Trainer gives it; only then are they kept.
        keeps_logits = metrics_fn is not None and not generates and takes_eval_prediction(metrics_fn)
        kept_logits: list[torch.Tensor] = []
        kept_labels: list[torch.Tensor] = []
        device = _model_device(model)
        batch_size = config["per_device_eval_batch_size"]
        loss_sum = 0.0
        token_count = 0
        model.eval()
        with torch.no_grad():
            for start in range(0, len(eval_data), batch_size):
                batch = eval_data.batch(list(range(start, min(start + batch_size, len(eval_data)))))
                batch = {name: tensor.to(device) for name, tensor in batch.items()}
                with _precision(config, device):
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                    ).logits
                targets = batch["labels"][:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),
                    targets.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                loss_sum += float(losses)
                token_count += int((targets != IGNORE_INDEX).sum())
                if keeps_logits:
                    kept_logits.append(logits.float().cpu())
                    kept_labels.append(batch["labels"].cpu())
            metrics = {EVAL_LOSS_METRIC: loss_sum / max(token_count, 1)}
            if metrics_fn is not None:
                eval_prediction = None
                if generates:
                    generation = self._generation_set(tokenizer, config)
                    with _precision(config, device):
                        texts = generate_texts(model, tokenizer, generation, config, seed + context.step)
                    eval_prediction = EvalPrediction(predictions=texts, label_ids=generation.references)
                elif keeps_logits:
                    eval_prediction = stacked_logits(kept_logits, kept_labels)
                metrics.update(
                    call_metrics(
                        metrics_fn,
                        context,
                        eval_prediction=eval_prediction,
                        model=model,
                        tokenizer=tokenizer,
                        eval_examples=self._raw_examples("eval", config),
                    )
                )
        model.train()
        return metrics


# -------------------------------------------------------------------------------------------- helpers


def _datasets(dataset: Any) -> dict[str | None, Any]:
    """A dataset, or one per trainer type, as rows the trainer keeps (see `_rows`)."""
    if is_keyed_by_trainer_type(dataset):
        return {str(key): _rows(rows) for key, rows in dataset.items()}
    return {None: _rows(dataset)}


def _rows(dataset: Iterable[Any]) -> Any:
    """The rows as the trainer keeps them: a `datasets.Dataset` as it is (Arrow-backed, often memory-mapped: no
    Python object per row in every worker), anything else as a list."""
    if _is_arrow_dataset(dataset):
        return dataset
    return list(dataset)


def _head(rows: Any, count: int) -> Any:
    return rows.select(range(min(count, len(rows)))) if _is_arrow_dataset(rows) else rows[:count]


def _is_arrow_dataset(rows: Any) -> bool:
    return hasattr(rows, "select") and hasattr(rows, "column_names") and hasattr(rows, "__len__")


def _base_key(config: Mapping[str, Any]) -> str:
    """One base per model and loading arguments: a bfloat16 copy is not the float32 one."""
    model_kwargs = config.get("model_kwargs")
    name = config["model_name_or_path"]
    return name if not model_kwargs else f"{name} {json.dumps(model_kwargs, sort_keys=True)}"


def _run_seed(task: TrainTask) -> int:
    seed = task.config.get("seed")
    return int(task.seed if seed is None else seed)


def _lora_shape(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two adapters interchangeable once their weights are overwritten (alpha and dropout are set for
    each run when it binds the slot)."""
    modules = config["target_modules"]
    return (
        config["r"],
        modules if isinstance(modules, str) else tuple(sorted(modules)) if modules is not None else None,
        config["bias"],
        config["task_type"],
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _precision(config: dict[str, Any], device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 and fp16 as Hugging Face's Trainer does them: the forward pass under autocast (fp16's loss scaling is
    the stepper's)."""
    if config["bf16"]:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if config["fp16"]:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _logits_of(model: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A batch's logits from `model` as it is (an evaluation's forward, outside any DDP wrapper)."""

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    return logits


def _set_dropout(model: Any, enabled: bool) -> None:
    """Dropout as the run trains: off for a preference run (TRL's disable_dropout), and back to each module's own
    rate for the next run that trains on the same modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            if not hasattr(module, "_rf_rate"):
                module._rf_rate = module.p
            module.p = module._rf_rate if enabled else 0.0


def _train_only(state: _RunState) -> None:
    """The run's adapter active in its LoRA host, and its parameters alone trainable."""
    model = state.model
    assert state.slot is not None
    model.set_adapter(state.slot.name)
    trainable_ids = {id(parameter) for parameter in state.trainable.values()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable_ids)


@contextlib.contextmanager
def _adapter_active(state: _RunState, adapter_name: str) -> Iterator[None]:
    """Another adapter of the run's LoRA host active for a while (a reference), then the run's own again."""
    state.model.set_adapter(adapter_name)
    try:
        yield
    finally:
        _train_only(state)


def _set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """On or off for this chunk, whatever the last run on this base asked for. Non-reentrant, as Hugging Face now
    recommends: the frozen embeddings of a LoRA run need no `requires_grad` workaround, and dropout recomputes with
    the same random state, so the result is the run's without it."""
    target = model.module if hasattr(model, "module") else model
    if enabled:
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(target, "is_activation_checkpointing", False):
        target.activation_checkpointing_disable()


def _adapter_parameters(host: PeftModel, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters keyed without the adapter name, so a parent's keys match a clone's."""
    parameters: dict[str, torch.nn.Parameter] = {}
    for name, parameter in host.named_parameters():
        parts = name.split(".")
        if adapter_name in parts:
            parameters[".".join(part for part in parts if part != adapter_name)] = parameter
    if not parameters:
        raise ValueError(f"adapter {adapter_name!r} has no parameters: do its target_modules match the model?")
    return parameters


def _load_trainable(state: _RunState, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy checkpoint weights into the run, insisting on equal keys and shapes (PEFT skips mismatches)."""
    expected = (
        {key: parameter.detach() for key, parameter in state.trainable.items()}
        if state.is_lora
        else state.model.state_dict()
    )
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{key}: {tuple(weights[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(weights))
        if weights[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_summarise(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches (checkpoint vs run) {_summarise(mismatched)}")
        raise ValueError(
            f"weights from {source} do not fit run {state.run_id}'s "
            f"{'LoRA adapter' if state.is_lora else 'model'}: {'; '.join(problems)}. Warm starts need the "
            "same base model, fine-tuning kind, target_modules and rank"
        )
    with torch.no_grad():
        if state.is_lora:
            for key, parameter in state.trainable.items():
                parameter.copy_(weights[key])
        else:
            state.model.load_state_dict(dict(weights), strict=True)


def _load_optimizer_moments(state: _RunState, parent_optimizer: Mapping[str, Any], source: str) -> None:
    """Take the parent's per-parameter AdamW state but keep the clone's own hyperparameters (lr, decay)."""
    parent_moments = parent_optimizer["state"]
    parameters = list(state.trainable.values())
    for index, parameter in enumerate(parameters):
        moment = parent_moments.get(index, {}).get("exp_avg")
        if moment is not None and moment.shape != parameter.shape:
            raise ValueError(
                f"optimizer state from {source} does not fit run {state.run_id}: parameter {index} has "
                f"moments of shape {tuple(moment.shape)}, the run's parameter {tuple(parameter.shape)}"
            )
    if len(parent_moments) > len(parameters):
        raise ValueError(
            f"optimizer state from {source} has {len(parent_moments)} parameters; "
            f"run {state.run_id} has {len(parameters)}"
        )
    merged = state.optimizer.state_dict()
    # Copies: the parent may be training in this process, and its moments must not move the clone's.
    merged["state"] = {
        index: {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in moments.items()}
        for index, moments in parent_moments.items()
    }
    state.optimizer.load_state_dict(merged)


def _step_batches(order: list[int], chunk: ChunkSpec, batch_size: int, accumulation: int) -> list[list[list[int]]]:
    """Per optimizer step of the chunk, its micro-batches of sample indices (an epoch's last may be short)."""
    samples_per_step = batch_size * accumulation
    steps: list[list[list[int]]] = []
    for step_in_chunk in range(chunk.num_steps):
        start = chunk.start_sample + step_in_chunk * samples_per_step
        indices = order[start : min(start + samples_per_step, chunk.end_sample)]
        if not indices:
            raise ValueError(
                f"chunk {chunk.index} has {chunk.num_steps} steps but samples {chunk.start_sample}-"
                f"{chunk.end_sample} fill only {step_in_chunk} steps of {samples_per_step} samples"
            )
        steps.append([indices[offset : offset + batch_size] for offset in range(0, len(indices), batch_size)])
    return steps


def _improves(best: Mapping[str, Any] | None, value: float | None, mode: str) -> bool:
    if value is None or not np.isfinite(value):
        return False
    if best is None:
        return True
    return value < best["value"] if mode == "min" else value > best["value"]


def _being_written(path: Path) -> bool:
    """A temporary file for `path` exists: a writer is on it right now."""
    folder = path.parent
    return folder.is_dir() and any(entry.name.startswith(f".{path.name}.") for entry in folder.iterdir())


def _metric_row(step: int, name: str, value: float, chunk_index: int, at: float) -> dict[str, Any]:
    return {"step": step, "name": name, "value": float(value), "chunk": chunk_index, "time": at}


def _summarise(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    more = len(items) - _MAX_LISTED_KEYS
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")
