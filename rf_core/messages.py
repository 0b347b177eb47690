"""Messages between the fit loop and the code that trains: what to train, and what came of it.

Both are plain, JSON-able dataclasses so they can cross a process boundary (slot worker pipes) unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rf_core.states import DEFAULT_METRIC, ChunkStatus, WarmStartMode


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk of one run: a contiguous range of whole optimizer steps inside one epoch."""

    index: int  # 0-based over the whole run (epoch-major)
    epoch: int  # 0-based
    chunk_in_epoch: int  # 0-based, < num_chunks
    num_chunks: int  # chunks per epoch
    start_step: int  # global optimizer step at which the chunk starts (0-based)
    end_step: int  # exclusive; a run with max_steps ends inside its last chunk
    start_sample: int  # offset into this epoch's shuffled order
    end_sample: int  # exclusive

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step


@dataclass(frozen=True)
class WarmStart:
    """Initial state of a clone: the parent's checkpoint taken at the boundary where the clone op was applied."""

    parent_run_id: int
    parent_checkpoint: str  # path of the parent's checkpoint file at parent_step
    parent_step: int
    mode: WarmStartMode  # "weights": fresh optimizer and schedule; "weights+optimizer": optimizer state too


@dataclass(frozen=True)
class Gang:
    """This process's place in a multi-process run's chunk: every member trains the same task together."""

    rank: int
    world_size: int
    address: str  # host:port of the rendezvous store rank 0 opens for this chunk
    slots: tuple[int, ...]  # the device slots of the gang, rank order
    strategy: str  # "ddp" or "deepspeed"

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or len(self.slots) != self.world_size:
            raise ValueError(f"inconsistent gang: rank {self.rank}, world size {self.world_size}, slots {self.slots}")


@dataclass(frozen=True)
class TrainTask:
    experiment: str
    run_id: int
    config: dict[str, Any]  # normalised config (defaults filled in)
    chunk: ChunkSpec
    run_dir: str  # the run's checkpoint/artifact folder; the trainer reads and writes its state here
    seed: int  # experiment seed; the run's own `seed` knob, when set, wins
    warm_start: WarmStart | None = None  # only for a clone's first chunk
    metric: str = DEFAULT_METRIC  # the experiment's metric: which chunk is the run's best
    mode: str = "min"
    keep_checkpoints: int | None = None  # newest step checkpoints kept per run; None keeps all
    pinned_steps: tuple[int, ...] = ()  # checkpoints a pending warm-started clone still needs
    gang: Gang | None = None  # set when the run trains on several processes (or through DeepSpeed)
    attempt: int | None = None  # the timeline entry of this try at the chunk; its metric rows carry it
    # Nothing waits for this boundary's evaluation before the next plan (no policy reads it): a worker that can
    # evaluate beside training answers once it has, while its next chunk already trains.
    evaluation_may_wait: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainTask:
        warm = data.get("warm_start")
        gang = data.get("gang")
        return cls(
            experiment=data["experiment"],
            run_id=data["run_id"],
            config=data["config"],
            chunk=ChunkSpec(**data["chunk"]),
            run_dir=data["run_dir"],
            seed=data["seed"],
            warm_start=WarmStart(**warm) if warm else None,
            metric=data.get("metric", DEFAULT_METRIC),
            mode=data.get("mode", "min"),
            keep_checkpoints=data.get("keep_checkpoints"),
            pinned_steps=tuple(data.get("pinned_steps") or ()),
            gang=Gang(**{**gang, "slots": tuple(gang["slots"])}) if gang else None,
            attempt=data.get("attempt"),
            evaluation_may_wait=bool(data.get("evaluation_may_wait", False)),
        )


@dataclass
class ChunkOutcome:
    run_id: int
    chunk_index: int
    status: ChunkStatus  # "completed": the run has nothing left to train (max_steps or last chunk reached)
    step: int  # global optimizer steps done after this chunk
    epoch: int
    samples: int  # samples consumed in total by the run
    checkpoint: str | None = None  # checkpoint written at this boundary
    eval_metrics: dict[str, float] = field(default_factory=dict)
    last_train_loss: float | None = None
    error: str | None = None  # one-line reason when failed
    traceback: str | None = None
    train_seconds: float = 0.0  # wall time spent inside the training loop for this chunk
    state_seconds: float = 0.0  # getting the run's state in (swap in) and saving it at the boundary (swap out)
    eval_seconds: float = 0.0  # the evaluation at the boundary
    exports: dict[str, str] = field(default_factory=dict)  # "latest" / "best" -> loadable export folder
    best_step: int | None = None  # the run's best chunk so far by the experiment's metric
    best_value: float | None = None
    device: str | None = None  # where the chunk trained ("cpu", "cuda:0")
    device_peak_mib: float | None = None  # a GPU worker's peak allocated memory so far; None on CPU
    truncated_rows: int | None = None  # training rows cut to the run's max_length
    # When the worker began and finished the chunk (its clock): the chunk's timeline entry spans them, not the
    # moments it was planned (perhaps while the slot's previous chunk evaluated) and recorded.
    started_at: float | None = None
    ended_at: float | None = None
    # The chunk's last metric batches ({"batch_id", "rows"}), stored with the chunk's record, before it.
    metric_batches: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
