"""Small causal LMs that need no download: built, briefly pretrained on CPython's help text, and cached.

The built-in names ("rf-tiny-llama", "rf-tiny-gpt2") are saved with `save_pretrained` into the model cache and
then loaded exactly like any local folder or hub name, with `from_pretrained(..., local_files_only=True)`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from rf_core.model_roots import ROOTS_ENV, is_hub_id, model_source_problem
from rf_core.paths import model_cache_dir
from rf_core.training.data import pretraining_texts

VOCAB_SIZE = 2048
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BUILD_SEED = 1234
PRETRAIN_STEPS = 600  # a base that knows some English, so LoRA configs end visibly apart; ~30 s on 2 cores
PRETRAIN_BATCH_SIZE = 8
PRETRAIN_SEQ_LEN = 64
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 20
_MAX_POSITIONS = 1024
# The tiny models' chat template: each turn is "<|role|>\n", its content and the end-of-text token. The generation
# prompt opens an assistant turn, so a rendered prompt is always a prefix of the prompt with its completion.
# Assistant turns sit inside {% generation %} markers, so `assistant_only_loss` can tell them apart; the text is the
# same as without the markers.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}{% generation %}"
    "{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _tiny_llama_config(vocab_size: int, eos_id: int, pad_id: int) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _tiny_gpt2_config(vocab_size: int, eos_id: int, pad_id: int) -> PretrainedConfig:
    # GPT-2 keeps its default dropout (0.1): useful for checking that training is exact with dropout on.
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=_MAX_POSITIONS,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


TINY_MODELS: dict[str, Callable[[int, int, int], PretrainedConfig]] = {
    "rf-tiny-llama": _tiny_llama_config,
    "rf-tiny-gpt2": _tiny_gpt2_config,
}


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that is neither built in, a local folder, nor in the local Hugging Face cache."""


def ensure_pretrained(name: str, cache_dir: Path, *, pretrain_steps: int = PRETRAIN_STEPS) -> Path:
    """Folder of the built-in model `name` under `cache_dir`, building it first if it is not there.

    Building trains the tokenizer, random-initialises the model with a fixed seed, pretrains it for
    `pretrain_steps` full fine-tuning steps (0: keep the random init) and moves the saved folder into place
    atomically. A file lock makes concurrent builders of one name wait for the first and reuse its result.
    The caller's RNG state is left untouched.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(TINY_MODELS)}")
    if pretrain_steps < 0:
        raise ValueError(f"{pretrain_steps=} must be >= 0")
    cache_dir = Path(cache_dir)
    target = cache_dir / name
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{name}.lock"):
        if target.is_dir():  # built by another process while we waited for the lock
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=cache_dir))
        try:
            with torch.random.fork_rng(devices=[]):
                _build(name, staging, pretrain_steps)
            os.chmod(staging, 0o755)  # mkdtemp makes it private; the finished model is an ordinary folder
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def load_base_model(
    name_or_path: str, cache_dir: Path, model_kwargs: Mapping[str, Any] | None = None
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) for a built-in tiny name, a local folder, or a hub name already in the local cache.

    Everything goes through `from_pretrained(..., local_files_only=True)`: nothing is ever downloaded.
    `model_kwargs` are a config's (`rf_core.config.MODEL_KWARGS`): dtype, attention implementation, cache use.
    """
    if name_or_path in TINY_MODELS:
        source = str(ensure_pretrained(name_or_path, cache_dir))
    else:
        source = _local_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, **from_pretrained_kwargs(model_kwargs)
        )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"cannot load model {name_or_path!r}: it is not a built-in model "
            f"({', '.join(sorted(TINY_MODELS))}), "
            f"a local model folder, or a hub model already in the local cache (downloads are off): {error}"
        ) from error
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batches need a pad id; pads are masked out of the loss
    if name_or_path in TINY_MODELS and tokenizer.chat_template is None:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE  # a tiny model cached before its tokenizer had one
    return model, tokenizer


def demo_create_model_fn(config: dict[str, Any]) -> tuple[PreTrainedModel, Any]:
    """The demo experiment's `create_model_fn`: the run's base model from the engine's model cache."""
    return load_base_model(config["model_name_or_path"], model_cache_dir(), config.get("model_kwargs"))


def from_pretrained_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A config's model_kwargs as `from_pretrained` takes them (device_map is the engine's to decide)."""
    kwargs = {key: value for key, value in (model_kwargs or {}).items() if key != "device_map"}
    dtype = kwargs.pop("torch_dtype", None)
    if dtype is not None:
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    return kwargs


def _local_source(name_or_path: str) -> str:
    """The folder to load: a hub id's snapshot in the local Hugging Face cache (never a folder of that name in
    the working directory), or a local path inside the model roots."""
    problem = model_source_problem(name_or_path)
    if problem is not None:
        raise ModelNotFoundError(problem)
    if not is_hub_id(name_or_path):
        return str(Path(name_or_path).expanduser())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"cannot load model {name_or_path!r}: it is not a built-in model ({', '.join(sorted(TINY_MODELS))}) "
            f"and, as a hub id, it is not in the local Hugging Face cache (downloads are off); for a local folder "
            f"give its absolute path, under {ROOTS_ENV} ({error.__class__.__name__})"
        ) from error


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 2048) trained on `pretraining_texts`, with eos and pad tokens. Deterministic."""
    bpe = Tokenizer(tokenizer_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(pretraining_texts(), bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=_MAX_POSITIONS
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _build(name: str, folder: Path, pretrain_steps: int) -> None:
    tokenizer = build_tokenizer()
    config = TINY_MODELS[name](len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(BUILD_SEED)
    model = AutoModelForCausalLM.from_config(config)
    if pretrain_steps:
        _pretrain(model, tokenizer, pretrain_steps)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _pretrain(model: PreTrainedModel, tokenizer: Any, steps: int) -> None:
    """Full training on random windows of the help-topic text: a next-token LM, nothing fancy."""
    stream: list[int] = []
    # The backend tokenizer directly: the wrapper warns about texts longer than the model's context.
    for encoding in tokenizer.backend_tokenizer.encode_batch(pretraining_texts(), add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_token_id)
    tokens = torch.tensor(stream, dtype=torch.long)
    windows = torch.Generator().manual_seed(BUILD_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / PRETRAIN_WARMUP) * max(0.1, 1 - step / steps)
    )
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - PRETRAIN_SEQ_LEN, (PRETRAIN_BATCH_SIZE,), generator=windows)
        batch = torch.stack([tokens[start : start + PRETRAIN_SEQ_LEN] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
