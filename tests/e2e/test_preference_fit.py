"""DPO runs through the real parts: `run_fit` with the Prefect fit flow, an rf server on a DuckDB store, slot worker
processes and real training; an SFT run cloned into a DPO run warm-started from its weights, by a policy, mid-fit."""

from __future__ import annotations

import math
from typing import Any

import pytest

from rf_core import paths
from tests.e2e.test_fit import prefect_harness  # noqa: F401 - the session's Prefect server
from tests.e2e_experiment import MODEL_CACHE_ENV

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def sft_rows(count: int, offset: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"item {i}: ", "completion": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4))}
        for i in range(offset, offset + count)
    ]


def preference_rows(count: int, offset: int) -> list[dict[str, str]]:
    """Chosen: the item's own words; rejected: the words in reverse, a plausible wrong completion."""
    return [
        {"prompt": row["prompt"], "chosen": row["completion"], "rejected": " ".join(row["completion"].split()[::-1])}
        for row in sft_rows(count, offset)
    ]


def test_sft_and_dpo_runs_side_by_side_and_an_sft_run_cloned_into_dpo_by_a_policy(
    prefect_harness,  # noqa: F811
    tmp_path,
    monkeypatch,
) -> None:
    from peft import PeftModel

    from rf_core import Experiment
    from rf_core.policies import CloneModify, ExperimentSnapshot, Policy, PolicyOp
    from rf_core.training.artifacts import LATEST, export_dir
    from rf_core.training.checkpoints import init_checkpoint_path, load_checkpoint
    from rf_core.training.trainer import reference_path
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)

    class AlignTheSftRun(Policy):
        """The usual story: once the SFT run has trained a chunk, go on from its weights with DPO."""

        name = "align"

        def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
            if len(snapshot.runs) > 2:
                return []
            return [
                CloneModify(run.run_id, "align it", overrides={"trainer_type": "dpo"}, warm_start="weights")
                for run in snapshot.trainable()
                if run.config["trainer_type"] == "sft" and run.chunks_done >= 1
            ]

    config = {"model_name_or_path": "rf-tiny-llama", "r": 4, "max_length": 32, "per_device_train_batch_size": 8}
    snapshot = Experiment("aligned").run_fit(
        [config, {**config, "trainer_type": "dpo", "beta": 0.5, "learning_rate": 1e-3}],
        e2e_experiment.create_model_fn,
        {"sft": sft_rows(32, 0), "dpo": preference_rows(32, 0)},
        {"sft": sft_rows(8, 100), "dpo": preference_rows(8, 100)},
        num_chunks=2,
        policies=[AlignTheSftRun()],
        cpu_slots=1,
        idle_timeout=1,
    )
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert sorted(runs) == [1, 2, 3] and all(run["status"] == "Completed" for run in runs.values()), runs
    assert [runs[i]["config"]["trainer_type"] for i in (1, 2, 3)] == ["sft", "dpo", "dpo"]
    assert runs[3]["parent_id"] == 1 and runs[3]["config"]["ref_model"] == "parent"

    metrics = Experiment("aligned").metrics()
    margins = metrics[metrics["name"] == "rewards/margins"]
    assert sorted(set(margins["run_id"])) == [2, 3]  # DPO runs only
    first_losses = metrics[(metrics["name"] == "train_loss") & (metrics["step"] == 1)].set_index("run_id")["value"]
    # Both DPO runs start at their reference (a new adapter is the base; the clone is its parent): loss log 2.
    assert first_losses[2] == pytest.approx(math.log(2), abs=1e-6)
    assert first_losses[3] == pytest.approx(math.log(2), abs=1e-6)
    assert first_losses[1] != pytest.approx(math.log(2), abs=1e-3)  # the SFT run's cross-entropy
    evaluated = set(metrics[metrics["name"] == "eval_rewards/accuracies"]["run_id"])
    assert evaluated == {2, 3} and set(metrics[metrics["name"] == "eval_loss"]["run_id"]) == {1, 2, 3}

    # The clone is anchored to run 1's weights at the step it was cloned from, kept in its own folder.
    clone_dir = paths.run_dir("aligned", 3, home)
    reference = load_checkpoint(reference_path(clone_dir))
    assert reference["lora"] == {"r": 4, "lora_alpha": 16, "target_modules": None}
    assert load_checkpoint(init_checkpoint_path(clone_dir))["trainable"].keys() == reference["weights"].keys()

    # A DPO run exports as an SFT run does: a PEFT adapter that loads on its base.
    base, _ = e2e_experiment.create_model_fn(config)
    adapter = PeftModel.from_pretrained(base, str(export_dir(clone_dir, LATEST)))
    assert any("lora_A" in name for name, _ in adapter.named_parameters())

    results = Experiment("aligned").results()
    assert results["trainer_type"].tolist() == ["sft", "dpo", "dpo"]


