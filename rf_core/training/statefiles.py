"""Run-state files without torch: their names, their errors, and atomic writes.

Kept free of heavy imports so the fit flow's process (which only moves files around) never loads torch.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

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


def step_of(path: Path) -> int | None:
    """The step of a `step-<N>.pt` file; None for any other name."""
    match = _STEP_FILE.match(path.name)
    return int(match.group(1)) if match else None


def atomic_write(path: Path, write: Callable[[BinaryIO], None], durable: bool = True) -> int:
    """Write a file through `write(file)` so readers see the old file or the whole new one. Returns its size.

    `durable` fsyncs the file and the rename; a RAM-backed staging file skips that.
    """

    def write_to(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            write(file)

    return atomic_write_path(path, write_to, durable)


def atomic_write_path(path: Path, write_to: Callable[[Path], None], durable: bool = True) -> int:
    """Like `atomic_write`, for writers that want a file name rather than an open file. Returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write_to(Path(temp_name))
        size = os.path.getsize(temp_name)
        if durable:
            with open(temp_name, "rb") as file:
                os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return size


def atomic_copy(source: Path, path: Path) -> int:
    def copy(file: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, file, length=8 << 20)

    return atomic_write(path, copy)


def fsync_dir(folder: Path) -> None:
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
