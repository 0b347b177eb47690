"""GRPO's numbers against TRL's `GRPOTrainer`: on fixed completions and rewards (its generation replaced by ours),
TRL's own `_generate_and_score_completions` and `_compute_loss` give the advantages, loss, metrics and gradients that
`rf_core.training.grpo` computes. TRL is the reference here only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from peft import LoraConfig

from rf_core.training.grpo import completion_token_logps, group_advantages, grpo_loss
from rf_core.training.models import ensure_pretrained, load_base_model

NUM_GENERATIONS = 4
PROMPTS = ["def add(x, y):", "The sky is"]


def length_reward(completions: list[str], **_: Any) -> list[float]:
    return [float(len(text)) / 10 for text in completions]


def has_digit(completions: list[str], **_: Any) -> list[float | None]:
    # None for one completion: TRL leaves it out of this function's statistics
    return [None if index == 1 else float(any(c.isdigit() for c in text)) for index, text in enumerate(completions)]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    ensure_pretrained("rf-tiny-llama", cache, pretrain_steps=0)
    return cache


def fixed_completions(tokenizer: Any) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Per completion (prompts repeated NUM_GENERATIONS times): prompt ids, completion ids (ending with EOS, or cut
    at the length limit), and the completion's text."""
    texts = ["x + y", " return 42", "??", " blue", " 7 7 7", "", " green and wide", "1"]
    prompt_ids, completion_ids = [], []
    for index, text in enumerate(texts):
        prompt_ids.append(tokenizer(text=PROMPTS[index // NUM_GENERATIONS])["input_ids"])
        ids = tokenizer(text=text, add_special_tokens=False)["input_ids"][:6]
        completion_ids.append(ids + ([tokenizer.eos_token_id] if index % 3 else []))
    return prompt_ids, completion_ids, texts


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"loss_type": "grpo", "beta": 0.04},
        {"loss_type": "bnpo", "scale_rewards": "batch"},
        {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.1},
    ],
    ids=["dapo", "grpo-kl", "bnpo-batch", "dr_grpo-none-kl"],
)
def test_advantages_loss_metrics_and_gradients_equal_trls(settings, model_cache, tmp_path) -> None:
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_base_model("rf-tiny-llama", model_cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arguments = GRPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
        per_device_train_batch_size=len(PROMPTS) * NUM_GENERATIONS, num_generations=NUM_GENERATIONS,
        max_completion_length=8, temperature=0.7, reward_weights=[1.0, 0.5], **settings,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[length_reward, has_digit],
        args=arguments,
        train_dataset=datasets.Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    policy = trainer.model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    prompt_ids, completion_ids, texts = fixed_completions(tokenizer)
    trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, texts, None, {}, None, [])
    trainer.current_gradient_accumulation_steps = 1
    policy.train()
    rows = [{"prompt": prompt} for prompt in PROMPTS for _ in range(NUM_GENERATIONS)]
    scored = trainer._generate_and_score_completions(rows)
    trl_loss = trainer._compute_loss(policy, scored)
    trl_loss.backward()
    trl_gradients = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    policy.zero_grad(set_to_none=True)

    config = {"loss_type": None, "epsilon": 0.2, "beta": None, "scale_rewards": "group", **settings}
    rewards = torch.tensor(
        [[value if value is not None else float("nan") for value in column] for column in
         zip(length_reward(texts), has_digit(texts), strict=True)],
        dtype=torch.float32,
    )  # fmt: skip
    advantages, reward_metrics = group_advantages(
        rewards, [1.0, 0.5], NUM_GENERATIONS, config["scale_rewards"], ["length_reward", "has_digit"]
    )
    assert torch.allclose(advantages, scored["advantages"], rtol=1e-6, atol=1e-7)
    for name, value in reward_metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-7, nan_ok=True), name

    input_ids = torch.cat([scored["prompt_ids"], scored["completion_ids"]], dim=1)
    attention_mask = torch.cat([scored["prompt_mask"], scored["completion_mask"]], dim=1)
    reference = None
    if config["beta"]:
        with torch.no_grad(), policy.disable_adapter():
            reference_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        reference, _ = completion_token_logps(reference_logits, scored["completion_ids"], 0.7)
        mask = scored["completion_mask"].bool()  # TRL's are 0 past a completion's end
        assert torch.allclose(reference[mask], scored["ref_per_token_logps"][mask], rtol=1e-5, atol=1e-6)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    logps, entropies = completion_token_logps(logits, scored["completion_ids"], 0.7)
    loss, metrics = grpo_loss(
        logps, reference, scored["completion_mask"], advantages, config,
        tokens_in_generation_batch=float(scored["num_items_in_batch"]), accumulation=1, max_completion_length=8,
        entropies=entropies,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-9)
    for name, parameter in policy.named_parameters():
        if parameter.grad is None:
            continue
        expected = trl_gradients[name]
        scale = expected.abs().max().clamp(min=1e-12)
        assert ((parameter.grad - expected).abs().max() / scale).item() <= 1e-5, name
    for name in ("clip_ratio/region_mean", "entropy", *(["kl"] if config["beta"] else [])):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-7), name
    assert reward_metrics["reward_std"] > 0 and advantages.abs().sum() > 0  # a real comparison


