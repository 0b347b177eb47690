"""Tiny offline models and the offline data: build/cache/reload, tokenizer, stdlib SFT pairs, tokenization."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from rf_core.training import models
from rf_core.training.data import (
    IGNORE_INDEX,
    demo_datasets,
    pretraining_texts,
    stdlib_sft_examples,
    tokenize_examples,
)
from rf_core.training.models import ModelNotFoundError, ensure_pretrained, load_base_model

QUICK_PRETRAIN_STEPS = 2  # the build path end to end, without the seconds of real pretraining


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    for name in models.TINY_MODELS:
        ensure_pretrained(name, cache, pretrain_steps=QUICK_PRETRAIN_STEPS)
    return cache


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path):
    return load_base_model("rf-tiny-llama", model_cache)[1]


# ------------------------------------------------------------------------------------------------ models


def test_tokenizer_round_trips_text_and_has_special_tokens(tokenizer) -> None:
    text = 'def f(x):\n    """Ünïcödé ✓ tabs\tand  spaces."""\n    return x ** 2\n'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges, not bytes
    assert len(tokenizer) == models.VOCAB_SIZE
    assert tokenizer.eos_token == models.EOS_TOKEN and tokenizer.pad_token == models.PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_ensure_pretrained_builds_once_then_hits_the_cache(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = model_cache / "rf-tiny-llama"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in model_cache.iterdir() if "building" in p.name]  # no staging leftovers

    def no_rebuild(*args: object) -> None:
        raise AssertionError("cache hit expected, but the model was rebuilt")

    monkeypatch.setattr(models, "_build", no_rebuild)
    assert ensure_pretrained("rf-tiny-llama", model_cache) == folder


def test_concurrent_builders_share_one_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = models._build
    builds: list[str] = []

    def counting_build(name: str, folder: Path, steps: int) -> None:
        builds.append(name)
        real_build(name, folder, steps)

    monkeypatch.setattr(models, "_build", counting_build)
    results: list[Path] = []
    # flock locks belong to open file descriptions, so two threads exclude each other like two processes.
    threads = [
        threading.Thread(target=lambda: results.append(ensure_pretrained("rf-tiny-gpt2", tmp_path, pretrain_steps=0)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == ["rf-tiny-gpt2"]
    assert results == [tmp_path / "rf-tiny-gpt2"] * 2


def test_build_is_deterministic_and_keeps_the_callers_rng(tmp_path: Path) -> None:
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    first = ensure_pretrained("rf-tiny-llama", tmp_path / "a", pretrain_steps=QUICK_PRETRAIN_STEPS)
    assert torch.equal(torch.rand(3), expected_next)
    second = ensure_pretrained("rf-tiny-llama", tmp_path / "b", pretrain_steps=QUICK_PRETRAIN_STEPS)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_built_models_reload_through_from_pretrained_and_differ_in_shape(model_cache: Path) -> None:
    llama, llama_tokenizer = load_base_model("rf-tiny-llama", model_cache)
    gpt2, _ = load_base_model(str(model_cache / "rf-tiny-gpt2"), model_cache)  # a plain local folder too
    assert llama.config.model_type == "llama" and gpt2.config.model_type == "gpt2"
    assert llama.config.tie_word_embeddings and llama.lm_head.weight is llama.model.embed_tokens.weight
    assert llama.config.hidden_size == 128 and llama.config.num_hidden_layers == 2
    assert gpt2.config.n_embd == 128 and gpt2.config.n_layer == 2
    assert set(llama.state_dict()) != set(gpt2.state_dict())
    batch = llama_tokenizer(["def f():"], return_tensors="pt")
    for model in (llama, gpt2):
        logits = model(**batch).logits
        assert logits.shape[-1] == models.VOCAB_SIZE and torch.isfinite(logits).all()


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_base_model(str(missing), tmp_path)
    with pytest.raises(ModelNotFoundError, match="someone/not-cached-model"):
        load_base_model("someone/not-cached-model", tmp_path)
    with pytest.raises(ValueError, match="unknown built-in model"):
        ensure_pretrained("rf-huge", tmp_path)


# -------------------------------------------------------------------------------------------------- data


def test_pretraining_texts_are_the_pydoc_topics() -> None:
    texts = pretraining_texts()
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000


def test_stdlib_sft_examples_are_many_real_unique_and_deterministic() -> None:
    examples = stdlib_sft_examples()
    assert len(examples) >= 1500
    assert examples == stdlib_sft_examples()
    assert stdlib_sft_examples(limit=10) == examples[:10]
    prompts = [example["prompt"] for example in examples]
    completions = [example["completion"] for example in examples]
    assert len(set(prompts)) == len(prompts) and len(set(completions)) == len(completions)
    assert all(p.startswith(("def ", "class ")) and p.endswith(":\n") for p in prompts)
    assert all(len(c) >= 20 and "\n" not in c for c in completions)
    assert " at 0x" not in "".join(prompts)  # object addresses would change between processes
    by_prompt = dict(zip(prompts, completions, strict=True))
    assert any(p.startswith("def json.dumps(") for p in by_prompt)
    assert by_prompt["def math.gcd(*integers):\n"].startswith("Greatest Common Divisor")


def test_stdlib_sft_examples_do_not_depend_on_what_the_process_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Libraries replace stdlib functions (Ray swaps inspect.isgenerator and sys.excepthook) and add logging
    handlers; a slot worker that imported one must still build the same data set as the flow that did not."""
    import inspect
    import logging
    import sys

    from rf_core import demo_data

    before = stdlib_sft_examples()
    monkeypatch.setattr(sys, "excepthook", lambda *args: None)
    monkeypatch.setattr(inspect, "isgenerator", lambda value: False)
    handler = logging.StreamHandler()
    logging.getLogger("a-library").addHandler(handler)
    demo_data._examples_from_a_clean_interpreter.cache_clear()
    try:
        assert stdlib_sft_examples() == before
    finally:
        logging.getLogger("a-library").removeHandler(handler)
    prompts = {example["prompt"] for example in before}
    assert "def inspect.isgenerator(object):\n" in prompts
    assert not any("<weakref" in prompt or "<function" in prompt for prompt in prompts)


