"""Write-behind for run state: snapshot to a RAM-backed staging area now, make it durable on disk in the background.

At a chunk boundary the trainer serialises a run's state into the staging area (by default `/dev/shm/rf-<uid>`,
a tmpfs: a memory copy, no fsync) and goes on training. A background thread then copies the file to its place
under the run folder with an atomic rename and fsync, and runs the follow-ups (exports, pruning). So:

- disk writes never stall training unless `max_pending` of them are queued (bounded write-behind);
- another slot worker takes the run over from the staged copy, through RAM, even before the disk copy exists;
- a worker that crashes mid-write loses nothing: the staged copy outlives the process, and
  `persist_staged` (run by the fit at start and end) finishes any write a dead worker left behind.

A staged file mirrors its disk path under the staging root (`<root>/<absolute disk path>`), so any process
finds it from the disk path alone. Without a staging area (no /dev/shm, or `RF_STAGING_DIR=off`), the snapshot
is a bytes buffer in the worker's memory and only the disk write happens in the background.
"""

from __future__ import annotations

import atexit
import errno
import os
import queue
import shutil
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rf_core.training.statefiles import CheckpointError, atomic_copy, atomic_write, atomic_write_path, step_of

STAGING_ENV = "RF_STAGING_DIR"  # a folder for staged state; "off" (or empty) writes straight to disk
SPACE_MARGIN = 1.05  # a write needs its size plus this margin free, so the filesystem never fills completely

AfterPersist = Callable[[Path], None]


class StorageFull(CheckpointError):
    """There is not enough space to write a run's state; the message names the path and the bytes needed."""


def default_staging_root() -> Path | None:
    """`$RF_STAGING_DIR`, else `/dev/shm/rf-<uid>` when /dev/shm is a writable folder, else None (disk only)."""
    configured = os.environ.get(STAGING_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "none") else Path(configured)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"rf-{os.getuid()}"
    return None


def staged_path(staging_root: Path, disk_path: str | Path) -> Path:
    """Where the staged copy of `disk_path` lives: the absolute disk path mirrored under the root."""
    absolute = Path(os.path.abspath(disk_path))
    return staging_root / absolute.relative_to(absolute.anchor)


def disk_path_of(staging_root: Path, staged: Path) -> Path:
    return Path("/") / staged.relative_to(staging_root)


def load_state(path: str | Path, staging_root: Path | None) -> dict[str, Any]:
    """Load a run state from its staged copy when there is one (RAM), else from disk."""
    from rf_core.training.checkpoints import read_checkpoint_file

    if staging_root is not None:
        staged = staged_path(staging_root, path)
        try:
            return read_checkpoint_file(staged, shown_as=Path(path))
        except FileNotFoundError:
            pass  # never staged, or already persisted and cleaned up: the disk copy is the one
    return read_checkpoint_file(Path(path))


def state_exists(path: str | Path, staging_root: Path | None) -> bool:
    return Path(path).is_file() or (staging_root is not None and staged_path(staging_root, path).is_file())


# Writers not closed yet. At interpreter exit each is closed (its queued writes finished, its thread joined): a
# daemon thread still inside torch's C++ code when Python finalises is unwound by force, and the process aborts
# ("terminate called without an active exception", exit -6) instead of exiting 0.
_LIVE_WRITERS: weakref.WeakSet[StateWriter] = weakref.WeakSet()


@atexit.register
def _close_live_writers() -> None:
    for writer in list(_LIVE_WRITERS):
        try:
            writer.close()
        except Exception as exc:  # a write that failed at exit keeps its staged copy: say so, go on closing
            print(f"rf: a run state could not be written at exit: {exc}", file=sys.stderr)


@dataclass
class _Job:
    disk_path: Path
    size: int
    staged: Path | None = None  # copy this file to disk ...
    buffer: bytes | None = None  # ... or write these bytes
    after_persist: list[AfterPersist] = field(default_factory=list)


