"""Multi-process runs: a 2-process gloo gang trains the same trajectory as one process over the same global batch.

Each gang member is a real process with its own SlotTrainer, as a slot worker is; the gang forms a torch.distributed
group per chunk. The members swap ranks every chunk and, half-way, both drop the run's state from memory, so later
chunks resume from the checkpoint rank 0 wrote: the trajectory must not notice either.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest

from rf_core.chunks import micro_batches_per_step, plan_chunks
from rf_core.config import normalize_config
from rf_core.messages import ChunkSpec, Gang, TrainTask
from rf_core.training.gang import GANG_TIMEOUT_ENV, free_address

NUM_TRAIN = 64
STEPS = 50
RELATIVE_TOLERANCE = 1e-5
BASE = {
    "model_name_or_path": "rf-tiny-llama",
    "use_peft": True,
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "learning_rate": 5e-3,
    "per_device_train_batch_size": 4,
    "num_train_epochs": 7,
    "max_steps": STEPS,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "max_length": 32,
    "seed": 7,
}


def _datasets() -> tuple[dict[str, list[dict[str, str]]], dict[str, list[dict[str, str]]]]:
    from rf_core.demo_data import stdlib_preference_examples
    from rf_core.training.data import stdlib_sft_examples

    examples = stdlib_sft_examples(limit=NUM_TRAIN + 16)
    pairs = stdlib_preference_examples(limit=NUM_TRAIN + 16)
    return {"sft": examples[:NUM_TRAIN], "dpo": pairs[:NUM_TRAIN]}, {
        "sft": examples[NUM_TRAIN:],
        "dpo": pairs[NUM_TRAIN:],
    }


def _member(model_cache: str, inbox: Any, outbox: Any) -> None:
    """One process, as a slot worker: trains each chunk it is sent and answers with its rows and outcome."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from rf_core.training.models import load_base_model
    from rf_core.training.trainer import SlotTrainer

    torch.set_num_threads(1)
    train, evaluation = _datasets()
    trainer = SlotTrainer(
        lambda config: load_base_model(config["model_name_or_path"], Path(model_cache)),
        train,
        evaluation,
        num_threads=1,
    )
    try:
        while (message := inbox.get()) is not None:
            kind, payload = message
            if kind == "release":
                trainer.release(payload)
                continue
            rows: list[dict[str, Any]] = []
            outcome = trainer.train(TrainTask.from_dict(payload), rows.extend)
            trainer.flush()
            outbox.put((rows, outcome.to_dict()))
    finally:
        trainer.close()


def _tasks(config: dict[str, Any], run_dir: Path, num_chunks: int, gang_of: Any) -> list[dict[str, Any]]:
    plan: list[ChunkSpec] = plan_chunks(NUM_TRAIN, config, num_chunks)
    return [
        TrainTask(
            experiment="gang",
            run_id=1,
            config=config,
            chunk=chunk,
            run_dir=str(run_dir),
            seed=0,
            gang=gang_of(chunk.index),
        ).to_dict()
        for chunk in plan
    ]


