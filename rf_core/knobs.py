"""Knobs (`List`, `Range`) and config-group generators (`GridSearch`, `RandomSearch`).

A config group is a config dict, a list of them, or a generator over them; `expand_config_group` turns any of these
into the plain configs it stands for. Knobs are only allowed as top-level values of a config dict, and a plain list
(e.g. `target_modules`) is always just a value.

The same knobs have a tagged JSON form for the CLI, the dashboard and policies — `{"$list": [...]}`,
`{"$range": {"low": .., "high": .., "log": true}}`, `{"$grid": ...}`, `{"$random": {...}}` — read by one
function, `parse_tagged`, and written by its inverse, `to_tagged`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config or config group is invalid; `problems` lists every reason."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class List:
    """A knob taking each of `values`: every one in a grid, one drawn uniformly in a random search."""

    values: tuple[Any, ...]

    def __init__(self, values: Sequence[Any]) -> None:
        # A string is a Sequence too, but List("abc") is almost certainly a mistake for List(["abc"]).
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"List needs a non-empty list of values, got {values=}")
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True)
class Range:
    """A knob drawn from [low, high], log-uniformly when `log`; two int bounds give int samples."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        for name, value in (("low", self.low), ("high", self.high)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"Range {name} must be a finite number, got {name}={value!r}")
        if not isinstance(self.log, bool):
            raise ConfigError(f"Range log must be True or False, got log={self.log!r}")
        if self.low > self.high:
            raise ConfigError(f"Range low must be <= high, got low={self.low!r} > high={self.high!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log Range needs low > 0, got low={self.low!r}")

    @property
    def is_integer(self) -> bool:
        # bool bounds were rejected above, so isinstance(.., int) means a real integer here.
        return isinstance(self.low, int) and isinstance(self.high, int)

    def sample(self, rng: random.Random) -> float | int:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        elif self.is_integer:
            return rng.randint(int(self.low), int(self.high))
        else:
            value = rng.uniform(self.low, self.high)
        if self.is_integer:
            # Rounding can step just outside the bounds at either end; clamp so they always hold.
            return min(int(self.high), max(int(self.low), round(value)))
        return min(self.high, max(self.low, value))


Knob = List | Range


