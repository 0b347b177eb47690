"""What a run leaves behind besides its resumable state: loadable exports, and a bounded number of checkpoints.

Each run folder holds ``exports/latest`` and ``exports/best`` (its best chunk by the experiment's metric). An
export loads with the usual calls: ``PeftModel.from_pretrained(base, path)`` for a LoRA run (adapter weights and
``adapter_config.json``), ``AutoModelForCausalLM.from_pretrained(path)`` for a full fine-tune; both carry the
tokenizer and an ``rf_export.json`` saying which step and checkpoint they come from.

Exports are written from the checkpoint file just persisted (memory-mapped: only the weights are read), on the
state writer's background thread, so they cost training nothing. A folder is replaced whole: readers see the
old export or the new one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rf_core.training.checkpoints import checkpoints_dir, read_checkpoint_entry, step_of

EXPORTS_DIRNAME = "exports"
LATEST, BEST = "latest", "best"
EXPORT_INFO_NAME = "rf_export.json"


def export_dir(run_dir: str | Path, which: str) -> Path:
    return Path(run_dir) / EXPORTS_DIRNAME / which


@dataclass(frozen=True)
class ExportRecipe:
    """What an export needs besides the weights: the tokenizer, and the adapter or model configuration."""

    tokenizer: Any
    lora_config: Any | None = None  # a peft LoraConfig for LoRA runs
    model_config: Any | None = None  # a transformers PretrainedConfig for full fine-tunes

    def __post_init__(self) -> None:
        if (self.lora_config is None) == (self.model_config is None):
            raise ValueError("an ExportRecipe needs exactly one of lora_config and model_config")

    @classmethod
    def for_lora(cls, tokenizer: Any, lora_config: Any, base_model_name_or_path: str) -> ExportRecipe:
        lora_config = copy.copy(lora_config)
        lora_config.base_model_name_or_path = base_model_name_or_path
        return cls(tokenizer=tokenizer, lora_config=lora_config)


def write_export(checkpoint_path: Path, recipe: ExportRecipe, destination: Path, info: dict[str, Any]) -> Path:
    """Write a loadable export of `checkpoint_path`'s weights to `destination`, replacing what was there."""
    weights = read_checkpoint_entry(checkpoint_path, "trainable")
    step = read_checkpoint_entry(checkpoint_path, "step")
    staging = _fresh_sibling(destination, "tmp")
    if recipe.lora_config is not None:
        save_file(_contiguous(weights), staging / "adapter_model.safetensors", metadata={"format": "pt"})
        recipe.lora_config.save_pretrained(str(staging))
    else:
        save_file(_contiguous(_without_shared(weights)), staging / "model.safetensors", metadata={"format": "pt"})
        recipe.model_config.save_pretrained(str(staging))
    if not _link_tokenizer_files(destination, staging):
        recipe.tokenizer.save_pretrained(str(staging))
    (staging / EXPORT_INFO_NAME).write_text(
        json.dumps({"step": int(step), "checkpoint": str(checkpoint_path), **info}, indent=2)
    )
    _replace_folder(staging, destination)
    return destination


def copy_export(source: Path, destination: Path) -> Path:
    """Make `destination` the same export as `source` (hard links where the filesystem allows)."""
    staging = _fresh_sibling(destination, "tmp")
    for entry in source.iterdir():
        try:
            os.link(entry, staging / entry.name)
        except OSError:
            shutil.copy2(entry, staging / entry.name)
    _replace_folder(staging, destination)
    return destination


def prune_checkpoints(run_dir: str | Path, keep: int | None, pinned_steps: Iterable[int] = ()) -> list[Path]:
    """Delete step checkpoints older than the newest `keep`, sparing `pinned_steps`. None keeps everything.

    Pinned steps are the ones a pending warm-started clone will start from.
    """
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"{keep=} must be >= 1 (the latest checkpoint is what a run resumes from)")
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    steps = sorted((step, path) for path in folder.iterdir() if (step := step_of(path)) is not None)
    spared = {step for step, _ in steps[-keep:]} | {int(step) for step in pinned_steps}
    deleted = [path for step, path in steps if step not in spared]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


_WEIGHT_AND_CONFIG_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "model.safetensors",
    "config.json",
    "generation_config.json",
    EXPORT_INFO_NAME,
}


def _link_tokenizer_files(previous: Path, staging: Path) -> bool:
    """A run's tokenizer never changes: reuse the previous export's files (hard links) instead of rewriting them."""
    if not (previous / "tokenizer_config.json").is_file():
        return False
    for entry in previous.iterdir():
        if entry.name not in _WEIGHT_AND_CONFIG_FILES and entry.is_file():
            try:
                os.link(entry, staging / entry.name)
            except OSError:
                shutil.copy2(entry, staging / entry.name)
    return True


def _contiguous(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in weights.items()}


def _without_shared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights (embeddings and LM head) share storage; safetensors stores each once, as HF does."""
    seen: set[tuple[int, int]] = set()
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def _fresh_sibling(destination: Path, tag: str) -> Path:
    sibling = destination.with_name(f".{destination.name}.{tag}-{os.getpid()}")
    shutil.rmtree(sibling, ignore_errors=True)
    sibling.mkdir(parents=True)
    return sibling


def _replace_folder(new: Path, destination: Path) -> None:
    old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        os.replace(destination, old)
    os.replace(new, destination)
    shutil.rmtree(old, ignore_errors=True)
