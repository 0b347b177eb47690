"""The forms a training or eval example may take, checked without torch: a fit refuses bad data before any worker
starts, naming the dataset, the row and why.

TRL's dataset formats, with its column names and loss semantics (SFTConfig's defaults):
- language modelling, `{"text": str}`: every token trained;
- prompt-completion, `{"prompt": str, "completion": str}`: only the completion trained (`completion_only_loss`);
- conversational language modelling, `{"messages": [{"role", "content"}, ...]}`: rendered with the tokenizer's chat
  template, every token trained (`assistant_only_loss` false);
- conversational prompt-completion, `{"prompt": [messages], "completion": [messages]}`: rendered with the chat
  template (the prompt with the generation prompt), only the completion trained.

Preference rows, for `trainer_type` dpo (TRL's preference format): `{"prompt", "chosen", "rejected"}` strings, or lists
of messages (conversational), or `chosen` and `rejected` alone when they share their prompt (TRL's implicit prompt).

A dataset may also be given per trainer type, `{"sft": rows, "dpo": preference_rows}`: each run trains and evaluates
on the one of its own trainer type (`dataset_for`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

ExampleForm = Literal[
    "text",
    "prompt_completion",
    "messages",
    "prompt_completion_messages",
    "preference",
    "preference_messages",
    "prompt_only",
    "prompt_only_messages",
]
CONVERSATIONAL_FORMS = frozenset({"messages", "prompt_completion_messages"})
PREFERENCE_FORMS = frozenset({"preference", "preference_messages"})
# The forms each trainer type trains on.
TRAINER_FORMS: dict[str, frozenset[str]] = {
    "sft": frozenset({"text", "prompt_completion", "messages", "prompt_completion_messages"}),
    "dpo": PREFERENCE_FORMS,
    # GRPO generates from the prompt; a completion, if the row has one, is neither trained on nor given to rewards.
    "grpo": frozenset({"prompt_only", "prompt_only_messages", "prompt_completion", "prompt_completion_messages"}),
}
_FORMS_WANTED = {
    "sft": "'text', 'prompt' and 'completion', or 'messages' rows",
    "dpo": "preference rows: 'prompt', 'chosen' and 'rejected' (or 'chosen' and 'rejected' sharing their prompt)",
    "grpo": "rows with a 'prompt' (a string or messages) to generate from; other columns go to the reward functions",
}
MAX_PROBLEMS_SHOWN = 5
# Rows a formatting function is tried on before the fit starts: it may be slow, and it runs again in each worker.
FORMATTING_SAMPLE_ROWS = 16
# The role a conversational prompt may end on: a question (TRL then adds the generation prompt) or an assistant turn
# that the completion continues.
PROMPT_LAST_ROLES = ("user", "tool", "assistant")


def example_form(example: Any) -> ExampleForm:
    """Which form `example` has; raises ValueError saying what is wrong with it."""
    if not isinstance(example, Mapping):
        raise ValueError(f"is a {type(example).__name__}, not a mapping of column names to values")
    if "chosen" in example or "rejected" in example:
        return _preference_form(example)
    if isinstance(example.get("text"), str):
        return "text"
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt_completion"
    if "messages" in example:
        _check_messages(example["messages"], "messages")
        return "messages"
    if "prompt" in example and "completion" not in example:
        if isinstance(prompt, str):
            return "prompt_only"
        _check_messages(prompt, "prompt")
        return "prompt_only_messages"
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


def _preference_form(example: Mapping[str, Any]) -> ExampleForm:
    chosen, rejected, prompt = example.get("chosen"), example.get("rejected"), example.get("prompt")
    if "chosen" not in example or "rejected" not in example:
        return _raise(f"has {'chosen' if 'chosen' in example else 'rejected'} alone: a preference row has both")
    if isinstance(chosen, str) and isinstance(rejected, str) and (prompt is None or isinstance(prompt, str)):
        return "preference"
    if isinstance(chosen, list) and isinstance(rejected, list) and (prompt is None or isinstance(prompt, list)):
        if prompt is not None:
            _check_messages(prompt, "prompt")
        _check_messages(chosen, "chosen")
        _check_messages(rejected, "rejected")
        return "preference_messages"
    return _raise("mixes forms: 'prompt', 'chosen' and 'rejected' are either all strings or all lists of messages")


def _raise(message: str) -> Any:
    raise ValueError(message)


def trainer_form_problem(form: str, trainer_type: str) -> str | None:
    """Why a row of `form` cannot train a run of `trainer_type`, or None."""
    if form in TRAINER_FORMS[trainer_type]:
        return None
    return f"is a {form!r} row: trainer_type {trainer_type} trains on {_FORMS_WANTED[trainer_type]}"


def dataset_for(dataset: Any, trainer_type: str, name: str = "train_dataset") -> Any:
    """The rows runs of `trainer_type` use: the dataset itself, or its entry when it is keyed by trainer type."""
    if not is_keyed_by_trainer_type(dataset):
        return dataset
    if trainer_type not in dataset:
        raise ValueError(
            f"{name} has no {trainer_type!r} dataset (it has {', '.join(map(repr, dataset))}): runs with "
            f"trainer_type {trainer_type} need one"
        )
    return dataset[trainer_type]


def is_keyed_by_trainer_type(dataset: Any) -> bool:
    """A dict of datasets (a `datasets.DatasetDict` is one too), as opposed to a dataset of rows."""
    return isinstance(dataset, Mapping)


def keyed_dataset_problems(dataset: Any, name: str) -> list[str]:
    """What is wrong with a dataset given per trainer type: unknown keys, empty datasets."""
    if not is_keyed_by_trainer_type(dataset):
        return [] if len(dataset) else [f"{name} is empty"]
    problems = [
        f"{name} key {key!r} is not a trainer type (one of {', '.join(TRAINER_FORMS)}): a dict of datasets is "
        "keyed by the trainer type whose runs use each"
        for key in dataset
        if key not in TRAINER_FORMS
    ]
    problems += [f"{name}[{key!r}] is empty" for key in dataset if key in TRAINER_FORMS and not len(dataset[key])]
    if not dataset:
        problems.append(f"{name} is an empty dict")
    return problems


def _check_messages(messages: Any, column: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"has a {column!r} that is not a non-empty list of messages")
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"has {column} message {position} without a string 'role'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"has {column} message {position} ({message['role']}) without a string 'content'")


def dataset_problems(dataset: Iterable[Any], name: str, trainer_type: str = "sft") -> list[str]:
    """Every row of `dataset` that runs of `trainer_type` cannot train on (the first few, and how many in all)."""
    problems: list[str] = []
    bad = 0
    for index, example in enumerate(dataset):
        try:
            problem = trainer_form_problem(example_form(example), trainer_type)
            if problem is not None:
                raise ValueError(problem)
        except ValueError as exc:
            bad += 1
            if len(problems) < MAX_PROBLEMS_SHOWN:
                problems.append(f"{name} row {index} {exc}")
    if bad > len(problems):
        problems.append(f"{name}: {bad - len(problems)} more rows like these")
    return problems


def check_datasets(train_dataset: Iterable[Any], eval_dataset: Iterable[Any]) -> None:
    """Raise ValueError listing the rows of either dataset that cannot be trained or evaluated on."""
    check_fit_data(train_dataset, eval_dataset, [{}], {})


def formatted_example(formatting_func: Callable[[Any], Any] | None, example: Any) -> Any:
    """What a config trains on for `example`: the row itself, or its `formatting_func`'s output, where a string is
    a `{"text": ...}` row (TRL's formatting_func) and a mapping is a row of any form."""
    if formatting_func is None:
        return example
    output = formatting_func(example)
    return {"text": output} if isinstance(output, str) else output


def prompt_and_reference(example: Any) -> tuple[Any, str]:
    """For generation: the part of a row the model is given (a string, or messages) and the text it should write.

    A prompt-completion row gives its prompt and its completion; a `messages` row gives the conversation before its
    last assistant message, and that message. A text row has no prompt: ValueError.
    """
    form = example_form(example)
    if form == "prompt_completion":
        return example["prompt"], example["completion"]
    if form == "prompt_completion_messages":
        return example["prompt"], "".join(message["content"] for message in example["completion"])
    if form == "messages":
        messages = example["messages"]
        last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=0)
        if last == 0:
            raise ValueError("has no assistant message after the first one to generate and score")
        return messages[:last], messages[last]["content"]
    raise ValueError("is a 'text' row: generation needs a prompt ('prompt' and 'completion', or 'messages')")


