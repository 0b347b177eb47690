"""The config schema: every knob accepted and rejected by name, defaults, warm-start compatibility, CLI overrides."""

from __future__ import annotations

import math
import tempfile
from typing import Any

import pytest

from rf_core.config import (
    KNOBS,
    apply_overrides,
    architecture_mismatch,
    knob_table_markdown,
    normalize_config,
    parse_set_overrides,
    validate_config,
    validate_config_group,
    varying_knobs,
)
from rf_core.knobs import ConfigError, GridSearch, List, RandomSearch, Range

# Per knob: values it accepts and values it rejects (each rejection must name the key).
VALID: dict[str, list[Any]] = {
    "trainer_type": ["sft", "dpo"],
    "beta": [None, 0.1, 2],
    "loss_type": [None, "sigmoid", "ipo", "hinge", "robust"],
    "num_generations": [2, 8, 16],
    "max_completion_length": [1, 64, 8192],
    "temperature": [0.1, 1, 1.5],
    "top_p": [0.5, 1],
    "scale_rewards": ["group", "batch", "none"],
    "reward_funcs": [["format_reward"], ["format_reward", "length.reward"]],
    "reward_weights": [None, [1.0, 1.0], [2, 0.5]],
    "label_smoothing": [0, 0.0, 0.1, 0.49],
    "reference_free": [False, True],
    "ref_model": ["parent", "base"],
    "logging_steps": [None, 1, 500],
    "run_name": [None, "baseline", "lr 3e-4 / r 16"],
    # Local folders must lie under the model roots (the temporary folder, in tests/conftest.py).
    "model_name_or_path": ["rf-tiny-llama", f"{tempfile.gettempdir()}/models/llama", "org/model"],
    "model_kwargs": [None, {}, {"torch_dtype": "bfloat16", "device_map": "auto", "use_cache": False},
                     {"attn_implementation": "sdpa", "trust_remote_code": False, "low_cpu_mem_usage": True}],
    "use_peft": [True, False],
    "r": [1, 8, 1024],
    "lora_alpha": [16, 0.5, 1e3],
    "lora_dropout": [0, 0.0, 0.05, 0.999],
    "target_modules": [None, "all-linear", ["q_proj"], ["q_proj", "v_proj"]],
    "learning_rate": [2e-4, 1, 1.0, 1e-8],
    "weight_decay": [0, 0.0, 0.1],
    "max_grad_norm": [0, 1.0, 5],
    "per_device_train_batch_size": [1, 64],
    "per_device_eval_batch_size": [1, 64],
    "gradient_accumulation_steps": [1, 16],
    "num_train_epochs": [1, 3],
    "max_steps": [-1, 1, 500],
    "lr_scheduler_type": ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt"],
    "warmup_steps": [0, 10],
    "warmup_ratio": [0, 0.0, 0.03, 0.99],
    "bias": ["none"],
    "task_type": ["CAUSAL_LM"],
    "bf16": [False, True],
    "fp16": [False, True],
    "gradient_checkpointing": [False, True],
    "gradient_checkpointing_kwargs": [None, {}, {"use_reentrant": False}],
    "seed": [None, 0, 42, 2**32 - 1],
    "max_length": [8, 64, 8192],
    "completion_only_loss": [None, True, False],
    "assistant_only_loss": [False, True],
    "formatting_func": [None, "qa_format", "formats.chat-v2"],
    "compute_metrics": [None, "my_metrics", "Metrics_2"],
    "predict_with_generate": [False, True],
    "generation_config": [None, {}, {"max_new_tokens": 32, "do_sample": True, "temperature": 0.7, "top_p": 0.9},
                          {"repetition_penalty": 1.1, "num_beams": 2, "top_k": 0}],
    "eval_strategy": ["chunk", "epoch", "no"],
    "eval_steps": [None, 1, 500],
    "eval_subset": [None, 1, 64],
    "num_devices": [1, 2, 64],
    "max_devices": [None, 1, 64],
    "strategy": ["ddp", "deepspeed"],
    "zero_stage": [0, 1, 2, 3],
}  # fmt: skip
INVALID: dict[str, list[Any]] = {
    "trainer_type": ["SFT", "ppo", "", None, 1],
    "beta": [0, -0.1, True, "0.1", math.nan],
    "loss_type": ["Sigmoid", "exo_pair", "", 1, "dapo"],
    "num_generations": [1, 0, 2.0, None],
    "max_completion_length": [0, 8193, None, 1.5],
    "temperature": [0, -1, None, "1"],
    "top_p": [0, 1.5, None],
    "scale_rewards": ["Group", True, None],
    "reward_funcs": [[], "format_reward", ["1bad"], [3]],
    "reward_weights": [[], ["1"], [True], [1.0, math.nan]],
    "label_smoothing": [-0.1, 0.5, 1, True, None],
    "reference_free": [1, "true", None],
    "ref_model": ["self", "", None],
    "logging_steps": [0, -1, 1.5, True, "10"],
    "run_name": ["", "   ", "x" * 101, 3],
    "model_name_or_path": ["", "   ", None, 3, ["a"], "/models/llama", "../../../../../../../../etc/llama"],
    "model_kwargs": [
        [],
        "bf16",
        {"torch_dtype": "fp16"},
        {"trust_remote_code": "yes"},
        {"device_map": "cuda:0"},
        {"quantization_config": {}},
    ],
    "use_peft": [1, 0, "true", None],
    "r": [0, 1025, -1, 8.0, True, "8", None],
    "lora_alpha": [0, -1, True, math.nan, math.inf, "16", None],
    "lora_dropout": [1, 1.0, -0.1, False, math.nan],
    "target_modules": ["q_proj", "", [], [""], ["q_proj", 3], 5, {"q_proj": 1}],
    "learning_rate": [0, -0.1, 1.5, True, math.nan, -math.inf, "3e-4", None],
    "weight_decay": [-0.01, True, math.inf, None],
    "max_grad_norm": [-1, False, math.nan],
    "per_device_train_batch_size": [0, 1.5, True, None],
    "per_device_eval_batch_size": [0, -2, 8.0, False],
    "gradient_accumulation_steps": [0, 2.0, True],
    "num_train_epochs": [0, 1.5, True, None],
    "max_steps": [0, -2, 10.0, True, None],
    "lr_scheduler_type": ["Linear", "cosine_annealing", "", None, 1],
    "warmup_steps": [-1, 2.5, True],
    "warmup_ratio": [-0.1, 1, 1.0, "0.1", None],
    "bias": ["all", "lora_only", None],
    "task_type": ["SEQ_CLS", "causal_lm", None],
    "bf16": [1, "true", None],
    "fp16": [1, "true", None],
    "gradient_checkpointing": [0, "yes", None],
    "gradient_checkpointing_kwargs": [{"use_reentrant": True}, {"preserve_rng_state": False}, [], "none"],
    "seed": [-1, 2**32, 1.5, True, "42"],
    "max_length": [7, 8193, 64.0, True, None],
    "completion_only_loss": [0, "false"],
    "assistant_only_loss": [None, 1, "true"],
    "formatting_func": ["", "1st", "has space", "x" * 101, 3, "rougeL"],
    "compute_metrics": ["", "a/b", 3, ["rougeL"], "rougeL", "bleu"],
    "predict_with_generate": [1, "true", None],
    "generation_config": [
        [],
        "greedy",
        {"max_new_tokens": 0},
        {"temperature": 0},
        {"do_sample": 1},
        {"max_length": 20},
        {"top_p": 1.5},
    ],
    "eval_strategy": ["steps", "Steps", "chunks", "", None, 1],
    "eval_steps": [0, -1, 0.5, True, "10"],
    "eval_subset": [0, 2.5, False, "8"],
    "num_devices": [0, 65, 2.0, True, None],
    "max_devices": [0, 65, 2.0, True, "4"],
    "strategy": ["DDP", "fsdp", "", None],
    "zero_stage": [-1, 4, 2.0, None],
}

