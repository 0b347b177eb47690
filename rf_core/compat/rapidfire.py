"""RapidFire AI's fit API over rf: a RapidFire SFT notebook runs with its import lines changed.

    from rf_core.compat.rapidfire import Experiment
    from rf_core.compat.rapidfire import List, RFGridSearch, RFModelConfig, RFLoraConfig, RFSFTConfig

`RFModelConfig`, `RFLoraConfig`, `RFSFTConfig`, `List`, `Range`, `RFGridSearch`/`RFRandomSearch` and
`Experiment(experiment_name=..., mode="fit").run_fit(config_group, create_model_fn, train, eval, num_chunks, seed)`
take RapidFire's arguments and become an rf config group and an rf fit: the runs train in rf's own loop, in
chunks, steerable from the rf dashboard and CLI. The notebook's `create_model_fn` is called with the model config
RapidFire gives it (`model_config["model_name"]`, `["model_kwargs"]`, `["model_type"]`, `["peft_params"]`,
`["training_args"]`); rf applies LoRA afterwards, as RapidFire does.

Semantics that differ are named, never silent: a training argument with no meaning here is either ignored with the
reason in `IGNORED_TRAINING_ARGS` (logging and saving settings: rf stores every step and checkpoints every chunk)
or refused by name with why (`REFUSED_TRAINING_ARGS`). A `formatting_func` output is merged into the row, as
`datasets.map` does. With a `generation_config`, `compute_metrics(eval_preds)` gets `(predictions, references)` as
texts (rf's `predict_with_generate`); without one, HF's logits and label ids.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rf_core import knobs
from rf_core.config import GENERATION_FIELDS, KNOBS
from rf_core.experiment import Experiment as RFExperiment
from rf_core.knobs import ConfigError

TRAINER_TYPES = ("SFT", "DPO", "GRPO")
LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")
# Training arguments rf takes and drops, with why: they set what HF's Trainer logs or saves, which rf does its way.
IGNORED_TRAINING_ARGS: dict[str, str] = {
    "report_to": "rf stores every metric in its own store, shown on its dashboard and by `rf runs`",
    "logging_strategy": "rf stores the training loss of every step",
    "logging_first_step": "rf stores the training loss of every step",
    "output_dir": "rf keeps each run's checkpoints and exports under RF_HOME",
    "save_strategy": "rf checkpoints every run at every chunk boundary",
    "save_steps": "rf checkpoints every run at every chunk boundary",
    "save_total_limit": "rf keeps the newest chunk checkpoints of each run (keep_checkpoints)",
    "disable_tqdm": "rf shows no progress bars",
    "dataloader_pin_memory": "rf feeds batches itself",
    "tf32": "a CUDA matmul setting for the whole process: set torch.backends.cuda.matmul.allow_tf32 yourself",
    "do_train": "every rf run trains",
    "do_eval": "rf evaluates as eval_strategy says",
}
REFUSED_TRAINING_ARGS: dict[str, str] = {
    "fsdp": "rf trains a run on several devices with DDP or DeepSpeed ZeRO: set num_devices and strategy",
    "fsdp_config": "rf trains a run on several devices with DDP or DeepSpeed ZeRO: set num_devices and strategy",
    "deepspeed": "set strategy='deepspeed' and zero_stage instead",
    "packing": "rf trains unpacked rows, padded per batch",
    "optim": "rf trains with AdamW (torch's)",
    "adam_beta1": "rf's AdamW keeps torch's betas (0.9, 0.999)",
    "adam_beta2": "rf's AdamW keeps torch's betas (0.9, 0.999)",
}
# RFDPOConfig arguments about TRL's reference model, which rf chooses with its ref_model knob instead.
IGNORED_DPO_ARGS: dict[str, str] = {
    "model_adapter_name": "rf trains the run's own adapter",
    "ref_adapter_name": "rf's DPO reference is the base (adapters off) or a warm start's parent: ref_model",
    "force_use_ref_model": "rf's DPO reference is the base (adapters off) or a warm start's parent: ref_model",
    "max_prompt_length": "TRL 1.x cuts prompt + completion at max_length only, and so does rf",
    "max_completion_length": "TRL 1.x cuts prompt + completion at max_length only, and so does rf",
}
# RFGRPOConfig arguments that TRL 1.x no longer has, or that rf decides.
IGNORED_GRPO_ARGS: dict[str, str] = {
    "max_prompt_length": "TRL 1.x generates from the whole prompt, and so does rf",
}
TRAINER_KNOB_VALUES = {"SFT": "sft", "DPO": "dpo", "GRPO": "grpo"}  # RapidFire's trainer_type -> rf's
ARGUMENT_CLASSES = {"SFT": "RFSFTConfig", "DPO": "RFDPOConfig", "GRPO": "RFGRPOConfig"}
RENAMED_TRAINING_ARGS = {"max_seq_length": "max_length", "evaluation_strategy": "eval_strategy"}
# generation_config keys RapidFire reads or passes on that rf decides itself (the tokenizer's pad and eos ids).
ENGINE_GENERATION_KEYS = ("pad_token_id", "eos_token_id", "use_cache", "max_input_length", "add_generation_prompt",
                          "truncation_side")  # fmt: skip


class List:
    """RapidFire's `List(values)`: every value in a grid search, one drawn in a random search."""

    def __init__(self, values: list[Any]) -> None:
        if not isinstance(values, list):
            raise ValueError("List expects a list of values.")
        self.values = values

    def __repr__(self) -> str:
        return f"List({self.values!r})"