def _run(
    model_cache: Path, member_tasks: list[list[dict[str, Any]]], release_before: list[int], timeout: float = 240.0
) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Each member trains its tasks chunk by chunk, all members together, as the fit loop drives a gang: a gang's
    rendezvous port is picked just before its chunk (as `train_attempt` does), and `release_before` positions make
    every member drop the run from memory first."""
    ctx = mp.get_context("spawn")
    inboxes, outboxes = [ctx.Queue() for _ in member_tasks], [ctx.Queue() for _ in member_tasks]
    processes = [
        ctx.Process(target=_member, args=(str(model_cache), inbox, outbox))
        for inbox, outbox in zip(inboxes, outboxes, strict=True)
    ]
    for process in processes:
        process.start()
    collected: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = [([], []) for _ in member_tasks]
    try:
        for position in range(len(member_tasks[0])):
            address = free_address()
            for inbox, tasks in zip(inboxes, member_tasks, strict=True):
                if position in release_before:
                    inbox.put(("release", tasks[position]["run_id"]))
                task = tasks[position]
                if task["gang"] is not None:
                    task = {**task, "gang": {**task["gang"], "address": address}}
                inbox.put(("train", task))
            for outbox, (rows, outcomes) in zip(outboxes, collected, strict=True):
                chunk_rows, outcome = outbox.get(timeout=timeout)
                rows.extend(chunk_rows)
                outcomes.append(outcome)
                assert outcome["status"] != "failed", outcome["traceback"]
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    return collected


def _series(rows: list[dict[str, Any]], name: str) -> dict[int, float]:
    values = {row["step"]: row["value"] for row in rows if row["name"] == name}
    assert values, f"no {name} rows"
    return values


def _assert_close(left: dict[int, float], right: dict[int, float]) -> None:
    assert sorted(left) == sorted(right)
    worst = max(abs(left[step] - right[step]) / max(abs(right[step]), 1e-12) for step in left)
    print(f"largest relative difference {worst:.2e} over {len(left)} points")
    assert worst <= RELATIVE_TOLERANCE, f"largest relative difference {worst:.2e}"


@pytest.fixture(scope="module", autouse=True)
def gang_environment(tmp_path_factory: pytest.TempPathFactory):
    """Members inherit it: an RF_HOME of the module's (DeepSpeed compiles its op there once), a short gang timeout."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RF_HOME", str(tmp_path_factory.mktemp("rf-home")))
    patch.setenv(GANG_TIMEOUT_ENV, "60")
    yield
    patch.undo()


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rf_core.training.models import ensure_pretrained

    cache = tmp_path_factory.mktemp("models")
    ensure_pretrained("rf-tiny-llama", cache, pretrain_steps=0)
    return cache


