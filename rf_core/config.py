"""The config schema: every knob a run honours, with its type, range and default, in one table.

Names are the ones users know: Hugging Face `TrainingArguments` for training knobs, PEFT `LoraConfig` for adapter
knobs, TRL's `max_length`. A key is either honoured or rejected by name — never silently ignored.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rf_core.knobs import ConfigError, expand_config_group

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_in(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not _is_int(value):
            return "must be an integer"
        if value < low or (high is not None and value > high):
            return f"must be between {low} and {high}" if high is not None else f"must be >= {low}"
        return None

    return check


def _number(
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not _is_number(value):
            return "must be a finite number"
        if above is not None and not value > above:
            return f"must be > {above}" + (f" and <= {at_most}" if at_most is not None else "")
        if at_least is not None and not value >= at_least:
            return f"must be >= {at_least}" + (f" and < {below}" if below is not None else "")
        if at_most is not None and not value <= at_most:
            return f"must be <= {at_most}"
        if below is not None and not value < below:
            return f"must be < {below}"
        return None

    return check


def _non_empty_str(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _one_of(choices: Sequence[str]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _target_modules(value: Any) -> str | None:
    if value is None or value == "all-linear":
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return None
    return 'must be null, "all-linear", or a non-empty list of module names'


def _max_steps(value: Any) -> str | None:
    if not _is_int(value) or (value != -1 and value < 1):
        return "must be -1 (off) or an integer >= 1"
    return None


def _seed(value: Any) -> str | None:
    return None if value is None or _is_int(value) else "must be an integer or null"


@dataclass(frozen=True)
class KnobSpec:
    name: str
    kind: str  # "model" | "adapter" | "training" | "data"
    expected: str  # type and range, as shown to users
    default: Any
    check: Callable[[Any], str | None]
    doc: str


KNOBS: dict[str, KnobSpec] = {
    spec.name: spec
    for spec in (
        KnobSpec(
            "model_name_or_path",
            "model",
            "string",
            "rf-tiny-llama",
            _non_empty_str,
            "base model: a built-in tiny name, a local folder, or a hub name already cached",
        ),
        KnobSpec(
            "use_peft", "adapter", "bool", True, _bool, "true: train a LoRA adapter; false: full fine-tune"
        ),
        KnobSpec("r", "adapter", "int 1..1024", 8, _int_in(1, 1024), "LoRA rank"),
        KnobSpec("lora_alpha", "adapter", "number > 0", 16, _number(above=0), "LoRA scaling numerator"),
        KnobSpec(
            "lora_dropout",
            "adapter",
            "number in [0, 1)",
            0.05,
            _number(at_least=0, below=1),
            "dropout on the LoRA input",
        ),
        KnobSpec(
            "target_modules",
            "adapter",
            'null, "all-linear" or list of names',
            None,
            _target_modules,
            "modules that get adapters; null = PEFT's default for the architecture",
        ),
        KnobSpec(
            "learning_rate",
            "training",
            "number in (0, 1]",
            2e-4,
            _number(above=0, at_most=1),
            "peak AdamW learning rate",
        ),
        KnobSpec("weight_decay", "training", "number >= 0", 0.0, _number(at_least=0), "AdamW weight decay"),
        KnobSpec(
            "max_grad_norm",
            "training",
            "number >= 0",
            1.0,
            _number(at_least=0),
            "gradient clipping norm; 0 disables clipping",
        ),
        KnobSpec("per_device_train_batch_size", "training", "int >= 1", 8, _int_in(1), "micro-batch size"),
        KnobSpec("per_device_eval_batch_size", "training", "int >= 1", 8, _int_in(1), "eval batch size"),
        KnobSpec(
            "gradient_accumulation_steps",
            "training",
            "int >= 1",
            1,
            _int_in(1),
            "micro-batches per optimizer step",
        ),
        KnobSpec("num_train_epochs", "training", "int >= 1", 1, _int_in(1), "passes over the training set"),
        KnobSpec(
            "max_steps",
            "training",
            "-1 or int >= 1",
            -1,
            _max_steps,
            "stop after this many optimizer steps (-1: train all epochs)",
        ),
        KnobSpec(
            "lr_scheduler_type",
            "training",
            " | ".join(LR_SCHEDULERS),
            "linear",
            _one_of(LR_SCHEDULERS),
            "learning-rate schedule over the whole run (not per chunk)",
        ),
        KnobSpec("warmup_steps", "training", "int >= 0", 0, _int_in(0), "linear warm-up steps"),
        KnobSpec(
            "seed",
            "training",
            "int or null",
            None,
            _seed,
            "seed for adapter init and dropout; null = the experiment's seed",
        ),
        KnobSpec("max_length", "data", "int 8..8192", 64, _int_in(8, 8192), "tokens per training example"),
    )
}


def validate_config(cfg: Any) -> list[str]:
    """Every problem of one plain config, each naming the key, its value and what is expected."""
    if not isinstance(cfg, Mapping):
        return [f"a config must be an object of knob values, got {type(cfg).__name__}"]
    problems = []
    for key, value in cfg.items():
        spec = KNOBS.get(key)
        if spec is None:
            close = difflib.get_close_matches(str(key), KNOBS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(KNOBS)})"
            problems.append(f"unknown key {key!r}{hint}")
            continue
        reason = spec.check(value)
        if reason:
            problems.append(f"{key}={json.dumps(value, default=repr)}: {reason}")
    return problems


def normalize_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every default filled in, in table order; raises ConfigError listing every problem."""
    problems = validate_config(cfg)
    if problems:
        raise ConfigError(problems)
    return {name: cfg.get(name, spec.default) for name, spec in KNOBS.items()}


def validate_config_group(group: Any) -> list[str]:
    try:
        configs = expand_config_group(group)
    except ConfigError as exc:
        return exc.problems
    if not configs:
        return ["the config group is empty"]
    if len(configs) == 1:
        return validate_config(configs[0])
    return [f"config {i + 1}: {p}" for i, cfg in enumerate(configs) for p in validate_config(cfg)]


def architecture_mismatch(parent: Mapping[str, Any], clone: Mapping[str, Any]) -> list[str]:
    """Why `clone` cannot warm-start from `parent`; empty when the trainable weights have the same shape."""
    fields = ["model_name_or_path", "use_peft"]
    if parent.get("use_peft", True) and clone.get("use_peft", True):
        fields += ["r", "target_modules"]
    problems = []
    for name in fields:
        a, b = parent.get(name, KNOBS[name].default), clone.get(name, KNOBS[name].default)
        if name == "target_modules" and isinstance(a, list) and isinstance(b, list):
            same = set(a) == set(b)
        else:
            same = a == b
        if not same:
            problems.append(f"{name} differs: parent {json.dumps(a)}, clone {json.dumps(b)}")
    return problems


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {**config, **overrides}


def parse_set_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """CLI `--set k=v` pairs; values are JSON when they parse (3e-4, true, ["q_proj"], {"$list": [...]})."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key.strip()] = value
    return overrides


def varying_knobs(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose values differ between configs, in table order (unknown keys last)."""
    keys = list(KNOBS) + sorted({k for c in configs for k in c} - set(KNOBS))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def knob_table_markdown() -> str:
    lines = ["| knob | kind | type / range | default | meaning |", "|---|---|---|---|---|"]
    for spec in KNOBS.values():
        lines.append(
            f"| `{spec.name}` | {spec.kind} | {spec.expected} | `{json.dumps(spec.default)}` | {spec.doc} |"
        )
    return "\n".join(lines)
