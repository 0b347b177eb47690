"""A small, fast experiment for end-to-end tests, importable by slot workers as `tests.e2e_experiment:spec`.

The base models are the engine's own tiny shapes with no pretraining, cached in the folder named by
RF_E2E_MODEL_CACHE so a test session builds them once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rf_core.experiment import ExperimentSpec
from rf_core.knobs import List

MODEL_CACHE_ENV = "RF_E2E_MODEL_CACHE"

CONFIGS = {
    "model_name_or_path": "rf-tiny-llama",
    "learning_rate": List([1e-3, 3e-3, 1e-2]),
    "r": 4,
    "lora_alpha": 8,
    "per_device_train_batch_size": 8,
    "max_length": 32,
}


def create_model_fn(config: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rf_core.training.models import ensure_pretrained

    folder = ensure_pretrained(config["model_name_or_path"], Path(os.environ[MODEL_CACHE_ENV]), pretrain_steps=0)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True), tokenizer


def _examples(count: int, offset: int) -> list[dict[str, str]]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [
        {"prompt": f"item {i}: ", "completion": " ".join(words[(i + j) % len(words)] for j in range(6))}
        for i in range(offset, offset + count)
    ]


def spec() -> ExperimentSpec:
    return ExperimentSpec(
        config_group=CONFIGS,
        create_model_fn=create_model_fn,
        train_dataset=_examples(96, 0),
        eval_dataset=_examples(16, 1000),
        num_chunks=4,
        seed=7,
        # Every chunk checkpoint stays: the end-to-end test compares a clone's start with its parent's state.
        keep_checkpoints=None,
    )
