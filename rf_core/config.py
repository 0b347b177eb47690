"""The config schema: every knob a run honours, with its type, range and default, in one table (`KNOBS`).

A config is a flat, JSON-able dict. Names are the ones users know: Hugging Face `TrainingArguments` for training
knobs, PEFT `LoraConfig` for adapter knobs, TRL's `max_length` for the data knob. Every key is either honoured or
rejected by name; nothing is silently ignored. Booleans never count as numbers, ints count wherever a number is
expected, and NaN/infinity are rejected.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rf_core.functions import BUILTIN_METRICS, name_problem
from rf_core.knobs import ConfigError, GridSearch, List, RandomSearch, Range, expand_config_group
from rf_core.model_roots import model_source_problem

KnobKind = Literal["model", "adapter", "training", "preference", "grpo", "data", "eval", "devices"]

# What a run optimises: supervised fine-tuning, preference optimisation (TRL's DPOTrainer's objective), or group
# relative policy optimisation on its own generations, scored by reward functions (TRL's GRPOTrainer's).
TRAINER_TYPES = ("sft", "dpo", "grpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
LOSS_TYPES = {"dpo": DPO_LOSS_TYPES, "grpo": GRPO_LOSS_TYPES}
SCALE_REWARDS = ("group", "batch", "none")
REF_MODELS = ("parent", "base")
DEFAULT_BETA = {"dpo": 0.1, "grpo": 0.0}  # TRL's DPOConfig and GRPOConfig
DEFAULT_DPO_BETA = DEFAULT_BETA["dpo"]
# Knobs that only some trainer types read: a value other than the default on a run of another type is refused.
TRAINER_TYPE_KNOBS: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "grpo"), "loss_type": ("dpo", "grpo"), "ref_model": ("dpo", "grpo"),
    "label_smoothing": ("dpo",), "reference_free": ("dpo",),
    "num_generations": ("grpo",), "max_completion_length": ("grpo",), "temperature": ("grpo",), "top_p": ("grpo",),
    "scale_rewards": ("grpo",), "reward_funcs": ("grpo",), "reward_weights": ("grpo",),
    "completion_only_loss": ("sft",), "assistant_only_loss": ("sft",), "predict_with_generate": ("sft",),
    "compute_metrics": ("sft",), "generation_config": ("sft",),
}  # fmt: skip

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)

STRATEGIES = ("ddp", "deepspeed")

# numpy's legacy seeding (used by transformers' set_seed) only takes seeds in [0, 2**32).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Constraint:
    """What a value of the right type must also satisfy; `description` reads after "must be"."""

    description: str
    holds: Callable[[Any], bool]


@dataclass(frozen=True)
class KnobSpec:
    name: str
    kind: KnobKind
    types: tuple[type, ...]  # a float knob also takes ints; bool never passes as int or float
    default: Any
    constraint: Constraint | None  # None: any value of an accepted type is fine (null always is, when accepted)
    doc: str  # one line, for the README table

    def accepts_type(self, value: Any) -> bool:
        if isinstance(value, bool):
            return bool in self.types
        if value is None:
            return type(None) in self.types
        if isinstance(value, float):
            return float in self.types and math.isfinite(value)
        if isinstance(value, int):
            return int in self.types or float in self.types
        return isinstance(value, self.types)

    def problem(self, value: Any) -> str | None:
        """Why `value` is not acceptable for this knob (naming key, value and what is expected), or None."""
        shown = f"{self.name}={_show(value)}"
        if isinstance(value, List | Range | GridSearch | RandomSearch):
            return f"{shown}: is an unexpanded {type(value).__name__}; expand the config group first"
        if not self.accepts_type(value):
            if isinstance(value, float) and not math.isfinite(value):
                return f"{shown}: must be a finite number"
            return f"{shown}: must be {_type_words(self.types)}, got {_json_type(value)}"
        if value is not None and self.constraint and not self.constraint.holds(value):
            return f"{shown}: must be {self.constraint.description}"
        return None

    @property
    def type_text(self) -> str:
        return " or ".join(_TYPE_NAMES[t] for t in self.types)


_TYPE_NAMES = {
    bool: "bool", int: "int", float: "number", str: "string", list: "list", dict: "object", type(None): "null"
}  # fmt: skip
_TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _type_words(types: tuple[type, ...]) -> str:
    words = [_TYPE_WORDS[t] for t in types]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    if isinstance(value, Mapping):
        return "an object"
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _between(low: float, high: float) -> Constraint:
    return Constraint(f"between {low} and {high}", lambda v: low <= v <= high)


def _at_least(low: float) -> Constraint:
    return Constraint(f">= {low}", lambda v: v >= low)


# transformers' GenerationConfig fields a config's generation_config may set, each with what its value must be.
GENERATION_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "max_new_tokens": ("an integer between 1 and 4096", lambda v: _is_int(v) and 1 <= v <= 4096),
    "min_new_tokens": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
    "temperature": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "top_p": ("a number > 0 and <= 1", lambda v: _is_number(v) and 0 < v <= 1),
    "top_k": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "repetition_penalty": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "num_beams": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "no_repeat_ngram_size": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
}
DEFAULT_MAX_NEW_TOKENS = 64
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
# from_pretrained arguments a config's model_kwargs may set, each with what its value must be. device_map is taken
# and left unused, as RapidFire AI does: the engine puts each base on its slot's device.
MODEL_KWARGS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "torch_dtype": (f"one of {', '.join(TORCH_DTYPES)}", lambda v: v in TORCH_DTYPES),
    "attn_implementation": (f"one of {', '.join(ATTN_IMPLEMENTATIONS)}", lambda v: v in ATTN_IMPLEMENTATIONS),
    "use_cache": ("true or false", lambda v: isinstance(v, bool)),
    "low_cpu_mem_usage": ("true or false", lambda v: isinstance(v, bool)),
    "device_map": ('"auto" or null (the engine places each base on its slot\'s device)', lambda v: v in ("auto", None)),
    "trust_remote_code": (
        "true or false; true runs code from the model's repository, so the experiment must opt in "
        "(run_fit(..., trust_remote_code=True))",
        lambda v: isinstance(v, bool),
    ),
}
EVAL_STRATEGIES = ("chunk", "steps", "epoch", "no")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def generation_config_problems(value: Any) -> list[str]:
    return _object_problems(
        "generation_config", value, GENERATION_FIELDS, "generation settings", "a setting rf passes on"
    )


def model_kwargs_problems(value: Any) -> list[str]:
    return _object_problems(
        "model_kwargs", value, MODEL_KWARGS, "from_pretrained arguments", "an argument rf passes to from_pretrained"
    )


def _object_problems(
    knob: str, value: Any, fields: Mapping[str, tuple[str, Callable[[Any], bool]]], what: str, one: str
) -> list[str]:
    """Each key of an object-valued knob that `fields` does not know, or whose value breaks its rule."""
    if not isinstance(value, Mapping):
        return []
    problems = []
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            why = f"{key!r} is not {one} (known: {', '.join(fields)})"
        elif not field[1](item):
            why = f"{key} must be {field[0]}, got {_show(item)}"
        else:
            continue
        problems.append(f"{knob}={_show(value)}: must be an object of {what}; {why}")
    return problems


def _is_module_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, str) and m.strip() for m in value)


_K = KnobSpec
KNOBS: dict[str, KnobSpec] = {
    spec.name: spec
    for spec in (
        _K(
            "model_name_or_path", "model", (str,), "rf-tiny-llama",
            Constraint("a non-empty string", lambda v: bool(v.strip())),
            "name or local path of the base model",
        ),
        _K(
            "model_kwargs", "model", (dict, type(None)), None,
            Constraint("an object of from_pretrained arguments", lambda v: not model_kwargs_problems(v)),
            f"arguments for loading the base ({', '.join(MODEL_KWARGS)}), handed to create_model_fn in the config; "
            "bases with other model_kwargs are other bases",
        ),
        _K(
            "trainer_type", "model", (str,), "sft",
            Constraint(f"one of {', '.join(TRAINER_TYPES)}", lambda v: v in TRAINER_TYPES),
            "what the run optimises: sft (supervised, TRL's SFTTrainer), dpo (preferences, TRL's DPOTrainer) or grpo "
            "(its own generations scored by reward functions, TRL's GRPOTrainer); may differ between runs and change "
            "in a Clone-Modify",
        ),
        _K("use_peft", "adapter", (bool,), True, None, "true: train a LoRA adapter; false: full fine-tune"),
        _K("r", "adapter", (int,), 8, _between(1, 1024), "LoRA rank"),
        _K("lora_alpha", "adapter", (float,), 16, Constraint("> 0", lambda v: v > 0), "LoRA scaling (alpha / r)"),
        _K(
            "lora_dropout", "adapter", (float,), 0.05, Constraint(">= 0 and < 1", lambda v: 0 <= v < 1),
            "dropout on the LoRA input",
        ),
        _K(
            "target_modules", "adapter", (type(None), str, list), None,
            Constraint(
                'null, "all-linear", or a non-empty list of non-empty module names',
                lambda v: v == "all-linear" or _is_module_list(v),
            ),
            "modules that get adapters; null = PEFT's default for the architecture",
        ),
        _K(
            "bias", "adapter", (str,), "none", Constraint('"none"', lambda v: v == "none"),
            "PEFT's LoRA bias: only \"none\" (trained biases would live outside the adapter that runs swap)",
        ),
        _K(
            "task_type", "adapter", (str,), "CAUSAL_LM", Constraint('"CAUSAL_LM"', lambda v: v == "CAUSAL_LM"),
            "PEFT's task type: the engine trains causal language models",
        ),
        _K(
            "learning_rate", "training", (float,), 2e-4, Constraint("> 0 and <= 1", lambda v: 0 < v <= 1),
            "peak learning rate (AdamW)",
        ),
        _K("weight_decay", "training", (float,), 0.0, _at_least(0), "AdamW weight decay"),
        _K("max_grad_norm", "training", (float,), 1.0, _at_least(0), "gradient clipping norm; 0 disables clipping"),
        _K("per_device_train_batch_size", "training", (int,), 8, _at_least(1), "training micro-batch size"),
        _K("per_device_eval_batch_size", "training", (int,), 8, _at_least(1), "evaluation batch size"),
        _K(
            "gradient_accumulation_steps", "training", (int,), 1, _at_least(1),
            "micro-batches per optimizer step",
        ),
        _K("num_train_epochs", "training", (int,), 1, _at_least(1), "passes over the training set"),
        _K(
            "max_steps", "training", (int,), -1, Constraint("-1 (off) or >= 1", lambda v: v == -1 or v >= 1),
            "train this many optimizer steps, overriding num_train_epochs (the data repeats); -1 = off",
        ),
        _K(
            "lr_scheduler_type", "training", (str,), "linear",
            Constraint(f"one of {', '.join(LR_SCHEDULERS)}", lambda v: v in LR_SCHEDULERS),
            "learning-rate schedule, spanning the whole run (not one chunk)",
        ),
        _K("warmup_steps", "training", (int,), 0, _at_least(0), "linear warm-up steps at the start of the run"),
        _K(
            "warmup_ratio", "training", (float,), 0.0, Constraint(">= 0 and < 1", lambda v: 0 <= v < 1),
            "warm-up as a fraction of the run's steps, rounded up (transformers 4's); warmup_steps > 0 wins",
        ),
        _K(
            "bf16", "training", (bool,), False, None,
            "as HF's bf16: training and eval forward passes under bfloat16 autocast; weights stay float32",
        ),
        _K(
            "fp16", "training", (bool,), False, None,
            "as HF's fp16: float16 autocast with a loss scaler whose state is the run's (an overflow skips the "
            "step and the LR schedule waits, as in HF); needs a CUDA slot",
        ),
        _K(
            "gradient_checkpointing", "training", (bool,), False, None,
            "as HF's: recompute activations in the backward pass (non-reentrant) to save memory; same result",
        ),
        _K(
            "gradient_checkpointing_kwargs", "training", (dict, type(None)), None,
            Constraint(
                '{"use_reentrant": false} or null (rf checkpoints non-reentrantly: reentrant checkpointing needs '
                "inputs that require grad, which a LoRA run's frozen embeddings do not give)",
                lambda v: dict(v) in ({}, {"use_reentrant": False}),
            ),
            "HF's, accepted with the one setting rf uses",
        ),
        _K(
            "seed", "training", (int, type(None)), None, _between(0, MAX_SEED),
            "the run's seed (initialisation, dropout, data order); null = the experiment's seed",
        ),
        _K(
            "logging_steps", "training", (int, type(None)), None, _at_least(1),
            "HF's: also log `loss`, the mean train_loss of the last N steps, at steps N, 2N, ... (as HF's Trainer); "
            "null = only train_loss, which rf stores at every step anyway",
        ),
        _K(
            "run_name", "training", (str, type(None)), None,
            Constraint("1 to 100 characters", lambda v: v is None or 0 < len(v.strip()) <= 100),
            "HF's run_name: a label for the run, shown in every runs table; null = none",
        ),
        _K(
            "beta", "preference", (float, type(None)), None, _at_least(0),
            "TRL's beta: how far the run may move from its reference (DPO), the KL penalty's weight (GRPO); null = "
            f"TRL's default, {DEFAULT_BETA['dpo']} for DPO and {DEFAULT_BETA['grpo']} for GRPO (no reference)",
        ),
        _K(
            "loss_type", "preference", (str, type(None)), None,
            Constraint(
                f"one of {', '.join(DPO_LOSS_TYPES)} (dpo), {', '.join(GRPO_LOSS_TYPES)} (grpo), or null",
                lambda v: v in DPO_LOSS_TYPES + GRPO_LOSS_TYPES,
            ),
            "TRL's loss_type; null = TRL's default: sigmoid (the DPO paper's) for DPO, dapo for GRPO",
        ),
        _K(
            "label_smoothing", "preference", (float,), 0.0, Constraint(">= 0 and < 0.5", lambda v: 0 <= v < 0.5),
            "TRL's: the probability that a preference label is flipped (loss_type robust, as TRL)",
        ),
        _K(
            "reference_free", "preference", (bool,), False, None,
            "DPO against a uniform reference (log-probabilities 0): no reference forward pass",
        ),
        _K(
            "ref_model", "preference", (str,), "parent",
            Constraint(f"one of {', '.join(REF_MODELS)}", lambda v: v in REF_MODELS),
            "the DPO reference: parent = the weights a warm-started clone starts from (the SFT model it came from; "
            "a clone of a DPO run keeps that run's reference); base = the base model. A run with no parent uses "
            "the base either way",
        ),
        _K(
            "num_generations", "grpo", (int,), 8, _between(2, 1024),
            "GRPO: completions generated per prompt (a group); the batch (per_device_train_batch_size x "
            "gradient_accumulation_steps x num_devices, in completions) must be a multiple of it",
        ),
        _K(
            "max_completion_length", "grpo", (int,), 512, _between(1, 8192),
            "GRPO: most tokens generated per completion (TRL's default 512)",
        ),
        _K("temperature", "grpo", (float,), 1.0, Constraint("> 0", lambda v: v > 0), "GRPO: sampling temperature"),
        _K(
            "top_p", "grpo", (float,), 1.0, Constraint("> 0 and <= 1", lambda v: 0 < v <= 1),
            "GRPO: nucleus sampling's probability mass",
        ),
        _K(
            "scale_rewards", "grpo", (str,), "group",
            Constraint(f"one of {', '.join(SCALE_REWARDS)}", lambda v: v in SCALE_REWARDS),
            "GRPO: advantages divided by the standard deviation of the group's rewards, the batch's, or none",
        ),
        _K(
            "reward_funcs", "grpo", (list, type(None)), None,
            Constraint(
                "a non-empty list of registered functions' names",
                lambda v: bool(v) and all(name_problem(name) is None for name in v),
            ),
            "GRPO: reward functions (prompts, completions, **columns) -> list of floats, by registered name",
        ),
        _K(
            "reward_weights", "grpo", (list, type(None)), None,
            Constraint("a non-empty list of numbers", lambda v: bool(v) and all(_is_number(w) for w in v)),
            "GRPO: each reward function's weight in the reward; null = 1 each",
        ),
        _K(
            "max_length", "data", (int,), 1024, _between(8, 8192),
            "tokens per training example, as TRL's SFTConfig; longer ones are cut, and counted per run",
        ),
        _K(
            "completion_only_loss", "data", (bool, type(None)), None, None,
            "TRL's: false trains prompt-completion rows on the prompt too; null = true for those rows",
        ),
        _K(
            "assistant_only_loss", "data", (bool,), False, None,
            "TRL's: true trains conversations on the assistant's turns only (needs {% generation %} in the template)",
        ),
        _K(
            "formatting_func", "data", (str, type(None)), None,
            Constraint("a registered function's name, or null", lambda v: name_problem(v) is None),
            "function example -> text, {prompt, completion} or {messages}, by registered name; null = rows as given",
        ),
        _K(
            "compute_metrics", "eval", (str, type(None)), None,
            Constraint(
                "a registered function's name, a built-in metric, or null",
                lambda v: v in BUILTIN_METRICS or not name_problem(v),
            ),
            f"metric function by registered name, or built-in {', '.join(BUILTIN_METRICS)}; null = the experiment's",
        ),
        _K(
            "predict_with_generate", "eval", (bool,), False, None,
            "as HF's: compute_metrics gets generated texts and references (the engine generates, batched)",
        ),
        _K(
            "generation_config", "eval", (dict, type(None)), None,
            Constraint("an object of generation settings", lambda v: not generation_config_problems(v)),
            f"generation settings for predict_with_generate ({', '.join(GENERATION_FIELDS)}); "
            f"null = greedy, {DEFAULT_MAX_NEW_TOKENS} new tokens",
        ),
        _K(
            "eval_strategy", "eval", (str,), "chunk",
            Constraint(f"one of {', '.join(EVAL_STRATEGIES)}", lambda v: v in EVAL_STRATEGIES),
            "when the run is evaluated: every chunk boundary, every eval_steps steps (and at its last step), "
            "at each epoch's end, or never",
        ),
        _K(
            "eval_steps", "eval", (int, type(None)), None, _at_least(1),
            "optimizer steps between evaluations with eval_strategy steps",
        ),
        _K(
            "eval_subset", "eval", (int, type(None)), None, _at_least(1),
            "evaluate on the first N eval rows only (loss and metrics); null = all",
        ),
        _K(
            "num_devices", "devices", (int,), 1, _between(1, 64),
            "device slots that train the run together, one process each; a step's batch is split across them",
        ),
        _K(
            "max_devices", "devices", (int, type(None)), None, _between(1, 64),
            "ddp: slots the run may take for a chunk when they would idle; the step is shared, the result the same",
        ),
        _K(
            "strategy", "devices", (str,), "ddp",
            Constraint(f"one of {', '.join(STRATEGIES)}", lambda v: v in STRATEGIES),
            "how the run trains: torch DDP (used only when num_devices > 1) or DeepSpeed ZeRO (any num_devices)",
        ),
        _K(
            "zero_stage", "devices", (int,), 2, _between(0, 3),
            "DeepSpeed ZeRO stage (strategy deepspeed): 1 shards the optimizer state, 2 the gradients, 3 the weights",
        ),
    )
}  # fmt: skip


def validate_config(cfg: Any) -> list[str]:
    """Every problem of one plain config, each naming the key, its value and what is expected; [] = valid."""
    if not isinstance(cfg, Mapping):
        return [f"a config must be an object of knob values, got {_json_type(cfg)}"]
    problems = []
    for key, value in cfg.items():
        spec = KNOBS.get(key) if isinstance(key, str) else None
        if spec is None:
            problems.append(_unknown_key(key))
            continue
        problem = spec.problem(value)
        if problem is None and key == "model_name_or_path":
            problem = model_source_problem(value)
        if key == "generation_config" and problem is not None:
            problems.extend(generation_config_problems(value) or [problem])
            continue
        if key == "model_kwargs" and problem is not None:
            problems.extend(model_kwargs_problems(value) or [problem])
            continue
        if problem:
            problems.append(problem)
    return (
        problems
        or _device_problems(cfg)
        or _precision_problems(cfg)
        or _trainer_type_problems(cfg)
        or _eval_problems(cfg)
    )


def _trainer_type_problems(cfg: Mapping[str, Any]) -> list[str]:
    """A knob of one trainer type set on a run of another: it would be ignored, so it is refused."""
    trainer_type = cfg.get("trainer_type", KNOBS["trainer_type"].default)
    problems = [
        f"{knob}={_show(cfg[knob])}: applies to trainer_type {' and '.join(owners)} runs; this config's "
        f"trainer_type is {trainer_type} (leave it at its default, {_show(KNOBS[knob].default)})"
        for knob, owners in TRAINER_TYPE_KNOBS.items()
        if knob in cfg and trainer_type not in owners and cfg[knob] != KNOBS[knob].default
    ]
    if problems:
        return problems
    if trainer_type != "sft" and cfg.get("strategy") == "deepspeed":
        problems.append(f"trainer_type={_show(trainer_type)}: not supported with strategy deepspeed yet; use ddp")
    loss_type = cfg.get("loss_type")
    if loss_type is not None and trainer_type in LOSS_TYPES and loss_type not in LOSS_TYPES[trainer_type]:
        problems.append(
            f"loss_type={_show(loss_type)}: must be one of {', '.join(LOSS_TYPES[trainer_type])} for trainer_type "
            f"{trainer_type}, or null"
        )
    if cfg.get("label_smoothing") and loss_type not in ("robust",):
        problems.append(
            f"label_smoothing={_show(cfg['label_smoothing'])}: is read by loss_type robust only (as TRL's); "
            f"this config's loss_type is {_show(loss_type)}"
        )
    if trainer_type == "dpo" and cfg.get("beta") == 0:
        problems.append("beta=0: must be > 0 for trainer_type dpo (it divides the IPO loss and scales every reward)")
    if trainer_type == "grpo":
        problems += _grpo_problems(cfg)
    return problems


def _grpo_problems(cfg: Mapping[str, Any]) -> list[str]:
    problems = []
    functions, weights = cfg.get("reward_funcs"), cfg.get("reward_weights")
    if not functions:
        problems.append(
            'trainer_type="grpo": needs reward_funcs, a list of registered reward functions\' names (functions '
            "(prompts, completions, **columns) -> list of floats)"
        )
    elif weights is not None and len(weights) != len(functions):
        problems.append(
            f"reward_weights={_show(weights)}: must have one weight per reward function ({len(functions)}), or be null"
        )
    if cfg.get("num_devices", 1) > 1 or cfg.get("max_devices") is not None:
        problems.append('trainer_type="grpo": trains on one device per run so far (num_devices 1, max_devices null)')
    generations = cfg.get("num_generations", KNOBS["num_generations"].default)
    batch = (
        cfg.get("per_device_train_batch_size", KNOBS["per_device_train_batch_size"].default)
        * cfg.get("gradient_accumulation_steps", KNOBS["gradient_accumulation_steps"].default)
        * cfg.get("num_devices", KNOBS["num_devices"].default)
    )
    if batch % generations:
        problems.append(
            f"num_generations={generations}: must divide the step's batch of completions (per_device_train_batch_size"
            f" x gradient_accumulation_steps x num_devices = {batch}), as TRL's generation batch"
        )
    return problems


def _eval_problems(cfg: Mapping[str, Any]) -> list[str]:
    problems = []
    metric = cfg.get("compute_metrics")
    if metric in BUILTIN_METRICS and not cfg.get("predict_with_generate"):
        problems.append(
            f"compute_metrics={_show(metric)}: must be used with predict_with_generate=true (the built-in metric "
            "scores generated text)"
        )
    if cfg.get("eval_strategy") == "steps" and cfg.get("eval_steps") is None:
        problems.append('eval_strategy="steps": must be used with eval_steps (an integer >= 1)')
    if cfg.get("predict_with_generate") and cfg.get("strategy") == "deepspeed":
        problems.append("predict_with_generate=true: must be false with strategy deepspeed (not supported there yet)")
    return problems


def _precision_problems(cfg: Mapping[str, Any]) -> list[str]:
    if cfg.get("bf16") and cfg.get("fp16"):
        return ["bf16=true and fp16=true: pick one mixed precision"]
    for knob in ("bf16", "fp16"):
        if cfg.get(knob) and cfg.get("strategy") == "deepspeed":
            return [
                f"{knob}=true: not supported with strategy deepspeed yet (DeepSpeed keeps its own precision settings)"
            ]
    return []


def _device_problems(cfg: Mapping[str, Any]) -> list[str]:
    """The device knobs together (each already valid alone)."""
    devices, most = cfg.get("num_devices", 1), cfg.get("max_devices")
    if most is None:
        return []
    if most < devices:
        return [f"max_devices={most}: must be >= num_devices ({devices}), or null"]
    if cfg.get("strategy", "ddp") == "deepspeed" and most != devices:
        return [f"max_devices={most}: a DeepSpeed run keeps num_devices ({devices}) for life (its ZeRO shards do)"]
    return []


# Names users carry over from other tools, which spelling similarity alone would not map to our knob.
_COMMON_ALIASES = {
    "lr": "learning_rate",
    "lora_r": "r",
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "scheduler": "lr_scheduler_type",
    "warmup": "warmup_steps",
    "max_seq_length": "max_length",
    "grad_accum": "gradient_accumulation_steps",
    "evaluation_strategy": "eval_strategy",  # transformers' name before 4.46
}


# Hugging Face / TRL training arguments people set that rf does not have yet: named as such, never "corrected" to
# a knob that merely looks alike (logging_strategy is not strategy).
# GRPO's epsilon is one of them in effect: rf trains one policy iteration per generation (TRL's num_iterations=1),
# where the ratio to the old policy is exactly 1 and clipping never acts; it is refused with that reason.
_WHY_NOT: dict[str, str] = {
    "epsilon": "GRPO's clipping range clips nothing with one policy iteration per generation (num_iterations=1, "
    "rf's), where the policy ratio is exactly 1",
}
_NOT_YET_SUPPORTED = frozenset(
    {
        "tf32", "logging_strategy", "logging_first_step",
        "save_strategy", "save_steps", "packing", "dataset_text_field", "optim", "report_to", "output_dir",
        "max_prompt_length", "max_completion_length", "truncation_mode", "precompute_ref_log_probs", "loss_weights",
        "f_divergence_type", "use_weighting", "sync_ref_model", "ld_alpha", "rpo_alpha", "disable_dropout",
        "num_iterations", "steps_per_generation", "generation_batch_size", "epsilon_high", "mask_truncated_completions",
    }
)  # fmt: skip
# Spelling slips only: a lower similarity suggests knobs of another meaning.
_TYPO_CUTOFF = 0.8


def _unknown_key(key: Any) -> str:
    text = str(key)
    if text in _WHY_NOT:
        return f"unknown key {key!r}: {_WHY_NOT[text]}"
    if text in _NOT_YET_SUPPORTED:
        return (
            f"unknown key {key!r}: a Hugging Face / TRL training argument that rf does not support yet "
            f"(known keys: {', '.join(KNOBS)})"
        )
    suggestion = _COMMON_ALIASES.get(text.lower())
    if suggestion is None:
        close = difflib.get_close_matches(text, KNOBS, n=1, cutoff=_TYPO_CUTOFF)
        suggestion = close[0] if close else None
    hint = f"did you mean {suggestion!r}?" if suggestion else f"known keys: {', '.join(KNOBS)}"
    return f"unknown key {key!r} ({hint})"


def normalize_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict with every default filled in, in KNOBS order; raises ConfigError listing every problem."""
    problems = validate_config(cfg)
    if problems:
        raise ConfigError(problems)
    # Deep copies, so the normalised config never shares a mutable list (target_modules) with its source.
    return {name: copy.deepcopy(cfg[name]) if name in cfg else spec.default for name, spec in KNOBS.items()}