# What a knob's valid values need beside them: the knobs of one trainer type are read by its runs only.
DPO = {"trainer_type": "dpo"}
GRPO = {"trainer_type": "grpo", "reward_funcs": ["format_reward"], "per_device_train_batch_size": 16}
CONTEXT: dict[str, dict[str, Any]] = {
    "beta": DPO, "loss_type": DPO, "reference_free": DPO, "ref_model": DPO,
    "label_smoothing": {**DPO, "loss_type": "robust"},
    "num_generations": GRPO, "max_completion_length": GRPO, "temperature": GRPO, "top_p": GRPO,
    "scale_rewards": GRPO, "reward_funcs": GRPO, "reward_weights": {**GRPO, "reward_funcs": ["a", "b"]},
}  # fmt: skip


def test_knobs_of_another_trainer_type_are_refused_unless_left_at_their_default() -> None:
    assert validate_config({"beta": 0.2}) == [
        "beta=0.2: applies to trainer_type dpo and grpo runs; this config's trainer_type is sft (leave it at its "
        "default, null)"
    ]
    [problem] = validate_config({"trainer_type": "dpo", "assistant_only_loss": True})
    assert problem.startswith("assistant_only_loss=true: applies to trainer_type sft runs")
    assert validate_config({"trainer_type": "dpo", "beta": 0.5, "completion_only_loss": None}) == []
    assert validate_config({"trainer_type": "dpo", "strategy": "deepspeed"}) == [
        'trainer_type="dpo": not supported with strategy deepspeed yet; use ddp'
    ]
    [problem] = validate_config({"trainer_type": "dpo", "label_smoothing": 0.1})
    assert problem.startswith("label_smoothing=0.1: is read by loss_type robust only")


