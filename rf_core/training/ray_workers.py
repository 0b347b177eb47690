"""Slot workers on a Ray cluster: the same `SlotService` a local worker runs, inside a Ray actor.

The fit process stays where it is: it plans, applies IC Ops and talks to the rf server. Each slot becomes an actor
that Ray places on a node with the slot's resources (CPU threads, or a GPU), so one fit can use the devices of
several machines. Actors send their metrics to the rf server over HTTP (with `RF_API_TOKEN`), and read and write
run state under `RF_HOME`, which every node must see at the same path (a shared filesystem). Ray is an optional
extra (`pip install '.[ray]'`); nothing here imports it until a fit asks for Ray workers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from rf_core.messages import ChunkOutcome, TrainTask
from rf_core.training.worker import WORKER_START_TIMEOUT_S, Slot, SlotService, SpecSource, WorkerDied

# What the workers need to see of the fit's environment: the engine's settings, offline switches, import path.
FORWARDED_PREFIXES = ("RF_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("Ray workers need Ray: pip install '.[ray]' (make install does)") from exc
    return ray


def connect(address: str) -> dict[str, float]:
    """Join the Ray cluster at `address` ("auto", "host:port", or "local" to start one here); its resources."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": forwarded_environment()}, log_to_driver=True)
    return {name: float(value) for name, value in ray.cluster_resources().items()}


def disconnect() -> None:
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


def forwarded_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables actors inherit: RF_*/HF_* settings and an import path that finds the fit's entrypoint."""
    environ = os.environ if environ is None else environ
    variables = {name: value for name, value in environ.items() if name.startswith(FORWARDED_PREFIXES)}
    paths = [path for path in environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    variables["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*paths, os.getcwd()]))
    return variables


class _SlotActor:
    """The actor's body; made a Ray actor class in `RaySlotWorker.start`."""

    def __init__(
        self, slot: int, source: SpecSource, server_url: str, spool_dir: str, num_threads: int, device: str | None
    ) -> None:
        self.service = SlotService(slot, source, server_url, spool_dir, num_threads, device)

    def ready(self) -> str:
        import socket

        return socket.gethostname()

    def train(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.service.train(payload)

    def release(self, run_ids: list[int]) -> None:
        self.service.release(run_ids)

    def close(self) -> None:
        self.service.close()

    def rendezvous_address(self) -> str:
        import ray

        from rf_core.training.gang import free_address

        return free_address(ray.util.get_node_ip_address())


class RaySlotWorker(Slot):
    """One slot as a Ray actor holding `num_threads` CPUs (and one GPU when `device` is a CUDA device)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node: str | None = None  # the host its actor runs on, once ready
        self._actor: Any = None

    def start(self) -> None:
        ray = _ray()
        gpus = 1 if self.device is not None and self.device.startswith("cuda") else 0
        actor_class = ray.remote(_SlotActor)
        self._actor = actor_class.options(num_cpus=self._num_threads, num_gpus=gpus).remote(
            self.slot,
            self._source,
            self._server_url,
            str(self._spool_dir),
            self._num_threads,
            # Ray shows an actor only the GPU it was given, as device 0.
            "cuda:0" if gpus else self.device,
        )

    def wait_ready(self, timeout: float = WORKER_START_TIMEOUT_S) -> None:
        ray = _ray()
        try:
            self.node = ray.get(self._actor.ready.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise WorkerDied(
                f"slot {self.slot} Ray worker did not start within {timeout:.0f} s (are the cluster's CPUs/GPUs "
                f"enough for every slot? each needs {self._num_threads} CPUs)"
            ) from exc
        except ray.exceptions.RayError as exc:
            raise WorkerDied(f"slot {self.slot} Ray worker failed to start: {exc}") from exc

    def train_once(self, task: TrainTask) -> ChunkOutcome:
        ray = _ray()
        with self._lock:
            if self._actor is None:
                raise WorkerDied(f"slot {self.slot} Ray worker is not running")
            try:
                return ChunkOutcome(**ray.get(self._actor.train.remote(task.to_dict())))
            except ray.exceptions.RayError as exc:
                raise WorkerDied(f"slot {self.slot} Ray worker is gone: {exc}") from exc

    def restart(self, died: WorkerDied | None = None) -> None:
        with self._lock:
            self.restarts += 1
            self._kill()
            self.start()
            self.wait_ready()

    def release(self, run_ids: list[int]) -> None:
        if not run_ids or self._actor is None:
            return
        ray = _ray()
        with self._lock:
            try:
                ray.get(self._actor.release.remote(list(run_ids)))
            except ray.exceptions.RayError:
                pass  # a dead worker holds no state to release

    def rendezvous_address(self) -> str:
        ray = _ray()
        try:
            return ray.get(self._actor.rendezvous_address.remote())
        except ray.exceptions.RayError as exc:
            raise WorkerDied(f"slot {self.slot} Ray worker is gone: {exc}") from exc

    def close(self, timeout: float = 30.0) -> None:
        if self._actor is None:
            return
        ray = _ray()
        with self._lock:
            try:
                ray.get(self._actor.close.remote(), timeout=timeout)
            except ray.exceptions.RayError:
                pass
            self._kill()

    def _kill(self) -> None:
        if self._actor is not None:
            _ray().kill(self._actor)
        self._actor = None


def ray_slots(address: str, slots: int | None, gpus_per_slot: int) -> tuple[list[str | None], int, type[Slot]]:
    """Join the Ray cluster and size its slots: one per GPU (or `slots`), CPU threads shared out evenly."""
    if gpus_per_slot not in (0, 1):
        raise ValueError(f"ray_gpus_per_slot must be 0 or 1, got {gpus_per_slot}")
    resources = connect(address)
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    count = slots or (gpus if gpus_per_slot and gpus else 2)
    if count < 1:
        raise ValueError(f"ray_slots must be >= 1, got {count}")
    devices: list[str | None] = ["cuda" if gpus_per_slot else None] * count
    return devices, max(1, cpus // count), RaySlotWorker
