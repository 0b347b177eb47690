"""RapidFire AI's config objects become rf config groups: names mapped, Lists expanded, unmeaning knobs named."""

from __future__ import annotations

from typing import Any

import pytest

from rf_core.compat.rapidfire import (
    Experiment,
    List,
    Range,
    RapidFireModelFactory,
    RFDPOConfig,
    RFGridSearch,
    RFGRPOConfig,
    RFLoraConfig,
    RFModelConfig,
    RFRandomSearch,
    RFSFTConfig,
    rf_configs,
)
from rf_core.config import normalize_config
from rf_core.knobs import ConfigError


class ChatFormatter:  # a callable object, as in RapidFire's cybersecurity notebook: it has no __name__
    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": row["instruction"]}],
                "completion": [{"role": "assistant", "content": row["response"]}]}  # fmt: skip


def qa_format(row: dict[str, Any]) -> dict[str, str]:
    return {"text": f"Question: {row['instruction']}\nAnswer: {row['response']}"}


def compute_metrics(eval_preds: Any) -> dict[str, float]:
    predictions, labels = eval_preds
    return {"n": float(len(predictions))}


def model_config(**changes: Any) -> RFModelConfig:
    fields: dict[str, Any] = {
        "model_name": "rf-tiny-llama",
        "peft_config": List([
            RFLoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                         task_type="CAUSAL_LM"),
            RFLoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "k_proj"], bias="none"),
        ]),
        "training_args": RFSFTConfig(
            learning_rate=2e-4, lr_scheduler_type="linear", per_device_train_batch_size=2,
            gradient_accumulation_steps=4, max_steps=100, logging_steps=1, eval_strategy="steps", eval_steps=10,
            fp16=False, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            report_to="none", num_train_epochs=10,
        ),
        "model_type": "causal_lm",
        "model_kwargs": {"device_map": "auto", "torch_dtype": "auto", "use_cache": False},
        "formatting_func": List([ChatFormatter(), qa_format]),
        "compute_metrics": compute_metrics,
        "generation_config": {"max_new_tokens": 256, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1,
                              "pad_token_id": 0, "eos_token_id": 1},
    }  # fmt: skip
    return RFModelConfig(**{**fields, **changes})


def test_a_notebooks_config_group_becomes_rf_configs_knob_for_knob() -> None:
    configs = rf_configs(RFGridSearch(configs=List([model_config()]), trainer_type="SFT"))
    assert len(configs) == 4  # two LoRA configs x two formatters
    first = normalize_config(configs[0])  # every one is a valid rf config
    assert first["model_name_or_path"] == "rf-tiny-llama" and first["r"] == 8 and first["target_modules"] == [
        "q_proj", "v_proj"]  # fmt: skip
    assert (first["max_steps"], first["num_train_epochs"], first["eval_strategy"], first["eval_steps"]) == (
        100, 10, "steps", 10)  # fmt: skip
    assert first["gradient_checkpointing"] and first["predict_with_generate"]
    assert first["generation_config"] == {
        "max_new_tokens": 256,
        "temperature": 0.6,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
    }  # the engine uses the tokenizer's ids
    assert first["model_kwargs"] == {"device_map": "auto", "torch_dtype": "auto", "use_cache": False}
    assert [c["formatting_func"] for c in configs] == ["ChatFormatter", "qa_format"] * 2
    assert {c["compute_metrics"] for c in configs} == {"compute_metrics"}
    assert [c["r"] for c in configs] == [8, 8, 32, 32]