def formatting_problems(
    formatting_func: Callable[[Any], Any],
    name: str,
    dataset: Iterable[Any],
    dataset_name: str,
    trainer_type: str = "sft",
) -> list[str]:
    """Run `formatting_func` on the first rows of `dataset` and check what it returns."""
    problems = []
    for index, example in enumerate(itertools.islice(dataset, FORMATTING_SAMPLE_ROWS)):
        try:
            output = formatted_example(formatting_func, example)
        except Exception as exc:  # the user's function: whatever it raises is the answer
            where = f"formatting_func {name!r} on {dataset_name} row {index}"
            problems.append(f"{where} raised {type(exc).__name__}: {exc}")
            break
        try:
            problem = trainer_form_problem(example_form(output), trainer_type)
            if problem is not None:
                raise ValueError(problem)
        except ValueError as exc:
            problems.append(f"formatting_func {name!r} on {dataset_name} row {index} returned a row that {exc}")
        if len(problems) >= MAX_PROBLEMS_SHOWN:
            break
    return problems


def check_fit_data(
    train_dataset: Any,
    eval_dataset: Any,
    configs: Sequence[Mapping[str, Any]],
    functions: Mapping[str, Callable[..., Any]],
) -> None:
    """Raise ValueError listing what in the data the configs cannot use, before any worker starts.

    Each trainer type's configs are checked against their own datasets (`dataset_for`). Rows trained as they are (a
    config without formatting_func) are checked one by one; a formatting function runs on a sample of each dataset
    and its output is checked. Configs that generate for their metrics need eval rows with a prompt.
    """
    problems = keyed_dataset_problems(train_dataset, "train_dataset")
    problems += keyed_dataset_problems(eval_dataset, "eval_dataset")
    if problems:
        raise ValueError("the data cannot be used as it is:\n  " + "\n  ".join(problems))
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for config in configs:
        by_type.setdefault(str(config.get("trainer_type") or "sft"), []).append(config)
    for trainer_type in sorted(by_type):
        try:
            train = dataset_for(train_dataset, trainer_type, "train_dataset")
            evaluation = dataset_for(eval_dataset, trainer_type, "eval_dataset")
        except ValueError as exc:
            problems.append(str(exc))
            continue
        problems += _trainer_type_data_problems(train, evaluation, by_type[trainer_type], functions, trainer_type)
    if problems:
        raise ValueError("the data cannot be used as it is:\n  " + "\n  ".join(problems))