def test_grpo_configs_are_checked_together() -> None:
    assert validate_config(GRPO) == []
    assert validate_config({**GRPO, "loss_type": "dr_grpo", "beta": 0.0}) == []
    [problem] = validate_config({"trainer_type": "grpo", "per_device_train_batch_size": 16})
    assert problem.startswith('trainer_type="grpo": needs reward_funcs')
    assert validate_config({**GRPO, "per_device_train_batch_size": 6}) == [
        "num_generations=8: must divide the step's batch of completions (per_device_train_batch_size x "
        "gradient_accumulation_steps x num_devices = 6), as TRL's generation batch"
    ]
    assert validate_config({**GRPO, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}) == []
    [problem] = validate_config({**GRPO, "reward_weights": [1, 2]})
    assert problem.startswith("reward_weights=[1, 2]: must have one weight per reward function (1)")
    [problem] = validate_config({**GRPO, "loss_type": "sigmoid"})
    assert problem.startswith('loss_type="sigmoid": must be one of dapo, grpo, bnpo, dr_grpo for trainer_type grpo')
    [problem] = validate_config({**DPO, "beta": 0})
    assert problem.startswith("beta=0: must be > 0 for trainer_type dpo")
    [problem] = validate_config({**DPO, "num_generations": 4})
    assert problem.startswith("num_generations=4: applies to trainer_type grpo runs")


def test_device_knobs_are_checked_together() -> None:
    assert validate_config({"num_devices": 2, "max_devices": 4}) == []
    assert validate_config({"num_devices": 2, "max_devices": 1}) == [
        "max_devices=1: must be >= num_devices (2), or null"
    ]
    [problem] = validate_config({"strategy": "deepspeed", "max_devices": 2})
    assert problem.startswith("max_devices=2: a DeepSpeed run keeps num_devices (1)")
    assert validate_config({"strategy": "deepspeed", "num_devices": 2, "max_devices": 2}) == []


def test_the_tables_above_cover_every_knob() -> None:
    assert set(VALID) == set(KNOBS) == set(INVALID)


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, values in VALID.items() for v in values])
def test_each_knob_accepts_a_valid_value(key: str, value: Any) -> None:
    context = CONTEXT.get(key, {})
    assert validate_config({**context, key: value}) == []
    assert normalize_config({**context, key: value})[key] == value


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, values in INVALID.items() for v in values])
def test_each_knob_rejects_an_invalid_value_by_name(key: str, value: Any) -> None:
    problems = validate_config({**CONTEXT.get(key, {}), key: value})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}="), problems
    assert ": must be " in problems[0]