def test_nested_lists_and_ranges_expand_as_rapidfire_does() -> None:
    lora = RFLoraConfig(r=List([8, 32]), lora_alpha=16, target_modules=List([["q_proj"], ["q_proj", "v_proj"]]))
    config = RFModelConfig(model_name="rf-tiny-llama", peft_config=lora,
                           training_args=RFSFTConfig(learning_rate=List([1e-3, 1e-4])))  # fmt: skip
    configs = rf_configs(RFGridSearch(config, trainer_type="sft"))
    assert len(configs) == 8
    drawn = rf_configs(RFRandomSearch(
        RFModelConfig(model_name="rf-tiny-llama", training_args=RFSFTConfig(learning_rate=Range(1e-5, 1e-3, log=True))),
        trainer_type="SFT", num_runs=3))  # fmt: skip
    assert len(drawn) == 3 and all(1e-5 <= c["learning_rate"] <= 1e-3 for c in drawn) and not drawn[0]["use_peft"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"training_args": RFSFTConfig(fsdp="full_shard")}, "RFSFTConfig fsdp='full_shard': rf trains a run on"),
        ({"peft_config": RFLoraConfig(r=8, use_rslora=True)}, "RFLoraConfig use_rslora=True: rf sets only r,"),
        ({"model_type": "seq2seq_lm"}, "model_type='seq2seq_lm': rf trains causal language models only"),
        ({"generation_config": {"num_return_sequences": 2}}, "generation_config keys ['num_return_sequences']"),
        (
            {"training_args": RFSFTConfig(gradient_checkpointing_kwargs={"use_reentrant": True})},
            'gradient_checkpointing_kwargs={"use_reentrant": true}: must be {"use_reentrant": false} or null',
        ),
    ],
)
def test_what_has_no_meaning_here_is_refused_by_name(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as refused:
        rf_configs(RFGridSearch(model_config(**changes), trainer_type="SFT"))
    assert expected in str(refused.value)


def test_other_trainers_and_modes_are_refused_with_why() -> None:
    with pytest.raises(ConfigError, match="trainer_type must be one of SFT, DPO, GRPO for a fit, got 'PPO'"):
        RFGridSearch(model_config(), trainer_type="PPO")
    with pytest.raises(ConfigError, match="training_args must be an RFDPOConfig for trainer_type 'DPO'"):
        rf_configs(RFGridSearch(model_config(), trainer_type="DPO"))
    with pytest.raises(ValueError, match="run_fit needs Experiment"):
        Experiment(experiment_name="evals-only").run_fit(None, None, [], [], num_chunks=1)


def test_create_model_fn_gets_the_model_config_rapidfire_gives_it() -> None:
    seen: list[dict[str, Any]] = []

    def create_model(model_config: dict[str, Any]) -> tuple[str, str]:
        seen.append(model_config)
        return "model", "tokenizer"

    config = normalize_config(rf_configs(RFGridSearch(model_config(), trainer_type="SFT"))[0])
    assert RapidFireModelFactory(create_model)(config) == ("model", "tokenizer")
    (given,) = seen
    assert given["model_name"] == "rf-tiny-llama" and given["model_type"] == "causal_lm"
    assert given["model_kwargs"] == {"torch_dtype": "auto", "use_cache": False}  # rf places the model itself
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert given["peft_params"] == {**lora, "bias": "none", "task_type": "CAUSAL_LM"}
    assert given["training_args"]["learning_rate"] == 2e-4


def test_rapidfires_dpo_notebook_config_becomes_dpo_runs() -> None:
    """RapidFire's DPO tutorial (rf-tutorial-dpo-alignment-lite), its adapter-naming and length arguments included."""
    dpo = RFDPOConfig(
        model_adapter_name="default", ref_adapter_name="reference", force_use_ref_model=False,
        loss_type="robust", beta=0.1, label_smoothing=0.1, max_prompt_length=512, max_completion_length=512,
        max_length=1024, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-4,
        warmup_ratio=0.1, weight_decay=0, lr_scheduler_type="linear", num_train_epochs=1, bf16=True,
        save_strategy="epoch", logging_strategy="steps", logging_steps=1,
    )  # fmt: skip
    lora = RFLoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, lora_dropout=0.1, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    config = RFModelConfig(model_name="rf-tiny-llama", ref_model_name=None, peft_config=lora, training_args=dpo,
                           model_kwargs={"device_map": "auto", "torch_dtype": "bfloat16"})  # fmt: skip
    [rf_config] = rf_configs(RFGridSearch(configs=List([config]), trainer_type="DPO"))
    normalised = normalize_config(rf_config)
    assert normalised["trainer_type"] == "dpo" and normalised["loss_type"] == "robust"
    assert (normalised["beta"], normalised["label_smoothing"], normalised["max_length"]) == (0.1, 0.1, 1024)
    assert normalised["r"] == 16 and normalised["bf16"] and normalised["ref_model"] == "parent"
    seen: list[dict[str, Any]] = []
    RapidFireModelFactory(lambda model_config: seen.append(model_config) or ("model", "tokenizer"))(normalised)
    assert seen[0]["trainer_type"] == "DPO"
    with pytest.raises(ConfigError, match="ref_model_name='other': not supported here"):
        rf_configs(RFGridSearch(RFModelConfig(model_name="rf-tiny-llama", ref_model_name="other", training_args=dpo),
                                trainer_type="DPO"))  # fmt: skip


def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    return [2.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer, strict=True)]


def int_reward_func(completions, **kwargs) -> list[float]:
    return [0.5 if completion[0]["content"].strip().isdigit() else 0.0 for completion in completions]


def test_rapidfires_grpo_notebook_config_becomes_grpo_runs() -> None:
    """RapidFire's GRPO tutorial (rf-tutorial-grpo-mathreasoning-lite): reward functions on the model config."""
    grpo = RFGRPOConfig(
        learning_rate=5e-6, warmup_ratio=0.1, weight_decay=0.1, max_grad_norm=0.1, lr_scheduler_type="linear",
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=8, num_train_epochs=1,
        max_prompt_length=256, max_completion_length=256, logging_steps=2, beta=0.0,
    )  # fmt: skip
    lora = RFLoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none")
    config = RFModelConfig(model_name="rf-tiny-llama", peft_config=lora, training_args=grpo,
                           reward_funcs=[correctness_reward_func, int_reward_func])  # fmt: skip
    group = RFGridSearch(configs=List([config]), trainer_type="GRPO")
    config_group, functions = group.rf_config_group(seed=42)
    [rf_config] = config_group.configs()
    normalised = normalize_config(rf_config)
    assert normalised["trainer_type"] == "grpo" and normalised["num_generations"] == 8
    assert normalised["reward_funcs"] == ["correctness_reward_func", "int_reward_func"]
    assert functions["int_reward_func"] is int_reward_func
    assert (normalised["max_completion_length"], normalised["beta"]) == (256, 0.0)
    with pytest.raises(ConfigError, match="adam_beta2=0.99: rf's AdamW keeps torch's betas"):
        rf_configs(RFGridSearch(RFModelConfig(model_name="m", training_args=RFGRPOConfig(adam_beta2=0.99),
                                              reward_funcs=[int_reward_func]), trainer_type="GRPO"))  # fmt: skip
    with pytest.raises(ConfigError, match="reward_funcs: only trainer_type 'GRPO' runs use them"):
        rf_configs(RFGridSearch(model_config(reward_funcs=[int_reward_func]), trainer_type="SFT"))
