"""Run states and what moves them: IC Ops (from users or policies) and system events (chunk bookkeeping).

Every status change in the engine is looked up here. `OP_TABLE` is the state × op table, `EVENT_TABLE` the
state × system-event table, and `TRANSITIONS` (derived from both) lists every legal move.

The rest of the engine's shared words are defined here once too (warm-start modes, chunk outcomes, policy
decision modes and statuses, experiment statuses, the default metric); every other module, the CLI's `choices=`
included, reads them from here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args


class RunStatus(StrEnum):
    NEW = "New"  # never trained
    ONGOING = "Ongoing"  # has trained, or is training, and will train more
    STOPPED = "Stopped"  # paused by an op; Resume sends it back to Ongoing
    COMPLETED = "Completed"
    FAILED = "Failed"
    DELETED = "Deleted"

    def is_terminal(self) -> bool:
        """Nothing can ever train this run again (it can still be cloned unless Deleted)."""
        return self in _TERMINAL

    def is_trainable(self) -> bool:
        """The scheduler may give this run its next chunk."""
        return self in _TRAINABLE


_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.DELETED})
_TRAINABLE = frozenset({RunStatus.NEW, RunStatus.ONGOING})


class OpKind(StrEnum):
    STOP = "stop"
    RESUME = "resume"
    CLONE = "clone"
    DELETE = "delete"


class SystemEvent(StrEnum):
    START = "start"  # a chunk of the run was dispatched
    COMPLETE = "complete"  # the run has nothing left to train
    FAIL = "fail"  # a chunk failed
    INTERRUPT = "interrupt"  # a chunk could not be saved for a cause outside the run (a full disk): pause it


# The IC Op table: state -> op -> the run's state after the op. A missing cell means the op is rejected.
# Clone leaves the parent as it is. Warm clones also need the parent's trained state (a checkpoint): a New
# run has none yet, and a Failed run warm-starts from its last good checkpoint; rf_core.control.ops checks that.
OP_TABLE: dict[RunStatus, dict[OpKind, RunStatus]] = {
    RunStatus.NEW: {
        OpKind.STOP: RunStatus.STOPPED,
        OpKind.CLONE: RunStatus.NEW,
        OpKind.DELETE: RunStatus.DELETED,
    },
    RunStatus.ONGOING: {
        OpKind.STOP: RunStatus.STOPPED,
        OpKind.CLONE: RunStatus.ONGOING,
        OpKind.DELETE: RunStatus.DELETED,
    },
    RunStatus.STOPPED: {
        OpKind.RESUME: RunStatus.ONGOING,
        OpKind.CLONE: RunStatus.STOPPED,
        OpKind.DELETE: RunStatus.DELETED,
    },
    RunStatus.COMPLETED: {OpKind.CLONE: RunStatus.COMPLETED, OpKind.DELETE: RunStatus.DELETED},
    RunStatus.FAILED: {OpKind.CLONE: RunStatus.FAILED, OpKind.DELETE: RunStatus.DELETED},
    RunStatus.DELETED: {},
}

# The system-event table, in the same shape.
EVENT_TABLE: dict[SystemEvent, dict[RunStatus, RunStatus]] = {
    SystemEvent.START: {RunStatus.NEW: RunStatus.ONGOING, RunStatus.ONGOING: RunStatus.ONGOING},
    SystemEvent.COMPLETE: {RunStatus.ONGOING: RunStatus.COMPLETED},
    SystemEvent.FAIL: {RunStatus.NEW: RunStatus.FAILED, RunStatus.ONGOING: RunStatus.FAILED},
    SystemEvent.INTERRUPT: {RunStatus.NEW: RunStatus.STOPPED, RunStatus.ONGOING: RunStatus.STOPPED},
}


def _legal_moves() -> dict[RunStatus, frozenset[RunStatus]]:
    moves: dict[RunStatus, set[RunStatus]] = {state: set() for state in RunStatus}
    for state, cells in OP_TABLE.items():
        moves[state].update(cells.values())
    for cells in EVENT_TABLE.values():
        for state, target in cells.items():
            moves[state].add(target)
    return {state: frozenset(targets - {state}) for state, targets in moves.items()}


# Every legal status change (staying put is not a move), derived from the two tables above.
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = _legal_moves()


def allowed_ops(state: RunStatus | str) -> list[OpKind]:
    return list(OP_TABLE[RunStatus(state)])


def op_result(state: RunStatus | str, kind: OpKind | str) -> RunStatus | None:
    """The run's state after `kind` is applied to a run in `state`; None when the table rejects the op."""
    return OP_TABLE[RunStatus(state)].get(OpKind(kind))


