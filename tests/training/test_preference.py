"""DPO runs: TRL's numbers (tokenization, loss, rewards, gradients against `DPOTrainer`'s own computation), and the
engine's contract for them (chunked == straight-through, swaps through disk, SFT -> DPO warm starts, references).

TRL is the reference here only: the engine never imports its trainers.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from peft import LoraConfig

from rf_core.chunks import plan_chunks
from rf_core.config import normalize_config
from rf_core.demo_data import stdlib_preference_examples
from rf_core.messages import WarmStart
from rf_core.training.checkpoints import init_checkpoint_path, load_checkpoint
from rf_core.training.data import stdlib_sft_examples
from rf_core.training.models import ensure_pretrained, load_base_model
from rf_core.training.preference import DPO_METRICS, completion_logps, dpo_loss, tokenize_preferences
from rf_core.training.trainer import SlotTrainer, reference_path
from tests.training.test_trainer import (
    NUM_THREADS,
    Recorder,
    assert_same_weights,
    final_weights,
    task_for,
    train_ok,
)

MAX_LENGTH = 48
DPO_LORA = {
    "model_name_or_path": "rf-tiny-llama",
    "trainer_type": "dpo",
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,  # DPO trains without dropout, as TRL's disable_dropout: the runs must not depend on it
    "learning_rate": 5e-3,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "num_train_epochs": 2,
    "warmup_steps": 2,
    "max_length": MAX_LENGTH,
    "seed": 7,
}
DPO_FULL = {**DPO_LORA, "model_name_or_path": "rf-tiny-gpt2", "use_peft": False, "learning_rate": 1e-3}
SFT_LORA = {key: value for key, value in DPO_LORA.items() if key != "trainer_type"}


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    for name in ("rf-tiny-llama", "rf-tiny-gpt2"):
        ensure_pretrained(name, cache, pretrain_steps=0)
    return cache


@pytest.fixture(scope="module")
def preference_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = stdlib_preference_examples(limit=48)
    return rows[:32], rows[32:]


@pytest.fixture(scope="module")
def make_trainer(model_cache: Path, preference_rows) -> Callable[..., SlotTrainer]:
    sft_rows = stdlib_sft_examples(limit=48)

    def create_model_fn(config: dict[str, Any]):
        return load_base_model(config["model_name_or_path"], model_cache)

    def make(**kwargs: Any) -> SlotTrainer:
        kwargs.setdefault("create_model_fn", create_model_fn)
        kwargs.setdefault("train_dataset", {"sft": sft_rows[:32], "dpo": preference_rows[0]})
        kwargs.setdefault("eval_dataset", {"sft": sft_rows[32:], "dpo": preference_rows[1]})
        return SlotTrainer(num_threads=NUM_THREADS, **kwargs)

    return make


# ----------------------------------------------------------------------------------------- TRL's numbers


def trl_trainer(model: Any, rows: list[dict[str, Any]], tmp_path: Path, ref_model: Any = None, **settings: Any):
    from trl import DPOConfig, DPOTrainer

    arguments = DPOConfig(
        output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none", gradient_checkpointing=False,
        max_length=MAX_LENGTH, per_device_train_batch_size=len(rows), **settings,
    )  # fmt: skip
    peft_config = None if ref_model is not None else LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=arguments,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=model_tokenizer(model),
        peft_config=peft_config,
    )


_TOKENIZERS: dict[int, Any] = {}


def model_tokenizer(model: Any) -> Any:
    return _TOKENIZERS[id(model)]


def tiny(model_cache: Path, name: str = "rf-tiny-llama") -> tuple[Any, Any]:
    model, tokenizer = load_base_model(name, model_cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _TOKENIZERS[id(model)] = tokenizer
    return model, tokenizer


STANDARD = [
    {"prompt": "def add(x, y):", "chosen": " return x + y", "rejected": " return x - y  # wrong"},
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green, mostly."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
]
IMPLICIT = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in STANDARD]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
    for row in STANDARD
]


@pytest.mark.parametrize("rows", [STANDARD, IMPLICIT, CONVERSATIONAL], ids=["standard", "implicit", "conversational"])
def test_preference_rows_tokenize_and_collate_as_trls_dpo_trainer(rows, model_cache, tmp_path) -> None:
    model, tokenizer = tiny(model_cache)
    trainer = trl_trainer(model, rows, tmp_path)
    expected = trainer.data_collator([trainer.train_dataset[index] for index in range(len(rows))])
    batch = tokenize_preferences(rows, tokenizer, MAX_LENGTH).batch(list(range(len(rows))))
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], expected[key]), key


def perturbed(model: Any, seed: int = 0) -> None:
    """Move trainable weights off their initial values, so the policy and its reference differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def ours(model: Any, reference_model: Any, batch: dict[str, torch.Tensor], config: dict[str, Any], within=None):
    """Our loss and metrics; `within` is what the reference forward runs under (a LoRA host's adapters off)."""
    with torch.no_grad(), within() if within else contextlib.nullcontext():
        reference_logits = reference_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference_logps = completion_logps(reference_logits, batch["input_ids"], batch["completion_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = completion_logps(logits, batch["input_ids"], batch["completion_mask"])
    return dpo_loss(logps, reference_logps, batch["completion_mask"], config)


def gradients(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# A gradient is a float32 sum over the batch of terms larger than itself: the two implementations order the sums
# differently, which leaves differences of about one float32 ulp of those terms (1.2e-7 seen on a LoRA gradient of
# largest entry 0.09, so 1.3e-6 relative, under load). The loss is compared at 1e-6, gradients at 1e-5 (as GRPO's).
LOSS_RELATIVE = 1e-6
GRADIENT_RELATIVE = 1e-5


def assert_close_relative(
    ours_value: torch.Tensor, theirs: torch.Tensor, what: str, tolerance: float = LOSS_RELATIVE
) -> None:
    scale = theirs.abs().max().clamp(min=1e-12)
    assert ((ours_value - theirs).abs().max() / scale).item() <= tolerance, what


@pytest.mark.parametrize(
    "settings",
    [{}, {"loss_type": "ipo", "beta": 0.5}, {"loss_type": "hinge"}, {"loss_type": "robust", "label_smoothing": 0.2}],
    ids=["sigmoid", "ipo", "hinge", "robust"],
)
def test_lora_dpo_loss_rewards_and_gradients_equal_trls(settings, model_cache, tmp_path) -> None:
    model, tokenizer = tiny(model_cache)
    trainer = trl_trainer(model, STANDARD, tmp_path, **settings)
    policy = trainer.model
    perturbed(policy)
    policy.train()
    inputs = trainer.data_collator([trainer.train_dataset[index] for index in range(len(STANDARD))])
    trl_loss = trainer._compute_loss(policy, inputs, False)
    trl_loss.backward()
    trl_gradients = gradients(policy)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    policy.zero_grad(set_to_none=True)

    config = normalize_config({"trainer_type": "dpo", **settings})
    batch = tokenize_preferences(STANDARD, tokenizer, MAX_LENGTH).batch(list(range(len(STANDARD))))
    loss, metrics = ours(policy, policy, batch, config, within=policy.disable_adapter)
    loss.backward()
    assert trl_gradients and gradients(policy).keys() == trl_gradients.keys()
    assert_close_relative(loss.detach(), trl_loss.detach(), "loss")
    for name, gradient in gradients(policy).items():
        assert_close_relative(gradient, trl_gradients[name], name, GRADIENT_RELATIVE)
    for name in ("logps/chosen", "logps/rejected", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-6), name
    # A reward is beta * (logps - reference logps): two float32 sums of ~40 in magnitude whose difference is ~0.2,
    # so it matches to 1e-6 of the log-probabilities it comes from (float32 rounding of each), not of itself.
    beta = config["beta"] or 0.1
    cancellation = 1e-6 * beta * max(abs(trl_metrics["logps/chosen"]), abs(trl_metrics["logps/rejected"]))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=cancellation), name
    assert metrics["rewards/margins"] != 0  # the policy moved off its reference: a real comparison


def test_full_fine_tune_dpo_against_a_frozen_reference_equals_trls(model_cache, tmp_path) -> None:
    model, tokenizer = tiny(model_cache, "rf-tiny-gpt2")
    reference = copy.deepcopy(model)
    perturbed(model, seed=1)
    trainer = trl_trainer(model, STANDARD, tmp_path, ref_model=reference)
    policy = trainer.model
    policy.train()
    inputs = trainer.data_collator([trainer.train_dataset[index] for index in range(len(STANDARD))])
    trl_loss = trainer._compute_loss(policy, inputs, False)
    trl_loss.backward()
    trl_gradients = gradients(policy)
    policy.zero_grad(set_to_none=True)

    batch = tokenize_preferences(STANDARD, tokenizer, MAX_LENGTH).batch(list(range(len(STANDARD))))
    loss, _ = ours(policy, reference, batch, normalize_config({"trainer_type": "dpo"}))
    loss.backward()
    assert_close_relative(loss.detach(), trl_loss.detach(), "loss")
    for name, gradient in gradients(policy).items():
        assert_close_relative(gradient, trl_gradients[name], name, GRADIENT_RELATIVE)


# ------------------------------------------------------------------------------------- the engine's contract


def config_of(base: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return normalize_config({**base, **overrides})


def run_chunks(
    make_trainer,
    config: dict,
    run_dir: Path,
    num_chunks: int,
    *,
    alternate: bool = False,
    warm: WarmStart | None = None,
) -> tuple[Recorder, Any]:
    """Train a run in `num_chunks` chunks: on one trainer, or alternating between two (every chunk through disk)."""
    trainers = [make_trainer(), make_trainer()] if alternate else [make_trainer()]
    recorder = Recorder()
    outcome = None
    for chunk in plan_chunks(32, config, num_chunks):
        trainer = trainers[chunk.index % len(trainers)]
        outcome = train_ok(trainer, task_for(1, config, chunk, run_dir, warm if chunk.index == 0 else None), recorder)
        if alternate:
            trainer.release(1)
    return recorder, outcome


@pytest.mark.parametrize("base", [DPO_LORA, DPO_FULL], ids=["lora", "full"])
def test_dpo_chunked_through_disk_equals_straight_through(make_trainer, base, tmp_path) -> None:
    config = config_of(base)
    straight, last_straight = run_chunks(make_trainer, config, tmp_path / "straight", 1)
    chunked, last_chunked = run_chunks(make_trainer, config, tmp_path / "chunked", 4, alternate=True)
    assert last_chunked is not None and last_chunked.status == "completed"
    for name in ("train_loss", "learning_rate", *DPO_METRICS):
        assert straight.values(name) == chunked.values(name), name
    assert_same_weights(final_weights(last_straight), final_weights(last_chunked))
    steps = [step for step, _ in straight.values("rewards/accuracies")]
    assert steps == list(range(1, 9))  # 32 pairs, 8 per step, 2 epochs
    # Evaluated at every boundary: each epoch's end in both, and at 6 more boundaries when chunked.
    for name in ("eval_loss", *(f"eval_{metric}" for metric in DPO_METRICS)):
        chunked_evals = dict(chunked.values(name))
        assert len(chunked_evals) == 8, name
        assert [(step, chunked_evals[step]) for step in (4, 8)] == straight.values(name), name
    # The preference is learnt: the margin on the training pairs grows.
    margins = [value for _, value in straight.values("rewards/margins")]
    assert margins[-1] > margins[0]


def test_dpo_run_trains_without_dropout_and_an_sft_run_on_the_same_base_keeps_it(make_trainer, tmp_path) -> None:
    with_dropout = config_of(DPO_LORA, lora_dropout=0.3)
    recorder, _ = run_chunks(make_trainer, config_of(DPO_LORA), tmp_path / "a", 1)
    other, _ = run_chunks(make_trainer, with_dropout, tmp_path / "b", 1)
    assert recorder.values("train_loss") == other.values("train_loss")

    trainer = make_trainer()
    sft = config_of(SFT_LORA, lora_dropout=0.3)
    sft_alone = Recorder()
    train_ok(make_trainer(), task_for(2, sft, plan_chunks(32, sft, 1)[0], tmp_path / "sft-alone"), sft_alone)
    after_dpo = Recorder()
    dpo_chunk = plan_chunks(32, config_of(DPO_LORA), 1)[0]
    train_ok(trainer, task_for(1, config_of(DPO_LORA), dpo_chunk, tmp_path / "dpo"), Recorder())
    train_ok(trainer, task_for(2, sft, plan_chunks(32, sft, 1)[0], tmp_path / "sft-after"), after_dpo)
    assert sft_alone.values("train_loss") == after_dpo.values("train_loss")


def sft_parent(make_trainer, tmp_path: Path) -> tuple[WarmStart, Any]:
    config = config_of(SFT_LORA)
    _, outcome = run_chunks(make_trainer, config, tmp_path / "parent", 2)
    assert outcome is not None and outcome.checkpoint is not None
    warm = WarmStart(parent_run_id=9, parent_checkpoint=outcome.checkpoint, parent_step=outcome.step, mode="weights")
    return warm, outcome


def test_sft_to_dpo_warm_clone_is_anchored_to_its_parent_and_chunks_exactly(make_trainer, tmp_path) -> None:
    warm, parent = sft_parent(make_trainer, tmp_path)
    config = config_of(DPO_LORA)
    straight, last_straight = run_chunks(make_trainer, config, tmp_path / "straight", 1, warm=warm)
    chunked, last_chunked = run_chunks(make_trainer, config, tmp_path / "chunked", 4, alternate=True, warm=warm)
    assert straight.values("train_loss") == chunked.values("train_loss")
    assert_same_weights(final_weights(last_straight), final_weights(last_chunked))

    # Its reference is the parent's weights: at its first step the policy is its reference, so every reward is 0.
    assert straight.values("rewards/margins")[0][1] == 0.0
    assert straight.values("train_loss")[0][1] == pytest.approx(0.6931471805599453)
    reference = load_checkpoint(reference_path(tmp_path / "straight"))
    assert_same_weights(reference["weights"], final_weights(parent))
    assert load_checkpoint(last_chunked.checkpoint)["reference"]["key"] == "run 9 at step 8"

    # Anchored to the base instead, its first rewards are not 0: the parent moved away from the base.
    base_anchored, _ = run_chunks(make_trainer, config_of(DPO_LORA, ref_model="base"), tmp_path / "base", 1, warm=warm)
    assert base_anchored.values("rewards/margins")[0][1] != 0.0
    assert not reference_path(tmp_path / "base").exists()


def test_a_clone_of_a_dpo_run_keeps_its_reference_and_never_takes_its_moments(make_trainer, tmp_path) -> None:
    warm, _ = sft_parent(make_trainer, tmp_path)
    config = config_of(DPO_LORA)
    _, dpo_parent = run_chunks(make_trainer, config, tmp_path / "dpo", 2, warm=warm)
    assert dpo_parent is not None
    grandchild_warm = WarmStart(10, dpo_parent.checkpoint, dpo_parent.step, "weights+optimizer")
    trainer = make_trainer()
    chunk = plan_chunks(32, config, 2)[0]
    train_ok(trainer, task_for(3, config, chunk, tmp_path / "grandchild", grandchild_warm), Recorder())
    reference = load_checkpoint(reference_path(tmp_path / "grandchild"))
    assert_same_weights(reference["weights"], load_checkpoint(reference_path(tmp_path / "dpo"))["weights"])
    # The same objective: its moments came along. An SFT clone of the DPO run starts with fresh moments.
    assert load_checkpoint(init_checkpoint_path(tmp_path / "grandchild"))["optimizer"]["state"]
    sft = config_of(SFT_LORA)
    train_ok(trainer, task_for(4, sft, plan_chunks(32, sft, 2)[0], tmp_path / "sft-clone", grandchild_warm), Recorder())
    assert not load_checkpoint(init_checkpoint_path(tmp_path / "sft-clone"))["optimizer"]["state"]


def test_a_reference_leaves_memory_with_the_last_run_anchored_to_it(make_trainer, tmp_path) -> None:
    warm, _ = sft_parent(make_trainer, tmp_path)
    config = config_of(DPO_LORA)
    trainer = make_trainer()
    chunks = plan_chunks(32, config, 2)
    first = task_for(1, config, chunks[0], tmp_path / "a", warm)
    train_ok(trainer, first, Recorder())
    train_ok(trainer, task_for(2, config, chunks[0], tmp_path / "b", warm), Recorder())
    host = next(iter(trainer._bases.values())).lora_host
    references = [name for name in host.peft_config if name.startswith("reference-")]
    assert len(references) == 1  # both clones are anchored to run 9 at the same step: one frozen adapter
    trainer.release(1)
    assert [name for name in host.peft_config if name.startswith("reference-")] == references  # run 2 still holds it
    trainer.release(2)
    assert not [name for name in host.peft_config if name.startswith("reference-")]
    # Swapped back in, the run finds its reference on disk again and trains on as it would have.
    resumed, kept = Recorder(), Recorder()
    train_ok(trainer, task_for(1, config, chunks[1], tmp_path / "a"), resumed)
    straight = make_trainer()
    train_ok(straight, task_for(3, config, chunks[0], tmp_path / "c", warm), Recorder())
    train_ok(straight, task_for(3, config, chunks[1], tmp_path / "c"), kept)
    assert resumed.values("train_loss") == kept.values("train_loss")
