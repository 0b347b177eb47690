"""Offline training data: texts and prompt → completion pairs that ship with Python, and their tokenization.

Nothing here downloads. `pydoc_data.topics` (CPython's help topics, PSF licence) is the pretraining text; the
standard library's own docstrings, read with `inspect`, are the supervised fine-tuning set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rf_core.data_forms import CONVERSATIONAL_FORMS, example_form, prompt_and_reference
from rf_core.demo_data import (  # noqa: F401 - the demo's data, here too for code that reads it with the tokenizer
    DEMO_SPLIT_SEED,
    demo_datasets,
    pretraining_texts,
    stdlib_sft_examples,
)

IGNORE_INDEX = -100  # label value the causal-LM loss skips


@dataclass(frozen=True)
class TokenizedData:
    """Tokenized examples kept unpadded (every row's tokens back to back), padded per batch to its longest row, so
    a long `max_length` costs nothing for short rows."""

    tokens: torch.Tensor  # [total tokens] int64
    labels: torch.Tensor  # [total tokens] int64, IGNORE_INDEX where no loss is taken
    offsets: torch.Tensor  # [rows + 1]: row i is tokens[offsets[i]:offsets[i + 1]]
    pad_id: int
    truncated: int = 0  # rows cut to max_length

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def batch(self, indices: list[int], width: int | None = None) -> dict[str, torch.Tensor]:
        """Rows `indices`, right-padded to the longest of them (or to `width`)."""
        index = torch.tensor(indices, dtype=torch.long)
        lengths = (self.offsets[index + 1] - self.offsets[index]).tolist()
        width = width if width is not None else max(max(lengths), 1)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        for row, (index, length) in enumerate(zip(indices, lengths, strict=True)):
            start = int(self.offsets[index])
            input_ids[row, :length] = self.tokens[start : start + length]
            labels[row, :length] = self.labels[start : start + length]
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenize_examples(
    examples: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int,
    *,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
) -> TokenizedData:
    """Tokenize examples of any form `rf_core.data_forms` accepts, each to at most `max_length` tokens.

    A text example is trained on all its tokens; a prompt/completion example only on the completion and the
    end-of-sequence token (prompt labels are -100), unless `completion_only_loss` is False (TRL's SFTConfig: None
    means True for prompt-completion rows). `assistant_only_loss` trains a `messages` row on its assistant turns
    only, as the chat template's `{% generation %}` markers tell them. Conversational examples are first rendered
    with the tokenizer's chat template by TRL's `apply_chat_template` (the prompt with the generation prompt), and
    then tokenized as TRL does: no special tokens added and no end-of-sequence appended, since the template writes
    both. Too-long examples are truncated (and counted in `truncated`), but a prompt never takes more than half of
    `max_length` when that would leave its completion no room, so every example keeps at least one trained token.
    `examples` may be a list, a `datasets.Dataset` or any iterable of such dicts.
    """
    if max_length < 2:
        raise ValueError(f"{max_length=} must be at least 2")
    originals = list(examples)
    rows, rendered = _rendered_rows(originals, tokenizer)
    if assistant_only_loss:
        _check_assistant_only(originals, tokenizer)
    prompt_trained = completion_only_loss is False
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    placed: list[tuple[list[int], list[int]]] = [([], [])] * len(rows)
    truncated = 0

    def place(row: int, context: list[int], target: list[int], cut: bool) -> None:
        nonlocal truncated
        tokens = (context + target)[:max_length]
        trained_from = 0 if prompt_trained else min(len(context), len(tokens))
        placed[row] = (tokens, [IGNORE_INDEX] * trained_from + tokens[trained_from:])
        truncated += cut or len(context) + len(target) > max_length

    def place_assistant_turns(row: int) -> None:
        nonlocal truncated
        encoded = tokenizer.apply_chat_template(
            originals[row]["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(encoded["input_ids"]), encoded["assistant_masks"]
        labels = [token if trained else IGNORE_INDEX for token, trained in zip(ids, mask, strict=True)]
        placed[row] = (ids[:max_length], labels[:max_length])
        truncated += len(ids) > max_length

    # Encode each field of every example in one batched call per group: much faster than one call per example.
    # One token past max_length is kept, to tell a row that fits from one that was cut.
    text_rows, pair_rows = _split_by_form(rows)
    for templated in (False, True):
        special, eos = not templated, [] if templated else eos_ids
        texts = [row for row in text_rows if (row in rendered) == templated]
        if templated and assistant_only_loss:
            for row in texts:
                place_assistant_turns(row)
            texts = []
        encoded = _encode([rows[i]["text"] for i in texts], tokenizer, max_length + 1, special)
        for row, ids in zip(texts, encoded, strict=True):
            place(row, [], ids + eos, False)
        pairs = [row for row in pair_rows if (row in rendered) == templated]
        prompts = _encode([rows[i]["prompt"] for i in pairs], tokenizer, max_length + 1, special)
        completions = _encode([rows[i]["completion"] for i in pairs], tokenizer, max_length + 1, False)
        for row, prompt, completion in zip(pairs, prompts, completions, strict=True):
            target = completion + eos
            prompt_budget = max(max_length // 2, max_length - len(target))
            place(row, prompt[:prompt_budget], target, len(prompt) > prompt_budget)
    lengths = [len(tokens) for tokens, _ in placed]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return TokenizedData(
        tokens=torch.tensor([t for tokens, _ in placed for t in tokens], dtype=torch.long),
        labels=torch.tensor([t for _, labels in placed for t in labels], dtype=torch.long),
        offsets=offsets,
        pad_id=int(pad_id),
        truncated=int(truncated),
    )


def _check_assistant_only(rows: list[Any], tokenizer: Any) -> None:
    from trl.chat_template_utils import has_generation_markers

    for index, row in enumerate(rows):
        form = _form_of(row, index)
        if form not in CONVERSATIONAL_FORMS:
            raise ValueError(
                f"assistant_only_loss=true: example {index} is a {form!r} row; the option needs conversational rows "
                "('messages', or 'prompt' and 'completion' message lists), as TRL's"
            )
    template = getattr(tokenizer, "chat_template", None)
    if template is None or not has_generation_markers(template):
        raise ValueError(
            "assistant_only_loss=true: the tokenizer's chat template has no {% generation %} markers to tell the "
            "assistant's tokens apart; give create_model_fn's tokenizer a template with them, or set "
            "assistant_only_loss=false"
        )


def _rendered_rows(rows: list[Any], tokenizer: Any) -> tuple[list[Any], set[int]]:
    """The rows with every conversational one rendered to strings by the chat template, and which those are."""
    conversational = [index for index, row in enumerate(rows) if _form_of(row, index) in CONVERSATIONAL_FORMS]
    if not conversational:
        return rows, set()
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"example {conversational[0]} is conversational, but the tokenizer has no chat template to render it "
            "with: set `tokenizer.chat_template` in create_model_fn, or give the rows as 'text', or 'prompt' and "
            "'completion', strings"
        )
    from trl.data_utils import apply_chat_template

    rows = list(rows)
    for index in conversational:
        row = rows[index]
        columns = ("messages",) if "messages" in row else ("prompt", "completion")
        rows[index] = apply_chat_template({column: row[column] for column in columns}, tokenizer)
    return rows, set(conversational)


def _split_by_form(rows: list[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    text_rows: list[int] = []
    pair_rows: list[int] = []
    for index, row in enumerate(rows):
        (text_rows if _form_of(row, index) == "text" else pair_rows).append(index)
    return text_rows, pair_rows


def _form_of(row: Any, index: int) -> str:
    try:
        return example_form(row)
    except ValueError as exc:
        raise ValueError(f"example {index} {exc}") from None


def _encode(texts: list[str], tokenizer: Any, max_length: int, add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    # Truncating here only drops tokens that `place` would cut anyway, and keeps long texts cheap.
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)
    return encoded["input_ids"]


@dataclass(frozen=True)
class GenerationSet:
    """Eval examples as generation inputs: each prompt's token ids (unpadded) and the text it should produce."""

    prompts: list[list[int]]
    references: list[str]


def generation_set(examples: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int) -> GenerationSet:
    """The prompt and the reference text of every example, tokenized as training tokenizes prompts.

    A conversational prompt is rendered by TRL's `apply_chat_template` (with the generation prompt) and tokenized
    without added special tokens; a string prompt with them. Long prompts keep their last `max_length` tokens, the
    ones next to what is generated.
    """
    prompts: list[list[int]] = []
    references: list[str] = []
    for index, example in enumerate(examples):
        try:
            prompt, reference = prompt_and_reference(example)
        except ValueError as exc:
            raise ValueError(f"predict_with_generate: eval example {index} {exc}") from None
        templated = isinstance(prompt, list)
        if templated:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(f"eval example {index} is conversational, but the tokenizer has no chat template")
            from trl.data_utils import apply_chat_template

            prompt = apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]
        ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
        prompts.append(list(ids[-max_length:]) or [tokenizer.eos_token_id])
        references.append(reference)
    return GenerationSet(prompts=prompts, references=references)