def test_demo_datasets_split_is_deterministic_and_disjoint() -> None:
    train, evaluation = demo_datasets(eval_size=64)
    assert len(evaluation) == 64 and len(train) + 64 == len(stdlib_sft_examples())
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in evaluation}
    assert (train, evaluation) == demo_datasets(eval_size=64)
    with pytest.raises(ValueError, match="eval_size"):
        demo_datasets(eval_size=0)


def test_tokenize_trains_only_on_completion_and_eos(tokenizer) -> None:
    examples = [{"prompt": "def os.getcwd():\n", "completion": "Return the current directory."}]
    data = tokenize_examples(examples, tokenizer, max_length=32)
    prompt_ids = tokenizer(examples[0]["prompt"])["input_ids"]
    completion_ids = tokenizer(examples[0]["completion"], add_special_tokens=False)["input_ids"]
    length = len(prompt_ids) + len(completion_ids) + 1
    assert data.lengths.tolist() == [length] and data.tokens.shape == data.labels.shape == (length,)  # unpadded
    batch = data.batch([0], width=32)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (1, 32)
    assert batch["input_ids"][0, :length].tolist() == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert batch["labels"][0, : len(prompt_ids)].eq(IGNORE_INDEX).all()
    assert batch["labels"][0, len(prompt_ids) : length].tolist() == completion_ids + [tokenizer.eos_token_id]
    assert batch["labels"][0, length:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * length + [0] * (32 - length)
    assert batch["input_ids"][0, length:].eq(tokenizer.pad_token_id).all()
    assert data.truncated == 0


def test_tokenize_text_examples_and_truncation(tokenizer) -> None:
    long_prompt = {"prompt": "def f(" + "argument, " * 60 + "):\n", "completion": "Does things."}
    data = tokenize_examples([{"text": "hello world"}, long_prompt], tokenizer, max_length=16)
    both = data.batch([0, 1])
    text_length = int(data.lengths[0])
    assert both["labels"][0, :text_length].tolist() == both["input_ids"][0, :text_length].tolist()
    assert both["attention_mask"][1].all() and int(data.lengths[1]) == 16  # truncated to exactly max_length
    assert (both["labels"][1] != IGNORE_INDEX).sum() >= 1  # the prompt never crowds out the whole completion
    assert data.truncated == 1  # the long prompt, counted
    batch = data.batch([0])
    assert batch["input_ids"].shape == (1, text_length)  # micro-batches pad to their own longest row
    # A row exactly max_length long is not truncated; one token more is.
    exact = tokenize_examples([{"text": "hello world"}], tokenizer, max_length=text_length)
    assert (
        exact.truncated == 0 and tokenize_examples([{"text": "hello world"}], tokenizer, text_length - 1).truncated == 1
    )


def test_tokenize_accepts_any_iterable_of_dicts(tokenizer) -> None:
    rows = ({"text": f"line {i}"} for i in range(3))
    assert len(tokenize_examples(rows, tokenizer, max_length=8)) == 3


def test_tokenize_rejects_an_example_of_neither_form(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"example 1 has columns \['input', 'output'\]"):
        tokenize_examples([{"text": "ok"}, {"input": "a", "output": "b"}], tokenizer, max_length=8)
    with pytest.raises(ValueError, match="example 0"):
        tokenize_examples(["just a string"], tokenizer, max_length=8)


def test_the_tiny_models_factory_is_exported_and_loads_from_the_rf_home_cache(tmp_path, monkeypatch) -> None:
    from rf_core import create_tiny_model
    from rf_core.paths import model_cache_dir
    from rf_core.training.models import ensure_pretrained

    monkeypatch.setenv("RF_HOME", str(tmp_path))
    ensure_pretrained("rf-tiny-gpt2", model_cache_dir(), pretrain_steps=0)  # built here without the pretraining
    model, tokenizer = create_tiny_model({"model_name_or_path": "rf-tiny-gpt2", "learning_rate": 1e-3})
    assert model.config.model_type == "gpt2" and tokenizer.pad_token_id is not None
    with pytest.raises(models.ModelNotFoundError, match="not a built-in model"):
        create_tiny_model({"model_name_or_path": str(tmp_path / "no-such-folder")})


CHAT = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris, on the Seine."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
]
CHAT_PAIRS = [
    {"prompt": [{"role": "user", "content": "Name a prime number."}],
     "completion": [{"role": "assistant", "content": "Seven is prime."}]},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Colour of the sky?"}],
     "completion": [{"role": "assistant", "content": "Blue."}]},
]  # fmt: skip


