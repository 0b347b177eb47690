"""Every config knob is honoured by the trainer: one case per knob, each showing its observable effect on a run.

Config validation lives in test_config.py; this file checks the other half of the promise "every key is either
honoured or rejected by name". Each case trains whole runs (every chunk from `plan_chunks`, 2 chunks per epoch, one
fresh `SlotTrainer` per run) with one knob changed from `BASE`, and asserts something about the emitted metric rows,
the chunk outcomes, the final checkpoint or the model's forward calls that would fail if the knob were ignored.

Runs are tiny (random-init models, 32 training and 8 eval examples, 16 tokens, 8 optimizer steps, 1 thread) and each
distinct run is trained once per module, so the whole file takes a few seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from rf_core import evaluation_context
from rf_core.chunks import plan_chunks
from rf_core.config import KNOBS, normalize_config
from rf_core.demo_data import stdlib_preference_examples
from rf_core.messages import ChunkOutcome, TrainTask
from rf_core.training.checkpoints import load_checkpoint
from rf_core.training.data import stdlib_sft_examples
from rf_core.training.models import ensure_pretrained, load_base_model
from rf_core.training.trainer import SlotTrainer

NUM_THREADS = 1
NUM_CHUNKS = 2
EXPERIMENT_SEED = 1234
NUM_TRAIN, NUM_EVAL = 32, 8
# The knobs not named here keep their KNOBS defaults: LoRA with PEFT's default targets, no weight decay, clipping at
# 1.0, no accumulation, 1 epoch, no max_steps, linear schedule without warm-up. 32 / 4 = 8 optimizer steps per epoch.
BASE: dict[str, Any] = {
    "model_name_or_path": "rf-tiny-llama",
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,  # llama has no dropout of its own: the base run is deterministic without RNG
    "learning_rate": 1e-2,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_length": 16,
    "seed": 7,
}
BASE_STEPS = NUM_TRAIN // BASE["per_device_train_batch_size"]
LR = BASE["learning_rate"]
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def identity_format(example: dict[str, Any]) -> dict[str, Any]:
    return example


def completion_as_text(example: dict[str, Any]) -> str:
    return example["completion"]  # a string: trained as a text row, every token


def as_messages(example: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": example["prompt"]},
                         {"role": "assistant", "content": example["completion"]}]}  # fmt: skip


SEEN_BY_METRICS: list[dict[str, Any]] = []


def hf_metrics(eval_prediction: Any) -> dict[str, float]:
    """HF's form: records what it was given and where (rf_core.evaluation_context), returns one metric."""
    predictions, label_ids = eval_prediction  # unpacks as Trainer's EvalPrediction does
    context = evaluation_context()
    SEEN_BY_METRICS.append(
        {"predictions": predictions, "label_ids": label_ids, "step": context.step, "run_id": context.run_id}
    )
    return {"seen": float(len(predictions))}


FUNCTIONS = {f.__name__: f for f in (identity_format, completion_as_text, as_messages, hf_metrics)}


@dataclass(frozen=True)
class Forward:
    """One call of the model, seen by a hook on its input embedding."""

    training: bool
    batch_size: int
    width: int  # tokens per row


@dataclass
class Run:
    """What one whole run produced."""

    config: dict[str, Any]
    rows: list[dict[str, Any]]
    outcomes: list[ChunkOutcome]
    checkpoint: dict[str, Any]  # the final one, from load_checkpoint
    forwards: list[Forward]
    metric_calls: list[dict[str, Any]]

    def values(self, name: str) -> list[float]:
        return [row["value"] for row in self.rows if row["name"] == name]

    def steps(self, name: str) -> list[int]:
        return [row["step"] for row in self.rows if row["name"] == name]

    @property
    def losses(self) -> list[float]:
        return self.values("train_loss")

    @property
    def lrs(self) -> list[float]:
        return self.values("learning_rate")

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return self.checkpoint["trainable"]

    @property
    def seen(self) -> list[dict[str, Any]]:
        """What hf_metrics was given while this run trained, one entry per chunk boundary."""
        return self.metric_calls

    @property
    def last(self) -> ChunkOutcome:
        return self.outcomes[-1]

    def train_forwards(self) -> list[Forward]:
        return [forward for forward in self.forwards if forward.training]

    def eval_forwards(self) -> list[Forward]:
        return [forward for forward in self.forwards if not forward.training]


