"""Offline training data: texts and prompt → completion pairs that ship with Python, and their tokenization.

Nothing here downloads. `pydoc_data.topics` (CPython's help topics, PSF licence) is the pretraining text; the
standard library's own docstrings, read with `inspect`, are the supervised fine-tuning set.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # label value the causal-LM loss skips

# Modules that import quickly with no side effects and document their API well. The order is part of the
# data set's definition: changing it changes which duplicates win and so the examples themselves.
SFT_MODULES = (
    "argparse",
    "array",
    "ast",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "collections.abc",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "email.utils",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "glob",
    "gzip",
    "heapq",
    "html",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "sys",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "traceback",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
)
DEMO_SPLIT_SEED = 0
_MIN_COMPLETION_CHARS = 20
_MAX_COMPLETION_CHARS = 600
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")  # object reprs in signatures differ per process


def pretraining_texts() -> list[str]:
    """CPython's help topics (79 texts, ~465 k characters), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_sft_examples(limit: int | None = None) -> list[dict[str, str]]:
    """Prompt → completion pairs from standard-library docstrings.

    The prompt is a definition line such as ``def json.dumps(obj, *, skipkeys=False, ...):\\n`` and the
    completion is the first paragraph of that object's own docstring. Modules, members and methods are visited
    in a fixed order and duplicated prompts or completions are dropped, so the list is the same in every
    process of the same Python version.
    """
    examples: list[dict[str, str]] = []
    seen_prompts: set[str] = set()
    seen_completions: set[str] = set()
    for module_name in SFT_MODULES:
        for prompt, completion in _module_pairs(module_name):
            if prompt in seen_prompts or completion in seen_completions:
                continue
            seen_prompts.add(prompt)
            seen_completions.add(completion)
            examples.append({"prompt": prompt, "completion": completion})
            if limit is not None and len(examples) >= limit:
                return examples
    return examples


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
        if isinstance(row, Mapping) and isinstance(row.get("text"), str):
            text_rows.append(index)
        elif isinstance(row, Mapping) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            pair_rows.append(index)
        else:
            keys = sorted(map(str, row.keys())) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(
                f"example {index} has keys {keys}: expected a string 'text', or string 'prompt' and 'completion' fields"
            )
    return text_rows, pair_rows


def _encode(texts: list[str], tokenizer: Any, max_length: int, *, add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    # Truncating here only drops tokens that `place` would cut anyway, and keeps long texts cheap.
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)
    return encoded["input_ids"]


def _module_pairs(module_name: str) -> list[tuple[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and names are still fine to document
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return []
        # os.path is posixpath (or ntpath): accept members defined in the module the name points at.
        home_modules = {module_name, module.__name__}
        pairs: list[tuple[str, str]] = []
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or inspect.ismodule(member):
                continue
            if getattr(member, "__module__", None) not in home_modules:
                continue
            if inspect.isclass(member):
                pairs.extend(_definition_pair("class", f"{module_name}.{name}", member))
                for method_name, method in sorted(vars(member).items()):
                    function = getattr(method, "__func__", method)  # unwrap classmethod / staticmethod
                    if method_name.startswith("_") or not inspect.isroutine(function):
                        continue
                    pairs.extend(_definition_pair("def", f"{module_name}.{name}.{method_name}", function))
            elif inspect.isroutine(member):
                pairs.extend(_definition_pair("def", f"{module_name}.{name}", member))
        return pairs


def _definition_pair(keyword: str, qualified_name: str, member: Any) -> Iterable[tuple[str, str]]:
    # The member's own __doc__, not inspect.getdoc: that falls back to inherited docstrings, which repeat.
    doc = member.__doc__ if isinstance(getattr(member, "__doc__", None), str) else None
    if not doc:
        return
    completion = _first_paragraph(inspect.cleandoc(doc), qualified_name.rsplit(".", 1)[-1])
    if completion is None:
        return
    yield f"{keyword} {qualified_name}{_signature(member)}:\n", completion


def _first_paragraph(doc: str, short_name: str) -> str | None:
    paragraphs = [" ".join(part.split()) for part in doc.split("\n\n")]
    paragraphs = [part for part in paragraphs if part]
    # C functions without a text signature start their docstring with one ("dumps(obj) -> str"): skip it.
    if paragraphs and paragraphs[0].startswith(f"{short_name}(") and len(paragraphs) > 1:
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None
    paragraph = paragraphs[0]
    if len(paragraph) < _MIN_COMPLETION_CHARS or paragraph.startswith(f"{short_name}("):
        return None
    if len(paragraph) > _MAX_COMPLETION_CHARS:
        paragraph = paragraph[:_MAX_COMPLETION_CHARS].rsplit(" ", 1)[0] + " ..."
    return paragraph


def _signature(member: Any) -> str:
    try:
        signature = str(inspect.signature(member))
    except (TypeError, ValueError):
        return "(...)"
    return _MEMORY_ADDRESS.sub("", signature)
