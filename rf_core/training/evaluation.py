"""A config's metrics beyond eval_loss: which `compute_metrics` it uses, and what that function is given.

Two contracts, told apart by the signature:
- HF's `compute_metrics(eval_prediction)` (one required positional parameter) gets a `transformers.EvalPrediction`
  that unpacks as `(predictions, label_ids)`. With `predict_with_generate` both hold texts: what the model generated
  for each eval prompt and the reference completion (RapidFire AI's and Seq2SeqTrainer's usage); without it, HF's
  arrays: the logits [examples, tokens, vocabulary] and the label ids (-100 where no loss is taken).
- the engine's `compute_metrics(model, tokenizer, eval_examples)` gets the model and the raw eval rows.
Either may call `rf_core.evaluation_context()` to learn the run and the step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from rf_core.config import DEFAULT_MAX_NEW_TOKENS
from rf_core.functions import BUILTIN_METRICS, EvaluationContext, evaluating, resolve
from rf_core.messages import ChunkSpec
from rf_core.text_metrics import text_metric
from rf_core.training.data import IGNORE_INDEX, GenerationSet

MetricsFn = Callable[..., Mapping[str, Any]]


def metrics_function(
    config: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]], default: MetricsFn | None
) -> MetricsFn | None:
    """The function that scores this config: its `compute_metrics` by name (a built-in or a registered one), or
    the experiment's `default` when it names none."""
    name = config.get("compute_metrics")
    if name is None:
        return default
    if name in BUILTIN_METRICS:
        return _builtin(name)
    return resolve(functions, "compute_metrics", name)


def evaluates_at_boundary(config: Mapping[str, Any], chunk: ChunkSpec, run_total_steps: int) -> bool:
    """Whether the run is evaluated at the end of `chunk` (its best checkpoint is chosen among these)."""
    strategy = config["eval_strategy"]
    if strategy == "chunk":
        return True
    if strategy == "no":
        return False
    if chunk.end_step == run_total_steps:  # every evaluated run ends with a value
        return True
    if strategy == "epoch":
        return chunk.chunk_in_epoch == chunk.num_chunks - 1
    return chunk.end_step % config["eval_steps"] == 0


def evaluates_after_step(config: Mapping[str, Any], step: int) -> bool:
    """Whether the run is evaluated after optimizer step `step` inside a chunk (eval_strategy steps)."""
    return config["eval_strategy"] == "steps" and step % config["eval_steps"] == 0


def _builtin(name: str) -> MetricsFn:
    def builtin_metric(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions, references = eval_prediction
        return {name: text_metric(name, predictions, references)}

    return builtin_metric


def takes_eval_prediction(function: Callable[..., Any]) -> bool:
    """True for HF's form, `compute_metrics(eval_prediction)`: exactly one required positional parameter."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) == 1


def generate_texts(
    model: Any, tokenizer: Any, generation: GenerationSet, config: Mapping[str, Any], seed: int
) -> list[str]:
    """What the model writes after each prompt, batched and left-padded, with the config's `generation_config`
    (greedy and DEFAULT_MAX_NEW_TOKENS new tokens unless it says otherwise); special tokens dropped, stripped."""
    settings = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, **(config["generation_config"] or {})}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    batch_size = config["per_device_eval_batch_size"]
    torch.manual_seed(seed)  # sampling repeats for a run and step; the caller restores the training RNG after
    texts: list[str] = []
    for start in range(0, len(generation.prompts), batch_size):
        prompts = generation.prompts[start : start + batch_size]
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **settings,
        )
        texts += [text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]
    return texts


def stacked_logits(logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> EvalPrediction:
    """Per-batch logits and labels as HF hands them over: one array each, padded to the longest (labels with -100)."""
    width = max(int(batch.shape[1]) for batch in labels)
    padded_logits = [np.pad(b.numpy(), ((0, 0), (0, width - b.shape[1]), (0, 0))) for b in logits]
    padded_labels = [np.pad(b.numpy(), ((0, 0), (0, width - b.shape[1])), constant_values=IGNORE_INDEX) for b in labels]
    return EvalPrediction(predictions=np.concatenate(padded_logits), label_ids=np.concatenate(padded_labels))


def call_metrics(
    function: MetricsFn,
    context: EvaluationContext,
    *,
    eval_prediction: EvalPrediction | None,
    model: Any,
    tokenizer: Any,
    eval_examples: Sequence[Any],
) -> dict[str, float]:
    """Run `function` in its contract with `context` set; every value must be a number."""
    with evaluating(context):
        if takes_eval_prediction(function):
            result = function(eval_prediction)
        else:
            result = function(model, tokenizer, eval_examples)
    if not isinstance(result, Mapping):
        raise TypeError(f"compute_metrics returned {type(result).__name__}, expected a dict of metric name -> number")
    metrics = {}
    for name, value in result.items():
        try:
            metrics[str(name)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"compute_metrics returned {name!r}: {value!r}, not a number") from None
    return metrics