@pytest.mark.parametrize("name", list(KNOBS))
def test_every_default_is_valid(name: str) -> None:
    spec = KNOBS[name]
    assert spec.name == name
    assert spec.kind in ("model", "adapter", "training", "preference", "grpo", "data", "eval", "devices")
    assert spec.problem(spec.default) is None
    assert spec.doc


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"learning_rate": -0.1}, "learning_rate=-0.1: must be > 0 and <= 1"),
        ({"learning_rate": "3e-4"}, 'learning_rate="3e-4": must be a number, got a string'),
        ({"r": True}, "r=true: must be an integer, got a boolean"),
        ({"r": 2048}, "r=2048: must be between 1 and 1024"),
        ({"lora_dropout": math.nan}, "lora_dropout=NaN: must be a finite number"),
        ({"seed": 1.5}, "seed=1.5: must be an integer or null, got a number"),
        ({"lr_scheduler_type": "cos"}, 'lr_scheduler_type="cos": must be one of linear, cosine,'),
        ({"learning_rate": List([1e-4])}, "is an unexpanded List; expand the config group first"),
    ],
)
def test_problems_name_the_key_the_value_and_what_is_expected(config: dict[str, Any], expected: str) -> None:
    (problem,) = validate_config(config)
    assert problem.startswith(expected) or expected in problem, problem


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("learning_rat", "learning_rate"), ("warmup_step", "warmup_steps"), ("target_module", "target_modules"),
     ("per_device_batch_size", "per_device_eval_batch_size"), ("lr", "learning_rate"),
     ("batch_size", "per_device_train_batch_size"), ("max_seq_length", "max_length"), ("lora_r", "r"),
     ("evaluation_strategy", "eval_strategy")],
)  # fmt: skip
def test_unknown_keys_are_rejected_with_a_suggestion(key: str, suggestion: str) -> None:
    assert validate_config({key: 1}) == [f"unknown key {key!r} (did you mean {suggestion!r}?)"]


@pytest.mark.parametrize("key", ["logging_strategy", "tf32", "logging_first_step", "packing"])
def test_hugging_face_knobs_not_supported_yet_are_named_so_and_never_mapped_to_a_look_alike(key: str) -> None:
    (problem,) = validate_config({key: 1})
    assert problem.startswith(f"unknown key {key!r}: a Hugging Face / TRL training argument that rf does not")
    assert "did you mean" not in problem


def test_eval_strategy_steps_comes_with_eval_steps() -> None:
    assert validate_config({"eval_strategy": "steps", "eval_steps": 10}) == []


def test_bf16_with_deepspeed_is_refused_naming_both() -> None:
    assert validate_config({"bf16": True, "strategy": "deepspeed"}) == [
        "bf16=true: not supported with strategy deepspeed yet (DeepSpeed keeps its own precision settings)"
    ]
    assert validate_config({"bf16": True, "gradient_checkpointing": True}) == []
    assert validate_config({"bf16": 1}) != []  # a bool, not a number


def test_fp16_is_refused_with_bf16_or_deepspeed() -> None:
    assert validate_config({"fp16": True, "bf16": True}) == ["bf16=true and fp16=true: pick one mixed precision"]
    assert validate_config({"fp16": True, "strategy": "deepspeed"}) == [
        "fp16=true: not supported with strategy deepspeed yet (DeepSpeed keeps its own precision settings)"
    ]
    assert validate_config({"fp16": True, "gradient_checkpointing": True}) == []


def test_an_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    (problem,) = validate_config({"zzz": 1})
    assert problem.startswith(
        "unknown key 'zzz' (known keys: model_name_or_path, model_kwargs, trainer_type, use_peft,"
    )


def test_every_problem_is_reported_at_once() -> None:
    problems = validate_config({"learning_rat": 1e-4, "r": 0, "use_peft": "yes"})
    assert len(problems) == 3


@pytest.mark.parametrize("config", [None, [], "learning_rate=1e-4", 3])
def test_a_non_dict_config_is_one_problem(config: Any) -> None:
    (problem,) = validate_config(config)
    assert problem.startswith("a config must be an object")