class Range:
    """RapidFire's `Range(start, end, dtype=None, log=False)`, drawn in a random search."""

    def __init__(self, start: float, end: float, dtype: str | None = None, log: bool = False, step: Any = None):
        if step is not None:
            raise ConfigError("Range(step=...): rf draws from the whole interval; leave step out")
        if dtype not in (None, "int", "float"):
            raise ConfigError(f"Range dtype must be 'int' or 'float', got {dtype!r}")
        self.start, self.end, self.log = start, end, log
        self.dtype = dtype or ("int" if isinstance(start, int) and isinstance(end, int) else "float")

    def as_rf(self) -> knobs.Range:
        cast = int if self.dtype == "int" else float
        return knobs.Range(cast(self.start), cast(self.end), log=self.log)


class _Arguments:
    """A RapidFire config of keyword arguments (RFLoraConfig, RFSFTConfig): kept as given, `List`s and all."""

    def __init__(self, **kwargs: Any) -> None:
        self._user_params = copy.deepcopy(kwargs)

    def __getattr__(self, name: str) -> Any:
        params = self.__dict__.get("_user_params", {})
        if name in params:
            return params[name]
        raise AttributeError(name)

    def copy(self) -> _Arguments:
        return type(self)(**self._user_params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._user_params.items())})"


class RFLoraConfig(_Arguments):
    """PEFT's LoraConfig arguments (r, lora_alpha, lora_dropout, target_modules, bias, task_type)."""


class RFSFTConfig(_Arguments):
    """TRL's SFTConfig arguments."""


class RFDPOConfig(_Arguments):
    """TRL's DPOConfig arguments (beta, loss_type, label_smoothing, ... and the training arguments)."""


class RFGRPOConfig(_Arguments):
    """TRL's GRPOConfig arguments (num_generations, max_completion_length, beta, ... and the training arguments)."""


@dataclass
class RFModelConfig:
    model_name: str | None = None
    tokenizer: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    formatting_func: Callable[..., Any] | List | None = None
    compute_metrics: Callable[..., Any] | List | None = None
    peft_config: RFLoraConfig | List | list[RFLoraConfig] | None = None
    training_args: RFSFTConfig | RFDPOConfig | RFGRPOConfig | None = None
    model_type: str | None = "causal_lm"
    model_kwargs: dict[str, Any] | None = None
    ref_model_name: str | None = None
    ref_model_type: str | None = None
    ref_model_kwargs: dict[str, Any] | None = None
    reward_funcs: Any = None
    generation_config: dict[str, Any] | None = None
    num_gpus: int | None = None

    def copy(self) -> RFModelConfig:
        return copy.deepcopy(self)