class Runs:
    """`runs(overrides, experiment_seed=...)`: the Run of BASE + overrides, trained once and then remembered."""

    def __init__(self, model_cache: Path, run_root: Path) -> None:
        self.model_cache = model_cache
        self._run_root = run_root
        examples = stdlib_sft_examples(limit=NUM_TRAIN + NUM_EVAL)
        self._train_examples, self._eval_examples = examples[:NUM_TRAIN], examples[NUM_TRAIN:]
        preferences = stdlib_preference_examples(limit=NUM_TRAIN + NUM_EVAL)
        self._train_preferences, self._eval_preferences = preferences[:NUM_TRAIN], preferences[NUM_TRAIN:]
        self._runs: dict[str, Run] = {}

    @property
    def eval_examples(self) -> list[dict[str, Any]]:
        return self._eval_examples

    def __call__(self, overrides: dict[str, Any] | None = None, *, experiment_seed: int = EXPERIMENT_SEED) -> Run:
        key = json.dumps([overrides or {}, experiment_seed], sort_keys=True)
        if key not in self._runs:
            self._runs[key] = self._train_run(overrides or {}, experiment_seed, self._run_root / str(len(self._runs)))
        return self._runs[key]

    def _train_run(self, overrides: dict[str, Any], experiment_seed: int, run_dir: Path) -> Run:
        forwards: list[Forward] = []

        def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            input_ids = args[0]
            forwards.append(Forward(module.training, int(input_ids.shape[0]), int(input_ids.shape[1])))

        def create_model_fn(config: dict[str, Any]) -> tuple[Any, Any]:
            model, tokenizer = load_base_model(config["model_name_or_path"], self.model_cache, config["model_kwargs"])
            model.get_input_embeddings().register_forward_pre_hook(record)
            return model, tokenizer

        config = normalize_config({**BASE, **overrides})
        SEEN_BY_METRICS.clear()
        trainer = SlotTrainer(
            create_model_fn,
            {"sft": self._train_examples, "dpo": self._train_preferences},
            {"sft": self._eval_examples, "dpo": self._eval_preferences},
            functions=FUNCTIONS,
            num_threads=NUM_THREADS,
        )
        rows: list[dict[str, Any]] = []
        outcomes = []
        for chunk in plan_chunks(NUM_TRAIN, config, NUM_CHUNKS):
            task = TrainTask("knobs", 1, config, chunk, str(run_dir), experiment_seed)
            outcome = trainer.train(task, rows.extend)
            assert outcome.status != "failed", outcome.traceback
            outcomes.append(outcome)
        assert outcomes[-1].status == "completed" and outcomes[-1].checkpoint is not None
        trainer.close()  # the state is written behind: wait for the last checkpoint file
        calls = list(SEEN_BY_METRICS)
        return Run(config, rows, outcomes, load_checkpoint(outcomes[-1].checkpoint), forwards, calls)


@pytest.fixture(scope="session")
def knob_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("knob-models")
    for name in ("rf-tiny-llama", "rf-tiny-gpt2"):
        ensure_pretrained(name, cache, pretrain_steps=0)
    return cache


@pytest.fixture(scope="module")
def train(knob_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    threads = torch.get_num_threads()
    yield Runs(knob_model_cache, tmp_path_factory.mktemp("runs"))
    torch.set_num_threads(threads)  # SlotTrainer sets the process-wide count; leave it as the session had it


# ------------------------------------------------------------------------------------------------ helpers


def adapted_modules(weights: dict[str, torch.Tensor]) -> set[str]:
    """Names of the modules with LoRA weights ("q_proj", ...), from checkpoint keys like '...q_proj.lora_A.weight'."""
    names = set()
    for key in weights:
        parts = key.split(".")
        for marker in ("lora_A", "lora_B"):
            if marker in parts:
                names.add(parts[parts.index(marker) - 1])
    return names


def numel(weights: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() for tensor in weights.values())


def same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


def lora_a_norm(weights: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(tensor.pow(2).sum()) for key, tensor in weights.items() if "lora_A" in key))


def lora_b_size(weights: dict[str, torch.Tensor]) -> float:
    return sum(float(tensor.abs().sum()) for key, tensor in weights.items() if "lora_B" in key)


def linear_lrs(lr: float, total: int, warmup: int = 0) -> list[float]:
    """Rate used by update k = 1..total under transformers' linear schedule (the schedule's step k - 1)."""
    return [lr * (s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))) for s in range(total)]


# --------------------------------------------------------------------------------------- one case per knob


def case_model_name_or_path(train: Runs) -> None:
    base, gpt2 = train(), train({"model_name_or_path": "rf-tiny-gpt2"})
    # PEFT's default targets differ by architecture: llama's attention projections, GPT-2's fused c_attn.
    assert adapted_modules(base.weights) == {"q_proj", "v_proj"}
    assert adapted_modules(gpt2.weights) == {"c_attn"}
    assert all(".h.0." in key or ".h.1." in key for key in gpt2.weights)  # GPT-2's block naming
    assert gpt2.checkpoint["config"]["model_name_or_path"] == "rf-tiny-gpt2"
    assert gpt2.losses != base.losses