def test_normalize_fills_every_default_in_table_order() -> None:
    normalised = normalize_config({"learning_rate": 3e-4, "r": 16})
    assert list(normalised) == list(KNOBS)
    assert normalised["learning_rate"] == 3e-4 and normalised["r"] == 16
    assert {k: v for k, v in normalised.items() if k not in ("learning_rate", "r")} == {
        k: spec.default for k, spec in KNOBS.items() if k not in ("learning_rate", "r")
    }
    assert normalize_config({}) == {name: spec.default for name, spec in KNOBS.items()}
    assert normalize_config(normalised) == normalised


def test_normalize_returns_a_copy() -> None:
    original = {"target_modules": ["q_proj"]}
    normalised = normalize_config(original)
    normalised["target_modules"].append("v_proj")
    assert original == {"target_modules": ["q_proj"]}


def test_normalize_raises_with_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        normalize_config({"learning_rate": 2, "r": "8"})
    assert len(info.value.problems) == 2
    assert "learning_rate=2" in str(info.value) and 'r="8"' in str(info.value)


# -- config groups ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ({"learning_rate": 1e-4}, []),
        ({"learning_rate": 2}, ["learning_rate=2: must be > 0 and <= 1"]),
        ({"r": List([8, 0])}, ["config 2: r=0: must be between 1 and 1024"]),
        (GridSearch({"r": List([0, 8]), "lr": 1}), [
            "config 1: r=0: must be between 1 and 1024",
            "config 1: unknown key 'lr' (did you mean 'learning_rate'?)",
            "config 2: unknown key 'lr' (did you mean 'learning_rate'?)",
        ]),
        (RandomSearch({"learning_rate": Range(1e-5, 1e-3, log=True)}, num_runs=3), []),
        ({"learning_rate": Range(1e-5, 1e-3)}, [
            "knob(s) ['learning_rate'] are Ranges: wrap the config in RandomSearch(config, num_runs, seed) "
            '(in JSON: {"$random": {"config": ..., "num_runs": n, "seed": s}})'
        ]),
        ([], ["the config group expands to no config"]),
    ],
)  # fmt: skip
def test_validate_config_group(group: Any, expected: list[str]) -> None:
    assert validate_config_group(group) == expected


# -- warm-start compatibility -----------------------------------------------------------------------------------

PARENT = normalize_config({"target_modules": ["q_proj", "v_proj"]})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, []),
        ({"learning_rate": 1e-3, "lora_alpha": 64, "lora_dropout": 0.0, "seed": 3}, []),
        ({"target_modules": ["v_proj", "q_proj"]}, []),
        ({"r": 16}, ["r differs: parent 8, clone 16"]),
        ({"model_name_or_path": "other"}, ['model_name_or_path differs: parent "rf-tiny-llama", clone "other"']),
        ({"use_peft": False}, ["use_peft differs: parent true, clone false"]),
        ({"target_modules": ["q_proj"]}, ['target_modules differs: parent ["q_proj", "v_proj"], clone ["q_proj"]']),
        ({"target_modules": None}, ['target_modules differs: parent ["q_proj", "v_proj"], clone null']),
        ({"target_modules": "all-linear"},
         ['target_modules differs: parent ["q_proj", "v_proj"], clone "all-linear"']),
        ({"r": 4, "model_name_or_path": "m"},
         ['model_name_or_path differs: parent "rf-tiny-llama", clone "m"', "r differs: parent 8, clone 4"]),
    ],
)  # fmt: skip
def test_architecture_mismatch(change: dict[str, Any], expected: list[str]) -> None:
    clone = normalize_config({**PARENT, **change})
    assert architecture_mismatch(PARENT, clone) == expected


def test_null_target_modules_match_each_other() -> None:
    assert architecture_mismatch(normalize_config({}), normalize_config({"learning_rate": 1e-3})) == []


def test_full_fine_tunes_ignore_adapter_shape() -> None:
    parent = normalize_config({"use_peft": False, "r": 8})
    assert architecture_mismatch(parent, normalize_config({"use_peft": False, "r": 64})) == []