class RFGridSearch:
    """Every combination of the `List`s in each model config (RapidFire's grid search)."""

    def __init__(
        self, configs: Any = None, create_model_fn: Any = None, trainer_type: str | None = None, num_runs: int = 1
    ) -> None:
        self.trainer_type = (trainer_type or "").upper() or None
        if self.trainer_type not in TRAINER_TYPES:
            raise ConfigError(f"trainer_type must be one of {', '.join(TRAINER_TYPES)} for a fit, got {trainer_type!r}")
        self.configs = _model_configs(configs)
        self.num_runs = num_runs
        self.create_model_fn = create_model_fn

    def rf_config_group(self, seed: int) -> tuple[Any, dict[str, Callable[..., Any]]]:
        """The rf config group these configs stand for, and the functions it names."""
        namer = _FunctionNamer()
        bases = [base for config in self.configs for base in _rf_bases(config, namer, self.trainer_type or "SFT")]
        return knobs.GridSearch(bases), namer.functions


class RFRandomSearch(RFGridSearch):
    """`num_runs` configs drawing each `List` and `Range` (RapidFire's random search)."""

    def rf_config_group(self, seed: int) -> tuple[Any, dict[str, Callable[..., Any]]]:
        namer = _FunctionNamer()
        bases = [base for config in self.configs for base in _rf_bases(config, namer, self.trainer_type or "SFT")]
        return knobs.RandomSearch(bases, num_runs=self.num_runs, seed=seed), namer.functions


class Experiment:
    """RapidFire's `Experiment(experiment_name, mode="fit")`; `run_fit` trains through rf's fit flow."""

    def __init__(
        self,
        experiment_name: str,
        mode: str = "evals",
        experiment_path: str | None = None,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
    ) -> None:
        if mode not in ("fit", "evals"):
            raise ValueError(f"mode must be 'fit' or 'evals', got {mode!r}")
        self.experiment_name = experiment_name
        self.mode = mode
        self.num_cpus = num_cpus
        self._rf = RFExperiment(experiment_name)
        self.snapshot: dict[str, Any] | None = None

    def run_fit(
        self,
        param_config: Any,
        create_model_fn: Callable[[dict[str, Any]], tuple[Any, Any]],
        train_dataset: Any,
        eval_dataset: Any,
        num_chunks: int,
        seed: int = 42,
        num_gpus: int = 1,
        monte_carlo_simulations: int = 1000,
        **rf_options: Any,
    ) -> None:
        """Train the config group; `rf_options` go to rf's `run_fit` (policies, cpu_slots, metric, mode...)."""
        if self.mode != "fit":
            raise ValueError(f"run_fit needs Experiment(..., mode='fit'); this one has mode={self.mode!r}")
        if not isinstance(param_config, RFGridSearch):
            param_config = RFGridSearch(param_config, trainer_type="SFT")
        config_group, functions = param_config.rf_config_group(seed)
        self.snapshot = self._rf.run_fit(
            config_group,
            RapidFireModelFactory(create_model_fn),
            train_dataset,
            eval_dataset,
            num_chunks=num_chunks,
            seed=seed,
            functions=functions,
            **rf_options,
        )

    def get_results(self) -> Any:
        """RapidFire's results table: one row per (run_id, step), a column per metric (a pandas DataFrame)."""
        points = self._rf.metrics()
        wide = points.pivot_table(index=["run_id", "step"], columns="name", values="value", aggfunc="last")
        return wide.reset_index().rename_axis(columns=None)

    def get_runs_info(self) -> Any:
        """One row per run: id, status, and its config (a pandas DataFrame)."""
        import pandas as pd

        runs = (self.snapshot or {}).get("runs", [])
        return pd.DataFrame(
            [{"run_id": run["run_id"], "status": run["status"], "config": run["config"]} for run in runs]
        )

    def end(self) -> None:
        """Nothing to shut down: rf's fit ends when its runs do."""


class RapidFireModelFactory:
    """rf's `create_model_fn` around a RapidFire one: calls it with the model config RapidFire would give it."""

    def __init__(self, create_model_fn: Callable[[dict[str, Any]], tuple[Any, Any]]) -> None:
        self.create_model_fn = create_model_fn

    def __call__(self, config: dict[str, Any]) -> tuple[Any, Any]:
        model_kwargs = {key: value for key, value in (config.get("model_kwargs") or {}).items()}
        model_kwargs.pop("device_map", None)  # rf puts the base on its slot's device, as RapidFire does
        model_config = {
            "trainer_type": config["trainer_type"].upper(),
            "model_name": config["model_name_or_path"],
            "tokenizer": None,
            "tokenizer_kwargs": None,
            "model_type": "causal_lm",
            "model_kwargs": model_kwargs,
            "peft_params": {key: config[key] for key in LORA_KEYS} if config["use_peft"] else {},
            "training_args": {key: value for key, value in config.items() if KNOBS[key].kind in ("training", "eval")},
            "additional_kwargs": {
                "formatting_func": config.get("formatting_func"),
                "compute_metrics": config.get("compute_metrics"),
                "generation_config": config.get("generation_config"),
            },
        }
        return self.create_model_fn(model_config)


