"""Offline training data: texts and prompt → completion pairs that ship with Python, and their tokenization.

Nothing here downloads. `pydoc_data.topics` (CPython's help topics, PSF licence) is the pretraining text; the
standard library's own docstrings, read with `inspect`, are the supervised fine-tuning set.
"""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rf_core.data_forms import example_form

IGNORE_INDEX = -100  # label value the causal-LM loss skips

DEMO_SPLIT_SEED = 0


def pretraining_texts() -> list[str]:
    """CPython's help topics (79 texts, ~465 k characters), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_sft_examples(limit: int | None = None) -> list[dict[str, str]]:
    """Prompt → completion pairs from standard-library docstrings (see `rf_core.training.stdlib_docs`).

    The pairs are read in a fresh interpreter (`python -I -S`, standard library only), once per process: what
    this process has imported or patched (a library replacing `sys.excepthook`, logging handlers appearing in a
    signature's default) must not change the data set, or two processes of one fit would train on different data.
    """
    examples = _examples_from_a_clean_interpreter()
    return [dict(example) for example in (examples if limit is None else examples[:limit])]


@functools.cache
def _examples_from_a_clean_interpreter() -> tuple[dict[str, str], ...]:
    from rf_core.training import stdlib_docs

    script = Path(stdlib_docs.__file__)
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"reading the standard library's docstrings failed:\n{result.stderr[-2000:]}")
    return tuple(json.loads(result.stdout))


def demo_datasets(eval_size: int = 128) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The demo's (train, eval) split of `stdlib_sft_examples`, shuffled with a fixed seed."""
    examples = stdlib_sft_examples()
    if not 0 < eval_size < len(examples):
        raise ValueError(f"{eval_size=} must be between 1 and {len(examples) - 1}")
    random.Random(DEMO_SPLIT_SEED).shuffle(examples)
    return examples[eval_size:], examples[:eval_size]


@dataclass(frozen=True)
class TokenizedData:
    """Examples padded (right) to one length: three [num_examples, max_length] int64 tensors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows `indices`, cut to the longest of them so short examples don't pay for padding."""
        index = torch.tensor(indices, dtype=torch.long)
        attention_mask = self.attention_mask[index]
        length = max(int(attention_mask.sum(dim=1).max()), 1)
        return {
            "input_ids": self.input_ids[index, :length],
            "attention_mask": attention_mask[:, :length],
            "labels": self.labels[index, :length],
        }


def tokenize_examples(examples: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int) -> TokenizedData:
    """Tokenize examples of the form {"text"} or {"prompt", "completion"} into fixed-length tensors.

    A text example is trained on all its tokens; a prompt/completion example only on the completion and the
    end-of-sequence token (prompt labels are -100). Too-long examples are truncated, but a prompt never takes
    more than half of `max_length` when that would leave its completion no room, so every example keeps at
    least one trained token. `examples` may be a list, a `datasets.Dataset` or any iterable of such dicts.
    """
    if max_length < 2:
        raise ValueError(f"{max_length=} must be at least 2")
    rows = list(examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    # Encode each field of every example in one batched call: much faster than one call per example.
    text_rows, pair_rows = _split_by_form(rows)
    text_ids = _encode([rows[i]["text"] for i in text_rows], tokenizer, max_length, add_special_tokens=True)
    prompt_ids = _encode([rows[i]["prompt"] for i in pair_rows], tokenizer, max_length, add_special_tokens=True)
    completion_ids = _encode(
        [rows[i]["completion"] for i in pair_rows], tokenizer, max_length, add_special_tokens=False
    )

    input_ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.long)

    def place(row: int, context: list[int], target: list[int]) -> None:
        tokens = (context + target)[:max_length]
        trained_from = min(len(context), len(tokens))
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
        labels[row, trained_from : len(tokens)] = input_ids[row, trained_from : len(tokens)]

    for row, ids in zip(text_rows, text_ids, strict=True):
        place(row, [], ids + eos_ids)
    for row, prompt, completion in zip(pair_rows, prompt_ids, completion_ids, strict=True):
        target = completion + eos_ids
        prompt_budget = max(max_length // 2, max_length - len(target))
        place(row, prompt[:prompt_budget], target)
    return TokenizedData(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _split_by_form(rows: list[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    text_rows: list[int] = []
    pair_rows: list[int] = []
    for index, row in enumerate(rows):
        try:
            form = example_form(row)
        except ValueError as exc:
            raise ValueError(f"example {index} {exc}") from None
        (text_rows if form == "text" else pair_rows).append(index)
    return text_rows, pair_rows


def _encode(texts: list[str], tokenizer: Any, max_length: int, *, add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    # Truncating here only drops tokens that `place` would cut anyway, and keeps long texts cheap.
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)
    return encoded["input_ids"]