@dataclass(frozen=True)
class GridSearch:
    """Every combination of the List knobs of each config: keys in insertion order, the first varying slowest."""

    config: tuple[dict[str, Any], ...]

    def __init__(self, config: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        configs = _as_config_tuple(config)
        for index, item in enumerate(configs):
            ranged = [key for key, value in item.items() if isinstance(value, Range)]
            if ranged:
                raise ConfigError(
                    f"{_where(index, configs)}knob(s) {ranged} are Ranges: a Range needs RandomSearch, not GridSearch"
                )
        object.__setattr__(self, "config", configs)

    def configs(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in self.config:
            keys = list(item)
            choices = [item[key].values if isinstance(item[key], List) else (item[key],) for key in keys]
            out.extend(dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices))
        return out


@dataclass(frozen=True)
class RandomSearch:
    """`num_runs` configs drawing each List uniformly and each Range; the same inputs give the same configs.

    With several base configs, runs take them in turn (run i uses config i % len(configs)).
    """

    config: tuple[dict[str, Any], ...]
    num_runs: int
    seed: int = 0

    def __init__(self, config: Mapping[str, Any] | Sequence[Mapping[str, Any]], num_runs: int, seed: int = 0) -> None:
        if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
            raise ConfigError(f"RandomSearch num_runs must be an integer >= 1, got {num_runs=}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"RandomSearch seed must be an integer, got {seed=}")
        object.__setattr__(self, "config", _as_config_tuple(config))
        object.__setattr__(self, "num_runs", num_runs)
        object.__setattr__(self, "seed", seed)

    def configs(self) -> list[dict[str, Any]]:
        rng = random.Random(self.seed)
        out = []
        for run in range(self.num_runs):
            item = self.config[run % len(self.config)]
            out.append({key: _sample(value, rng) for key, value in item.items()})
        return out


def _sample(value: Any, rng: random.Random) -> Any:
    if isinstance(value, List):
        return value.values[rng.randrange(len(value.values))]
    if isinstance(value, Range):
        return value.sample(rng)
    return value


def _where(index: int, configs: Sequence[Any]) -> str:
    return f"config {index + 1}: " if len(configs) > 1 else ""


def _as_config_tuple(config: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The base configs of a generator, copied, after checking knobs sit only at the top level."""
    if isinstance(config, Mapping):
        items: list[Any] = [config]
    elif isinstance(config, Sequence) and not isinstance(config, str | bytes):
        items = list(config)
    else:
        raise ConfigError(f"a generator takes a config dict or a list of them, got {type(config).__name__}")
    if not items:
        raise ConfigError("a generator needs at least one config, got an empty list")
    problems = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            problems.append(f"{_where(index, items)}must be a dict of knob values, got {type(item).__name__}")
            continue
        problems += [_where(index, items) + p for p in _misplaced_knobs(item)]
    if problems:
        raise ConfigError(problems)
    return tuple(dict(item) for item in items)


def _misplaced_knobs(config: Mapping[str, Any]) -> list[str]:
    """Knobs nested inside a value, or generators used as a value: both would otherwise pass through unexpanded."""
    problems = []
    for key, value in config.items():
        if isinstance(value, GridSearch | RandomSearch):
            problems.append(f"{key!r} holds a {type(value).__name__}: generators wrap whole configs, not one knob")
        elif not isinstance(value, List | Range) and _contains_knob(value):
            problems.append(f"{key!r} has a knob nested inside its value: knobs are only allowed as top-level values")
    return problems


def _contains_knob(value: Any) -> bool:
    if isinstance(value, List | Range | GridSearch | RandomSearch):
        return True
    if isinstance(value, Mapping):
        return any(_contains_knob(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains_knob(v) for v in value)
    return False


def expand_config_group(group: Any) -> list[dict[str, Any]]:
    """A config, a list of them, a GridSearch, a RandomSearch or any generator with a `configs()` method (such as
    OptunaSearch) → the plain configs it stands for.

    A config with List knobs expands as a grid; one with a Range must be wrapped in RandomSearch.
    """
    if isinstance(group, GridSearch | RandomSearch):
        return group.configs()
    if not isinstance(group, Mapping) and callable(getattr(group, "configs", None)):
        return list(group.configs())  # another generator (rf_core.optuna_search.OptunaSearch)
    if isinstance(group, Mapping):
        ranged = [key for key, value in group.items() if isinstance(value, Range)]
        if ranged:
            raise ConfigError(
                f"knob(s) {ranged} are Ranges: wrap the config in RandomSearch(config, num_runs, seed) "
                '(in JSON: {"$random": {"config": ..., "num_runs": n, "seed": s}})'
            )
        return GridSearch(group).configs()
    if isinstance(group, list | tuple):
        out: list[dict[str, Any]] = []
        for item in group:
            out.extend(expand_config_group(item))
        return out
    raise ConfigError(
        "a config group is a config dict, a list of them, a GridSearch or a RandomSearch; "
        f"got {type(group).__name__} {group!r}"
    )


TAGS = ("$list", "$range", "$grid", "$random")


def _is_tagged(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(key, str) and key.startswith("$") for key in obj)


def parse_tagged(obj: Any) -> Any:
    """Tagged JSON → knobs and generators.

    A tagged dict becomes its knob or generator; a config dict keeps its keys, with tagged top-level values parsed
    into knobs; a list is parsed item by item (a list of configs); anything else is returned as it is.
    """
    if isinstance(obj, list):
        return [parse_tagged(item) for item in obj]
    if not isinstance(obj, Mapping):
        return obj
    if not _is_tagged(obj):
        return {key: _parse_config_value(key, value) for key, value in obj.items()}
    tags = [key for key in obj if isinstance(key, str) and key.startswith("$")]
    unknown = [tag for tag in tags if tag not in TAGS]
    if unknown:
        raise ConfigError(f"unknown tag(s) {unknown}: a tagged value is exactly one of {list(TAGS)}")
    if len(obj) != 1:
        raise ConfigError(f"a tagged value has exactly one key (one of {list(TAGS)}), got {sorted(map(str, obj))}")
    tag, body = tags[0], obj[tags[0]]
    if tag == "$list":
        if not isinstance(body, list) or not body:
            raise ConfigError(f'"$list" takes a non-empty JSON list of values, got {json.dumps(body)}')
        return List(body)
    if tag == "$range":
        fields = _tag_fields(tag, body, required=("low", "high"), optional=("log",))
        return Range(fields["low"], fields["high"], log=fields.get("log", False))
    if tag == "$grid":
        return GridSearch(_parse_configs(tag, body))
    fields = _tag_fields(tag, body, required=("config", "num_runs"), optional=("seed",))
    return RandomSearch(_parse_configs(tag, fields["config"]), fields["num_runs"], fields.get("seed", 0))


def _parse_config_value(key: Any, value: Any) -> Any:
    """A config's top-level value: a knob when tagged, else the plain value (a JSON list stays a list)."""
    if not _is_tagged(value):
        return value
    try:
        parsed = parse_tagged(value)
    except ConfigError as exc:
        # Named by its knob, as every other config problem is (the dashboard writes it under that knob's line).
        raise ConfigError([f"{key}={json.dumps(value, default=str)}: {problem}" for problem in exc.problems]) from None
    if isinstance(parsed, GridSearch | RandomSearch):
        raise ConfigError(f"{key!r} holds a $grid/$random generator: generators wrap whole configs, not one knob")
    return parsed


def _parse_configs(tag: str, body: Any) -> list[dict[str, Any]]:
    items = body if isinstance(body, list) else [body]
    configs = []
    for item in items:
        if not isinstance(item, Mapping) or _is_tagged(item):
            raise ConfigError(f'"{tag}" wraps a config object or a list of them, got {item!r}')
        configs.append(parse_tagged(item))
    return configs


def _tag_fields(tag: str, body: Any, *, required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise ConfigError(f'"{tag}" takes an object with fields {list(required)}, got {body!r}')
    problems = [f'"{tag}" is missing field {name!r}' for name in required if name not in body]
    problems += [
        f'"{tag}" has unknown field {name!r} (allowed: {[*required, *optional]})'
        for name in body
        if name not in required and name not in optional
    ]
    if problems:
        raise ConfigError(problems)
    return dict(body)


def to_tagged(obj: Any) -> Any:
    """Knobs and generators → tagged JSON, the inverse of parse_tagged (for display and storage)."""
    if isinstance(obj, List):
        return {"$list": [to_tagged(value) for value in obj.values]}
    if isinstance(obj, Range):
        return {"$range": {"low": obj.low, "high": obj.high, "log": obj.log}}
    if isinstance(obj, GridSearch):
        return {"$grid": [to_tagged(config) for config in obj.config]}
    if isinstance(obj, RandomSearch):
        return {
            "$random": {
                "config": [to_tagged(config) for config in obj.config],
                "num_runs": obj.num_runs,
                "seed": obj.seed,
            }
        }
    if isinstance(obj, Mapping):
        return {key: to_tagged(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_tagged(value) for value in obj]
    return obj


def config_group_from_json(text_or_obj: str | bytes | Any) -> list[dict[str, Any]]:
    """JSON text (or already-parsed JSON), tags allowed → the plain configs it expands to (not yet validated)."""
    obj = text_or_obj
    if isinstance(text_or_obj, str | bytes):
        try:
            obj = json.loads(text_or_obj)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    return expand_config_group(parse_tagged(obj))
