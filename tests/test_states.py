"""Every cell of the run-state × IC Op table and of the system-event table."""

from __future__ import annotations

import pytest

from rf_core.states import (
    EVENT_TABLE,
    OP_TABLE,
    TRANSITIONS,
    OpKind,
    RunStatus,
    SystemEvent,
    event_result,
    op_rejection,
    op_result,
)

# One letter per state keeps the tables below readable as tables (G: onGoing).
N, G, S, C, F, D = (
    RunStatus.NEW,
    RunStatus.ONGOING,
    RunStatus.STOPPED,
    RunStatus.COMPLETED,
    RunStatus.FAILED,
    RunStatus.DELETED,
)
REJECTED = None

# (state, op, state after the op or REJECTED), straight from the spec's table; clone leaves the parent as is.
OP_CELLS = [
    (N, OpKind.STOP, S), (N, OpKind.RESUME, REJECTED), (N, OpKind.CLONE, N), (N, OpKind.DELETE, D),
    (G, OpKind.STOP, S), (G, OpKind.RESUME, REJECTED), (G, OpKind.CLONE, G), (G, OpKind.DELETE, D),
    (S, OpKind.STOP, REJECTED), (S, OpKind.RESUME, G), (S, OpKind.CLONE, S), (S, OpKind.DELETE, D),
    (C, OpKind.STOP, REJECTED), (C, OpKind.RESUME, REJECTED), (C, OpKind.CLONE, C), (C, OpKind.DELETE, D),
    (F, OpKind.STOP, REJECTED), (F, OpKind.RESUME, REJECTED), (F, OpKind.CLONE, F), (F, OpKind.DELETE, D),
    (D, OpKind.STOP, REJECTED), (D, OpKind.RESUME, REJECTED), (D, OpKind.CLONE, REJECTED),
    (D, OpKind.DELETE, REJECTED),
]  # fmt: skip

EVENT_CELLS = [
    (N, SystemEvent.START, G), (G, SystemEvent.START, G), (S, SystemEvent.START, None),
    (C, SystemEvent.START, None), (F, SystemEvent.START, None), (D, SystemEvent.START, None),
    (N, SystemEvent.COMPLETE, None), (G, SystemEvent.COMPLETE, C), (S, SystemEvent.COMPLETE, None),
    (C, SystemEvent.COMPLETE, None), (F, SystemEvent.COMPLETE, None), (D, SystemEvent.COMPLETE, None),
    (N, SystemEvent.FAIL, F), (G, SystemEvent.FAIL, F), (S, SystemEvent.FAIL, None),
    (C, SystemEvent.FAIL, None), (F, SystemEvent.FAIL, None), (D, SystemEvent.FAIL, None),
]  # fmt: skip


def test_the_op_table_covers_every_state() -> None:
    assert set(OP_TABLE) == set(RunStatus)
    assert len(OP_CELLS) == len(RunStatus) * len(OpKind)


@pytest.mark.parametrize(("state", "kind", "expected"), OP_CELLS)
def test_op_cell(state: RunStatus, kind: OpKind, expected: RunStatus | None) -> None:
    assert op_result(state, kind) == expected
    assert op_result(state.value, kind.value) == expected  # the stored strings work too
    reason = op_rejection(state, kind, run_id=3)
    if expected is REJECTED:
        assert reason is not None and f"run 3: it is {state.value}" in reason
    else:
        assert reason is None


@pytest.mark.parametrize(("state", "event", "expected"), EVENT_CELLS)
def test_event_cell(state: RunStatus, event: SystemEvent, expected: RunStatus | None) -> None:
    assert event_result(state, event) == expected


def test_transitions_are_exactly_the_moves_of_both_tables() -> None:
    moves = {(s, t) for s, _, t in OP_CELLS if t is not None and t != s}
    moves |= {(s, t) for s, _, t in EVENT_CELLS if t is not None and t != s}
    assert {(s, t) for s, targets in TRANSITIONS.items() for t in targets} == moves
    assert TRANSITIONS[D] == frozenset()
    assert set(EVENT_TABLE) == set(SystemEvent)


@pytest.mark.parametrize(
    ("state", "terminal", "trainable"),
    [
        (N, False, True),
        (G, False, True),
        (S, False, False),
        (C, True, False),
        (F, True, False),
        (D, True, False),
    ],
)
def test_state_helpers(state: RunStatus, terminal: bool, trainable: bool) -> None:
    assert state.is_terminal() is terminal
    assert state.is_trainable() is trainable


def test_rejection_names_what_the_state_allows() -> None:
    stopped = "cannot stop run 3: it is Stopped (a Stopped run allows: resume, clone, delete)"
    assert op_rejection(S, OpKind.STOP, 3) == stopped
    deleted = "cannot clone run 4: it is Deleted (a Deleted run allows: nothing)"
    assert op_rejection(D, OpKind.CLONE, 4) == deleted


def test_the_mode_follows_the_metric_when_an_experiment_does_not_say() -> None:
    from rf_core.demo import dpo_demo_experiment
    from rf_core.states import metric_mode

    assert [metric_mode(name) for name in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/rejected")] == [
        "min", "max", "min"
    ]  # fmt: skip
    assert metric_mode("rougeL") == metric_mode("eval_logps/chosen") == "max"
    assert dpo_demo_experiment().mode == "max"
