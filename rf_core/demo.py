"""The demo experiments: LoRA fine-tunes of a small pretrained causal LM on the standard library's docstrings.

Importable as `rf_core.demo:demo_experiment` (SFT) and `rf_core.demo:dpo_demo_experiment` (DPO), so the CLI, the
Prefect deployment and `rf continue` all name them the same way. The SFT grid spans learning rates wide enough that
the runs end visibly apart. Both carry the SFT pairs and the preference pairs (`train_dataset` keyed by trainer type),
so any run can be cloned into the other trainer type: `rf clone EXP 1 --set trainer_type=dpo --warm-start` is the
usual story, a DPO run anchored to the SFT run it starts from.
"""

from __future__ import annotations

from typing import Any

from rf_core.experiment import ExperimentSpec
from rf_core.knobs import GridSearch, List

DEMO_GRID = {
    "model_name_or_path": "rf-tiny-llama",
    "learning_rate": List([1e-2, 1e-5]),
    "r": List([16, 4]),
    "lora_alpha": 32,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
    "max_length": 64,
    "lr_scheduler_type": "linear",
    "warmup_steps": 5,
}


def create_tiny_model(config: dict[str, Any]) -> tuple[Any, Any]:
    """A `create_model_fn` for the built-in tiny models, for examples and tests: `{"model_name_or_path":
    "rf-tiny-llama"}` (or "rf-tiny-gpt2") gives (base model, tokenizer), built locally on first use (a byte-level BPE
    tokenizer and a short pretraining on CPython's help topics, ~30 s on 2 cores) and cached under
    `$RF_HOME/models`; any other name or path loads as the demo loads it (local folders, the local hub cache)."""
    from rf_core.training.models import demo_create_model_fn

    return demo_create_model_fn(config)


def tiny_model_folder(name: str = "rf-tiny-llama") -> str:
    """The folder of a built-in tiny model, built on first use under `$RF_HOME/models`: for code that loads its model
    with `from_pretrained(path)`, as notebooks do."""
    from rf_core.paths import model_cache_dir
    from rf_core.training.models import ensure_pretrained

    return str(ensure_pretrained(name, model_cache_dir()))


DPO_DEMO_GRID = {
    "model_name_or_path": "rf-tiny-llama",
    "trainer_type": "dpo",
    "beta": List([0.1, 0.5]),
    "learning_rate": List([1e-2, 1e-3]),  # the tiny model learns its preferences at the upper end
    "r": 8,
    "lora_alpha": 16,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,
    "max_length": 128,
    "warmup_steps": 5,
}


GRPO_DEMO_GRID = {
    "model_name_or_path": "rf-tiny-llama",
    "trainer_type": "grpo",
    "reward_funcs": ["sentence_reward", "length_reward"],
    "learning_rate": List([3e-3, 3e-4]),
    "num_generations": 4,
    "per_device_train_batch_size": 8,  # completions: 2 prompts per step, each sampled 4 times
    "max_completion_length": 24,
    "r": 8,
    "lora_alpha": 16,
}
GRPO_DEMO_PROMPTS = (320, 16)  # (train, eval) prompts: 160 steps an epoch, each eval 64 completions
TARGET_WORDS = 12  # length_reward's best completion length, in words


def sentence_reward(completions: list[Any], **_: Any) -> list[float]:
    """1 for a completion that reads as one sentence: it starts with a capital letter and ends with a period."""
    texts = [_text(completion).strip() for completion in completions]
    return [float(bool(text) and text[0].isupper() and text.endswith(".")) for text in texts]


def length_reward(completions: list[Any], **_: Any) -> list[float]:
    """Closer to TARGET_WORDS words is better: 1 at the target, down to 0 at twice as far."""
    return [
        max(0.0, 1 - abs(len(_text(completion).split()) - TARGET_WORDS) / TARGET_WORDS) for completion in completions
    ]


def _text(completion: Any) -> str:
    return completion if isinstance(completion, str) else "".join(message["content"] for message in completion)


def demo_experiment(num_chunks: int = 4) -> ExperimentSpec:
    return _demo_spec(GridSearch(DEMO_GRID), num_chunks)


def dpo_demo_experiment(num_chunks: int = 4) -> ExperimentSpec:
    """DPO runs on preference pairs (chosen: a function's docstring; rejected: another's), from the tiny model."""
    return _demo_spec(GridSearch(DPO_DEMO_GRID), num_chunks, metric="eval_rewards/accuracies")  # mode max follows


def grpo_demo_experiment(num_chunks: int = 4) -> ExperimentSpec:
    """GRPO runs that learn to answer a function signature with one sentence of about 12 words, from rewards
    checked by two plain functions (a verifiable format and length), from the tiny model."""
    return _demo_spec(GridSearch(GRPO_DEMO_GRID), num_chunks, metric="eval_reward")  # mode max follows


def _demo_spec(config_group: Any, num_chunks: int, metric: str = "eval_loss") -> ExperimentSpec:
    from rf_core.demo_data import demo_datasets, demo_preference_datasets

    train, evaluation = demo_datasets()
    preference_train, preference_eval = demo_preference_datasets()

    def prompts(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"prompt": row["prompt"]} for row in rows]

    return ExperimentSpec(
        config_group=config_group,
        create_model_fn=create_tiny_model,  # torch loads where the model is built (the slot workers), not here
        train_dataset={"sft": train, "dpo": preference_train, "grpo": prompts(train[: GRPO_DEMO_PROMPTS[0]])},
        eval_dataset={"sft": evaluation, "dpo": preference_eval, "grpo": prompts(evaluation[: GRPO_DEMO_PROMPTS[1]])},
        num_chunks=num_chunks,
        seed=42,
        metric=metric,
        functions={"sentence_reward": sentence_reward, "length_reward": length_reward},
    )