@pytest.fixture(scope="module")
def single_process(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The reference: one process, the same global batch as two micro-batches of accumulation."""
    config = normalize_config({**BASE, "gradient_accumulation_steps": 2, "num_devices": 1})
    tasks = _tasks(config, tmp_path_factory.mktemp("single"), 2, lambda _index: None)
    [(rows, _outcomes)] = _run(model_cache, [tasks], release_before=[])
    return rows


GANGS = {
    "ddp": {"strategy": "ddp"},
    "deepspeed-zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "deepspeed-zero3": {"strategy": "deepspeed", "zero_stage": 3},
    # A 1-device run given a second idle slot (max_devices): the same step, shared by two processes.
    "ddp-elastic": {"strategy": "ddp", "num_devices": 1, "gradient_accumulation_steps": 2, "max_devices": 2},
}


@pytest.mark.parametrize("kind", list(GANGS))
def test_two_processes_match_one_process_across_swaps(kind, model_cache, single_process, tmp_path) -> None:
    if GANGS[kind]["strategy"] == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is installed by make install")
    config = normalize_config({**BASE, "gradient_accumulation_steps": 1, "num_devices": 2, **GANGS[kind]})
    assert micro_batches_per_step(config) == 2
    plan_length = len(plan_chunks(NUM_TRAIN, config, 2))

    def gang_for(member: int):
        def gang_of(index: int) -> Gang:
            rank = member if index % 2 == 0 else 1 - member  # the members swap ranks every chunk
            # The address is picked by _run just before the chunk.
            return Gang(rank=rank, world_size=2, address="", slots=(0, 1), strategy=config["strategy"])

        return gang_of

    member_tasks = [_tasks(config, tmp_path / "run", 2, gang_for(member)) for member in (0, 1)]
    results = _run(model_cache, member_tasks, release_before=[plan_length // 2])

    reference_losses = _series(single_process, "train_loss")
    assert len(reference_losses) == STEPS
    leaders_rows = [row for rows, _ in results for row in rows]
    _assert_close(_series(leaders_rows, "train_loss"), reference_losses)
    _assert_close(_series(leaders_rows, "eval_loss"), _series(single_process, "eval_loss"))
    _assert_close(_series(leaders_rows, "learning_rate"), _series(single_process, "learning_rate"))
    # Each step was logged once, by the member that led that chunk.
    assert len([row for row in leaders_rows if row["name"] == "train_loss"]) == STEPS
    if config["strategy"] == "deepspeed":
        # ZeRO sharded the optimizer state: one file per rank beside the module's, at every kept step; the run's
        # own checkpoint holds weights, schedule and RNG but no optimizer state.
        shards = sorted(path.name for path in (tmp_path / "run" / "deepspeed" / f"step-{STEPS}").iterdir())
        assert [name for name in shards if name.endswith("_optim_states.pt")] == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
        from rf_core.training.checkpoints import load_checkpoint

        assert load_checkpoint(results[0][1][-1]["checkpoint"])["optimizer"] is None
    final = [outcomes[-1] for _, outcomes in results]
    assert {outcome["status"] for outcome in final} == {"completed"}
    assert final[0]["best_step"] == final[1]["best_step"]  # both members agree on the run's best chunk


def test_a_dpo_run_on_two_ddp_processes_matches_one_process(model_cache, tmp_path) -> None:
    """Each member computes its micro-batch's reference and policy forwards; DDP averages the gradients and the
    DPO metrics are averaged over the gang, so the run is the one-process run with the same global batch."""
    dpo = {**BASE, "trainer_type": "dpo", "max_steps": 12, "learning_rate": 1e-3}
    single = normalize_config({**dpo, "gradient_accumulation_steps": 2})
    [(reference_rows, _)] = _run(model_cache, [_tasks(single, tmp_path / "single", 2, lambda _index: None)], [])
    config = normalize_config({**dpo, "num_devices": 2})

    def gang_for(member: int):
        return lambda index: Gang(rank=member, world_size=2, address="", slots=(0, 1), strategy="ddp")

    results = _run(model_cache, [_tasks(config, tmp_path / "run", 2, gang_for(member)) for member in (0, 1)], [1])
    leaders_rows = [row for rows, _ in results for row in rows]
    for name in ("train_loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "eval_loss"):
        _assert_close(_series(leaders_rows, name), _series(reference_rows, name))
    assert len(_series(reference_rows, "rewards/margins")) == 12


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_deepspeed_on_one_process_matches_plain_training(stage, model_cache, single_process, tmp_path) -> None:
    """strategy "deepspeed" with one device trains through a DeepSpeed engine (a gang of one) the same trajectory
    as plain training; zero_stage decides how its optimizer state is saved."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by make install")
    config = normalize_config({**BASE, "gradient_accumulation_steps": 2, "strategy": "deepspeed", "zero_stage": stage})
    tasks = _tasks(config, tmp_path / "run", 2, lambda _index: None)
    [(rows, outcomes)] = _run(model_cache, [tasks], release_before=[len(tasks) // 2])
    _assert_close(_series(rows, "train_loss"), _series(single_process, "train_loss"))
    assert outcomes[-1]["status"] == "completed"
    shards = {path.name for path in (tmp_path / "run" / "deepspeed" / f"step-{STEPS}").iterdir()}
    # Stage 0 keeps the whole optimizer state with the module's; stage 1 writes it as the one rank's shard.
    assert ("zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards) == (stage > 0)


def test_shards_of_pruned_checkpoints_go_with_them(tmp_path) -> None:
    from rf_core.training.zero import prune_shards, shards_dir

    for step in (4, 8, 12):
        (shards_dir(tmp_path) / f"step-{step}").mkdir(parents=True)
        (shards_dir(tmp_path) / f"step-{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    prune_shards(tmp_path, [4, 8])
    assert sorted(path.name for path in shards_dir(tmp_path).iterdir()) == ["step-12"]
