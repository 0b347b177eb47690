"""The example forms a fit trains on, checked before any worker starts (rf_core.data_forms): TRL's formats."""

from __future__ import annotations

import pytest

from rf_core.data_forms import check_datasets, dataset_problems, example_form

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    ("example", "form"),
    [
        ({"text": "a whole document"}, "text"),
        ({"prompt": "Q: ", "completion": "A", "id": 3}, "prompt_completion"),
        ({"text": "text wins", "prompt": 1}, "text"),
        ({"messages": [USER, ASSISTANT]}, "messages"),
        ({"prompt": [USER], "completion": [ASSISTANT]}, "prompt_completion_messages"),
        ({"prompt": [USER, ASSISTANT], "completion": [ASSISTANT]}, "prompt_completion_messages"),
    ],
)
def test_each_form_is_recognised(example, form) -> None:
    assert example_form(example) == form


@pytest.mark.parametrize(
    ("example", "says"),
    [
        ({"messages": []}, "'messages' that is not a non-empty list of messages"),
        ({"messages": [{"content": "no role"}]}, "messages message 0 without a string 'role'"),
        ({"messages": [USER, {"role": "assistant", "content": None}]}, "message 1 (assistant) without a string"),
        ({"prompt": [USER], "completion": "a string"}, "mixes forms"),
        ({"prompt": [{"role": "system", "content": "s"}], "completion": [ASSISTANT]}, "ending on a 'system'"),
        ({"input": "a", "output": "b"}, "has columns ['input', 'output']"),
        ({"prompt": 3}, "has a 'prompt' that is not a non-empty list of messages"),
        ("just a string", "is a str"),
    ],
)
def test_rows_of_no_known_form_are_refused_saying_why(example, says) -> None:
    with pytest.raises(ValueError) as refused:
        example_form(example)
    assert says in str(refused.value)


def test_problems_name_the_dataset_and_the_rows_and_count_the_rest() -> None:
    rows = [{"text": "fine"}] + [{"messages": []}] * 7
    problems = dataset_problems(rows, "train_dataset")
    assert problems[0].startswith("train_dataset row 1 has a 'messages' that is not")
    assert len(problems) == 6 and problems[-1] == "train_dataset: 2 more rows like these"
    assert dataset_problems([{"text": "fine"}], "eval_dataset") == []


def test_check_datasets_lists_both_datasets() -> None:
    with pytest.raises(ValueError, match=r"(?s)train_dataset row 0 .*eval_dataset row 1 "):
        check_datasets([{"question": "q"}], [{"text": "ok"}, {"text": 3}])
    check_datasets([{"text": "ok"}], [{"prompt": "p", "completion": "c"}, {"messages": [USER, ASSISTANT]}])


def test_a_prompt_alone_is_grpo_data_and_refused_for_sft_saying_so() -> None:
    assert example_form({"prompt": "only a prompt", "answer": "4"}) == "prompt_only"
    assert example_form({"prompt": [USER]}) == "prompt_only_messages"
    [problem] = dataset_problems([{"prompt": "only a prompt"}], "train_dataset")
    assert problem.startswith("train_dataset row 0 is a 'prompt_only' row: trainer_type sft trains on 'text'")
    assert dataset_problems([{"prompt": "p"}, {"prompt": "p", "completion": "c"}], "train_dataset", "grpo") == []
    [problem] = dataset_problems([{"text": "t"}], "train_dataset", "grpo")
    assert problem.endswith("trainer_type grpo trains on rows with a 'prompt' (a string or messages) to generate "
                            "from; other columns go to the reward functions")  # fmt: skip
