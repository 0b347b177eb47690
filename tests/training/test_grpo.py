"""GRPO's numbers against TRL's `GRPOTrainer`: on fixed completions and rewards (its generation replaced by ours),
TRL's own `_generate_and_score_completions` and `_compute_loss` give the advantages, loss, metrics and gradients that
`rf_core.training.grpo` computes. TRL is the reference here only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from peft import LoraConfig

from rf_core.training.grpo import completion_token_logps, group_advantages, grpo_loss
from rf_core.training.models import ensure_pretrained, load_base_model

NUM_GENERATIONS = 4
PROMPTS = ["def add(x, y):", "The sky is"]


def length_reward(completions: list[str], **_: Any) -> list[float]:
    return [float(len(text)) / 10 for text in completions]


def has_digit(completions: list[str], **_: Any) -> list[float | None]:
    # None for one completion: TRL leaves it out of this function's statistics
    return [None if index == 1 else float(any(c.isdigit() for c in text)) for index, text in enumerate(completions)]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    ensure_pretrained("rf-tiny-llama", cache, pretrain_steps=0)
    return cache


def fixed_completions(tokenizer: Any) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Per completion (prompts repeated NUM_GENERATIONS times): prompt ids, completion ids (ending with EOS, or cut
    at the length limit), and the completion's text."""
    texts = ["x + y", " return 42", "??", " blue", " 7 7 7", "", " green and wide", "1"]
    prompt_ids, completion_ids = [], []
    for index, text in enumerate(texts):
        prompt_ids.append(tokenizer(text=PROMPTS[index // NUM_GENERATIONS])["input_ids"])
        ids = tokenizer(text=text, add_special_tokens=False)["input_ids"][:6]
        completion_ids.append(ids + ([tokenizer.eos_token_id] if index % 3 else []))
    return prompt_ids, completion_ids, texts


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"loss_type": "grpo", "beta": 0.04},
        {"loss_type": "bnpo", "scale_rewards": "batch"},
        {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.1},
    ],
    ids=["dapo", "grpo-kl", "bnpo-batch", "dr_grpo-none-kl"],
)
def test_advantages_loss_metrics_and_gradients_equal_trls(settings, model_cache, tmp_path) -> None:
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_base_model("rf-tiny-llama", model_cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arguments = GRPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
        per_device_train_batch_size=len(PROMPTS) * NUM_GENERATIONS, num_generations=NUM_GENERATIONS,
        max_completion_length=8, temperature=0.7, reward_weights=[1.0, 0.5], **settings,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[length_reward, has_digit],
        args=arguments,
        train_dataset=datasets.Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    policy = trainer.model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    prompt_ids, completion_ids, texts = fixed_completions(tokenizer)
    trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, texts, None, {}, None, [])
    trainer.current_gradient_accumulation_steps = 1
    policy.train()
    rows = [{"prompt": prompt} for prompt in PROMPTS for _ in range(NUM_GENERATIONS)]
    scored = trainer._generate_and_score_completions(rows)
    trl_loss = trainer._compute_loss(policy, scored)
    trl_loss.backward()
    trl_gradients = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    policy.zero_grad(set_to_none=True)

    config = {"loss_type": None, "epsilon": 0.2, "beta": None, "scale_rewards": "group", **settings}
    rewards = torch.tensor(
        [[value if value is not None else float("nan") for value in column] for column in
         zip(length_reward(texts), has_digit(texts), strict=True)],
        dtype=torch.float32,
    )  # fmt: skip
    advantages, reward_metrics = group_advantages(
        rewards, [1.0, 0.5], NUM_GENERATIONS, config["scale_rewards"], ["length_reward", "has_digit"]
    )
    assert torch.allclose(advantages, scored["advantages"], rtol=1e-6, atol=1e-7)
    for name, value in reward_metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-7, nan_ok=True), name

    input_ids = torch.cat([scored["prompt_ids"], scored["completion_ids"]], dim=1)
    attention_mask = torch.cat([scored["prompt_mask"], scored["completion_mask"]], dim=1)
    reference = None
    if config["beta"]:
        with torch.no_grad(), policy.disable_adapter():
            reference_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        reference, _ = completion_token_logps(reference_logits, scored["completion_ids"], 0.7)
        mask = scored["completion_mask"].bool()  # TRL's are 0 past a completion's end
        assert torch.allclose(reference[mask], scored["ref_per_token_logps"][mask], rtol=1e-5, atol=1e-6)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    logps, entropies = completion_token_logps(logits, scored["completion_ids"], 0.7)
    loss, metrics = grpo_loss(
        logps, reference, scored["completion_mask"], advantages, config,
        tokens_in_generation_batch=float(scored["num_items_in_batch"]), accumulation=1, max_completion_length=8,
        entropies=entropies,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-9)
    for name, parameter in policy.named_parameters():
        if parameter.grad is None:
            continue
        expected = trl_gradients[name]
        scale = expected.abs().max().clamp(min=1e-12)
        assert ((parameter.grad - expected).abs().max() / scale).item() <= 1e-5, name
    for name in ("clip_ratio/region_mean", "entropy", *(["kl"] if config["beta"] else [])):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-7), name
    assert reward_metrics["reward_std"] > 0 and advantages.abs().sum() > 0  # a real comparison
