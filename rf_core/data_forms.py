"""The forms a training or eval example may take, checked without torch: a fit refuses bad data before any worker
starts, naming the dataset, the row and why.

TRL's dataset formats, with its column names and loss semantics (SFTConfig's defaults):
- language modelling, `{"text": str}`: every token trained;
- prompt-completion, `{"prompt": str, "completion": str}`: only the completion trained (`completion_only_loss`);
- conversational language modelling, `{"messages": [{"role", "content"}, ...]}`: rendered with the tokenizer's chat
  template, every token trained (`assistant_only_loss` false);
- conversational prompt-completion, `{"prompt": [messages], "completion": [messages]}`: rendered with the chat
  template (the prompt with the generation prompt), only the completion trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

ExampleForm = Literal["text", "prompt_completion", "messages", "prompt_completion_messages"]
CONVERSATIONAL_FORMS = frozenset({"messages", "prompt_completion_messages"})
MAX_PROBLEMS_SHOWN = 5
# The role a conversational prompt may end on: a question (TRL then adds the generation prompt) or an assistant turn
# that the completion continues.
PROMPT_LAST_ROLES = ("user", "tool", "assistant")


def example_form(example: Any) -> ExampleForm:
    """Which form `example` has; raises ValueError saying what is wrong with it."""
    if not isinstance(example, Mapping):
        raise ValueError(f"is a {type(example).__name__}, not a mapping of column names to values")
    if isinstance(example.get("text"), str):
        return "text"
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt_completion"
    if "messages" in example:
        _check_messages(example["messages"], "messages")
        return "messages"
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise ValueError("mixes forms: a conversational 'prompt' and 'completion' are both lists of messages")
        _check_messages(prompt, "prompt")
        _check_messages(completion, "completion")
        if prompt[-1]["role"] not in PROMPT_LAST_ROLES:
            raise ValueError(
                f"has a 'prompt' ending on a {prompt[-1]['role']!r} message: it must end on one of "
                f"{', '.join(PROMPT_LAST_ROLES)}"
            )
        return "prompt_completion_messages"
    columns = sorted(map(str, example.keys()))
    raise ValueError(
        f"has columns {columns}: expected a string 'text', string 'prompt' and 'completion' columns, a 'messages' "
        "list, or 'prompt' and 'completion' lists of messages"
    )


def _check_messages(messages: Any, column: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"has a {column!r} that is not a non-empty list of messages")
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"has {column} message {position} without a string 'role'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"has {column} message {position} ({message['role']}) without a string 'content'")


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