# ------------------------------------------------------------------------------------- the engine's GRPO runs

GRPO_LORA = {
    "model_name_or_path": "rf-tiny-llama",
    "trainer_type": "grpo",
    "reward_funcs": ["starts_upper", "short"],
    "reward_weights": [1.0, 0.5],
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_completion_length": 8,
    "r": 4,
    "lora_alpha": 8,
    "learning_rate": 5e-3,
    "max_length": 64,
    "seed": 3,
}
NUM_PROMPTS = 16  # 2 prompts (8 completions) per step: 8 steps


def starts_upper(completions: list[str], **_: Any) -> list[float]:
    return [1.0 if text.strip()[:1].isupper() else 0.0 for text in completions]


def short(completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
    return [-len(ids) / 8 for ids in completion_ids]


def broken(completions: list[str], **_: Any) -> list[float]:
    raise KeyError("answer")


FUNCTIONS = {"starts_upper": starts_upper, "short": short, "broken": broken}


@pytest.fixture(scope="module")
def make_trainer(model_cache: Path):
    from rf_core.demo_data import stdlib_sft_examples
    from rf_core.training.trainer import SlotTrainer

    rows = [{"prompt": row["prompt"], "module": row["prompt"].split(".")[0]} for row in stdlib_sft_examples(limit=20)]

    def make() -> SlotTrainer:
        return SlotTrainer(
            lambda config: load_base_model(config["model_name_or_path"], model_cache),
            rows[:NUM_PROMPTS],
            rows[NUM_PROMPTS:],
            functions=FUNCTIONS,
            num_threads=2,
        )

    return make


def train_run(make_trainer, config: dict[str, Any], run_dir: Path, num_chunks: int, alternate: bool = False):
    from rf_core.chunks import plan_chunks
    from tests.training.test_trainer import Recorder, task_for, train_ok

    trainers = [make_trainer(), make_trainer()] if alternate else [make_trainer()]
    recorder, outcome = Recorder(), None
    for chunk in plan_chunks(NUM_PROMPTS, config, num_chunks):
        trainer = trainers[chunk.index % len(trainers)]
        outcome = train_ok(trainer, task_for(1, config, chunk, run_dir), recorder)
        if alternate:
            trainer.release(1)
    return recorder, outcome


@pytest.mark.parametrize("overrides", [{}, {"beta": 0.05, "loss_type": "grpo"}], ids=["dapo", "grpo-kl"])
def test_a_chunked_grpo_run_through_disk_equals_it_straight_through(make_trainer, overrides, tmp_path) -> None:
    from rf_core.config import normalize_config
    from tests.training.test_trainer import assert_same_weights, final_weights

    config = normalize_config({**GRPO_LORA, **overrides})
    straight, last_straight = train_run(make_trainer, config, tmp_path / "straight", 1)
    chunked, last_chunked = train_run(make_trainer, config, tmp_path / "chunked", 4, alternate=True)
    assert last_chunked.status == "completed"
    names = ["train_loss", "reward", "reward_std", "rewards/starts_upper/mean", "rewards/short/mean",
             "completions/mean_length", "entropy"] + (["kl"] if overrides else [])  # fmt: skip
    for name in names:
        assert straight.values(name) == chunked.values(name), name
    assert len(straight.values("reward")) == 8  # 16 prompts, 2 per step
    assert_same_weights(final_weights(last_straight), final_weights(last_chunked))
    # The policy gradient moved the adapter off its zero init (the loss is ~0 at ratio 1 by construction).
    assert any(tensor.abs().sum() > 0 for key, tensor in final_weights(last_straight).items() if "lora_B" in key)
    assert max(value for _, value in straight.values("reward_std")) > 0
    if overrides:
        assert straight.values("kl")[0] == (1, 0.0)  # a new adapter starts as the base, its reference
    # Evaluated at each boundary: generation seeded by run and step, so both agree where both evaluated.
    assert dict(chunked.values("eval_reward"))[8] == dict(straight.values("eval_reward"))[8]
    assert {"eval_loss", "eval_reward_std", "eval_completions/mean_length"} <= {row["name"] for row in straight.rows}


def test_a_reward_function_that_raises_fails_that_run_only_with_its_traceback(make_trainer, tmp_path) -> None:
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from tests.training.test_trainer import Recorder, task_for, train_ok

    trainer = make_trainer()
    failing = normalize_config({**GRPO_LORA, "reward_funcs": ["starts_upper", "broken"]})
    outcome = trainer.train(task_for(1, failing, plan_chunks(NUM_PROMPTS, failing, 2)[0], tmp_path / "a"), Recorder())
    assert outcome.status == "failed"
    assert outcome.error == "RuntimeError: reward function 'broken' raised KeyError: 'answer'"
    assert "def broken" in outcome.traceback or "KeyError" in outcome.traceback
    fine = normalize_config(GRPO_LORA)
    assert train_ok(trainer, task_for(2, fine, plan_chunks(NUM_PROMPTS, fine, 2)[0], tmp_path / "b"), Recorder())


@pytest.fixture(scope="module")
def grpo_runs(make_trainer, tmp_path_factory):
    """`runs(overrides)`: the rows and final weights of GRPO_LORA + overrides, trained once (2 chunks)."""
    from rf_core.config import normalize_config
    from tests.training.test_trainer import final_weights

    cache: dict[str, Any] = {}

    def runs(**overrides: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        key = repr(sorted(overrides.items()))
        if key not in cache:
            config = normalize_config({**GRPO_LORA, **overrides})
            recorder, outcome = train_run(make_trainer, config, tmp_path_factory.mktemp("grpo-knob"), 2)
            cache[key] = (recorder, final_weights(outcome))
        return cache[key]

    return runs


def values(recorder: Any, name: str) -> list[float]:
    return [value for _, value in recorder.values(name)]


def test_each_grpo_knob_is_honoured(grpo_runs) -> None:
    """One observable effect per GRPO knob (test_knobs_honoured.py covers the others)."""
    base, base_weights = grpo_runs()
    # num_generations: the same 8 completions per step come from 4 prompts of 2, so an epoch has half the steps.
    pairs, _ = grpo_runs(num_generations=2)
    assert len(values(base, "reward")) == 8 and len(values(pairs, "reward")) == 4
    # max_completion_length: completions stop at it.
    assert (
        max(values(grpo_runs(max_completion_length=3)[0], "completions/mean_length"))
        <= 3
        < max(values(base, "completions/mean_length"))
    )
    # temperature and top_p change what is sampled, and temperature the log-probabilities trained on.
    assert values(grpo_runs(temperature=0.3)[0], "entropy") != values(base, "entropy")
    assert values(grpo_runs(top_p=0.3)[0], "reward") != values(base, "reward")
    # scale_rewards: the same samples at the first step, updates of other sizes.
    unscaled, unscaled_weights = grpo_runs(scale_rewards="none")
    assert values(unscaled, "reward")[0] == values(base, "reward")[0]
    assert any(not torch.equal(unscaled_weights[key], base_weights[key]) for key in base_weights)
    # reward_funcs and reward_weights: what is rewarded, and how much each counts.
    upper_only, _ = grpo_runs(reward_funcs=["starts_upper"], reward_weights=None)
    assert "rewards/short/mean" not in {row["name"] for row in upper_only.rows}
    heavier, _ = grpo_runs(reward_weights=[1.0, 2.0])
    first_short = values(base, "rewards/short/mean")[0]
    assert values(heavier, "rewards/short/mean")[0] == first_short  # the same samples at the first step
    assert values(heavier, "reward")[0] == pytest.approx(values(base, "rewards/starts_upper/mean")[0] + 2 * first_short)
