"""The example forms a fit trains on, checked before any worker starts (rf_core.data_forms)."""

from __future__ import annotations

import pytest

from rf_core.data_forms import check_datasets, dataset_problems, example_form


@pytest.mark.parametrize(
    ("example", "form"),
    [
        ({"text": "a whole document"}, "text"),
        ({"prompt": "Q: ", "completion": "A", "id": 3}, "prompt_completion"),
        ({"text": "text wins", "prompt": 1}, "text"),
    ],
)
def test_each_form_is_recognised(example, form) -> None:
    assert example_form(example) == form


@pytest.mark.parametrize(
    ("example", "says"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "conversational"),
        ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
         "chat template"),
        ({"input": "a", "output": "b"}, "has columns ['input', 'output']"),
        ({"prompt": "only a prompt"}, "expected a string 'text'"),
        ("just a string", "is a str"),
    ],
)  # fmt: skip
def test_rows_of_no_known_form_are_refused_saying_why(example, says) -> None:
    with pytest.raises(ValueError) as refused:
        example_form(example)
    assert says in str(refused.value)


def test_problems_name_the_dataset_and_the_rows_and_count_the_rest() -> None:
    rows = [{"text": "fine"}] + [{"messages": []}] * 7
    problems = dataset_problems(rows, "train_dataset")
    assert problems[0].startswith("train_dataset row 1 is conversational")
    assert len(problems) == 6 and problems[-1] == "train_dataset: 2 more rows like these"
    assert dataset_problems([{"text": "fine"}], "eval_dataset") == []


def test_check_datasets_lists_both_datasets() -> None:
    with pytest.raises(ValueError, match=r"(?s)train_dataset row 0 .*eval_dataset row 1 "):
        check_datasets([{"question": "q"}], [{"text": "ok"}, {"text": 3}])
    check_datasets([{"text": "ok"}], [{"prompt": "p", "completion": "c"}])