def test_run_fit_refuses_preference_runs_without_preference_data_before_anything_starts(
    prefect_harness,  # noqa: F811
    tmp_path,
    monkeypatch,
) -> None:
    from rf_core import Experiment
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)
    dpo: dict[str, Any] = {"model_name_or_path": "rf-tiny-llama", "trainer_type": "dpo"}
    cases = [
        (sft_rows(8, 0), sft_rows(4, 100), r"train_dataset row 0 is a 'prompt_completion' row: trainer_type dpo"),
        ({"sft": sft_rows(8, 0)}, sft_rows(4, 100), r"train_dataset has no 'dpo' dataset \(it has 'sft'\)"),
        ({"dpo": preference_rows(8, 0), "train": sft_rows(8, 0)}, preference_rows(4, 100), r"key 'train' is not"),
        ([{"prompt": "p", "chosen": "c"}], preference_rows(4, 100), r"row 0 has chosen alone"),
    ]
    for train, evaluation, message in cases:
        with pytest.raises(ValueError, match=message):
            Experiment("refused").run_fit(dpo, e2e_experiment.create_model_fn, train, evaluation, num_chunks=2)
    assert not paths.db_path(home).exists() and not paths.server_info_path(home).exists()  # no server, no store


def test_a_grpo_run_with_reward_functions_defined_in_place_trains_in_a_real_fit(
    prefect_harness,  # noqa: F811
    tmp_path,
    monkeypatch,
) -> None:
    """Reward functions written in the test (sent by value), a GRPO run next to an SFT run, and a clone of the SFT
    run into GRPO, warm-started, switching reward functions by name."""
    from rf_core import Experiment
    from rf_core.policies import CloneModify, ExperimentSnapshot, Policy, PolicyOp
    from tests import e2e_experiment

    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)

    def mentions_the_item(completions: list[str], item: list[int], **_: Any) -> list[float]:
        return [float(str(number) in text) for text, number in zip(completions, item, strict=True)]

    def brevity(completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [-len(ids) / 8 for ids in completion_ids]

    class TryRewardsOnTheSftRun(Policy):
        name = "rl"

        def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
            if len(snapshot.runs) > 2:
                return []
            grpo = {"trainer_type": "grpo", "reward_funcs": ["brevity"], "num_generations": 4,
                    "max_completion_length": 6}  # fmt: skip
            return [
                CloneModify(run.run_id, "reinforce it", overrides=grpo, warm_start="weights")
                for run in snapshot.trainable()
                if run.config["trainer_type"] == "sft" and run.chunks_done >= 1
            ]

    prompts = [{"prompt": f"item {i}: ", "item": i} for i in range(16)]
    config = {"model_name_or_path": "rf-tiny-llama", "r": 4, "max_length": 32, "per_device_train_batch_size": 8}
    grpo = {**config, "trainer_type": "grpo", "reward_funcs": ["mentions_the_item", "brevity"],
            "reward_weights": [1.0, 0.25], "num_generations": 4, "max_completion_length": 6}  # fmt: skip
    snapshot = Experiment("rl").run_fit(
        [config, grpo],
        e2e_experiment.create_model_fn,
        {"sft": sft_rows(32, 0), "grpo": prompts},
        {"sft": sft_rows(8, 100), "grpo": prompts[:2]},
        num_chunks=2,
        functions=[mentions_the_item, brevity],
        policies=[TryRewardsOnTheSftRun()],
        cpu_slots=1,
        idle_timeout=1,
    )
    runs = {run["run_id"]: run for run in snapshot["runs"]}
    assert sorted(runs) == [1, 2, 3] and all(run["status"] == "Completed" for run in runs.values()), runs
    assert runs[3]["parent_id"] == 1 and runs[3]["config"]["reward_funcs"] == ["brevity"]
    metrics = Experiment("rl").metrics()
    names = set(metrics["name"])
    assert {"reward", "reward_std", "rewards/mentions_the_item/mean", "rewards/brevity/mean", "eval_reward"} <= names
    per_run = metrics.groupby("name")["run_id"].apply(set)
    assert per_run["rewards/mentions_the_item/mean"] == {2} and per_run["rewards/brevity/mean"] == {2, 3}
    assert len(metrics[(metrics["name"] == "reward") & (metrics["run_id"] == 2)]) == 8  # 16 prompts, 2 per step


def test_run_fit_refuses_grpo_runs_it_could_not_train_before_anything_starts(
    prefect_harness,  # noqa: F811
    tmp_path,
    monkeypatch,
) -> None:
    from rf_core import Experiment
    from tests import e2e_experiment

    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.delenv("RF_SERVER_URL", raising=False)

    def brevity(completions: list[str], **_: Any) -> list[float]:
        return [-len(text) for text in completions]

    prompts = [{"prompt": f"item {i}: "} for i in range(8)]
    grpo: dict[str, Any] = {"model_name_or_path": "rf-tiny-llama", "trainer_type": "grpo", "num_generations": 4,
                            "per_device_train_batch_size": 8, "reward_funcs": ["brevity"]}  # fmt: skip
    cases = [
        ({**grpo, "reward_funcs": None}, prompts, r'trainer_type="grpo": needs reward_funcs'),
        ({**grpo, "reward_funcs": ["missing"]}, prompts, r"reward_funcs='missing': no function of that name"),
        ({**grpo, "num_generations": 3}, prompts, r"num_generations=3: must divide the step's batch"),
        (grpo, [{"text": "no prompt"}] * 8, r"train_dataset row 0 is a 'text' row: trainer_type grpo trains on"),
    ]
    for config, rows, message in cases:
        with pytest.raises(ValueError, match=message):
            Experiment("refused").run_fit(
                config, e2e_experiment.create_model_fn, rows, rows, num_chunks=2, functions=[brevity]
            )
    assert not paths.server_info_path(home).exists()  # no server was left behind