class StateWriter:
    """Snapshots run states synchronously and persists them to disk on one background thread.

    `save` returns once the snapshot is taken; `flush` waits for every queued write and raises, naming the
    files, if any failed. A failed background write keeps the staged copy, so the run stays resumable.
    """

    def __init__(self, staging_root: Path | None, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"{max_pending=} must be >= 1")
        self.staging_root = staging_root
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._failures: dict[Path, str] = {}  # run folder -> why its last background write failed
        self._closed = False
        self._thread = threading.Thread(target=self._persist_forever, name="rf-state-writer", daemon=True)
        self._thread.start()
        _LIVE_WRITERS.add(self)

    # ----------------------------------------------------------------------------------------------- public

    def save(self, state: dict[str, Any], disk_path: str | Path, after_persist: list[AfterPersist] = ()) -> Path:
        """Snapshot `state` now; it reaches `disk_path` (atomically, fsynced) in the background.

        Raises StorageFull, before anything is queued, when the disk cannot take the write.
        """
        disk_path = Path(disk_path)
        run_folder = disk_path.parent
        with self._lock:
            failure = self._failures.pop(run_folder, None)
        if failure is not None:
            raise CheckpointError(f"an earlier write of this run's state failed: {failure}")
        job = self._snapshot(state, disk_path)
        try:
            with self._lock:
                queued = self._pending_bytes
            _check_free_space(disk_path.parent, job.size + queued, f"run state {disk_path}")
        except StorageFull:
            if job.staged is not None:
                job.staged.unlink(missing_ok=True)
            raise
        job.after_persist = list(after_persist)
        if job.staged is None:
            # Another worker may look for this state before the disk write starts: tell it one is on the way.
            _pending_marker(disk_path).parent.mkdir(parents=True, exist_ok=True)
            _pending_marker(disk_path).touch()
        with self._lock:
            self._pending_bytes += job.size
        self._queue.put(job)  # blocks while max_pending writes are queued: the write-behind is bounded
        return disk_path

    def flush(self) -> None:
        """Wait until every queued write is on disk; raise CheckpointError naming those that failed."""
        self._queue.join()
        with self._lock:
            failures = dict(self._failures)  # kept: the run's next save reports its own failure too
        if failures:
            raise CheckpointError("; ".join(failures.values()))

    def close(self) -> None:
        """Finish every queued write and stop the thread. Safe to call twice; also called at interpreter exit for
        a writer nobody closed."""
        if self._closed:
            return
        self._closed = True
        _LIVE_WRITERS.discard(self)
        try:
            self.flush()
        finally:
            self._failures.clear()
            self._queue.put(None)
            self._thread.join(timeout=60)

    # ------------------------------------------------------------------------------------------ internals

    def _snapshot(self, state: dict[str, Any], disk_path: Path) -> _Job:
        from rf_core.training.checkpoints import EncodedState

        encoded = EncodedState(state)
        staging_full = False
        if self.staging_root is not None:
            staged = staged_path(self.staging_root, disk_path)
            try:
                size = atomic_write_path(staged, encoded.write_to, durable=False)
                return _Job(disk_path=disk_path, size=size, staged=staged)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                staging_full = True
        data = encoded.to_bytes()
        if staging_full:
            free = shutil.disk_usage(self.staging_root).free if self.staging_root.exists() else 0
            print(
                f"rf: staging area {self.staging_root} is full ({len(data):,} bytes needed, {free:,} free): "
                f"{disk_path} goes to disk from this worker's memory instead",
                file=sys.stderr,
            )
        return _Job(disk_path=disk_path, size=len(data), buffer=data)

    def _persist_forever(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._persist(job)
            finally:
                if job is not None:
                    with self._lock:
                        self._pending_bytes -= job.size
                self._queue.task_done()

    def _persist(self, job: _Job) -> None:
        try:
            _check_free_space(job.disk_path.parent, job.size, f"run state {job.disk_path}")
            if job.staged is not None:
                atomic_copy(job.staged, job.disk_path)
            else:
                data = job.buffer
                assert data is not None
                atomic_write(job.disk_path, lambda file: file.write(data))
                _pending_marker(job.disk_path).unlink(missing_ok=True)
        except Exception as error:  # the staged copy stays: the state is safe, only not yet durable
            kept = f"; the state is kept at {job.staged}" if job.staged is not None else ""
            message = f"could not write {job.disk_path}: {error}{kept}"
            print(f"rf: {message}", file=sys.stderr)
            with self._lock:
                self._failures[job.disk_path.parent] = message
            return
        for follow_up in job.after_persist:
            try:
                follow_up(job.disk_path)
            except Exception as error:  # an export or a prune failing must not lose the checkpoint
                print(f"rf: after writing {job.disk_path}: {type(error).__name__}: {error}", file=sys.stderr)
        if self.staging_root is not None:
            _drop_older_staged(self.staging_root, job.disk_path)


# ------------------------------------------------------------------------------------------ file helpers


def persist_staged(staging_root: Path | None, folder: str | Path) -> list[Path]:
    """Make every staged state under `folder` durable on disk, then free the staging area. Returns new files.

    The fit calls this when it starts (a crashed earlier fit may have left states only in RAM) and when it
    ends (the workers have flushed; what remains staged is already on disk, or was left by a dead worker).
    """
    if staging_root is None:
        return []
    staged_folder = staged_path(staging_root, folder)
    if not staged_folder.is_dir():
        return []
    written: list[Path] = []
    for staged in sorted(staged_folder.rglob("*.pt")):
        if staged.name.startswith("."):
            staged.unlink(missing_ok=True)  # a torn temporary file from a crash
            continue
        disk_path = disk_path_of(staging_root, staged)
        if not disk_path.is_file():
            atomic_copy(staged, disk_path)
            written.append(disk_path)
        staged.unlink(missing_ok=True)
    shutil.rmtree(staged_folder, ignore_errors=True)
    _remove_empty_parents(staged_folder.parent, staging_root)
    return written


def _remove_empty_parents(folder: Path, staging_root: Path) -> None:
    """The mirrored path's empty folders, up to (not including) the staging root."""
    while folder != staging_root and staging_root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: another experiment's states live below
        folder = folder.parent


def _pending_marker(disk_path: Path) -> Path:
    """Exists while a state held only in a worker's memory waits for its disk write (no staging area)."""
    return disk_path.with_name(f".{disk_path.name}.pending")


def _drop_older_staged(staging_root: Path, persisted: Path) -> None:
    """Once a state is durable, older staged states of the same run only take RAM."""
    current = step_of(persisted)
    folder = staged_path(staging_root, persisted.parent)
    if current is None or not folder.is_dir():
        return
    for staged in folder.iterdir():
        step = step_of(staged)
        if step is not None and step < current:
            staged.unlink(missing_ok=True)


def _check_free_space(folder: Path, needed: int, what: str) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * SPACE_MARGIN:
        raise StorageFull(
            f"not enough space for {what}: needs {needed:,} bytes (+{SPACE_MARGIN - 1:.0%} margin), "
            f"{free:,} free on the filesystem of {folder}. Free space, then resume the run"
        )
