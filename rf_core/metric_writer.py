"""Metric rows from training to the rf server: batched in a background thread, spooled to disk while the server is
unreachable and replayed in order, so training never waits on, or dies of, the server."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rf_core import paths
from rf_core.client import RFClient, ServerError
from rf_core.errors import InvalidRequest, NotFound
from rf_core.server_process import is_process_alive


class MetricWriter:
    """Buffers metric rows and sends them in batches from a background thread; never raises into training.

    A batch is sent when `max_rows` rows are buffered or `flush_interval` seconds have passed. Each batch gets
    a uuid `batch_id`, so a batch sent twice is stored once. While the server is unreachable, batches are
    appended to a spool file in `spool_dir` (one JSON line per batch) and replayed, in order and before any
    new batch, as soon as it answers. Spool files left by a process that died are adopted and replayed too.
    """

    def __init__(
        self,
        client_or_url: RFClient | str | None = None,
        flush_interval: float = 0.5,
        max_rows: int = 500,
        spool_dir: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0, got {flush_interval=}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows=}")
        url = client_or_url.url if isinstance(client_or_url, RFClient) else client_or_url
        # No retries inside a send: a batch the server does not take at once goes to the spool instead.
        self._client = RFClient(url, timeout=timeout, retries=0)
        self.flush_interval = flush_interval
        self.max_rows = max_rows
        self.spool_dir = Path(spool_dir) if spool_dir is not None else paths.rf_home() / "spool"
        self.spool_path = self.spool_dir / f"metrics-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._buffer: list[dict[str, Any]] = []
        self._wakeup = threading.Condition()
        self._send_lock = threading.Lock()  # held while sending: batches leave in the order they were made
        self._closing = False
        self._closed = False
        self._outage = False  # True from a failed send until the spool is replayed
        self._retry_at = 0.0
        self._adopted = self._adopt_orphans()
        self._thread = threading.Thread(target=self._run, name="rf-metric-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Buffer one row or many: {"experiment", "run_id", "step", "name", "value"[, "chunk", "time"]}."""
        new_rows = [dict(rows)] if isinstance(rows, Mapping) else [dict(row) for row in rows]
        now = time.time()
        for row in new_rows:
            row.setdefault("time", now)
        with self._wakeup:
            self._buffer.extend(new_rows)
            if len(self._buffer) >= self.max_rows:
                self._wakeup.notify()

    def flush(self) -> None:
        """Send everything buffered now (spooling it if the server is unreachable)."""
        self._flush(force_replay=True)

    def hand_over(self) -> list[dict[str, Any]]:
        """The rows still buffered, as batches the caller delivers itself (with the chunk's record, in the same
        request), once every batch made before them has been sent. While the server is unreachable they go the
        usual way instead (spooled after the earlier ones, keeping their order) and nothing is handed over."""
        with self._send_lock:
            if not self._spool_files():
                with self._wakeup:
                    rows, self._buffer = self._buffer, []
                return [
                    {"batch_id": uuid.uuid4().hex, "rows": rows[start : start + self.max_rows]}
                    for start in range(0, len(rows), self.max_rows)
                ]
        self.flush()
        return []

    def close(self) -> None:
        """Flush everything and replay the spool; whatever the server still cannot take stays spooled."""
        if self._closed:
            return
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()
        self._flush(force_replay=True)
        self._closed = True

    @property
    def spooled_batches(self) -> int:
        return sum(_count_lines(path) for path in self._spool_files())

    # -- internals ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                if not self._closing and len(self._buffer) < self.max_rows:
                    self._wakeup.wait(self.flush_interval)
                closing = self._closing
            if closing:
                return  # close() does the last flush
            try:
                self._flush(force_replay=False)
            except Exception as exc:  # never let the writer thread die: metrics must keep flowing
                print(f"rf: metric writer error: {exc}", file=sys.stderr, flush=True)

    def _flush(self, force_replay: bool) -> None:
        with self._send_lock:
            with self._wakeup:
                rows, self._buffer = self._buffer, []
            batches = [
                {"batch_id": uuid.uuid4().hex, "rows": rows[start : start + self.max_rows]}
                for start in range(0, len(rows), self.max_rows)
            ]
            if self._spool_files():
                if not force_replay and time.monotonic() < self._retry_at:
                    self._spool(batches)
                    return
                if not self._replay():
                    self._spool(batches)
                    return
            for index, batch in enumerate(batches):
                if not self._send(batch):
                    self._spool(batches[index:])
                    return

    def _send(self, batch: Mapping[str, Any]) -> bool:
        """True when the server took the batch (or refused it for good); False when it should be retried."""
        try:
            self._client.log_metrics(batch["batch_id"], batch["rows"])
        except (InvalidRequest, NotFound) as exc:
            # The server will never accept this batch; keeping it would block every later one.
            print(f"rf: metric batch {batch['batch_id']} dropped, the server refused it: {exc}", file=sys.stderr)
            return True
        except ServerError as exc:
            self._enter_outage(exc)
            return False
        self._outage = False
        return True

    def _enter_outage(self, exc: Exception) -> None:
        if not self._outage:
            self._outage = True
            print(
                f"rf: warning: metrics server unreachable ({exc}); spooling metric batches to "
                f"{self.spool_path} and replaying them when it answers",
                file=sys.stderr,
                flush=True,
            )
        self._retry_at = time.monotonic() + 2.0

    def _spool(self, batches: Sequence[Mapping[str, Any]]) -> None:
        if not batches:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        with open(self.spool_path, "a", encoding="utf-8") as spool:
            for batch in batches:
                spool.write(json.dumps(batch) + "\n")
            spool.flush()
            os.fsync(spool.fileno())

    def _spool_files(self) -> list[Path]:
        files = [path for path in self._adopted if path.exists()]
        if self.spool_path.exists():
            files.append(self.spool_path)
        return files

    def _replay(self) -> bool:
        """Send spooled batches in order; True when the spool is empty afterwards."""
        for path in self._spool_files():
            lines = path.read_text(encoding="utf-8").splitlines()
            for index, line in enumerate(lines):
                try:
                    batch = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash mid-write carries no complete batch
                if not self._send(batch):
                    _rewrite(path, lines[index:])
                    return False
            path.unlink(missing_ok=True)
        self._adopted = [path for path in self._adopted if path.exists()]
        return True

    def _adopt_orphans(self) -> list[Path]:
        """Take over spool files of writers whose process has died (renaming makes a file ours alone)."""
        adopted = []
        if not self.spool_dir.is_dir():
            return adopted
        for path in sorted(self.spool_dir.glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime):
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid == os.getpid() or is_process_alive(pid):
                continue
            claimed = self.spool_dir / f"metrics-{os.getpid()}-adopted-{uuid.uuid4().hex[:8]}.jsonl"
            try:
                os.rename(path, claimed)
            except OSError:
                continue  # another writer adopted it first
            adopted.append(claimed)
        return adopted


def _rewrite(path: Path, lines: Sequence[str]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(temporary, path)


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0
