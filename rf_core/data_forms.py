"""The forms a training or eval example may take, checked without torch: a fit refuses bad data before any worker
starts, naming the dataset, the row and why.

Forms, with TRL's column names: language modelling, `{"text": str}` (every token trained); prompt-completion,
`{"prompt": str, "completion": str}` (only the completion trained). TRL's conversational forms (a `messages` list,
or `prompt`/`completion` as lists of messages) are recognised and refused with what to do instead, until the
engine renders them with the tokenizer's chat template.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

ExampleForm = Literal["text", "prompt_completion"]
MAX_PROBLEMS_SHOWN = 5


def example_form(example: Any) -> ExampleForm:
    """Which form `example` has; raises ValueError saying what is wrong with it."""
    if not isinstance(example, Mapping):
        raise ValueError(f"is a {type(example).__name__}, not a mapping of column names to values")
    if isinstance(example.get("text"), str):
        return "text"
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt_completion"
    if isinstance(example.get("messages"), list) or isinstance(prompt, list) or isinstance(completion, list):
        raise ValueError(
            "is conversational (lists of messages), which this version does not train on yet: render it into a "
            "'text' string (or 'prompt' and 'completion' strings) with your tokenizer's chat template first"
        )
    columns = sorted(map(str, example.keys()))
    raise ValueError(f"has columns {columns}: expected a string 'text', or string 'prompt' and 'completion' columns")


def dataset_problems(dataset: Iterable[Any], name: str) -> list[str]:
    """Every row of `dataset` that has no form the engine trains on (the first few, and how many in all)."""
    problems: list[str] = []
    bad = 0
    for index, example in enumerate(dataset):
        try:
            example_form(example)
        except ValueError as exc:
            bad += 1
            if len(problems) < MAX_PROBLEMS_SHOWN:
                problems.append(f"{name} row {index} {exc}")
    if bad > len(problems):
        problems.append(f"{name}: {bad - len(problems)} more rows like these")
    return problems


def check_datasets(train_dataset: Iterable[Any], eval_dataset: Iterable[Any]) -> None:
    """Raise ValueError listing the rows of either dataset that cannot be trained or evaluated on."""
    problems = dataset_problems(train_dataset, "train_dataset") + dataset_problems(eval_dataset, "eval_dataset")
    if problems:
        raise ValueError("the data cannot be used as it is:\n  " + "\n  ".join(problems))
