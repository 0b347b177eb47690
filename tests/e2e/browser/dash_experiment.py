"""The live experiment the browser tests steer, importable by slot workers as `tests.e2e.browser.dash_experiment:spec`.

Two runs of 4 chunks × 6 steps on the engine's tiny base (no pretraining): long enough, with the tests' step
delay, for ops to arrive mid-chunk, short enough to keep the browser tests under two minutes.
"""

from __future__ import annotations

from rf_core.experiment import ExperimentSpec
from rf_core.knobs import List
from tests.e2e_experiment import _examples, create_model_fn

CONFIGS = {
    "model_name_or_path": "rf-tiny-llama",
    "learning_rate": List([1e-3, 3e-3]),
    "r": 4,
    "lora_alpha": 8,
    "per_device_train_batch_size": 8,
    "max_length": 32,
}


def spec() -> ExperimentSpec:
    return ExperimentSpec(
        config_group=CONFIGS,
        create_model_fn=create_model_fn,
        train_dataset=_examples(192, 0),  # 24 steps an epoch: 6 a chunk
        eval_dataset=_examples(16, 1000),
        num_chunks=4,
        seed=11,
        keep_checkpoints=None,  # every chunk's checkpoint stays, so a deleted run's files can be checked
    )