def case_use_peft(train: Runs) -> None:
    base, full = train(), train({"use_peft": False})
    assert all("lora_" in key for key in base.weights)
    assert not any("lora_" in key for key in full.weights)
    assert "model.embed_tokens.weight" in full.weights and "model.layers.0.self_attn.q_proj.weight" in full.weights
    assert numel(full.weights) > 50 * numel(base.weights)
    # The base weights themselves were trained.
    original = load_base_model("rf-tiny-llama", train.model_cache)[0]
    assert not torch.equal(
        full.weights["model.layers.0.self_attn.q_proj.weight"], original.model.layers[0].self_attn.q_proj.weight
    )
    assert full.losses[0] == pytest.approx(base.losses[0], rel=1e-5)  # same model, same batch before any update
    assert full.losses[1:] != base.losses[1:]


def case_r(train: Runs) -> None:
    base, rank2 = train(), train({"r": 2})
    for run, rank in ((base, 4), (rank2, 2)):
        shapes = {key: tuple(tensor.shape) for key, tensor in run.weights.items()}
        assert all(shape[0] == rank for key, shape in shapes.items() if "lora_A" in key), shapes
        assert all(shape[1] == rank for key, shape in shapes.items() if "lora_B" in key), shapes
    assert numel(rank2.weights) * 2 == numel(base.weights)


def case_lora_alpha(train: Runs) -> None:
    base, alpha = train(), train({"lora_alpha": 64})
    # lora_B starts at zero, so the first forward cannot see the scaling; every later one does.
    assert alpha.losses[0] == base.losses[0]
    assert all(a != b for a, b in zip(alpha.losses[1:], base.losses[1:], strict=True))
    assert not same_weights(alpha.weights, base.weights)


def case_lora_dropout(train: Runs) -> None:
    base, dropout = train(), train({"lora_dropout": 0.5})
    assert dropout.losses[0] == base.losses[0]  # lora_B is zero: dropout on its input changes nothing yet
    assert all(a != b for a, b in zip(dropout.losses[1:], base.losses[1:], strict=True))
    # Dropout is off at evaluation: eval_loss is a deterministic function of the trained weights, unlike the losses.
    assert dropout.values("eval_loss") != base.values("eval_loss")


def case_target_modules_list(train: Runs) -> None:
    base, mlp = train(), train({"target_modules": ["up_proj", "down_proj"]})
    assert adapted_modules(base.weights) == {"q_proj", "v_proj"}
    assert adapted_modules(mlp.weights) == {"up_proj", "down_proj"}
    assert mlp.losses[1:] != base.losses[1:]


def case_target_modules_all_linear(train: Runs) -> None:
    everything = train({"target_modules": "all-linear"})
    assert adapted_modules(everything.weights) == LLAMA_LINEAR  # every linear layer except the output head


def case_learning_rate(train: Runs) -> None:
    base, small = train(), train({"learning_rate": 1e-3})
    assert base.lrs == pytest.approx(linear_lrs(LR, BASE_STEPS))
    assert small.lrs == pytest.approx(linear_lrs(1e-3, BASE_STEPS))
    assert small.lrs[0] == 1e-3
    assert small.losses[0] == base.losses[0]
    assert small.losses[1:] != base.losses[1:]
    # lora_B starts at zero and Adam moves each weight by about the rate per step: a 10x smaller rate, far less.
    assert lora_b_size(small.weights) < lora_b_size(base.weights) / 3


def case_weight_decay(train: Runs) -> None:
    base, decayed = train(), train({"weight_decay": 5.0})
    assert not same_weights(decayed.weights, base.weights)
    # Decoupled decay multiplies the weights by (1 - lr * decay) = 0.95 every step: lora_A visibly shrinks.
    assert lora_a_norm(decayed.weights) < 0.9 * lora_a_norm(base.weights)


def case_max_grad_norm(train: Runs) -> None:
    base, unclipped, clipped = train(), train({"max_grad_norm": 0.0}), train({"max_grad_norm": 1e-3})
    assert not same_weights(clipped.weights, unclipped.weights)
    assert not same_weights(clipped.weights, base.weights)
    assert clipped.losses[0] == unclipped.losses[0]
    assert clipped.losses[1:] != unclipped.losses[1:]