class _FunctionNamer:
    """Names for the functions in RapidFire configs (a formatter may be a callable object, which has no name)."""

    def __init__(self) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}
        self._names: list[tuple[Callable[..., Any], bool, str]] = []  # (the user's function, formats rows, name)

    def name(self, function: Callable[..., Any], formats_rows: bool) -> str:
        for known, formats, name in self._names:
            if known is function and formats == formats_rows:
                return name
        own = getattr(function, "__name__", None)
        base = own if isinstance(own, str) and own.isidentifier() else type(function).__name__
        name, suffix = base, 2
        while name in self.functions:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self.functions[name] = _FormattedRow(function) if formats_rows else function
        self._names.append((function, formats_rows, name))
        return name


def _model_configs(configs: Any) -> list[RFModelConfig]:
    items = configs.values if isinstance(configs, List) else configs
    items = list(items) if isinstance(items, list | tuple) else [items]
    for item in items:
        if not isinstance(item, RFModelConfig):
            raise ConfigError(f"a fit's configs must be RFModelConfig objects, got {type(item).__name__}")
    return items


def _rf_bases(config: RFModelConfig, namer: _FunctionNamer, trainer_type: str) -> list[dict[str, Any]]:
    """The rf base configs (with rf `List`s and `Range`s) of one RFModelConfig: one per LoRA config."""
    problems = _unsupported_fields(config)
    training = _training_knobs(config.training_args, problems, trainer_type)
    model: dict[str, Any] = {"model_name_or_path": config.model_name}
    if trainer_type != "SFT":
        model["trainer_type"] = TRAINER_KNOB_VALUES[trainer_type]
    if config.reward_funcs is not None:
        if trainer_type != "GRPO":
            problems.append(f"RFModelConfig reward_funcs: only trainer_type 'GRPO' runs use them, not {trainer_type!r}")
        functions = config.reward_funcs if isinstance(config.reward_funcs, list | tuple) else [config.reward_funcs]
        model["reward_funcs"] = [namer.name(function, formats_rows=False) for function in functions]
    if config.model_kwargs:
        model["model_kwargs"] = {key: value for key, value in config.model_kwargs.items()}
    evaluation = _evaluation_knobs(config, namer, problems)
    peft_options = _peft_options(config.peft_config)
    bases = []
    for lora in peft_options:
        adapter = {"use_peft": False} if lora is None else _lora_knobs(lora, problems)
        bases.append({**model, **adapter, **training, **evaluation})
    if problems:
        raise ConfigError(problems)
    return bases


def _unsupported_fields(config: RFModelConfig) -> list[str]:
    why = {
        "tokenizer": "load the tokenizer in create_model_fn",
        "tokenizer_kwargs": "load the tokenizer in create_model_fn",
        "ref_model_name": "rf's DPO reference is the base (adapters off) or a warm start's parent: set ref_model",
        "ref_model_kwargs": "rf's DPO reference is the base (adapters off) or a warm start's parent: set ref_model",
        "num_gpus": "set num_devices (and strategy) in the training arguments' place: rf's multi-device runs",
    }
    problems = [
        f"RFModelConfig {name}={getattr(config, name)!r}: not supported here ({reason})"
        for name, reason in why.items()
        if getattr(config, name) is not None
    ]
    if config.model_type not in (None, "causal_lm"):
        problems.append(f"RFModelConfig model_type={config.model_type!r}: rf trains causal language models only")
    if config.model_name is None:
        problems.append("RFModelConfig model_name is required")
    return problems