# -- overrides --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["learning_rate=3e-4"], {"learning_rate": 3e-4}),
        (["r=16", "use_peft=true"], {"r": 16, "use_peft": True}),
        (['target_modules=["q_proj"]'], {"target_modules": ["q_proj"]}),
        (["seed=null"], {"seed": None}),
        (['learning_rate={"$list": [1e-4, 3e-4]}'], {"learning_rate": {"$list": [1e-4, 3e-4]}}),
        (["model_name_or_path=/models/tiny"], {"model_name_or_path": "/models/tiny"}),
        (["lr_scheduler_type=cosine"], {"lr_scheduler_type": "cosine"}),
        (["model_name_or_path=a=b"], {"model_name_or_path": "a=b"}),
        ([" r =4"], {"r": 4}),
        (["learning_rate=NaN"], {"learning_rate": "NaN"}),
        (["r=4", "r=8"], {"r": 8}),
        ([], {}),
    ],
)
def test_parse_set_overrides(pairs: list[str], expected: dict[str, Any]) -> None:
    assert parse_set_overrides(pairs) == expected


@pytest.mark.parametrize("pair", ["learning_rate", "=3", ""])
def test_a_set_pair_without_key_and_equals_is_rejected(pair: str) -> None:
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_set_overrides([pair])


def test_apply_overrides_returns_a_new_dict() -> None:
    base = {"r": 8, "learning_rate": 1e-4}
    assert apply_overrides(base, {"r": 16}) == {"r": 16, "learning_rate": 1e-4}
    assert base == {"r": 8, "learning_rate": 1e-4}


# -- reporting helpers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        ([], []),
        ([{"r": 8}], []),
        ([{"r": 8, "learning_rate": 1e-4}, {"learning_rate": 1e-4, "r": 16}], ["r"]),
        ([{"seed": 1, "r": 8}, {"seed": 2, "r": 4}], ["r", "seed"]),
        ([{"r": 8}, {}], []),  # a missing key counts as its default
        ([{"target_modules": ["q"]}, {"target_modules": ["q", "v"]}], ["target_modules"]),
        ([{"zz": 1}, {"zz": 2, "r": 4}], ["r", "zz"]),
        ([{"zz": True}, {"zz": 1}], ["zz"]),  # a flag is not a number
        ([{"zz": float("nan")}, {"zz": float("nan")}], []),
        ([{"zz": [1, 2]}, {"zz": [1.0, 2]}, {"zz": [1, 2]}], []),
        ([{"zz": {"a": 1}}, {"zz": {"a": 1}}, {"zz": {"a": 2}}], ["zz"]),
        ([{"r": 8}, {"r": 8}, {"r": 8}, {"r": 4}], ["r"]),  # the last run alone differs
    ],
)
def test_varying_knobs_in_table_order(configs: list[dict[str, Any]], expected: list[str]) -> None:
    assert varying_knobs(configs) == expected


def test_knob_table_has_a_row_per_knob() -> None:
    lines = knob_table_markdown().splitlines()
    assert lines[0] == "| knob | kind | type / range | default | meaning |"
    rows = lines[2:]
    assert len(rows) == len(KNOBS)
    for row, name in zip(rows, KNOBS, strict=True):
        assert row.startswith(f"| `{name}` |")
        # Five cells: no stray "|" inside a cell.
        assert row.replace("\\|", "").count("|") == 6


def test_varying_knobs_treats_equal_int_and_float_as_the_same() -> None:
    # lora_alpha's default is 16; `--set lora_alpha=16.0` is the same value and must not show as varying.
    assert varying_knobs([{"lora_alpha": 16.0}, {}]) == []
    assert varying_knobs([{"lora_alpha": 16.5}, {}]) == ["lora_alpha"]


def test_grpo_epsilon_is_refused_with_why() -> None:
    [problem] = validate_config({"epsilon": 0.2})
    assert problem == (
        "unknown key 'epsilon': GRPO's clipping range clips nothing with one policy iteration per generation "
        "(num_iterations=1, rf's), where the policy ratio is exactly 1"
    )