def op_rejection(state: RunStatus | str, kind: OpKind | str, run_id: int) -> str | None:
    """Why the table rejects `kind` on a run in `state`, naming what is allowed instead; None when allowed."""
    state, kind = RunStatus(state), OpKind(kind)
    if kind in OP_TABLE[state]:
        return None
    allowed = ", ".join(op.value for op in OP_TABLE[state]) or "nothing"
    return f"cannot {kind.value} run {run_id}: it is {state.value} (a {state.value} run allows: {allowed})"


def event_result(state: RunStatus | str, event: SystemEvent | str) -> RunStatus | None:
    """The run's state after a system event; None when the event is not legal in `state`."""
    return EVENT_TABLE[SystemEvent(event)].get(RunStatus(state))


# -- the shared vocabulary ----------------------------------------------------------------------------------

# How a clone starts: from scratch, from the parent's weights, or from its weights and optimizer state.
WarmStartMode = Literal["off", "weights", "weights+optimizer"]
WARM_START_MODES: tuple[str, ...] = get_args(WarmStartMode)

# How a chunk ended. "completed": the run has nothing left to train; "interrupted": the chunk could not be saved
# for a reason outside the run (a full disk), and the run stays resumable.
ChunkStatus = Literal["ok", "completed", "failed", "interrupted"]
CHUNK_OUTCOMES: tuple[str, ...] = get_args(ChunkStatus)
FAILED_CHUNK_OUTCOMES = frozenset({"failed", "interrupted"})  # the chunk's progress does not count
ABANDONED = "abandoned"  # the timeline outcome of an attempt whose worker or flow died before it answered
# The system event a chunk's outcome sends to its run ("ok" sends none).
OUTCOME_EVENTS: dict[str, SystemEvent] = {
    "completed": SystemEvent.COMPLETE,
    "failed": SystemEvent.FAIL,
    "interrupted": SystemEvent.INTERRUPT,
}

# A policy's decision: "act" queues its op at once, "propose" waits for a person to approve or dismiss it.
DecisionMode = Literal["act", "propose"]
DECISION_MODES: tuple[str, ...] = get_args(DecisionMode)
DECISION_STATUSES = ("submitted", "rejected", "proposed", "approved", "dismissed", "noted")


class Verdict(StrEnum):
    """A policy decision that queues no op. A rung template's promotion is recorded ("noted") so that it is final:
    the policy reads it back from its snapshot and never judges that run at that rung again."""

    PROMOTE = "promote"


PROMOTE = Verdict.PROMOTE.value
DECISION_KINDS: tuple[str, ...] = (*(kind.value for kind in OpKind), PROMOTE)


def decision_family(kind: str) -> str:
    """What a policy decides at most once per (run, boundary): its verdict (stop or promote), or a clone, a
    resume, a delete. So a policy may stop a run and replace it with a clone of it at the same boundary."""
    return "verdict" if kind in (OpKind.STOP.value, PROMOTE) else str(kind)


EXPERIMENT_STATUSES = ("running", "finished")  # a fit sets "running" when it starts and "finished" when it ends
# What readers see: a running experiment whose fit stopped renewing its lease is "crashed" (control/leases.py).
FIT_STATES = ("running", "crashed", "finished")
RESERVED_PREFIX = "reserved: "  # the fit owner of an experiment held for a fit about to start (control/leases.py)
FIT_EPOCH_HEADER = "X-RF-Fit-Epoch"  # a fit's calls carry it: one that was taken over is refused before it writes

# The metrics every run logs: the minibatch loss and the learning rate at each step, the eval loss at each boundary.
TRAIN_LOSS_METRIC = "train_loss"
LEARNING_RATE_METRIC = "learning_rate"
LOGGED_LOSS_METRIC = "loss"  # HF's logged training loss: the mean over logging_steps steps, when that knob is set
EVAL_LOSS_METRIC = "eval_loss"
DEFAULT_METRIC = EVAL_LOSS_METRIC  # what ranks runs unless the experiment names another metric
METRIC_MODES = ("min", "max")  # whether a lower or a higher value of the metric is better
# Metrics for which a higher value is better, as TRL and the built-in metrics log them; any other is a loss.
HIGHER_IS_BETTER = frozenset(
    {
        "eval_rewards/chosen", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen",
        "rougeL", "bleu", "exact_match", "eval_rougeL", "eval_bleu", "eval_exact_match", "eval_reward",
    }
)  # fmt: skip


def metric_mode(metric: str) -> str:
    """Whether a lower ("min") or a higher ("max") value of `metric` is better, when the experiment does not say."""
    return "max" if metric in HIGHER_IS_BETTER else "min"
