"""A run's state at a chunk boundary: one dict, one file, written atomically, read back as data (never code).

Checkpoint dict::

    {"format": 2, "config": dict, "step": int, "epoch": int, "samples": int, "chunk_index": int,
     "trainable": {name: tensor},   # adapter weights (LoRA, adapter name stripped) or the full state_dict
     "optimizer": AdamW state_dict, "scheduler": LR scheduler state_dict,
     "rng": {"torch": ByteTensor, "numpy": {...}, "python": [...], "cuda": [...] only when CUDA is in use},
     "best": {"value": float, "step": int} or None}   # the run's best chunk so far by the experiment's metric

File format 2 is one safetensors file: every tensor of the dict stored raw (bit for bit), and the rest of the dict
as JSON in the header, with each tensor replaced by a reference. Reading it is a header parse and a memory copy,
several times faster than unpickling (format 1, `torch.save`, is still read), which is what a swap between
workers costs. Files live in ``<run_dir>/checkpoints/``: ``step-<N>.pt`` after the chunk that ended at step N,
and ``init.pt`` for a warm-started clone's state before its first step. `rf_core.training.artifacts` prunes old ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from rf_core.training.statefiles import (
    INIT_CHECKPOINT_NAME,
    CheckpointError,
    atomic_write_path,
    checkpoints_dir,
    init_checkpoint_path,
    step_checkpoint_path,
    step_of,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "capture_rng_state",
    "checkpoints_dir",
    "init_checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint_entry",
    "read_checkpoint_file",
    "restore_rng_state",
    "save_checkpoint",
    "EncodedState",
    "step_checkpoint_path",
    "step_of",
]

CHECKPOINT_FORMAT = 2
_TORCH_ZIP_MAGIC = b"PK"  # format 1 files are torch.save zip archives
_STATE_KEY = "rf_state"  # safetensors header metadata holding the dict's JSON skeleton


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically and durably: readers see the old file or the whole new one."""
    path = Path(path)
    atomic_write_path(path, EncodedState(state).write_to, durable=True)
    return path


class EncodedState:
    """A state dict split into its tensors and its JSON skeleton, ready to be written as one safetensors file."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        skeleton = _encode({**state, "format": CHECKPOINT_FORMAT}, self.tensors, {})
        self.metadata = {_STATE_KEY: json.dumps(skeleton)}

    def write_to(self, path: Path) -> None:
        safetensors.torch.save_file(self.tensors, str(path), metadata=self.metadata)

    def to_bytes(self) -> bytes:
        return safetensors.torch.save(self.tensors, metadata=self.metadata)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; raises CheckpointError naming `path` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return read_checkpoint_file(path)


def read_checkpoint_file(path: Path, shown_as: Path | None = None) -> dict[str, Any]:
    """Load and check one checkpoint file. FileNotFoundError passes through (callers fall back elsewhere)."""
    shown = shown_as or path
    try:
        with open(path, "rb") as file:
            is_format_1 = file.read(2) == _TORCH_ZIP_MAGIC
        if is_format_1:
            # weights_only=True: a checkpoint is data, never code to run.
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = _decode_file(path)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise CheckpointError(f"checkpoint {shown} is unreadable or corrupt: {error}") from error
    if not isinstance(state, dict) or state.get("format") not in (1, CHECKPOINT_FORMAT):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {shown} has format {found!r}; expected {CHECKPOINT_FORMAT}")
    return state


def read_checkpoint_entry(path: Path, key: str) -> Any:
    """One top-level entry of a checkpoint (e.g. "trainable"), reading only its tensors when the format allows."""
    with open(path, "rb") as file:
        is_format_1 = file.read(2) == _TORCH_ZIP_MAGIC
    if is_format_1:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key]
    with safetensors.safe_open(str(path), framework="pt") as handle:
        skeleton = json.loads(handle.metadata()[_STATE_KEY])
        entry = _entries(skeleton)[key]
        return _decode(entry, lambda name: handle.get_tensor(name), {})


# A tensor becomes {"$t": name}; a second reference to the same tensor (tied weights) {"$alias": name}; a dict
# whose keys are not all strings (optimizer state is keyed by parameter index) {"$dict": [[key, value], ...]};
# a tuple {"$tuple": [...]}. Other values are JSON as they are.


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: dict[Any, str]) -> Any:
    if isinstance(value, torch.Tensor):
        storage = (value.device, value.untyped_storage().data_ptr())
        view = (*storage, value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if view in seen and value.numel() > 0:
            return {"$alias": seen[view]}
        name = f"t{len(tensors)}"
        shares_storage = storage in seen and value.numel() > 0
        seen[view] = seen[storage] = name
        # safetensors stores each buffer once: another view of a stored buffer is written as its own copy.
        tensor = value.detach().to("cpu")
        tensors[name] = tensor.clone() if shares_storage else tensor.contiguous()
        return {"$t": name}
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item, tensors, seen) for key, item in value.items()}
        return {"$dict": [[_encode(key, tensors, seen), _encode(item, tensors, seen)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item, tensors, seen) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors, seen) for item in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise TypeError(f"a checkpoint holds tensors and JSON values only, not {type(value).__name__}: {value!r}")


def _decode(value: Any, tensor: Callable[[str], torch.Tensor], cache: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensor, cache) for item in value]
    if not isinstance(value, dict):
        return value
    if "$t" in value or "$alias" in value:
        name = value.get("$t", value.get("$alias"))
        if name not in cache:
            cache[name] = tensor(name)
        return cache[name]
    if "$dict" in value:
        return {_decode(key, tensor, cache): _decode(item, tensor, cache) for key, item in value["$dict"]}
    if "$tuple" in value:
        return tuple(_decode(item, tensor, cache) for item in value["$tuple"])
    return {key: _decode(item, tensor, cache) for key, item in value.items()}


def _decode_file(path: Path) -> dict[str, Any]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _STATE_KEY not in metadata:
            raise ValueError("not a run-state file (no state skeleton in its header)")
        return _decode(json.loads(metadata[_STATE_KEY]), handle.get_tensor, {})


def _entries(skeleton: Any) -> dict[str, Any]:
    if isinstance(skeleton, dict) and "$dict" not in skeleton:
        return skeleton
    raise ValueError("a run-state file's top level must be a dict with string keys")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step checkpoint with the highest step; else `init.pt`; None when neither exists."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return None
    steps = [(step, entry) for entry in folder.iterdir() if (step := step_of(entry)) is not None]
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
