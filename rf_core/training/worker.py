"""Persistent slot workers: one process per device slot, alive for the whole fit.

A worker imports torch/transformers once, caches base models, and keeps the runs it trained warm in memory.
The fit loop talks to it through a pipe with three messages: train a chunk, release runs, stop. Answers come in the
order of the requests; a worker that evaluates beside training answers a chunk once its boundary is evaluated,
while the next chunk, sent before that answer, already trains. Experiments
travel by import path (`module:function`) or, for functions defined in a notebook, by cloudpickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rf_core.messages import ChunkOutcome, TrainTask
from rf_core.states import FAILED_CHUNK_OUTCOMES

STEP_DELAY_ENV = "RF_TEST_STEP_DELAY_S"  # test-only slow-down so IC Ops reliably arrive mid-chunk
WORKER_START_TIMEOUT_S = 180.0
PARENT_POLL_S = 0.5
EXIT_PARENT_GONE = 70
EXIT_PIPE_BROKEN = 71


@dataclass(frozen=True)
class SpecSource:
    """How a worker obtains the experiment: an importable entrypoint, or a cloudpickled ExperimentSpec."""

    entrypoint: str | None = None
    pickled: bytes | None = None

    def load(self) -> Any:
        if self.entrypoint:
            from rf_core.experiment import load_entrypoint

            return load_entrypoint(self.entrypoint)
        if self.pickled is None:
            raise ValueError("a SpecSource needs an entrypoint or a pickled spec")
        import cloudpickle

        return cloudpickle.loads(self.pickled)

    @classmethod
    def for_spec(cls, spec: Any, entrypoint: str | None) -> SpecSource:
        if entrypoint:
            return cls(entrypoint=entrypoint)
        import cloudpickle

        return cls(pickled=cloudpickle.dumps(spec))


class WorkerDied(RuntimeError):
    """A slot's worker died (or was restarted) before it answered. `generation`: which of the slot's worker
    processes it was, where the slot counts them, so that several callers who saw it die restart it once."""

    def __init__(self, message: str, generation: int | None = None) -> None:
        super().__init__(message)
        self.generation = generation


class SlotService:
    """What a slot worker is, wherever it runs (a child process here, a Ray actor elsewhere): the experiment loaded
    once, a SlotTrainer for the slot's device, and a metric writer to the rf server."""

    def __init__(
        self,
        slot: int,
        source: SpecSource,
        server_url: str,
        spool_dir: str,
        num_threads: int,
        device: str | None,
        evaluates_beside: bool = False,
    ) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
        # Spinning OpenMP threads slow every other slot's worker several-fold on a shared CPU.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        import transformers

        from rf_core.metric_writer import MetricWriter
        from rf_core.training.staging import default_staging_root
        from rf_core.training.trainer import SlotTrainer

        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(num_threads)
        self.slot = slot
        spec = source.load()
        self.trainer = SlotTrainer(
            spec.create_model_fn,
            spec.train_dataset,
            spec.eval_dataset,
            spec.compute_metrics,
            functions=spec.named_configs()[1],
            num_threads=num_threads,
            step_delay_s=float(os.environ.get(STEP_DELAY_ENV, "0") or 0),
            device=device,
            staging_root=default_staging_root(),
            evaluates_beside=evaluates_beside,
        )
        # Base models and tokenized data are ready before the first chunk, not paid for inside it.
        with contextlib.suppress(Exception):  # a config that cannot load fails its own run, with the reason
            self.trainer.prepare(_initial_configs(spec))
        self.writer = MetricWriter(server_url, spool_dir=Path(spool_dir))
        # One thread evaluates a boundary beside the next chunk's training; a run waits for its boundary's answer.
        self._beside = ThreadPoolExecutor(1, thread_name_prefix="rf-eval-beside") if evaluates_beside else None
        self._evaluating: tuple[int, Future[None]] | None = None  # (run, its boundary's evaluation and answer)

    def train(self, payload: dict[str, Any], on_trained: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train one chunk and return its answer, evaluated."""
        answers: list[dict[str, Any]] = []
        self._train(payload, on_trained, answers.append, leave_evaluation=False)
        return answers[0]

    def train_answering(
        self, payload: dict[str, Any], on_trained: Callable[[], None], answer: Callable[[dict[str, Any]], None]
    ) -> None:
        """Train one chunk; `answer` gets its answer, from this thread or, when its boundary is evaluated beside the
        next chunk's training, from the evaluating thread. Answers keep the order of the chunks."""
        self._train(payload, on_trained, answer, leave_evaluation=self._beside is not None)

    def _train(
        self,
        payload: dict[str, Any],
        on_trained: Callable[[], None] | None,
        answer: Callable[[dict[str, Any]], None],
        leave_evaluation: bool,
    ) -> None:
        from rf_core.training.trainer import EvaluationBeside

        started_at = time.time()
        task = TrainTask.from_dict(payload)
        if self._evaluating is not None and self._evaluating[0] == task.run_id:
            self.settle()  # its state is final only once its last boundary is evaluated and saved
        tags = {"experiment": task.experiment, "run_id": task.run_id}
        if task.attempt is not None:
            tags["attempt"] = task.attempt  # a batch replayed after this attempt was abandoned is dropped

        def emit(rows: list[dict[str, Any]]) -> None:
            self.writer.add([{**tags, **row} for row in rows])

        def trained() -> None:
            self.settle()  # the last chunk's answer goes first
            if on_trained is not None:
                on_trained()

        if leave_evaluation:
            outcome = self.trainer.train_leaving_evaluation(task, emit, trained)
        else:
            outcome = self.trainer.train(task, emit, trained)
        if isinstance(outcome, EvaluationBeside):
            assert self._beside is not None
            finish = outcome.finish

            def evaluate_and_answer() -> None:
                try:
                    result = self._answer(finish(), started_at)
                except Exception as error:  # the chunk fails with the reason; the fit must get an answer
                    failed = died_outcome(task, f"its evaluation beside training failed: {error}")
                    result = {**failed.to_dict(), "started_at": started_at, "ended_at": time.time()}
                try:
                    answer(result)
                except BaseException:
                    os._exit(EXIT_PIPE_BROKEN)  # answers are read in order: without this one, none can follow

            self._evaluating = (task.run_id, self._beside.submit(evaluate_and_answer))
            return
        self.settle()
        answer(self._answer(outcome, started_at))

    def _answer(self, outcome: ChunkOutcome, started_at: float) -> dict[str, Any]:
        # The chunk's last metric rows travel with its outcome and are stored by the request that records the chunk
        # as done, before it: one round trip less between two chunks.
        batches = self.writer.hand_over()
        return {**outcome.to_dict(), "started_at": started_at, "ended_at": time.time(), "metric_batches": batches}

    def settle(self) -> None:
        """Wait for the boundary being evaluated beside training, and its answer."""
        evaluating, self._evaluating = self._evaluating, None
        if evaluating is not None:
            evaluating[1].result()

    def release(self, run_ids: Sequence[int]) -> None:
        if self._evaluating is not None and self._evaluating[0] in run_ids:
            self.settle()  # a run's state goes once its last boundary is evaluated and saved
        for run_id in run_ids:
            self.trainer.release(run_id)

    def close(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self.settle()
            if self._beside is not None:
                self._beside.shutdown()
            self.trainer.close()  # every state on disk before the worker goes
        finally:
            self.writer.close()


def _serve(
    conn: Connection,
    slot: int,
    source: SpecSource,
    server_url: str,
    spool_dir: str,
    num_threads: int,
    device: str | None,
    evaluates_beside: bool = False,
) -> None:
    """Worker process main loop."""
    _exit_with_parent()
    try:
        service = SlotService(slot, source, server_url, spool_dir, num_threads, device, evaluates_beside)
    except Exception as exc:  # report start-up failures instead of dying silently
        conn.send(("error", f"slot {slot} worker failed to start: {exc}", traceback.format_exc()))
        return
    conn.send(("ready", None, None))
    send_lock = threading.Lock()  # an answer may leave from the evaluating thread

    def send(message: tuple[str, Any, Any]) -> None:
        with send_lock:
            conn.send(message)

    try:
        while True:
            kind, payload = conn.recv()
            if kind == "train":
                # "trained": the chunk's steps are done and its evaluation begins; the fit may plan the slot.
                service.train_answering(
                    payload, lambda: send(("trained", None, None)), lambda result: send(("result", result, None))
                )
            elif kind == "release":  # not answered: it is done before anything sent after it
                service.release(payload)
            elif kind == "stop":
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        service.close()


def _exit_with_parent(poll_s: float = PARENT_POLL_S) -> None:
    """End this worker at once if the fit process dies (kill -9 included): an orphan would go on training its
    chunk and log metrics for an attempt the resumed fit has already replaced."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="rf-parent-watch", daemon=True).start()


_MAIN_MODULE_LOCK = threading.Lock()


@contextlib.contextmanager
def _users_main_module_hidden() -> Any:
    """While a worker process starts, `__main__` (the user's script or notebook) names no file and no module.

    A spawned child otherwise runs the parent's `__main__` again before its own work: a script without
    `if __name__ == "__main__":` would start a whole fit in every worker, and a guarded one would still run its top
    level (loading data, printing) once per worker. The worker needs nothing from it: the experiment reaches it by
    import path or by value (cloudpickle sends functions defined in `__main__` by value).
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_MODULE_LOCK:
        saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
        main.__spec__ = None
        main.__dict__.pop("__file__", None)
        try:
            yield
        finally:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                del main.__spec__


def _initial_configs(spec: Any) -> list[dict[str, Any]]:
    from rf_core.config import normalize_config

    return [normalize_config(config) for config in spec.named_configs()[0]]


class Slot:
    """The fit loop's handle on one slot's worker, whatever runs it. Subclasses start, stop and talk to it."""

    def __init__(
        self,
        slot: int,
        source: SpecSource,
        server_url: str,
        spool_dir: Path,
        num_threads: int,
        device: str | None = None,
        evaluates_beside: bool = False,
    ) -> None:
        self.slot = slot
        self.device = device
        self._source = source
        self._server_url = server_url
        self._spool_dir = spool_dir
        self._num_threads = num_threads
        self._evaluates_beside = evaluates_beside
        self._lock = threading.Lock()
        self.restarts = 0
        # Told (with the slot) when a chunk's steps are done, before its evaluation; workers that cannot tell
        # (Ray actors) never call it.
        self.on_trained: Callable[[int], None] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float = WORKER_START_TIMEOUT_S) -> None:
        raise NotImplementedError

    def train_once(self, task: TrainTask) -> ChunkOutcome:
        """Train one chunk; raises WorkerDied if the worker dies meanwhile (it stays dead)."""
        raise NotImplementedError

    def restart(self, died: WorkerDied | None = None) -> None:
        """Start the worker again (`died`: what the caller saw; a worker restarted since is left alone)."""
        raise NotImplementedError

    def release(self, run_ids: list[int]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def rendezvous_address(self) -> str:
        """A host:port, free now, where this worker can host a gang's rendezvous as its rank 0."""
        from rf_core.training.gang import free_address

        return free_address()


class SlotWorker(Slot):
    """One slot's worker as a child process of the fit, spoken to through a pipe.

    Several callers may have requests out at once (a chunk sent while the last one is still being evaluated): the
    worker answers in order, and each caller reads its answer in its turn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._process: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._turns = threading.Condition(threading.RLock())  # sending, whose turn it is to read, restarting
        self._next_ticket = 0
        self._serving = 0
        self._generation = 0  # a restarted worker never answers what was sent to the one before

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve,
            args=(
                child_conn,
                self.slot,
                self._source,
                self._server_url,
                str(self._spool_dir),
                self._num_threads,
                self.device,
                self._evaluates_beside,
            ),
            name=f"rf-slot-{self.slot}",
            daemon=True,
        )
        with _users_main_module_hidden():
            self._process.start()
        child_conn.close()
        self._conn = parent_conn

    def wait_ready(self, timeout: float = WORKER_START_TIMEOUT_S) -> None:
        assert self._conn is not None
        if not self._conn.poll(timeout):
            raise WorkerDied(f"slot {self.slot} worker did not start within {timeout:.0f} s")
        kind, message, trace = self._recv()
        if kind != "ready":
            raise WorkerDied(f"{message}\n{trace or ''}")

    def _recv(self) -> tuple[str, Any, Any]:
        conn, process = self._conn, self._process
        if conn is None or process is None:
            raise WorkerDied(f"slot {self.slot} worker is not running")
        try:  # the pipe may also be closed under this caller by another's restart of the worker
            while not conn.poll(1.0):
                if not process.is_alive():
                    raise WorkerDied(f"slot {self.slot} worker exited with code {process.exitcode}")
            return conn.recv()
        except (EOFError, OSError, ValueError) as exc:
            raise WorkerDied(f"slot {self.slot} worker closed its pipe: {exc}") from exc

    @contextlib.contextmanager
    def _request(self, message: tuple[str, Any]) -> Any:
        """Send `message` now; the body runs in this request's turn to read the worker's answers."""
        with self._turns:
            ticket, generation = self._next_ticket, self._generation
            self._next_ticket += 1
            failure: Exception | None = None
            try:
                if self._conn is None:
                    raise WorkerDied(f"slot {self.slot} worker is not running")
                self._conn.send(message)
            except (WorkerDied, BrokenPipeError, OSError) as exc:
                failure = exc
            while self._serving != ticket:
                self._turns.wait()
        try:
            if failure is not None:
                raise WorkerDied(f"slot {self.slot} worker is gone: {failure}", generation) from failure
            if generation != self._generation:
                raise WorkerDied(f"slot {self.slot} worker was restarted before it answered", generation)
            try:
                yield
            except WorkerDied as died:
                died.generation = generation
                raise
        finally:
            with self._turns:
                self._serving += 1
                self._turns.notify_all()

    def _in_turn(self) -> Any:
        """Requests may be sent before the last one is answered only to a worker that evaluates beside training:
        elsewhere a chunk lined up behind another would share that one's fate if the worker died under it."""
        return contextlib.nullcontext() if self._evaluates_beside else self._lock

    def train_once(self, task: TrainTask) -> ChunkOutcome:
        with self._in_turn(), self._request(("train", task.to_dict())):
            kind, payload, _ = self._recv()
            while kind == "trained":
                if self.on_trained is not None:
                    self.on_trained(self.slot)
                kind, payload, _ = self._recv()
            return ChunkOutcome(**payload)

    def restart(self, died: WorkerDied | None = None) -> None:
        with self._turns:
            if died is not None and died.generation is not None and died.generation != self._generation:
                return  # another caller that saw the same worker die has restarted it
            self._restart()

    def _restart(self) -> None:
        self.restarts += 1
        self._generation += 1
        self._kill()
        self.start()
        self.wait_ready()

    def release(self, run_ids: list[int]) -> None:
        """Sent, not answered: the worker forgets the runs before it takes up anything sent after."""
        if not run_ids:
            return
        with self._turns:
            try:
                if self._conn is not None:
                    self._conn.send(("release", list(run_ids)))
            except (BrokenPipeError, OSError):
                pass  # a dead worker holds no state to release

    def close(self, timeout: float = 10.0) -> None:
        with self._turns:
            if self._process is None:
                return
            try:
                assert self._conn is not None
                self._conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout)
            self._kill()

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None


def train_attempt(workers: Sequence[Slot], task: TrainTask) -> ChunkOutcome:
    """One attempt at a chunk: on its slot's worker, or on its gang's workers at once (each as one rank of
    `task.gang`; rank 0's outcome is returned, or the first failed member's).

    If a worker dies meanwhile (a gang's other members then fail in their collectives), the dead workers are
    restarted and WorkerDied is raised: the caller records a new attempt and trains the chunk again from its
    start, so the dead attempt's metrics are dropped, not stored twice.
    """
    if task.gang is None:
        try:
            return workers[0].train_once(task)
        except WorkerDied as died:
            workers[0].restart(died)
            raise
    assert len(workers) == task.gang.world_size
    # Rank 0's worker hosts the rendezvous, on its own machine when workers are spread over several.
    gang = dataclasses.replace(task.gang, address=workers[0].rendezvous_address())
    with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="rf-gang") as pool:
        futures = [
            pool.submit(worker.train_once, dataclasses.replace(task, gang=dataclasses.replace(gang, rank=rank)))
            for rank, worker in enumerate(workers)
        ]
        results: list[ChunkOutcome | WorkerDied] = []
        for future in futures:
            try:
                results.append(future.result())
            except WorkerDied as exc:
                results.append(exc)
    deaths = [(worker, died) for worker, died in zip(workers, results, strict=True) if isinstance(died, WorkerDied)]
    for worker, died in deaths:
        worker.restart(died)
    if deaths:
        raise WorkerDied(f"a gang member died: {deaths[0][1]}")
    outcomes = [result for result in results if isinstance(result, ChunkOutcome)]
    failed = [outcome for outcome in outcomes if outcome.status in FAILED_CHUNK_OUTCOMES]
    return failed[0] if failed else outcomes[0]


def train_with_retry(
    workers: Sequence[Slot],
    task: TrainTask,
    start_attempt: Callable[[], int | None] = lambda: None,
    on_retry: Callable[[WorkerDied], None] = lambda _died: None,
) -> ChunkOutcome:
    """Train one chunk on its workers; if a worker dies, it is restarted and the chunk trained again from its saved
    state, once, as a new attempt. A chunk whose worker dies twice fails its run, with the reason.

    `start_attempt()` is called before each attempt and returns its id (the fit records a timeline entry, which
    closes the dead attempt's entry and drops the metrics it sent, so each step is stored once); `on_retry` is told
    why the first attempt died.
    """
    for attempt in (1, 2):
        attempt_id = start_attempt()
        try:
            return train_attempt(workers, task if attempt_id is None else dataclasses.replace(task, attempt=attempt_id))
        except WorkerDied as exc:
            if attempt == 2:
                return died_outcome(task, f"the worker died twice training this chunk: {exc}")
            on_retry(exc)
    raise AssertionError("unreachable")


def died_outcome(task: TrainTask, error: str) -> ChunkOutcome:
    """The outcome of a chunk whose worker kept dying: the run fails with the reason."""
    return ChunkOutcome(
        run_id=task.run_id,
        chunk_index=task.chunk.index,
        status="failed",
        step=task.chunk.start_step,
        epoch=task.chunk.epoch,
        samples=0,
        error=error,
    )


def slot_devices(cpu_slots: int | None, default_cpu_slots: int = 2) -> list[str | None]:
    """One slot per visible GPU, unless CPU slots are asked for (or there is no GPU); None means the CPU."""
    if cpu_slots is not None:
        if cpu_slots < 1:
            raise ValueError(f"cpu_slots must be >= 1, got {cpu_slots=}")
        return [None] * cpu_slots
    if not _gpu_driver_present():
        return [None] * default_cpu_slots  # no need to import torch (seconds) in the fit's process to know it
    import torch

    gpus = torch.cuda.device_count()
    return [f"cuda:{index}" for index in range(gpus)] if gpus else [None] * default_cpu_slots


def evaluates_beside_by_default(devices: Sequence[str | None], threads_per_slot: int, cpu_count: int) -> bool:
    """Evaluating a boundary beside the next chunk's training pays only where it takes nothing from training: CPU
    slots whose training threads leave as many cores again free. (GPU slots evaluate between chunks for now: the
    evaluation's kernels would queue on the training's stream.)"""
    if any(device is not None for device in devices):
        return False
    # The evaluating thread computes with as many threads as training does (the same sums, bit for bit).
    return cpu_count >= 2 * len(devices) * threads_per_slot


def _gpu_driver_present() -> bool:
    """An NVIDIA or AMD GPU driver is loaded (Linux device files), so torch may see a GPU; elsewhere, ask torch."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(device).exists() for device in ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/kfd"))


class SlotPool:
    """All slot workers of one fit, started in parallel (each pays its imports once)."""

    def __init__(
        self,
        devices: list[str | None],
        source: SpecSource,
        server_url: str,
        spool_root: Path,
        threads_per_slot: int,
        worker_class: type[Slot] | None = None,
        evaluates_beside: bool = False,
    ):
        """`worker_class`: what runs each slot: SlotWorker (a child process, the default) or RaySlotWorker.
        `evaluates_beside`: each worker evaluates a boundary in a thread of its own while its next chunk trains,
        where nothing waits for the result (see `SlotTrainer.evaluates_beside`)."""
        if not devices:
            raise ValueError("need at least one slot")
        make = worker_class or SlotWorker
        self.workers: list[Slot] = [
            make(slot, source, server_url, spool_root / f"slot-{slot}", threads_per_slot, device, evaluates_beside)  # type: ignore[call-arg]
            for slot, device in enumerate(devices)
        ]

    def __enter__(self) -> SlotPool:
        for worker in self.workers:
            worker.start()
        try:
            for worker in self.workers:
                worker.wait_ready()
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def __getitem__(self, slot: int) -> Slot:
        return self.workers[slot]