def _trainer_type_data_problems(
    train_dataset: Iterable[Any],
    eval_dataset: Iterable[Any],
    configs: Sequence[Mapping[str, Any]],
    functions: Mapping[str, Callable[..., Any]],
    trainer_type: str,
) -> list[str]:
    problems: list[str] = []
    formatters = sorted({config.get("formatting_func") for config in configs}, key=lambda name: name or "")
    for name in formatters:
        if name is None:
            problems += dataset_problems(train_dataset, "train_dataset", trainer_type)
            problems += dataset_problems(eval_dataset, "eval_dataset", trainer_type)
        elif name in functions:
            problems += formatting_problems(functions[name], name, train_dataset, "train_dataset", trainer_type)
            problems += formatting_problems(functions[name], name, eval_dataset, "eval_dataset", trainer_type)
    if not problems:
        problems += _generation_problems(eval_dataset, configs, functions)
        problems += _assistant_only_problems(train_dataset, configs, functions)
    return problems


def _assistant_only_problems(
    train_dataset: Iterable[Any], configs: Sequence[Mapping[str, Any]], functions: Mapping[str, Callable[..., Any]]
) -> list[str]:
    def conversational(row: Any) -> None:
        form = example_form(row)
        if form not in CONVERSATIONAL_FORMS:
            raise ValueError(f"is a {form!r} row; the option needs conversational rows")

    return _sample_problems(
        "assistant_only_loss=true", "assistant_only_loss", train_dataset, "train_dataset", configs, functions,
        conversational,
    )  # fmt: skip


def _generation_problems(
    eval_dataset: Iterable[Any], configs: Sequence[Mapping[str, Any]], functions: Mapping[str, Callable[..., Any]]
) -> list[str]:
    return _sample_problems(
        "predict_with_generate", "predict_with_generate", eval_dataset, "eval_dataset", configs, functions,
        prompt_and_reference,
    )  # fmt: skip


def _sample_problems(
    option: str,
    knob: str,
    dataset: Iterable[Any],
    dataset_name: str,
    configs: Sequence[Mapping[str, Any]],
    functions: Mapping[str, Callable[..., Any]],
    check: Callable[[Any], Any],
) -> list[str]:
    """The first sampled row, per formatting function of the configs that set `knob`, that `check` refuses."""
    formatters = {config.get("formatting_func") for config in configs if config.get(knob)}
    problems = []
    for name in sorted(formatters, key=lambda name: name or ""):
        formatting_func = functions.get(name) if name else None
        for index, example in enumerate(itertools.islice(dataset, FORMATTING_SAMPLE_ROWS)):
            try:
                check(formatted_example(formatting_func, example))
            except ValueError as exc:
                shown = f" formatted by {name!r}" if name else ""
                problems.append(f"{option}: {dataset_name} row {index}{shown} {exc}")
                break
    return problems
