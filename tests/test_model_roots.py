"""Local base models only from under the model roots: a path in a config must not open any folder on the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rf_core.client import RFClient
from rf_core.config import validate_config
from rf_core.errors import OpRejected
from rf_core.model_roots import ROOTS_ENV, model_roots, model_source_problem
from rf_core.training.models import ModelNotFoundError, load_base_model
from tests.test_server_api import CONFIG, start_server, stop


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    first, second = tmp_path / "models", tmp_path / "more-models"
    first.mkdir()
    second.mkdir()
    monkeypatch.setenv(ROOTS_ENV, f"{first}{os.pathsep}{second}")
    return first, second


def test_names_and_hub_ids_are_not_paths(roots: tuple[Path, Path]) -> None:
    for value in ("rf-tiny-llama", "gpt2", "meta-llama/Llama-3.2-1B", "org/model.v2_final"):
        assert model_source_problem(value) is None, value


@pytest.mark.parametrize("value", ["/etc", "/", "../../etc/passwd", "~/.ssh", "./secrets", "org/../../etc", "a\\b"])
def test_paths_outside_the_roots_are_refused(roots: tuple[Path, Path], value: str) -> None:
    problem = model_source_problem(value)
    assert problem is not None and ROOTS_ENV in problem and json.dumps(value) in problem
    assert validate_config({"model_name_or_path": value}) == [problem]


def test_paths_inside_a_root_are_accepted_but_not_through_a_symlink_out(roots: tuple[Path, Path]) -> None:
    first, second = roots
    (first / "llama").mkdir()
    assert model_source_problem(str(first / "llama")) is None
    assert model_source_problem(str(second)) is None
    assert model_source_problem(str(first / "llama" / ".." / ".." / "elsewhere")) is not None
    (first / "escape").symlink_to("/etc")
    assert model_source_problem(str(first / "escape")) is not None


def test_the_default_root_is_rf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    assert model_roots() == [(tmp_path / "home").resolve()]
    exported = tmp_path / "home" / "experiments" / "exp" / "run-1" / "exports" / "best"
    assert model_source_problem(str(exported)) is None  # warm starts from a run's export work out of the box
    assert model_source_problem(str(tmp_path / "outside")) is not None


def test_the_loader_refuses_outside_paths_and_never_reads_a_hub_id_from_the_working_directory(
    roots: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelNotFoundError, match="outside them"):
        load_base_model("/etc", tmp_path / "cache")
    decoy = tmp_path / "work" / "org" / "model"
    decoy.mkdir(parents=True)
    (decoy / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_base_model("org/model", tmp_path / "cache")


def test_the_server_refuses_a_clone_that_points_outside_the_roots(tmp_path: Path) -> None:
    process, info = start_server(tmp_path / "home")  # its model roots: the temporary folder (tests/conftest.py)
    try:
        client = RFClient(info["url"])
        client.create_experiment("roots", [CONFIG], num_chunks=2)
        with pytest.raises(OpRejected) as refused:
            client.submit_op("roots", "clone", 1, payload={"overrides": {"model_name_or_path": "/etc"}})
        assert "local folder under the model roots" in str(refused.value)
        assert client.list_ops("roots") == []  # nothing queued
    finally:
        stop(process)