def trl_reference(
    rows: list[dict], model_cache: Path, tmp_path: Path, **sft_config: Any
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row as TRL's own SFTTrainer prepares them (its defaults: completion-only loss for
    prompt-completion rows, all tokens of a conversation, no packing)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_base_model("rf-tiny-llama", model_cache)
    arguments = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        max_length=256,
        report_to="none",
        packing=False,
        bf16=False,
        use_cpu=True,
        **sft_config,
    )
    prepared = SFTTrainer(
        model=model, args=arguments, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    ).train_dataset
    return [(row["input_ids"], row["labels"]) for row in prepared]


def ours(rows: list[dict], tokenizer, **losses: Any) -> list[tuple[list[int], list[int]]]:
    data = tokenize_examples(rows, tokenizer, max_length=256, **losses)
    batch = data.batch(list(range(len(data))))
    return [
        (batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length].tolist())
        for row, length in enumerate(data.lengths.tolist())
    ]


@pytest.mark.parametrize("rows", [CHAT, CHAT_PAIRS], ids=["messages", "prompt-completion"])
def test_conversational_rows_tokenize_as_trls_sft_trainer_prepares_them(rows, tokenizer, model_cache, tmp_path):
    assert ours(rows, tokenizer) == trl_reference(rows, model_cache, tmp_path)


PAIRS = [{"prompt": "2 + 2 = ", "completion": "4"}, {"prompt": "The capital of France is", "completion": " Paris."}]


@pytest.mark.parametrize(
    ("rows", "losses"),
    [(CHAT, {"assistant_only_loss": True}), (CHAT_PAIRS, {"completion_only_loss": False})],
    ids=["messages-assistant-only", "chat-prompt-completion-all-tokens"],
)  # fmt: skip
def test_trls_loss_masks_are_trls(rows, losses, tokenizer, model_cache, tmp_path):
    reference = trl_reference(rows, model_cache, tmp_path, **losses)
    assert ours(rows, tokenizer, **losses) == reference
    assert ours(rows, tokenizer) != reference  # the option changed which tokens are trained


def test_completion_only_loss_false_trains_the_prompt_too(tokenizer):
    default, everything = ours(PAIRS, tokenizer), ours(PAIRS, tokenizer, completion_only_loss=False)
    assert [tokens for tokens, _ in everything] == [tokens for tokens, _ in default]
    assert all(labels == tokens for tokens, labels in everything)
    assert all(IGNORE_INDEX in labels for _, labels in default)


def test_assistant_only_loss_needs_conversations_and_generation_markers(model_cache) -> None:
    _, tokenizer = load_base_model("rf-tiny-llama", model_cache)
    with pytest.raises(ValueError, match=r"assistant_only_loss=true: example 0 is a 'prompt_completion' row"):
        tokenize_examples(PAIRS, tokenizer, max_length=64, assistant_only_loss=True)
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match=r"chat template has no \{% generation %\} markers"):
        tokenize_examples(CHAT, tokenizer, max_length=64, assistant_only_loss=True)


def test_conversational_rows_need_a_chat_template(model_cache) -> None:
    _, tokenizer = load_base_model("rf-tiny-llama", model_cache)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="example 0 is conversational, but the tokenizer has no chat template"):
        tokenize_examples(CHAT, tokenizer, max_length=64)


def test_a_datasets_dataset_tokenizes_like_the_list_it_was_made_from(tokenizer) -> None:
    import datasets

    for rows in (CHAT_PAIRS, [{"prompt": "2 + 2 = ", "completion": "4"}, {"prompt": "3 + 3 = ", "completion": "6"}]):
        from_list = tokenize_examples(rows, tokenizer, max_length=64)
        from_dataset = tokenize_examples(datasets.Dataset.from_list(rows), tokenizer, max_length=64)
        assert torch.equal(from_list.tokens, from_dataset.tokens)
        assert torch.equal(from_list.labels, from_dataset.labels)
        assert torch.equal(from_list.offsets, from_dataset.offsets)
