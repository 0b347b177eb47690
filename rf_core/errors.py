"""The errors the rf server raises and the client raises again on its side: one class per kind of refusal.

The server maps each to an HTTP status and an `error` name in its JSON reply; `RFClient` turns the reply back into
the same class, so code that calls the engine in-process and code that calls it over HTTP catch the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence


class InvalidRequest(ValueError):
    """The caller's input is wrong; `problems` names every fault found."""

    def __init__(self, problems: Sequence[str], message: str | None = None) -> None:
        self.problems = list(problems)
        super().__init__(message or "; ".join(self.problems))


class OpRejected(InvalidRequest):
    """An IC Op failed validation; nothing was written."""


class ExperimentExists(InvalidRequest):
    pass


class IllegalTransition(InvalidRequest):
    """A system event that the state table does not allow (a fit-loop bookkeeping bug, not user input)."""


class FitLive(InvalidRequest):
    """Another fit holds the experiment and renews its lease: it is alive, so it is not taken over."""


class FitSuperseded(InvalidRequest):
    """The calling fit no longer holds the experiment (another fit took it over): it must stop without writing."""


class NotFound(LookupError):
    """No such experiment, run or timeline entry."""

    def __init__(self, message: str) -> None:
        self.problems = [message]
        super().__init__(message)
