"""What the benchmark scripts share: an isolated, offline environment for a run, and a tiny base model built locally."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Libraries never reach for a hub (nothing can be downloaded here), say little, and leave the other slots' cores be.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}
# Left over from a shell or a test, these would point the benchmark at another server or slow its steps down.
FOREIGN_VARIABLES = ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "RF_SERVER_URL", "RF_TEST_STEP_DELAY_S")


def isolated_environment(scratch: Path, **extra: str) -> Path:
    """A fresh RF_HOME and PREFECT_HOME (ephemeral Prefect) under `scratch`, offline libraries, the project on
    PYTHONPATH for the processes the run starts, plus `extra` variables; returns RF_HOME."""
    home = scratch / "rf-home"
    os.environ.update(
        {
            "RF_HOME": str(home),
            "PREFECT_HOME": str(scratch / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **OFFLINE_ENVIRONMENT,
            **extra,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    for name in FOREIGN_VARIABLES:
        os.environ.pop(name, None)
    return home


def build_llama_base(folder: Path, shape: dict[str, Any], max_positions: int) -> Path:
    """A random-init Llama of `shape` with the demo's tokenizer, saved to `folder` (kept when already there)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rf_core.training.models import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class TrainTimer:
    """A `transformers.TrainerCallback` timing `Trainer.train` from its first step's start to its end (not the
    dataset preparation before it): `seconds` once it has ended."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            start = end = 0.0

            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                self.start = time.perf_counter()

            def on_train_end(self, *args: Any, **kwargs: Any) -> None:
                self.end = time.perf_counter()

            @property
            def seconds(self) -> float:
                return self.end - self.start

        return _Timer()
