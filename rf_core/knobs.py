"""Knobs (`List`, `Range`) and config-group generators (`GridSearch`, `RandomSearch`).

The same knobs have a tagged JSON form for the CLI, the dashboard and policies — `{"$list": [...]}`,
`{"$range": {"low": .., "high": .., "log": true}}`, `{"$grid": ...}`, `{"$random": {...}}` — read by one
function, `parse_tagged`. A plain JSON list (e.g. `target_modules`) is always just a value.
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
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class List:
    """A knob taking each of `values` (every one in a grid, one at random in a random search)."""

    values: tuple[Any, ...]

    def __init__(self, values: Sequence[Any]) -> None:
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"List needs a non-empty list of values, got {values=}")
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True)
class Range:
    """A knob sampled from [low, high] (log-uniformly when `log`); integer bounds give integers."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        for name, value in (("low", self.low), ("high", self.high)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"Range {name} must be a finite number, got {name}={value!r}")
        if self.low > self.high:
            raise ConfigError(f"Range low must be <= high, got low={self.low!r} > high={self.high!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log Range needs low > 0, got low={self.low!r}")

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def sample(self, rng: random.Random) -> float | int:
        if self.integer:
            if self.log:
                return min(
                    self.high,
                    max(self.low, round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))),
                )
            return rng.randint(self.low, self.high)
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


Knob = List | Range


def _as_config_list(config: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    items = [config] if isinstance(config, Mapping) else list(config)
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"config {index + 1} must be an object of knob values, got {type(item).__name__}"
            )
    return [dict(item) for item in items]


class GridSearch:
    """Every combination of the List knobs, first key varying slowest."""

    def __init__(self, config: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        self.config = _as_config_list(config)
        for item in self.config:
            for key, value in item.items():
                if isinstance(value, Range):
                    raise ConfigError(f"knob {key!r} is a Range: ranges need RandomSearch, not GridSearch")

    def configs(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in self.config:
            keys = list(item)
            choices = [item[k].values if isinstance(item[k], List) else (item[k],) for k in keys]
            out.extend(dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices))
        return out


class RandomSearch:
    """`num_runs` configs, each sampling every List uniformly and every Range; reproducible from `seed`."""

    def __init__(
        self, config: Mapping[str, Any] | Sequence[Mapping[str, Any]], num_runs: int, seed: int = 0
    ) -> None:
        if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
            raise ConfigError(f"RandomSearch num_runs must be an integer >= 1, got {num_runs=}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"RandomSearch seed must be an integer, got {seed=}")
        self.config = _as_config_list(config)
        self.num_runs = num_runs
        self.seed = seed

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


def _has_knob(config: Mapping[str, Any], kind: type) -> bool:
    return any(isinstance(value, kind) for value in config.values())


def expand_config_group(group: Any) -> list[dict[str, Any]]:
    """A config, a list of them, a GridSearch or a RandomSearch → the plain configs it stands for."""
    if isinstance(group, GridSearch | RandomSearch):
        return group.configs()
    if isinstance(group, Mapping):
        if _has_knob(group, Range):
            keys = [k for k, v in group.items() if isinstance(v, Range)]
            raise ConfigError(
                f"knob(s) {keys} are Ranges: wrap the config in RandomSearch(config, num_runs, seed)"
            )
        return GridSearch(group).configs()
    if isinstance(group, Sequence) and not isinstance(group, str | bytes):
        out: list[dict[str, Any]] = []
        for item in group:
            out.extend(expand_config_group(item))
        return out
    raise ConfigError(
        f"a config group is a config dict, a list of them, GridSearch or RandomSearch; got {group!r}"
    )


_TAGS = ("$list", "$range", "$grid", "$random")


def parse_tagged(obj: Any) -> Any:
    """Tagged JSON → knobs and generators; everything else is returned as it is."""
    if isinstance(obj, list):
        return [parse_tagged(item) for item in obj]
    if not isinstance(obj, Mapping):
        return obj
    tags = [key for key in obj if isinstance(key, str) and key.startswith("$")]
    if not tags:
        return {key: _parse_value(value) for key, value in obj.items()}
    if len(obj) != 1 or tags[0] not in _TAGS:
        raise ConfigError(
            f"unknown or mixed tag(s) {sorted(obj)}: a tagged value is exactly one of {list(_TAGS)}"
        )
    tag, body = tags[0], obj[tags[0]]
    if tag == "$list":
        if not isinstance(body, list):
            raise ConfigError(f'"$list" takes a JSON list, got {body!r}')
        return List(body)
    if tag == "$range":
        fields = _tag_fields(tag, body, required={"low", "high"}, optional={"log"})
        log = fields.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f'"$range" log must be true or false, got {log!r}')
        return Range(fields["low"], fields["high"], log=log)
    if tag == "$grid":
        return GridSearch(_parse_configs(body))
    fields = _tag_fields(tag, body, required={"config", "num_runs"}, optional={"seed"})
    return RandomSearch(_parse_configs(fields["config"]), fields["num_runs"], fields.get("seed", 0))


def _parse_value(value: Any) -> Any:
    """A config's top-level value: a knob when tagged, else a plain value (lists stay lists)."""
    if isinstance(value, Mapping) and any(isinstance(k, str) and k.startswith("$") for k in value):
        parsed = parse_tagged(value)
        if isinstance(parsed, GridSearch | RandomSearch):
            raise ConfigError("a $grid or $random generator can only wrap whole configs, not a single knob")
        return parsed
    return value


def _parse_configs(body: Any) -> list[dict[str, Any]]:
    items = body if isinstance(body, list) else [body]
    configs = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ConfigError(f"a generator wraps config objects, got {item!r}")
        configs.append(parse_tagged(item))
    return configs


def _tag_fields(tag: str, body: Any, *, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise ConfigError(f'"{tag}" takes an object with {sorted(required)}, got {body!r}')
    missing = sorted(required - set(body))
    unknown = sorted(set(body) - required - optional)
    problems = [f'"{tag}" is missing {name!r}' for name in missing]
    problems += [f'"{tag}" has unknown field {name!r}' for name in unknown]
    if problems:
        raise ConfigError(problems)
    return dict(body)


def to_tagged(obj: Any) -> Any:
    """Knobs and generators → tagged JSON (the inverse of parse_tagged), for display and storage."""
    if isinstance(obj, List):
        return {"$list": [to_tagged(v) for v in obj.values]}
    if isinstance(obj, Range):
        return {"$range": {"low": obj.low, "high": obj.high, "log": obj.log}}
    if isinstance(obj, GridSearch):
        return {"$grid": [to_tagged(c) for c in obj.config]}
    if isinstance(obj, RandomSearch):
        return {
            "$random": {
                "config": [to_tagged(c) for c in obj.config],
                "num_runs": obj.num_runs,
                "seed": obj.seed,
            }
        }
    if isinstance(obj, Mapping):
        return {key: to_tagged(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_tagged(value) for value in obj]
    return obj


def config_group_from_json(text_or_obj: str | Any) -> list[dict[str, Any]]:
    """JSON text (or already-parsed JSON) with optional tags → the plain configs it expands to."""
    if isinstance(text_or_obj, str | bytes):
        try:
            text_or_obj = json.loads(text_or_obj)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    return expand_config_group(parse_tagged(text_or_obj))