def validate_config_group(group: Any) -> list[str]:
    """Every problem of a config group: expansion errors, then each config's ("config 2: ..." when several)."""
    try:
        configs = expand_config_group(group)
    except ConfigError as exc:
        return list(exc.problems)
    if not configs:
        return ["the config group expands to no config"]
    if len(configs) == 1:
        return validate_config(configs[0])
    return [f"config {i}: {problem}" for i, cfg in enumerate(configs, start=1) for problem in validate_config(cfg)]


def architecture_mismatch(parent: Mapping[str, Any], clone: Mapping[str, Any]) -> list[str]:
    """Why `clone` cannot warm-start from `parent` (both normalised), one message per field; [] = compatible.

    Warm start copies trainable weights, so their shapes must match: same base model, same adapter-or-full choice,
    and for an adapter the same rank and the same adapted modules (order does not matter).
    """
    fields = ["model_name_or_path", "use_peft"]
    if _get(parent, "use_peft") and _get(clone, "use_peft"):
        fields += ["r", "target_modules"]
    problems = []
    for name in fields:
        parent_value, clone_value = _get(parent, name), _get(clone, name)
        if name == "target_modules":
            same = _module_set(parent_value) == _module_set(clone_value)
        else:
            same = parent_value == clone_value
        if not same:
            problems.append(f"{name} differs: parent {_show(parent_value)}, clone {_show(clone_value)}")
    return problems


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config with the knobs added since it was stored filled in with their defaults (which keep the old
    behaviour), so a run created by an earlier version trains on as it did."""
    return {**{name: copy.deepcopy(spec.default) for name, spec in KNOBS.items()}, **config}


def _get(config: Mapping[str, Any], name: str) -> Any:
    return config.get(name, KNOBS[name].default)


def _module_set(value: Any) -> Any:
    return frozenset(value) if isinstance(value, list | tuple) else value


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A new config: `config` with `overrides` on top (not validated; values may still be tagged knobs)."""
    return {**config, **overrides}