def case_per_device_train_batch_size(train: Runs) -> None:
    base, big = train(), train({"per_device_train_batch_size": 8})
    assert base.steps("train_loss") == list(range(1, BASE_STEPS + 1))
    assert big.steps("train_loss") == list(range(1, NUM_TRAIN // 8 + 1))
    assert [forward.batch_size for forward in base.train_forwards()] == [4] * BASE_STEPS
    assert [forward.batch_size for forward in big.train_forwards()] == [8] * (NUM_TRAIN // 8)
    assert big.last.step == NUM_TRAIN // 8 and big.last.samples == base.last.samples == NUM_TRAIN


def case_per_device_eval_batch_size(train: Runs) -> None:
    base, small = train(), train({"per_device_eval_batch_size": 3})
    # Evaluated at each of the 2 chunk ends, 8 examples each time.
    assert [forward.batch_size for forward in base.eval_forwards()] == [4, 4] * NUM_CHUNKS
    assert [forward.batch_size for forward in small.eval_forwards()] == [3, 3, 2] * NUM_CHUNKS
    # Training is untouched, and the loss is a per-token mean whatever the batching.
    assert small.losses == base.losses and same_weights(small.weights, base.weights)
    assert small.values("eval_loss") == pytest.approx(base.values("eval_loss"), rel=1e-5)


def case_gradient_accumulation_steps(train: Runs) -> None:
    base, accumulated = train(), train({"gradient_accumulation_steps": 2})
    steps = NUM_TRAIN // (4 * 2)
    assert accumulated.steps("train_loss") == list(range(1, steps + 1))
    assert accumulated.last.step == steps and accumulated.last.samples == NUM_TRAIN
    # Same micro-batches of 4, but two of them per optimizer step.
    assert [forward.batch_size for forward in accumulated.train_forwards()] == [4] * BASE_STEPS
    assert accumulated.lrs == pytest.approx(linear_lrs(LR, steps))
    # Both runs see the same sample order; a step's loss averages its micro-batches, so step 1 differs.
    assert accumulated.losses[0] != base.losses[0]


def case_num_devices(train: Runs) -> None:
    # num_devices sets the global batch: a step takes batch × accumulation × devices samples. Trained by one process
    # (here) it is the same run as the accumulation that gives that batch; tests/training/test_gang.py trains it as
    # a gang.
    base, two = train(), train({"num_devices": 2})
    accumulated = train({"gradient_accumulation_steps": 2})
    assert two.last.step == BASE_STEPS // 2 and two.last.samples == NUM_TRAIN
    assert [forward.batch_size for forward in two.train_forwards()] == [4] * BASE_STEPS
    assert two.losses == accumulated.losses and same_weights(two.weights, accumulated.weights)
    assert two.losses[0] != base.losses[0]


def case_num_train_epochs(train: Runs) -> None:
    base, two = train(), train({"num_train_epochs": 2})
    assert two.steps("train_loss") == list(range(1, 2 * BASE_STEPS + 1))
    assert [outcome.epoch for outcome in two.outcomes] == [0, 0, 1, 1]
    assert (two.last.step, two.last.epoch, two.last.samples) == (2 * BASE_STEPS, 1, 2 * NUM_TRAIN)
    assert len(two.train_forwards()) == 2 * len(base.train_forwards())
    assert two.lrs == pytest.approx(linear_lrs(LR, 2 * BASE_STEPS))  # one schedule over both epochs
    assert base.last.epoch == 0 and base.last.step == BASE_STEPS


def case_max_steps(train: Runs) -> None:
    base, capped = train(), train({"max_steps": 5})
    assert capped.steps("train_loss") == [1, 2, 3, 4, 5]
    assert [outcome.status for outcome in capped.outcomes] == ["ok", "completed"]
    assert capped.last.step == capped.checkpoint["step"] == 5 and capped.last.samples == 5 * 4
    assert capped.lrs == pytest.approx(linear_lrs(LR, 5))  # the schedule spans the 5 steps
    assert len(capped.train_forwards()) == 5
    assert base.last.step == BASE_STEPS
    # As in HF's Trainer, max_steps overrides num_train_epochs (1 here): the data repeats for a second epoch, in
    # that epoch's own order, and the schedule spans all 12 steps.
    longer = train({"max_steps": BASE_STEPS + 4})
    assert longer.steps("train_loss") == list(range(1, BASE_STEPS + 5))
    assert [outcome.epoch for outcome in longer.outcomes] == [0, 0, 1]  # 2 chunks of 4 steps an epoch
    assert [outcome.status for outcome in longer.outcomes] == ["ok", "ok", "completed"]
    assert (longer.last.step, longer.last.samples) == (BASE_STEPS + 4, (BASE_STEPS + 4) * 4)
    assert longer.lrs == pytest.approx(linear_lrs(LR, BASE_STEPS + 4))
    assert longer.losses[:BASE_STEPS] != pytest.approx(base.losses)  # another schedule from the first step


def case_warmup_ratio(train: Runs) -> None:
    # transformers 4's warmup_ratio: ceil(0.25 x 8 steps) = 2 warm-up steps; warmup_steps > 0 wins over it.
    ratio = train({"warmup_ratio": 0.25})
    assert ratio.lrs == pytest.approx(linear_lrs(LR, BASE_STEPS, warmup=2))
    assert train({"warmup_ratio": 0.3}).lrs == pytest.approx(linear_lrs(LR, BASE_STEPS, warmup=3))  # rounded up
    assert train({"warmup_ratio": 0.5, "warmup_steps": 3}).lrs == train({"warmup_steps": 3}).lrs


def case_bias_and_task_type(train: Runs) -> None:
    # Accepted only with the one value that works here (PEFT's defaults for a causal LM adapter): the same run.
    base, explicit = train(), train({"bias": "none", "task_type": "CAUSAL_LM"})
    assert explicit.losses == base.losses and same_weights(explicit.weights, base.weights)


def case_run_name(train: Runs) -> None:
    # A label only: the run trains exactly as without it.
    base, named = train(), train({"run_name": "baseline"})
    assert named.losses == base.losses and same_weights(named.weights, base.weights)


def case_bf16(train: Runs) -> None:
    # The forward passes run in bfloat16 (training and eval), the weights and the optimizer stay float32.
    base, mixed = train(), train({"bf16": True})
    assert mixed.losses != base.losses and mixed.losses == pytest.approx(base.losses, rel=0.05)
    assert mixed.last.eval_metrics["eval_loss"] != base.last.eval_metrics["eval_loss"]
    assert all(tensor.dtype == torch.float32 for tensor in mixed.weights.values())
    assert mixed.steps("train_loss") == base.steps("train_loss")


def case_fp16(train: Runs) -> None:
    # float16 autocast with a loss scaler (CPU here; a fit refuses fp16 on CPU slots): weights stay float32, the
    # scaler's state is saved with the run.
    base, mixed = train(), train({"fp16": True})
    assert mixed.losses != base.losses and mixed.losses == pytest.approx(base.losses, rel=0.05)
    assert all(tensor.dtype == torch.float32 for tensor in mixed.weights.values())
    assert mixed.checkpoint["grad_scaler"]["scale"] > 0 and base.checkpoint["grad_scaler"] is None


def case_logging_steps(train: Runs) -> None:
    # HF's logged `loss`: the mean train_loss over each interval of 3 steps (step 3-6 spans the chunk boundary).
    base, logged = train(), train({"logging_steps": 3})
    assert logged.losses == base.losses and same_weights(logged.weights, base.weights)
    assert logged.steps("loss") == [3, 6] and base.steps("loss") == []
    assert logged.values("loss") == pytest.approx([sum(base.losses[0:3]) / 3, sum(base.losses[3:6]) / 3], rel=1e-12)


def case_gradient_checkpointing(train: Runs) -> None:
    # Activations are recomputed in the backward pass: the same run, with the same forward passes seen.
    base, recomputed = train(), train({"gradient_checkpointing": True})
    assert recomputed.losses == pytest.approx(base.losses, rel=1e-5)
    for name, tensor in recomputed.weights.items():
        torch.testing.assert_close(tensor, base.weights[name], rtol=1e-5, atol=1e-6)


def case_gradient_checkpointing_kwargs(train: Runs) -> None:
    # HF's kwargs with the one setting rf uses: the same run as gradient checkpointing without them.
    plain = train({"gradient_checkpointing": True})
    explicit = train({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    assert explicit.losses == plain.losses and same_weights(explicit.weights, plain.weights)


def case_lr_scheduler_constant(train: Runs) -> None:
    base, constant = train(), train({"lr_scheduler_type": "constant"})
    assert base.lrs == pytest.approx(linear_lrs(LR, BASE_STEPS))
    assert all(later < earlier for earlier, later in zip(base.lrs, base.lrs[1:], strict=False))  # linear decays
    assert constant.lrs == [LR] * BASE_STEPS  # constant stays flat


def case_lr_scheduler_cosine(train: Runs) -> None:
    cosine = train({"lr_scheduler_type": "cosine"})
    expected = [LR * 0.5 * (1 + math.cos(math.pi * s / BASE_STEPS)) for s in range(BASE_STEPS)]
    assert cosine.lrs == pytest.approx(expected)
    assert cosine.lrs != pytest.approx(linear_lrs(LR, BASE_STEPS))


def case_warmup_steps_linear(train: Runs) -> None:
    base, warm = train(), train({"warmup_steps": 3})
    assert warm.lrs == pytest.approx(linear_lrs(LR, BASE_STEPS, warmup=3))
    assert warm.lrs[:4] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR])  # ramps up, then decays
    assert base.lrs[0] == LR


def case_warmup_steps_constant_with_warmup(train: Runs) -> None:
    warm = train({"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 3})
    assert warm.lrs == pytest.approx([0.0, LR / 3, 2 * LR / 3] + [LR] * (BASE_STEPS - 3))


def case_warmup_steps_constant(train: Runs) -> None:
    warm = train({"lr_scheduler_type": "constant", "warmup_steps": 3})
    assert warm.lrs[:4] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR])


def case_seed(train: Runs) -> None:
    base, other = train(), train({"seed": 8})
    assert other.losses[0] != base.losses[0]  # another data order: the first batch differs
    assert not same_weights(other.weights, base.weights)
    # The run's seed wins over the experiment's: another experiment seed changes nothing ...
    elsewhere = train(experiment_seed=99)
    assert [(r["step"], r["name"], r["value"]) for r in elsewhere.rows] == [
        (r["step"], r["name"], r["value"]) for r in base.rows
    ]
    assert same_weights(elsewhere.weights, base.weights)
    # ... and null means the experiment's seed.
    inherited = train({"seed": None}, experiment_seed=BASE["seed"])
    assert inherited.losses == base.losses and same_weights(inherited.weights, base.weights)


def case_max_length(train: Runs) -> None:
    base, longer = train(), train({"max_length": 24})
    # Every example here is longer than 24 tokens, so each batch is exactly max_length wide.
    assert {forward.width for forward in base.forwards} == {16}
    assert {forward.width for forward in longer.forwards} == {24}
    assert longer.losses != base.losses
    assert base.last.truncated_rows == longer.last.truncated_rows == NUM_TRAIN  # cut, and counted
    # TRL's default, 1024 tokens: batches as wide as their longest row, and only the longest rows cut.
    default = train({"max_length": KNOBS["max_length"].default})
    assert KNOBS["max_length"].default == 1024
    assert max(forward.width for forward in default.forwards) > 24
    assert default.last.truncated_rows < NUM_TRAIN


def case_formatting_func(train: Runs) -> None:
    base, same = train(), train({"formatting_func": "identity_format"})
    assert same.losses == base.losses and same_weights(same.weights, base.weights)
    assert same.values("eval_loss") == base.values("eval_loss")
    # Completions as text rows: other tokens, and every one of them trained.
    reformatted = train({"formatting_func": "completion_as_text"})
    assert reformatted.losses != base.losses
    assert reformatted.last.eval_metrics["eval_loss"] != base.last.eval_metrics["eval_loss"]


def case_compute_metrics_logits(train: Runs) -> None:
    # HF's compute_metrics(eval_prediction) without generation: logits and label ids, as Trainer gives them.
    base, scored = train(), train({"compute_metrics": "hf_metrics"})
    assert scored.losses == base.losses  # evaluation changes no training
    assert scored.values("seen") == [NUM_EVAL] * NUM_CHUNKS
    assert [call["step"] for call in scored.seen] == [BASE_STEPS // 2, BASE_STEPS]
    assert {call["run_id"] for call in scored.seen} == {1}
    logits, label_ids = scored.seen[-1]["predictions"], scored.seen[-1]["label_ids"]
    assert logits.shape[:2] == label_ids.shape == (NUM_EVAL, BASE["max_length"]) and logits.shape[2] > 100
    assert (label_ids == -100).any() and (label_ids >= 0).any()  # prompt tokens carry no label


def case_predict_with_generate(train: Runs) -> None:
    base = train()
    generating = train({"compute_metrics": "hf_metrics", "predict_with_generate": True})
    assert generating.losses == base.losses and same_weights(generating.weights, base.weights)
    predictions, references = generating.seen[-1]["predictions"], generating.seen[-1]["label_ids"]
    assert len(predictions) == NUM_EVAL and all(isinstance(text, str) for text in predictions)
    assert references == [example["completion"] for example in train.eval_examples]
    # The eval batches (4 rows) run the loss forward once, then one forward per generated token.
    eval_calls = len(generating.eval_forwards()) - len(base.eval_forwards())
    assert eval_calls > 2 * NUM_CHUNKS
    # A built-in metric by name scores the generated texts.
    rouge = train({"compute_metrics": "rougeL", "predict_with_generate": True})
    assert len(rouge.values("rougeL")) == NUM_CHUNKS and all(0 <= v <= 1 for v in rouge.values("rougeL"))


def case_generation_config(train: Runs) -> None:
    generating = {"compute_metrics": "hf_metrics", "predict_with_generate": True}
    short = train({**generating, "generation_config": {"max_new_tokens": 2}})
    longer = train({**generating, "generation_config": {"max_new_tokens": 6}})
    # A batch takes one forward per new token (until every row has stopped).
    assert max(map(len, short.seen[-1]["predictions"])) < max(map(len, longer.seen[-1]["predictions"]))
    assert len(short.eval_forwards()) == 2 * NUM_CHUNKS + 2 * 2 * NUM_CHUNKS  # loss + 2 tokens, 2 batches a chunk
    assert short.losses == longer.losses


def case_eval_strategy(train: Runs) -> None:
    base = train()
    assert base.steps("eval_loss") == [BASE_STEPS // 2, BASE_STEPS]  # "chunk": every boundary
    never = train({"eval_strategy": "no"})
    assert never.values("eval_loss") == [] and never.eval_forwards() == [] and never.last.eval_metrics == {}
    assert never.losses == base.losses
    per_epoch = train({"eval_strategy": "epoch", "num_train_epochs": 2})
    assert per_epoch.steps("eval_loss") == [BASE_STEPS, 2 * BASE_STEPS]


def case_eval_steps(train: Runs) -> None:
    base, every_3 = train(), train({"eval_strategy": "steps", "eval_steps": 3})
    assert every_3.steps("eval_loss") == [3, 6, BASE_STEPS]  # 3 and 6 inside chunks, and the run's last step
    assert every_3.losses == base.losses and same_weights(every_3.weights, base.weights)
    assert every_3.values("eval_loss")[-1] == base.values("eval_loss")[-1]


def case_eval_subset(train: Runs) -> None:
    base, subset = train(), train({"eval_subset": 3})
    assert {forward.batch_size for forward in subset.eval_forwards()} == {3}
    assert {forward.batch_size for forward in base.eval_forwards()} == {BASE["per_device_eval_batch_size"]}
    assert subset.values("eval_loss") != base.values("eval_loss") and subset.losses == base.losses


def case_completion_only_loss(train: Runs) -> None:
    base, everything = train(), train({"completion_only_loss": False})
    assert everything.losses != base.losses  # the prompt's tokens count too
    assert train({"completion_only_loss": True}).losses == base.losses  # null means true for these rows


def case_assistant_only_loss(train: Runs) -> None:
    chats = train({"formatting_func": "as_messages", "max_length": 64})
    assistant = train({"formatting_func": "as_messages", "max_length": 64, "assistant_only_loss": True})
    assert assistant.losses != chats.losses
    assert assistant.values("eval_loss") != chats.values("eval_loss")
    assert [f.width for f in assistant.forwards] == [f.width for f in chats.forwards]  # same tokens, other labels


def case_model_kwargs(train: Runs) -> None:
    base = train()
    bf16_base = train({"model_kwargs": {"torch_dtype": "bfloat16", "device_map": "auto", "use_cache": False}})
    assert bf16_base.losses != base.losses and bf16_base.losses == pytest.approx(base.losses, rel=0.05)
    assert all(tensor.dtype == torch.float32 for tensor in bf16_base.weights.values())  # PEFT keeps adapters fp32
    eager = train({"model_kwargs": {"attn_implementation": "eager"}})
    assert eager.losses == pytest.approx(base.losses, rel=1e-5)


DPO = {"trainer_type": "dpo"}
LN_2 = math.log(2)


def case_trainer_type(train: Runs) -> None:
    dpo = train(DPO)
    # A new adapter starts as the base, its reference: every reward is 0 and the loss log 2 at the first step.
    assert dpo.losses[0] == pytest.approx(LN_2, abs=1e-7) and dpo.values("rewards/margins")[0] == 0.0
    assert dpo.values("rewards/margins")[-1] > 0  # and it learns to prefer the chosen completions
    assert len(dpo.values("logps/chosen")) == len(dpo.losses) == BASE_STEPS
    assert dpo.values("eval_rewards/accuracies") and not train().values("rewards/chosen")
    assert dpo.train_forwards()[0].batch_size == 2 * BASE["per_device_train_batch_size"]  # chosen and rejected
    assert dpo.forwards[0] == Forward(False, 2 * BASE["per_device_train_batch_size"], 16)  # the reference, first


def case_beta(train: Runs) -> None:
    default, strong = train(DPO), train({**DPO, "beta": 1.0})
    assert strong.losses[0] == default.losses[0] == pytest.approx(LN_2, abs=1e-7)
    assert strong.losses[1:] != default.losses[1:]
    assert strong.values("rewards/margins")[1] != default.values("rewards/margins")[1]


def case_loss_type(train: Runs) -> None:
    assert train({**DPO, "loss_type": "ipo"}).losses[0] == pytest.approx((1 / (2 * 0.1)) ** 2)  # (0 - 1/(2 beta))^2
    assert train({**DPO, "loss_type": "hinge"}).losses[0] == pytest.approx(1.0)  # relu(1 - 0)
    assert train({**DPO, "loss_type": "sigmoid"}).losses == train(DPO).losses  # the default


def case_label_smoothing(train: Runs) -> None:
    clean, noisy = train({**DPO, "loss_type": "robust"}), train({**DPO, "loss_type": "robust", "label_smoothing": 0.3})
    assert clean.losses == train(DPO).losses  # robust without smoothing is sigmoid
    assert noisy.losses[0] == pytest.approx(LN_2, abs=1e-6) and noisy.losses[1:] != clean.losses[1:]


def case_reference_free(train: Runs) -> None:
    free = train({**DPO, "reference_free": True})
    # Against a uniform reference the rewards are beta * log-probabilities from the first step on.
    assert free.values("rewards/chosen")[0] == pytest.approx(0.1 * free.values("logps/chosen")[0], rel=1e-6)
    assert free.losses[0] != pytest.approx(LN_2)
    with_reference = train(DPO)
    assert len(free.train_forwards()) == len(with_reference.train_forwards())
    # No reference forwards: with one, every training step and every eval batch has one more.
    assert len(with_reference.eval_forwards()) == BASE_STEPS + 2 * len(free.eval_forwards())


CASES = [
    pytest.param("trainer_type", case_trainer_type, id="trainer_type"),
    pytest.param("beta", case_beta, id="beta"),
    pytest.param("loss_type", case_loss_type, id="loss_type"),
    pytest.param("label_smoothing", case_label_smoothing, id="label_smoothing"),
    pytest.param("reference_free", case_reference_free, id="reference_free"),
    pytest.param("model_name_or_path", case_model_name_or_path, id="model_name_or_path"),
    pytest.param("use_peft", case_use_peft, id="use_peft"),
    pytest.param("r", case_r, id="r"),
    pytest.param("lora_alpha", case_lora_alpha, id="lora_alpha"),
    pytest.param("lora_dropout", case_lora_dropout, id="lora_dropout"),
    pytest.param("target_modules", case_target_modules_list, id="target_modules-list"),
    pytest.param("target_modules", case_target_modules_all_linear, id="target_modules-all-linear"),
    pytest.param("learning_rate", case_learning_rate, id="learning_rate"),
    pytest.param("weight_decay", case_weight_decay, id="weight_decay"),
    pytest.param("max_grad_norm", case_max_grad_norm, id="max_grad_norm"),
    pytest.param("per_device_train_batch_size", case_per_device_train_batch_size, id="per_device_train_batch_size"),
    pytest.param("per_device_eval_batch_size", case_per_device_eval_batch_size, id="per_device_eval_batch_size"),
    pytest.param("gradient_accumulation_steps", case_gradient_accumulation_steps, id="gradient_accumulation_steps"),
    pytest.param("num_devices", case_num_devices, id="num_devices"),
    pytest.param("num_train_epochs", case_num_train_epochs, id="num_train_epochs"),
    pytest.param("max_steps", case_max_steps, id="max_steps"),
    pytest.param("lr_scheduler_type", case_lr_scheduler_constant, id="lr_scheduler_type-constant"),
    pytest.param("lr_scheduler_type", case_lr_scheduler_cosine, id="lr_scheduler_type-cosine"),
    pytest.param("warmup_steps", case_warmup_steps_linear, id="warmup_steps-linear"),
    pytest.param("warmup_steps", case_warmup_steps_constant_with_warmup, id="warmup_steps-constant_with_warmup"),
    pytest.param(
        "warmup_steps",
        case_warmup_steps_constant,
        id="warmup_steps-constant",
    ),
    pytest.param("run_name", case_run_name, id="run_name"),
    pytest.param("logging_steps", case_logging_steps, id="logging_steps"),
    pytest.param("bf16", case_bf16, id="bf16"),
    pytest.param("fp16", case_fp16, id="fp16"),
    pytest.param("warmup_ratio", case_warmup_ratio, id="warmup_ratio"),
    pytest.param("bias", case_bias_and_task_type, id="bias"),
    pytest.param("task_type", case_bias_and_task_type, id="task_type"),
    pytest.param("gradient_checkpointing", case_gradient_checkpointing, id="gradient_checkpointing"),
    pytest.param(
        "gradient_checkpointing_kwargs", case_gradient_checkpointing_kwargs, id="gradient_checkpointing_kwargs"
    ),
    pytest.param("seed", case_seed, id="seed"),
    pytest.param("max_length", case_max_length, id="max_length"),
    pytest.param("formatting_func", case_formatting_func, id="formatting_func"),
    pytest.param("compute_metrics", case_compute_metrics_logits, id="compute_metrics"),
    pytest.param("predict_with_generate", case_predict_with_generate, id="predict_with_generate"),
    pytest.param("generation_config", case_generation_config, id="generation_config"),
    pytest.param("eval_strategy", case_eval_strategy, id="eval_strategy"),
    pytest.param("eval_steps", case_eval_steps, id="eval_steps"),
    pytest.param("eval_subset", case_eval_subset, id="eval_subset"),
    pytest.param("model_kwargs", case_model_kwargs, id="model_kwargs"),
    pytest.param("completion_only_loss", case_completion_only_loss, id="completion_only_loss"),
    pytest.param("assistant_only_loss", case_assistant_only_loss, id="assistant_only_loss"),
]


# Knobs whose effect needs several processes or DeepSpeed: their cases live in tests/training/test_gang.py.
GANG_KNOBS = {"strategy", "zero_stage", "max_devices"}
# A knob whose effect needs a warm start: its cases live in tests/training/test_preference.py.
WARM_START_KNOBS = {"ref_model"}
# GRPO's own knobs: their cases need reward functions and live in tests/training/test_grpo.py.
GRPO_KNOBS = {
    "num_generations", "max_completion_length", "temperature", "top_p", "scale_rewards", "reward_funcs",
    "reward_weights",
}  # fmt: skip


def test_every_knob_has_a_case() -> None:
    assert {param.values[0] for param in CASES} | GANG_KNOBS | WARM_START_KNOBS | GRPO_KNOBS == set(KNOBS)


@pytest.mark.parametrize(("knob", "case"), CASES)
def test_knob_is_honoured(knob: str, case: Callable[[Runs], None], train: Runs) -> None:
    case(train)