def _training_knobs(arguments: Any, problems: list[str], trainer_type: str = "SFT") -> dict[str, Any]:
    if arguments is None:
        return {}
    expected = ARGUMENT_CLASSES[trainer_type]
    if type(arguments).__name__ != expected:
        problems.append(
            f"training_args must be an {expected} for trainer_type {trainer_type!r}, got {type(arguments).__name__}"
        )
        return {}
    knobs_set: dict[str, Any] = {}
    for key, value in arguments._user_params.items():
        ignored = IGNORED_DPO_ARGS if trainer_type == "DPO" else IGNORED_GRPO_ARGS if trainer_type == "GRPO" else {}
        if key in IGNORED_TRAINING_ARGS or key in ignored:
            continue
        if key in REFUSED_TRAINING_ARGS:
            problems.append(f"{expected} {key}={value!r}: {REFUSED_TRAINING_ARGS[key]}")
            continue
        knobs_set[RENAMED_TRAINING_ARGS.get(key, key)] = _rf_value(value)
    return knobs_set


def _evaluation_knobs(config: RFModelConfig, namer: _FunctionNamer, problems: list[str]) -> dict[str, Any]:
    knobs_set: dict[str, Any] = {}
    for knob in ("formatting_func", "compute_metrics"):
        value = getattr(config, knob)
        if value is None:
            continue
        functions = value.values if isinstance(value, List) else [value]
        # A string is a name rf knows already: a built-in metric ("rougeL", in place of evaluate.load("rouge")).
        named = [
            function if isinstance(function, str) else namer.name(function, formats_rows=knob == "formatting_func")
            for function in functions
        ]
        knobs_set[knob] = knobs.List(named) if isinstance(value, List) else named[0]
    generation = config.generation_config
    if generation is not None:
        unknown = [key for key in generation if key not in GENERATION_FIELDS and key not in ENGINE_GENERATION_KEYS]
        if unknown:
            problems.append(
                f"generation_config keys {unknown}: not generation settings rf passes on (known: "
                f"{', '.join(GENERATION_FIELDS)})"
            )
        knobs_set["generation_config"] = {k: v for k, v in generation.items() if k in GENERATION_FIELDS}
        if config.compute_metrics is not None:
            knobs_set["predict_with_generate"] = True  # RapidFire generates for compute_metrics exactly then
    return knobs_set


class _FormattedRow:
    """A RapidFire formatting function, whose columns are added to the row (as `datasets.map` does)."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = function

    def __call__(self, row: Mapping[str, Any]) -> Any:
        output = self.function(row)
        return {**row, **output} if isinstance(output, Mapping) else output


def _peft_options(peft_config: Any) -> list[RFLoraConfig | None]:
    if peft_config is None:
        return [None]
    if isinstance(peft_config, List):
        return list(peft_config.values)
    if isinstance(peft_config, list | tuple):
        return list(peft_config)
    return [peft_config]


def _lora_knobs(lora: Any, problems: list[str]) -> dict[str, Any]:
    if not isinstance(lora, RFLoraConfig):
        problems.append(f"peft_config must be RFLoraConfig objects, got {type(lora).__name__}")
        return {}
    knobs_set: dict[str, Any] = {"use_peft": True}
    for key, value in lora._user_params.items():
        if key not in LORA_KEYS:
            problems.append(f"RFLoraConfig {key}={value!r}: rf sets only {', '.join(LORA_KEYS)} of PEFT's LoraConfig")
            continue
        knobs_set[key] = _rf_value(value)
    return knobs_set


def _rf_value(value: Any) -> Any:
    if isinstance(value, List):
        return knobs.List([_rf_value(item) for item in value.values])
    if isinstance(value, Range):
        return value.as_rf()
    return value


def rf_configs(config_group: RFGridSearch, seed: int = 42) -> list[dict[str, Any]]:
    """The plain rf configs a RapidFire config group stands for (functions by name), validated; to inspect."""
    from rf_core.config import validate_config
    from rf_core.functions import named_configs

    group, functions = config_group.rf_config_group(seed)
    configs = named_configs(group, functions)[0]
    problems = [f"config {i}: {problem}" for i, config in enumerate(configs, 1) for problem in validate_config(config)]
    if problems:
        raise ConfigError(problems)
    return configs


__all__ = [
    "Experiment", "List", "RFDPOConfig", "RFGRPOConfig", "RFGridSearch", "RFLoraConfig", "RFModelConfig",
    "RFRandomSearch", "RFSFTConfig", "Range", "rf_configs",
]  # fmt: skip