def parse_set_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """CLI `--set k=v` pairs → overrides. A value is JSON when it parses (3e-4, true, ["q_proj"], {"$list": [...]},
    the last left as a dict for parse_tagged), else the raw string; a pair without "=" raises ConfigError.
    """
    overrides: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set expects key=value, got {pair!r}")
            continue
        overrides[key] = _parse_value(raw)
    if problems:
        raise ConfigError(problems)
    return overrides


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _parse_value(raw: str) -> Any:
    try:
        # NaN/Infinity are not JSON proper: keep them as the strings typed, so validation names them plainly.
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw


def _canonical(value: Any) -> str:
    """JSON text in which equal numbers agree (16 and 16.0 are the same learning setting)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(value, list):
        return json.dumps([_canonical(item) for item in value])
    return json.dumps(value, sort_keys=True, default=repr)


def varying_knobs(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose values differ across configs (a missing key counts as its default), KNOBS order, unknown last."""
    unknown = sorted({key for config in configs for key in config if key not in KNOBS}, key=str)
    varying = []
    for key in [*KNOBS, *unknown]:
        default = KNOBS[key].default if key in KNOBS else None
        if any(_differs(config.get(key, default), configs[0].get(key, default)) for config in configs[1:]):
            varying.append(key)
    return varying


_SCALARS = (str, int, float, bool, type(None))


def _differs(value: Any, other: Any) -> bool:
    """`_canonical(value) != _canonical(other)`, without writing JSON for scalars of one type (a snapshot asks this
    of every knob of every run)."""
    if type(value) is type(other) and isinstance(value, _SCALARS):
        return value != other and value == value  # NaN: equal to another NaN here, as in JSON text
    return _canonical(value) != _canonical(other)


def knob_table_markdown() -> str:
    """The KNOBS table as markdown (knob, kind, type/range, default, meaning), for the README."""
    lines = ["| knob | kind | type / range | default | meaning |", "|---|---|---|---|---|"]
    for spec in KNOBS.values():
        if spec.constraint is None:
            allowed = spec.type_text
        elif str in spec.types:
            allowed = spec.constraint.description  # string knobs' descriptions already say what shape they take
        else:
            allowed = f"{spec.type_text}, {spec.constraint.description}"
        cells = [f"`{spec.name}`", spec.kind, allowed, f"`{json.dumps(spec.default)}`", spec.doc]
        # A literal "|" would end the cell early.
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
