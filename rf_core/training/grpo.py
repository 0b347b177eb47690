"""GRPO's numbers for the engine's loop: advantages from grouped rewards, and the clipped policy loss with its KL
term, as TRL's `GRPOTrainer` (1.x) computes them from completions and their rewards.

A generation batch holds `num_generations` completions per prompt, side by side. Each completion's advantage is its
reward against its group's (TRL's default `multi_objective_aggregation="sum_then_normalize"`: the weighted sum of
the reward functions first), scaled by the group's standard deviation, the batch's, or not at all (`scale_rewards`).
The loss is TRL's for one policy iteration per generation (`num_iterations=1`): the old log-probabilities are the
current ones detached, so the ratio is 1 in value and carries the policy gradient.

`tests/training/test_grpo.py` checks advantages, loss, metrics and gradients against `GRPOTrainer`'s own computation
on fixed completions and rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # TRL's: advantages are divided by std + 1e-4
EPSILON = 0.2  # TRL's clipping range; with one policy iteration per generation the ratio is 1 and it clips nothing


def nanstd(tensor: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than 2 values), as TRL's."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std if dim is None else std.squeeze(dim)


def group_advantages(
    rewards_per_function: torch.Tensor,
    weights: Sequence[float],
    num_generations: int,
    scale_rewards: str,
    function_names: Sequence[str],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages of a generation batch ([completions, functions] rewards, NaN where a function gave None) and the
    reward metrics TRL logs for it."""
    weight = torch.tensor(list(weights), dtype=rewards_per_function.dtype, device=rewards_per_function.device)
    unscorable = torch.isnan(rewards_per_function).all(dim=1)
    rewards = (rewards_per_function * weight.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    metrics: dict[str, float] = {}
    for index, name in enumerate(function_names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_function[:, index]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_function[:, index]).item()
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = nanstd(rewards).item()
    metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    return advantages, metrics


def completion_token_logps(
    logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion token, its log-probability and the distribution's entropy under temperature-scaled logits.

    `logits` are the model's over prompt + completion; the last `completion_ids.shape[1] + 1` positions predict the
    completion (the very last predicts past it and is dropped). Row by row in float32, as TRL's chunked head."""
    width = completion_ids.shape[1]
    logps, entropies = [], []
    for row in range(logits.shape[0]):
        scaled = logits[row, -width - 1 : -1].float() / temperature
        log_probs = torch.log_softmax(scaled, dim=-1)
        logps.append(log_probs.gather(-1, completion_ids[row].unsqueeze(-1)).squeeze(-1))
        entropies.append(-(log_probs.exp() * log_probs).sum(-1).detach())
    return torch.stack(logps), torch.stack(entropies)


def grpo_loss(
    logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    config: Mapping[str, Any],
    *,
    tokens_in_generation_batch: float,
    accumulation: int,
    max_completion_length: int,
    entropies: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's GRPO loss of one micro-batch, scaled as TRL scales it for `accumulation` micro-batches per step (so the
    caller adds the micro-batches' gradients as they are), and the metrics TRL logs for it."""
    loss_type = config["loss_type"] or "dapo"
    epsilon = float(config.get("epsilon", EPSILON))
    beta = float(config["beta"] or 0.0)
    mask = completion_mask.to(logps.dtype)
    coefficient = torch.exp(logps - logps.detach())  # the ratio to the old policy: 1, carrying the gradient
    clipped = torch.clamp(coefficient, 1 - epsilon, 1 + epsilon)
    advantage = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coefficient * advantage, clipped * advantage)
    per_token_kl = None
    if beta != 0.0:
        assert reference_logps is not None
        difference = reference_logps - logps
        per_token_kl = (torch.exp(difference) - difference - 1) * coefficient  # TRL's bias-corrected KL
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / accumulation
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / max(tokens_in_generation_batch, 1.0)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}")

    def masked_mean(values: torch.Tensor) -> float:
        return ((values * mask).sum() / mask.sum().clamp(min=1.0)).item()

    low = (coefficient < 1 - epsilon) & (advantage < 0)
    high = (coefficient > 1 + epsilon) & (advantage > 0)
    metrics = {
        "clip_ratio/low_mean": masked_mean(low.float()),
        "clip_ratio/high_mean": masked_mean(high.float()),
        "clip_ratio/region_mean": masked_mean((low | high).float()),
        "completions/mean_length": mask.sum(-1).mean().item(),
    }
    if per_token_kl is not None:
        metrics["kl"] = masked_mean(per_token_kl.detach())
    if entropies is not None:
        metrics["entropy"] = masked_mean(entropies)
    return loss, metrics


# ------------------------------------------------------------------------------------------ generation and rewards


@dataclass(frozen=True)
class PromptData:
    """GRPO rows: each prompt as given (a string or messages) and tokenized, and the row's other columns, which the
    reward functions receive."""

    prompts: list[Any]
    prompt_ids: list[list[int]]
    columns: list[dict[str, Any]]
    pad_id: int
    truncated: int = 0  # kept for the chunk outcome's count; prompts are never cut

    def __len__(self) -> int:
        return len(self.prompts)


def tokenize_prompts(examples: Iterable[Mapping[str, Any]], tokenizer: Any) -> PromptData:
    """Prompts tokenized as TRL's GRPOTrainer does: messages through the chat template with the generation prompt,
    strings as the tokenizer encodes them (special tokens included)."""
    from trl.data_utils import is_conversational

    prompts, prompt_ids, columns = [], [], []
    for index, example in enumerate(examples):
        prompt = example["prompt"]
        if is_conversational({"prompt": prompt}):
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(f"GRPO example {index} is conversational, but the tokenizer has no chat template")
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
            prompt_ids.append(list(ids["input_ids"]))
        else:
            prompt_ids.append(list(tokenizer(text=prompt)["input_ids"]))
        prompts.append(prompt)
        columns.append({key: value for key, value in example.items() if key not in ("prompt", "completion")})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PromptData(prompts, prompt_ids, columns, int(pad_id))


@dataclass(frozen=True)
class Generation:
    """A generation batch: prompts left-padded and completions right-padded, as TRL lays them out."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]

    def rows(self, selection: slice) -> dict[str, torch.Tensor]:
        completion_ids = self.completion_ids[selection]
        return {
            "input_ids": torch.cat([self.prompt_ids[selection], completion_ids], dim=1),
            "attention_mask": torch.cat([self.prompt_mask[selection], self.completion_mask[selection]], dim=1),
            "completion_ids": completion_ids,
            "completion_mask": self.completion_mask[selection],
        }


def generate_completions(
    model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], config: Mapping[str, Any], device: Any
) -> Generation:
    """Sample one completion per prompt (prompts repeated as the group needs) with the torch RNG as it stands, which
    is the run's: a chunked run samples what a straight-through one does."""
    width = max(len(ids) for ids in prompt_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        prompts[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[row, width - len(ids) :] = 1
    prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(
                input_ids=prompts,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=float(config["temperature"]),
                top_p=float(config["top_p"]),
                top_k=0,
                max_new_tokens=int(config["max_completion_length"]),
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
    completions = output[:, width:]
    # Everything after a completion's first end-of-sequence token is padding (the token itself is trained on).
    is_eos = completions == tokenizer.eos_token_id
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), completions.shape[1])
    positions = torch.arange(completions.shape[1], device=completions.device).unsqueeze(0)
    completion_mask = (positions <= first_eos.unsqueeze(1)).long()
    completions = completions.masked_fill(completion_mask == 0, pad_id)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Generation(prompts, prompt_mask, completions, completion_mask, texts)


def reward_table(
    functions: Sequence[tuple[str, Callable[..., Any]]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[list[int]],
    columns: Sequence[Mapping[str, Any]],
) -> torch.Tensor:
    """[completions, functions] rewards, NaN where a function returned None, as TRL's `_calculate_rewards` calls
    them: `function(prompts=..., completions=..., completion_ids=..., **columns)`, columns as lists."""
    keys = [key for key in (columns[0] if columns else {}) if key != "completion_ids"]
    column_lists = {key: [row.get(key) for row in columns] for key in keys}
    table = torch.zeros((len(completions), len(functions)), dtype=torch.float32)
    for index, (name, function) in enumerate(functions):
        try:
            values = function(
                prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids),
                **column_lists,
            )  # fmt: skip
        except Exception as exc:  # the user's function: the run fails naming it, with the traceback kept
            raise RuntimeError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {name!r} returned {len(values)} values for {len(completions)} completions"
            )
        for row, value in enumerate(values):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"reward function {name!r} returned {value!r}: rewards are numbers or None")
            table[row, index] = float("nan") if value is None else float(value)
    return table
