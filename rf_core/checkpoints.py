"""A run's state on disk: one dict per chunk boundary, written atomically, read back with `weights_only=True`.

Checkpoint dict (format 1)::

    {"format": 1, "config": dict, "step": int, "epoch": int, "samples": int, "chunk_index": int,
     "trainable": {name: tensor},   # adapter weights (LoRA, adapter name stripped) or the full state_dict
     "optimizer": AdamW state_dict, "scheduler": LR scheduler state_dict,
     "rng": {"torch": ByteTensor, "numpy": {...}, "python": [...], "cuda": [...] only when CUDA is in use}}

Files live in ``<run_dir>/checkpoints/``: ``step-<N>.pt`` after the chunk that ended at step N, and
``init.pt`` for a warm-started clone's state before its first step. All chunk checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = 1
CHECKPOINTS_DIRNAME = "checkpoints"
INIT_CHECKPOINT_NAME = "init.pt"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable, corrupt, or not in a format this code reads."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def step_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{int(step)}.pt"


def init_checkpoint_path(run_dir: str | Path) -> Path:
    return checkpoints_dir(run_dir) / INIT_CHECKPOINT_NAME


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically: readers see the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({**state, "format": CHECKPOINT_FORMAT}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; raises CheckpointError naming `path` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only=True: a checkpoint is data, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has format {found!r}; expected {CHECKPOINT_FORMAT}")
    return state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step checkpoint with the highest step; else `init.pt`; None when neither exists."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return None
    steps = [(int(match.group(1)), entry) for entry in folder.iterdir() if (match := _STEP_FILE.match(entry.name))]
    if steps:
        return max(steps)[1]
    init = folder / INIT_CHECKPOINT_NAME
    return init if init.is_file() else None


def capture_rng_state() -> dict[str, Any]:
    """torch (and CUDA, when in use), numpy and python RNG states as tensors, lists and scalars.

    Plain types only, so `torch.load(weights_only=True)` can read them back.
    """
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    python_version, python_state, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": [python_version, list(python_state), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never start CUDA just to read its RNG
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(rng["torch"])
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_version, python_state, python_gauss = rng["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems don't allow opening a folder; the file itself is already synced
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
