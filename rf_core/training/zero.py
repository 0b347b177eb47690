"""DeepSpeed ZeRO for one chunk of a run: the engine over the run's model, and its sharded state on disk.

A DeepSpeed run trains through the same chunk loop as the others, in a gang of any size (1 included). Its engine
cannot outlive the chunk's process group, so every chunk starts one from the run's state: the trainable weights,
LR schedule, RNG and counters come from the run's own checkpoint, as for any run; the optimizer state, which
ZeRO shards across the gang (stages 1 and 2), comes from DeepSpeed's checkpoint of the same step, one file per
rank, in `<run dir>/deepspeed/step-<N>/`. Restoring it needs the same world size, which a run keeps for life.
ZeRO-3 also shards the parameters: every member then evaluates (its forward gathers them), and the weights are
gathered to be saved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rf_core.messages import Gang
from rf_core.paths import rf_home

SHARDS_DIRNAME = "deepspeed"
INSTALL_HINT = "pip install --no-build-isolation 'deepspeed==0.19.8' (make install does)"


def shards_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / SHARDS_DIRNAME


def _tag(step: int) -> str:
    return f"step-{int(step)}"


def import_deepspeed(device: torch.device) -> Any:
    """DeepSpeed, set up for this device; a clear error when it is not installed."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    # Its communication op is compiled on first use (~35 s): once per RF_HOME, not per process.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(rf_home() / "cache" / "torch_extensions"))
    try:
        import deepspeed
    except ImportError as exc:
        raise RuntimeError(f"strategy 'deepspeed' needs DeepSpeed, which is not installed: {INSTALL_HINT}") from exc
    return deepspeed


def engine_config(config: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: its micro-batch, accumulation, clipping and ZeRO stage; fp32 throughout."""
    micro, accumulation = int(config["per_device_train_batch_size"]), int(config["gradient_accumulation_steps"])
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "zero_optimization": {"stage": int(config["zero_stage"])},
        "gradient_clipping": float(config["max_grad_norm"]),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def start_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Mapping[str, Any],
    gang: Gang,
    device: torch.device,
) -> Any:
    """A DeepSpeed engine over `model` with the run's torch AdamW as its client optimizer (no JIT-built FusedAdam),
    inside the gang's process group, which must already be formed."""
    deepspeed = import_deepspeed(device)
    host, port = gang.address.rsplit(":", 1)
    local_rank = device.index if device.type == "cuda" and device.index is not None else gang.rank
    # DeepSpeed reads the launcher's variables even when the process group exists already.
    os.environ.update(
        LOCAL_RANK=str(local_rank),
        RANK=str(gang.rank),
        WORLD_SIZE=str(gang.world_size),
        MASTER_ADDR=host,
        MASTER_PORT=port,
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=engine_config(config, gang.world_size), dist_init_required=False
    )
    return engine


def partitions_parameters(config: Mapping[str, Any]) -> bool:
    """ZeRO-3 shards the parameters themselves: every member's forward takes part in gathering them."""
    return config["strategy"] == "deepspeed" and int(config["zero_stage"]) >= 3


def gathered(engine: Any, parameters: Sequence[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """Full values of these parameters while inside (collective: every member enters); a no-op below ZeRO-3."""
    if engine is None or engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None)


def save_shards(engine: Any, run_dir: str | Path, step: int) -> Path:
    """Every member writes its shard of the optimizer state (rank 0 also the module's); collective."""
    engine.save_checkpoint(str(shards_dir(run_dir)), tag=_tag(step), save_latest=False)
    return shards_dir(run_dir) / _tag(step)


def load_shards(engine: Any, run_dir: str | Path, step: int) -> None:
    """Restore the optimizer shards saved at `step`; the module's weights come from the run's own checkpoint."""
    folder = shards_dir(run_dir) / _tag(step)
    if not folder.is_dir():
        raise FileNotFoundError(f"no DeepSpeed optimizer state for step {step} in {folder}")
    loaded, _ = engine.load_checkpoint(
        str(shards_dir(run_dir)),
        tag=_tag(step),
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        # Adapter names inside the module differ between chunks; the weights are loaded from the run's checkpoint.
        load_module_strict=False,
    )
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed could not load its state for step {step} from {folder}")


def prune_shards(run_dir: str | Path, deleted_steps: Iterable[int]) -> None:
    """Delete the shard folders of the steps whose run checkpoints were just pruned."""
    for step in deleted_steps:
        shutil.rmtree(shards_dir(run_dir) / _tag(step), ignore_errors=True)
