"""Knobs, generators and their tagged JSON form: plain data in, plain configs out."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest

from rf_core.knobs import (
    ConfigError,
    GridSearch,
    List,
    RandomSearch,
    Range,
    config_group_from_json,
    expand_config_group,
    parse_tagged,
    to_tagged,
)

# -- List and Range ----------------------------------------------------------------------------------------------


def test_config_error_joins_its_problems() -> None:
    error = ConfigError(["a is wrong", "b is wrong"])
    assert isinstance(error, ValueError)
    assert error.problems == ["a is wrong", "b is wrong"]
    assert str(error) == "a is wrong; b is wrong"
    assert ConfigError("one").problems == ["one"]


@pytest.mark.parametrize("values", [[], (), "abc", 3, None])
def test_list_needs_a_non_empty_sequence(values: Any) -> None:
    with pytest.raises(ValueError, match="values="):
        List(values)


def test_list_keeps_values_as_a_tuple_and_allows_list_values() -> None:
    knob = List([["q_proj"], ["q_proj", "v_proj"]])
    assert knob.values == (["q_proj"], ["q_proj", "v_proj"])
    assert knob == List((["q_proj"], ["q_proj", "v_proj"]))


@pytest.mark.parametrize(
    ("low", "high", "log", "message"),
    [
        (1e-3, 1e-5, False, "low=0.001 > high=1e-05"),
        (5, 1, True, "low=5 > high=1"),
        (0.0, 1.0, True, "log Range needs low > 0"),
        (-1.0, 1.0, True, "log Range needs low > 0"),
        (True, 2, False, "low must be a finite number"),
        (0.0, math.inf, False, "high must be a finite number"),
        (math.nan, 1.0, False, "low must be a finite number"),
        ("0", 1, False, "low must be a finite number"),
        (1, 2, "yes", "log must be True or False"),
    ],
)
def test_bad_ranges_are_rejected_naming_the_bounds(low: Any, high: Any, log: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Range(low, high, log=log)


# -- GridSearch -------------------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_with_the_first_key_slowest() -> None:
    grid = GridSearch({"learning_rate": List([1e-4, 3e-4]), "r": List([4, 8, 16]), "lora_alpha": 32})
    configs = grid.configs()
    assert len(configs) == 6
    assert [(c["learning_rate"], c["r"]) for c in configs] == [
        (1e-4, 4), (1e-4, 8), (1e-4, 16), (3e-4, 4), (3e-4, 8), (3e-4, 16),
    ]  # fmt: skip
    assert all(c["lora_alpha"] == 32 for c in configs)
    assert [list(c) for c in configs] == [["learning_rate", "r", "lora_alpha"]] * 6


def test_grid_over_a_list_of_configs_concatenates_their_grids() -> None:
    grid = GridSearch([{"r": List([4, 8])}, {"r": 16, "use_peft": List([True, False])}])
    assert grid.configs() == [
        {"r": 4}, {"r": 8}, {"r": 16, "use_peft": True}, {"r": 16, "use_peft": False},
    ]  # fmt: skip


def test_grid_rejects_a_range_saying_it_needs_random_search() -> None:
    with pytest.raises(ConfigError, match="'learning_rate'.*RandomSearch"):
        GridSearch({"learning_rate": Range(1e-5, 1e-3, log=True)})


def test_grid_can_be_rerun_and_does_not_share_dicts_with_its_input() -> None:
    base = {"r": List([4, 8])}
    grid = GridSearch(base)
    first = grid.configs()
    first[0]["r"] = 99
    assert grid.configs() == [{"r": 4}, {"r": 8}]
    base["extra"] = 1
    assert grid.configs() == [{"r": 4}, {"r": 8}]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target_modules": [List(["q_proj", "v_proj"])]}, "nested inside its value"),
        ({"r": {"inner": List([1, 2])}}, "nested inside its value"),
        ({"r": GridSearch({"r": List([1, 2])})}, "generators wrap whole configs"),
        ([], "at least one config"),
        (["not a config"], "must be a dict"),
    ],
)
def test_knobs_are_only_allowed_as_top_level_values(config: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GridSearch(config)


# -- RandomSearch -----------------------------------------------------------------------------------------------

SPACE = {
    "learning_rate": Range(1e-5, 1e-2, log=True),
    "r": List([4, 8, 16]),
    "warmup_steps": Range(0, 10),
    "lora_alpha": 16,
}


def test_random_search_is_reproducible_and_seed_dependent() -> None:
    first = RandomSearch(SPACE, num_runs=8, seed=3).configs()
    assert first == RandomSearch(SPACE, num_runs=8, seed=3).configs()
    assert first != RandomSearch(SPACE, num_runs=8, seed=4).configs()
    assert len(first) == 8
    assert all(config["lora_alpha"] == 16 and config["r"] in (4, 8, 16) for config in first)


def test_random_search_takes_several_base_configs_in_turn() -> None:
    search = RandomSearch([{"use_peft": True, "r": List([4, 8])}, {"use_peft": False}], num_runs=5)
    assert [config["use_peft"] for config in search.configs()] == [True, False, True, False, True]


@pytest.mark.parametrize(("num_runs", "seed"), [(0, 0), (-1, 0), (1.5, 0), (True, 0), (2, "a"), (2, 1.0)])
def test_random_search_rejects_bad_num_runs_or_seed(num_runs: Any, seed: Any) -> None:
    with pytest.raises(ConfigError, match="num_runs=|seed="):
        RandomSearch(SPACE, num_runs=num_runs, seed=seed)


def test_log_range_samples_stay_in_bounds_and_are_log_distributed() -> None:
    low, high = 1e-6, 1e-2
    samples = [c["x"] for c in RandomSearch({"x": Range(low, high, log=True)}, num_runs=4000, seed=1).configs()]
    assert all(low <= value <= high for value in samples)
    assert all(isinstance(value, float) for value in samples)
    # Log-uniform: the median sits near the geometric mean (1e-4), two decades below the arithmetic midpoint.
    log_ratio = math.log10(statistics.median(samples) / math.sqrt(low * high))
    assert abs(log_ratio) < 0.15
    # And each decade gets about a quarter of the samples.
    per_decade = [sum(10.0**d <= v < 10.0 ** (d + 1) for v in samples) for d in range(-6, -2)]
    assert all(800 < count < 1200 for count in per_decade), per_decade


def test_linear_range_is_uniform() -> None:
    samples = [c["x"] for c in RandomSearch({"x": Range(0.0, 1.0)}, num_runs=4000, seed=2).configs()]
    assert all(0.0 <= value <= 1.0 for value in samples)
    assert abs(statistics.mean(samples) - 0.5) < 0.03


@pytest.mark.parametrize("log", [False, True])
def test_int_ranges_give_ints_covering_both_bounds(log: bool) -> None:
    samples = [c["r"] for c in RandomSearch({"r": Range(1, 8, log=log)}, num_runs=500, seed=0).configs()]
    assert all(type(value) is int for value in samples)
    assert set(samples) == set(range(1, 9))


def test_mixed_int_and_float_bounds_give_floats() -> None:
    (config,) = RandomSearch({"x": Range(1, 2.0)}, num_runs=1).configs()
    assert isinstance(config["x"], float)


# -- expand_config_group ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ({"r": 8}, [{"r": 8}]),
        ({}, [{}]),
        ({"r": List([4, 8])}, [{"r": 4}, {"r": 8}]),
        ([{"r": 4}, {"r": List([8, 16])}], [{"r": 4}, {"r": 8}, {"r": 16}]),
        (({"r": 4}, GridSearch({"r": List([8])})), [{"r": 4}, {"r": 8}]),
        ([], []),
        ({"target_modules": ["q_proj", "v_proj"]}, [{"target_modules": ["q_proj", "v_proj"]}]),
        (
            {"target_modules": List([["q_proj"], ["q_proj", "v_proj"]])},
            [{"target_modules": ["q_proj"]}, {"target_modules": ["q_proj", "v_proj"]}],
        ),
    ],
)
def test_expand_config_group(group: Any, expected: list[dict[str, Any]]) -> None:
    assert expand_config_group(group) == expected


def test_expand_returns_random_search_configs() -> None:
    search = RandomSearch(SPACE, num_runs=3, seed=9)
    assert expand_config_group(search) == search.configs()
    assert expand_config_group([search, {"r": 4}]) == [*search.configs(), {"r": 4}]


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"learning_rate": Range(1e-5, 1e-3)}, "'learning_rate'.*RandomSearch"),
        ([{"r": 4}, {"warmup_steps": Range(0, 5)}], "'warmup_steps'.*RandomSearch"),
        ("r=8", "a config group is"),
        (None, "a config group is"),
    ],
)
def test_expand_rejects_what_it_cannot_expand(group: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand_config_group(group)


# -- tagged JSON ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tagged", "expected"),
    [
        ({"$list": [1e-4, 3e-4]}, List([1e-4, 3e-4])),
        ({"$list": [["q_proj"], ["v_proj"]]}, List([["q_proj"], ["v_proj"]])),
        ({"$range": {"low": 1e-5, "high": 1e-3, "log": True}}, Range(1e-5, 1e-3, log=True)),
        ({"$range": {"low": 1, "high": 8}}, Range(1, 8)),
        ({"$grid": {"r": {"$list": [4, 8]}}}, GridSearch({"r": List([4, 8])})),
        ({"$grid": [{"r": 4}, {"r": 8}]}, GridSearch([{"r": 4}, {"r": 8}])),
        (
            {"$random": {"config": {"learning_rate": {"$range": {"low": 0.1, "high": 0.2}}}, "num_runs": 3}},
            RandomSearch({"learning_rate": Range(0.1, 0.2)}, num_runs=3, seed=0),
        ),
        (
            {"lr": {"$list": [1, 2]}, "target_modules": ["q_proj"], "r": 8},
            {"lr": List([1, 2]), "target_modules": ["q_proj"], "r": 8},
        ),
        ([{"r": {"$list": [1]}}, {"r": 2}], [{"r": List([1])}, {"r": 2}]),
        (3e-4, 3e-4),
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    ],
)
def test_parse_tagged(tagged: Any, expected: Any) -> None:
    assert parse_tagged(tagged) == expected


@pytest.mark.parametrize(
    "obj",
    [
        List([1e-4, 3e-4]),
        Range(1e-5, 1e-3, log=True),
        Range(1, 8),
        GridSearch([{"r": List([4, 8]), "target_modules": ["q_proj"]}, {"r": 16}]),
        RandomSearch({"learning_rate": Range(1e-5, 1e-3, log=True), "r": List([4, 8])}, num_runs=5, seed=7),
        {"learning_rate": List([1e-4]), "target_modules": ["q_proj", "v_proj"], "seed": None},
    ],
)
def test_tagged_round_trip(obj: Any) -> None:
    tagged = to_tagged(obj)
    # The tagged form is plain JSON, so it survives a trip through text.
    assert parse_tagged(json.loads(json.dumps(tagged))) == obj


@pytest.mark.parametrize(
    "group",
    [
        GridSearch([{"r": List([4, 8]), "target_modules": ["q_proj"]}, {"r": 16}]),
        RandomSearch({"learning_rate": Range(1e-5, 1e-3, log=True), "r": List([4, 8])}, num_runs=5, seed=7),
        [{"learning_rate": List([1e-4, 2e-4])}, {"r": 4}],
    ],
)
def test_a_group_expands_the_same_from_its_tagged_text(group: Any) -> None:
    assert config_group_from_json(json.dumps(to_tagged(group))) == expand_config_group(group)


@pytest.mark.parametrize(
    ("tagged", "message"),
    [
        ({"$choice": [1, 2]}, r"unknown tag\(s\) \['\$choice'\]"),
        ({"r": {"$lists": [1, 2]}}, r"'\$lists'"),
        ({"$list": [1], "extra": 2}, "exactly one key"),
        ({"$list": []}, "non-empty"),
        ({"$list": 5}, "takes a non-empty JSON list"),
        ({"$range": {"low": 1e-3}}, "missing field 'high'"),
        ({"$range": {"low": 1, "high": 2, "step": 1}}, "unknown field 'step'"),
        ({"$range": [1, 2]}, "takes an object"),
        ({"$range": {"low": 0.2, "high": 0.1}}, "low=0.2 > high=0.1"),
        ({"$range": {"low": 1, "high": 2, "log": "yes"}}, "log must be True or False"),
        ({"$random": {"config": {}, "seed": 1}}, "missing field 'num_runs'"),
        ({"$random": {"config": {}, "num_runs": 0}}, "num_runs=0"),
        ({"$grid": 5}, "wraps a config object"),
        ({"$grid": {"$list": [1]}}, "wraps a config object"),
        ({"r": {"$grid": {"r": 1}}}, "generators wrap whole configs"),
    ],
)
def test_bad_tags_are_rejected_by_name(tagged: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_tagged(tagged)


def test_missing_and_extra_fields_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        parse_tagged({"$range": {"lo": 1, "hi": 2}})
    assert len(info.value.problems) == 4


# -- config_group_from_json -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"r": 8}', [{"r": 8}]),
        ('{"r": {"$list": [4, 8]}, "target_modules": ["q_proj"]}',
         [{"r": 4, "target_modules": ["q_proj"]}, {"r": 8, "target_modules": ["q_proj"]}]),
        ('[{"r": 4}, {"$grid": {"r": {"$list": [8, 16]}}}]', [{"r": 4}, {"r": 8}, {"r": 16}]),
        (b'{"r": 8}', [{"r": 8}]),
    ],
)  # fmt: skip
def test_config_group_from_json_text(text: str | bytes, expected: list[dict[str, Any]]) -> None:
    assert config_group_from_json(text) == expected


def test_config_group_from_json_accepts_parsed_json() -> None:
    assert config_group_from_json({"r": {"$list": [4, 8]}}) == [{"r": 4}, {"r": 8}]


def test_random_tag_expands_reproducibly() -> None:
    text = '{"$random": {"config": {"learning_rate": {"$range": {"low": 1e-5, "high": 1e-3, "log": true}}},'
    text += ' "num_runs": 4, "seed": 5}}'
    configs = config_group_from_json(text)
    assert configs == config_group_from_json(text)
    assert len(configs) == 4
    assert all(1e-5 <= c["learning_rate"] <= 1e-3 for c in configs)


def test_malformed_json_names_line_and_column() -> None:
    with pytest.raises(ConfigError, match=r"malformed JSON at line 2, column \d+"):
        config_group_from_json('{"learning_rate": 0.1,\n')


def test_range_without_random_in_json_is_rejected() -> None:
    with pytest.raises(ConfigError, match="RandomSearch"):
        config_group_from_json('{"learning_rate": {"$range": {"low": 1e-5, "high": 1e-3}}}')
