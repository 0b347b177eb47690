"""Functions a config may name: its `formatting_func`, its `compute_metrics` and a GRPO run's `reward_funcs`.

In Python a config group may hold the functions themselves (`"formatting_func": List([qa_format, chat_format])`);
everywhere a config is JSON (the store, the CLI, the dashboard's Clone-Modify, policies) it holds their names. An
experiment registers its functions by name (`run_fit(..., functions={"qa": qa_format})`, or a function's own
`__name__` when it appears in the config group unregistered), the rf server keeps the list of names, and a config
or clone that names a function the experiment does not have is refused, listing the ones it has.

Built-in metrics are names too (`"compute_metrics": "rougeL"`): they score generated text against the references,
so they need `predict_with_generate`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from rf_core.knobs import ConfigError, expand_config_group

FUNCTION_KNOBS = ("formatting_func", "compute_metrics")
LIST_FUNCTION_KNOBS = ("reward_funcs",)  # knobs holding a list of functions
BUILTIN_METRICS = ("rougeL", "bleu", "exact_match")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,99}$")


def check_registry(functions: Mapping[str, Callable[..., Any]] | Sequence[Callable[..., Any]] | None) -> dict[str, Any]:
    """`functions` as {name: function}: a dict as given, a list by each function's `__name__`; raises ConfigError."""
    if functions is None:
        return {}
    if isinstance(functions, Mapping):
        pairs = list(functions.items())
    elif isinstance(functions, Sequence) and not isinstance(functions, str | bytes):
        pairs = [(_own_name(function, "functions"), function) for function in functions]
    else:
        raise ConfigError(f"functions must be a dict of name -> function or a list of functions, got {functions!r}")
    registry: dict[str, Any] = {}
    problems = []
    for name, function in pairs:
        problem = name_problem(name) or (None if callable(function) else f"functions[{name!r}] is not callable")
        if problem is None and name in registry and registry[name] is not function:
            problem = f"two different functions are registered as {name!r}"
        if problem:
            problems.append(problem)
        else:
            registry[name] = function
    if problems:
        raise ConfigError(problems)
    return registry


def name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not _NAME.match(name):
        return (
            f"function name {name!r}: must be a string of letters, digits, '_', '.' or '-' (not starting with a "
            "digit), at most 100 characters"
        )
    if name in BUILTIN_METRICS:
        return f"function name {name!r}: is a built-in metric's name; register your function under another"
    return None


def named_configs(
    config_group: Any, functions: Mapping[str, Callable[..., Any]] | Sequence[Callable[..., Any]] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Callable[..., Any]]]:
    """The config group's plain configs with every function replaced by its name, and the registry of names.

    Deterministic in its inputs, so the fit and each slot worker, given the same spec, agree on every name.
    """
    registry = check_registry(functions)
    name_of = {id(function): name for name, function in registry.items()}
    configs = []
    problems = []

    def named(function: Any, knob: str) -> Any:
        """The function's registered name (registering it under its own name the first time); itself if no name."""
        name = name_of.get(id(function))
        if name is not None:
            return name
        try:
            name = _own_name(function, knob)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return function
        if name in registry:
            problems.append(
                f"{knob}: two different functions are named {name!r}; register them under distinct names "
                "(functions={'name': function, ...})"
            )
            return function
        registry[name], name_of[id(function)] = function, name
        return name

    for config in expand_config_group(config_group):
        config = dict(config)
        for knob in FUNCTION_KNOBS:
            if callable(config.get(knob)):
                config[knob] = named(config[knob], knob)
        for knob in LIST_FUNCTION_KNOBS:
            if isinstance(config.get(knob), list | tuple):
                config[knob] = [named(item, knob) if callable(item) else item for item in config[knob]]
        configs.append(config)
    if problems:
        raise ConfigError(sorted(set(problems)))
    return configs, registry


def _own_name(function: Any, where: str) -> str:
    name = getattr(function, "__name__", None)
    if not callable(function) or name is None or name == "<lambda>":
        raise ConfigError(
            f"{where}: {function!r} has no name to store it under; register it with a name "
            "(functions={'name': function})"
        )
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return name


def unknown_function_problems(config: Mapping[str, Any], registered: Collection[str]) -> list[str]:
    """Function names in `config` that the experiment has no function for, each with the names it has."""
    problems = []
    named = [(knob, config.get(knob)) for knob in FUNCTION_KNOBS]
    named += [(knob, name) for knob in LIST_FUNCTION_KNOBS for name in config.get(knob) or () if isinstance(name, str)]
    for knob, name in named:
        if name is None or not isinstance(name, str):
            continue
        known = sorted(registered) + (list(BUILTIN_METRICS) if knob == "compute_metrics" else [])
        if name not in known:
            listed = ", ".join(known) if known else "none"
            problems.append(
                f"{knob}={name!r}: no function of that name is registered with this experiment (known: {listed})"
            )
    return problems


def resolve(registry: Mapping[str, Callable[..., Any]], knob: str, name: str) -> Callable[..., Any]:
    """The function a config names; raises ValueError when this process's spec has none of that name."""
    function = registry.get(name)
    if function is None:
        raise ValueError(
            f"{knob}={name!r}: the experiment's spec registers no function of that name "
            f"(it has: {', '.join(sorted(registry)) or 'none'}); pass it to run_fit in functions="
        )
    return function


@dataclass(frozen=True)
class EvaluationContext:
    """What a `compute_metrics` is evaluating: `rf_core.evaluation_context()` returns it while the function runs."""

    experiment: str
    run_id: int
    step: int  # optimizer steps the run has taken
    chunk_index: int
    epoch: int
    config: Mapping[str, Any]


_CURRENT_EVALUATION: ContextVar[EvaluationContext | None] = ContextVar("rf_evaluation", default=None)


def evaluation_context() -> EvaluationContext:
    """The run and step being evaluated, for a `compute_metrics` (or anything it calls) that wants to know."""
    context = _CURRENT_EVALUATION.get()
    if context is None:
        raise RuntimeError("evaluation_context() is only available while the engine runs a compute_metrics")
    return context


@contextlib.contextmanager
def evaluating(context: EvaluationContext) -> Iterator[EvaluationContext]:
    token = _CURRENT_EVALUATION.set(context)
    try:
        yield context
    finally:
        _CURRENT_EVALUATION.reset(token)
