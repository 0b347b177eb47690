"""Preference optimisation inside the engine's loop: TRL's preference rows tokenized as TRL's `DPOTrainer` does, and
its loss, rewards and metrics, computed from a policy forward and a reference forward.

The numbers are TRL's (`trl.trainer.dpo_trainer`, 1.x): the tests compare loss, rewards and gradients with
`DPOTrainer`'s own computation on the same model and batch. What the trainer does around them (chunking, swaps, the
reference model) is the engine's.

One deliberate difference: TRL drops a row whose prompt alone fills `max_length`; here the prompt keeps its last
`max_length // 2` tokens (counted as truncated), so a run's step count never depends on its tokenizer and the
chunk plan made without one holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class PreferenceData:
    """Tokenized preference rows: each row's prompt, chosen and rejected completion ids, unpadded."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    pad_id: int
    max_length: int
    truncated: int = 0  # rows with a prompt or a completion cut to fit max_length

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """TRL's `DataCollatorForPreference`: the chosen sequences, then the rejected ones (prompt + completion, cut
        to max_length keeping the start), right-padded; `completion_mask` marks the completion tokens."""
        sequences: list[list[int]] = []
        masks: list[list[int]] = []
        for completions in (self.chosen, self.rejected):
            for index in indices:
                prompt, completion = self.prompts[index], completions[index]
                sequences.append((prompt + completion)[: self.max_length])
                masks.append(([0] * len(prompt) + [1] * len(completion))[: self.max_length])
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (sequence, mask) in enumerate(zip(sequences, masks, strict=True)):
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, : len(sequence)] = 1
            completion_mask[row, : len(mask)] = torch.tensor(mask, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def tokenize_preferences(examples: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int) -> PreferenceData:
    """Tokenize preference rows as TRL's DPOTrainer prepares them.

    An implicit prompt is extracted (`maybe_extract_prompt`); a string row gets the end-of-sequence text appended to
    its completions; prompt, prompt + chosen and prompt + rejected are tokenized (conversational rows through the
    chat template, the prompt with the generation prompt), and the completion starts where they diverge.
    """
    from trl.data_utils import is_conversational, maybe_extract_prompt

    if max_length < 2:
        raise ValueError(f"{max_length=} must be at least 2")
    prompts: list[list[int]] = []
    chosen: list[list[int]] = []
    rejected: list[list[int]] = []
    truncated = 0
    for index, original in enumerate(examples):
        example = maybe_extract_prompt(dict(original))
        if is_conversational(example):
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(
                    f"preference example {index} is conversational, but the tokenizer has no chat template to render "
                    "it with: set `tokenizer.chat_template` in create_model_fn"
                )
            prompt_ids = _chat_ids(tokenizer, example["prompt"], add_generation_prompt=True)
            chosen_ids = _chat_ids(tokenizer, example["prompt"] + example["chosen"])
            rejected_ids = _chat_ids(tokenizer, example["prompt"] + example["rejected"])
        else:
            eos = tokenizer.eos_token or ""
            prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
            chosen_ids = tokenizer(text=example["prompt"] + _with_suffix(example["chosen"], eos))["input_ids"]
            rejected_ids = tokenizer(text=example["prompt"] + _with_suffix(example["rejected"], eos))["input_ids"]
        prompt_length = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))
        prompt = list(prompt_ids[:prompt_length])
        completions = (list(chosen_ids[prompt_length:]), list(rejected_ids[prompt_length:]))
        if len(prompt) >= max_length:
            prompt = prompt[-(max_length // 2) :]
        truncated += (
            any(len(prompt) + len(completion) > max_length for completion in completions) or len(prompt) < prompt_length
        )
        prompts.append(prompt)
        chosen.append(completions[0])
        rejected.append(completions[1])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return PreferenceData(prompts, chosen, rejected, int(pad_id), int(max_length), int(truncated))


def _chat_ids(tokenizer: Any, messages: list[Any], add_generation_prompt: bool = False) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(rendered["input_ids"])


def _with_suffix(text: str, suffix: str) -> str:
    return text if text.endswith(suffix) else text + suffix


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of the log-probabilities of its completion tokens (in float32).

    Row by row, so the float32 log-softmax never holds more than one sequence's logits."""
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    rows = []
    for row in range(logits.shape[0]):
        log_probs = torch.log_softmax(logits[row, :-1].float(), dim=-1)
        per_token = log_probs.gather(-1, labels[row].unsqueeze(-1)).squeeze(-1)
        rows.append(torch.where(mask[row], per_token, torch.zeros_like(per_token)).sum())
    return torch.stack(rows)


def dpo_loss(
    logps: torch.Tensor,
    reference_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    config: Mapping[str, Any],
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's DPO loss of a batch (chosen rows first, then rejected), and the metrics TRL logs for it."""
    from rf_core.config import DEFAULT_DPO_BETA

    beta = float(config["beta"] if config["beta"] is not None else DEFAULT_DPO_BETA)
    loss_type = config["loss_type"] or "sigmoid"
    label_smoothing = float(config["label_smoothing"])
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    reference_chosen, reference_rejected = reference_logps.chunk(2, dim=0)
    chosen_logratios = chosen_logps - reference_chosen
    rejected_logratios = rejected_logps - reference_rejected
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        # Length-normalised, as TRL (confirmed with the IPO authors, says its comment).
        chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
        chosen_average = chosen_logratios / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_average = rejected_logratios / rejected_mask.sum(dim=1).clamp(min=1.0)
        per_pair = (chosen_average - rejected_average - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        per_pair = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    loss = per_pair.mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
    }
    return loss, metrics
