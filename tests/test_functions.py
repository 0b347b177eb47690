"""Functions per config: naming, registries, the fit's data checks, built-in metrics and the rf server's refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rf_core import ExperimentSpec, GridSearch, List, evaluation_context
from rf_core.config import validate_config
from rf_core.control import experiments, ops
from rf_core.control.store import DuckDBStore
from rf_core.data_forms import check_fit_data, prompt_and_reference
from rf_core.errors import InvalidRequest, OpRejected
from rf_core.functions import EvaluationContext, evaluating, named_configs, resolve
from rf_core.knobs import ConfigError
from rf_core.text_metrics import text_metric

ROWS = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]


def qa_format(row: dict[str, Any]) -> dict[str, str]:
    return {"prompt": row["question"], "completion": row["answer"]}


def text_format(row: dict[str, Any]) -> str:
    return f"{row['question']} {row['answer']}"


def scores(eval_prediction: Any) -> dict[str, float]:
    return {"n": float(len(eval_prediction.predictions))}


def test_functions_in_a_config_group_become_names_and_register_themselves() -> None:
    group = GridSearch({"formatting_func": List([qa_format, text_format]), "compute_metrics": scores, "r": 4})
    configs, registry = named_configs(group, {"extra": scores})
    assert [config["formatting_func"] for config in configs] == ["qa_format", "text_format"]
    # A function registered under a name of its own keeps that name in the configs.
    assert {config["compute_metrics"] for config in configs} == {"extra"}
    assert registry == {"extra": scores, "qa_format": qa_format, "text_format": text_format}
    assert named_configs(group, {"extra": scores}) == (configs, registry)  # the workers get the same names


def test_nameless_and_clashing_functions_are_refused_with_the_way_out() -> None:
    with pytest.raises(ConfigError, match=r"has no name to store it under; register it with a name"):
        named_configs({"formatting_func": lambda row: row["text"]})

    def qa_format(row: dict[str, Any]) -> str:  # same __name__ as the module's, another function
        return row["question"]

    with pytest.raises(ConfigError, match="two different functions are named 'qa_format'"):
        named_configs({"formatting_func": List([qa_format, globals()["qa_format"]])})
    with pytest.raises(ConfigError, match="is a built-in metric's name"):
        named_configs({}, {"rougeL": scores})
    with pytest.raises(ConfigError, match="not callable"):
        named_configs({}, {"fine": "not a function"})
    with pytest.raises(ConfigError, match="has no name"):
        ExperimentSpec({"formatting_func": lambda row: row}, lambda c: (None, None), ROWS, ROWS, num_chunks=1)


def test_a_name_the_process_lacks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"formatting_func='chat'.*it has: qa\); pass it to run_fit in functions="):
        resolve({"qa": qa_format}, "formatting_func", "chat")


def test_built_in_metrics_need_generation_and_validate_together() -> None:
    assert validate_config({"compute_metrics": "rougeL", "predict_with_generate": True}) == []
    assert validate_config({"compute_metrics": "bleu"}) == [
        'compute_metrics="bleu": must be used with predict_with_generate=true (the built-in metric scores '
        "generated text)"
    ]
    [problem] = validate_config({"predict_with_generate": True, "strategy": "deepspeed"})
    assert problem.startswith("predict_with_generate=true: must be false with strategy deepspeed")
    [problem] = validate_config({"generation_config": {"max_new_tokens": 8, "beam": 2}})
    assert "'beam' is not a setting rf passes on (known: max_new_tokens" in problem


def test_built_in_text_metrics() -> None:
    assert text_metric("exact_match", [" yes", "no"], ["yes", "maybe"]) == 0.5
    assert text_metric("rougeL", ["the cats sat"], ["the cat sat"]) == pytest.approx(1.0)  # stemmed
    assert text_metric("rougeL", ["dog"], ["the cat sat"]) == 0.0
    assert text_metric("bleu", ["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metric("bleu", ["a", "b"], ["a"])


def test_evaluation_context_is_there_only_while_metrics_run() -> None:
    with pytest.raises(RuntimeError, match="only available while the engine runs a compute_metrics"):
        evaluation_context()
    context = EvaluationContext("exp", 3, 40, 1, 0, {"r": 4})
    with evaluating(context):
        assert evaluation_context() == context
    with pytest.raises(RuntimeError):
        evaluation_context()


def test_the_fit_checks_what_formatting_functions_make_before_it_starts() -> None:
    def broken(row: dict[str, Any]) -> dict[str, str]:
        return {"question": row["question"]}

    def raises(row: dict[str, Any]) -> str:
        raise KeyError("context")

    functions = {"qa_format": qa_format, "broken": broken, "raises": raises, "text_format": text_format}
    # Raw rows train through a formatting function; unformatted configs need rows of a form.
    check_fit_data(ROWS, ROWS, [{"formatting_func": "qa_format"}], functions)
    with pytest.raises(ValueError, match=r"train_dataset row 0 has columns \['answer', 'question'\]"):
        check_fit_data(ROWS, ROWS, [{"formatting_func": "qa_format"}, {"formatting_func": None}], functions)
    with pytest.raises(ValueError, match=r"formatting_func 'broken' on train_dataset row 0 returned a row that has"):
        check_fit_data(ROWS, ROWS, [{"formatting_func": "broken"}], functions)
    with pytest.raises(ValueError, match=r"formatting_func 'raises' on train_dataset row 0 raised KeyError"):
        check_fit_data(ROWS, ROWS, [{"formatting_func": "raises"}], functions)
    # Generation needs a prompt to generate from.
    generating = {"formatting_func": "text_format", "predict_with_generate": True}
    with pytest.raises(ValueError, match=r"predict_with_generate: eval_dataset row 0 formatted by 'text_format' is"):
        check_fit_data(ROWS, ROWS, [generating], functions)
    check_fit_data(ROWS, ROWS, [{**generating, "formatting_func": "qa_format"}], functions)


def test_prompt_and_reference_of_each_form() -> None:
    user = {"role": "user", "content": "hi"}
    bot = {"role": "assistant", "content": "hello"}
    assert prompt_and_reference({"prompt": "p", "completion": "c"}) == ("p", "c")
    assert prompt_and_reference({"prompt": [user], "completion": [bot]}) == ([user], "hello")
    assert prompt_and_reference({"messages": [user, bot, user, bot]}) == ([user, bot, user], "hello")
    with pytest.raises(ValueError, match="has no assistant message"):
        prompt_and_reference({"messages": [user]})


@pytest.fixture
def store(tmp_path: Path):
    opened = DuckDBStore(tmp_path / "rf.duckdb")
    yield opened
    opened.close()


def test_the_rf_server_refuses_names_the_experiment_does_not_register(store: DuckDBStore) -> None:
    config = {"model_name_or_path": "rf-tiny-llama", "formatting_func": "qa"}
    with pytest.raises(InvalidRequest, match=r"config 1: formatting_func='qa': no function of that name .* none"):
        experiments.create_experiment(store, "exp", [config], num_chunks=2)
    experiments.create_experiment(store, "exp", [config], num_chunks=2, functions=["qa", "chat"])
    with pytest.raises(OpRejected) as refused:
        ops.submit_op(store, "exp", "clone", 1, {"overrides": {"formatting_func": "instruct"}}, source="cli")
    assert "formatting_func='instruct': no function of that name is registered" in str(refused.value)
    assert "(known: chat, qa)" in str(refused.value)
    with pytest.raises(OpRejected, match=r"known: chat, qa, rougeL, bleu, exact_match"):
        ops.submit_op(store, "exp", "clone", 1, {"overrides": {"compute_metrics": "f1"}}, source="cli")
    assert store.list_ops("exp") == []  # nothing queued
    clone = ops.submit_op(store, "exp", "clone", 1, {"overrides": {"formatting_func": "chat"}}, source="cli")
    assert clone["payload"]["configs"][0]["formatting_func"] == "chat"
    # A fit that continues the experiment brings its spec's names.
    experiments.set_experiment_functions(store, "exp", ["qa", "instruct"])
    ops.submit_op(store, "exp", "clone", 1, {"overrides": {"formatting_func": "instruct"}}, source="cli")
    with pytest.raises(InvalidRequest, match="function name '9'"):
        experiments.set_experiment_functions(store, "exp", ["9"])


def test_the_fit_refuses_assistant_only_loss_on_rows_that_are_not_conversations() -> None:
    def chat(row: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]}  # fmt: skip

    functions = {"qa_format": qa_format, "chat": chat}
    check_fit_data(ROWS, ROWS, [{"formatting_func": "chat", "assistant_only_loss": True}], functions)
    with pytest.raises(ValueError, match=r"assistant_only_loss=true: train_dataset row 0 formatted by 'qa_format' is"):
        check_fit_data(ROWS, ROWS, [{"formatting_func": "qa_format", "assistant_only_loss": True}], functions)
