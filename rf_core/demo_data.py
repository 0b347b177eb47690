"""The demo's data, from the standard library alone: CPython's help topics (to pretrain the tiny models) and prompt →
completion pairs from standard-library docstrings (to fine-tune them). No torch here: a fit process that only
loads the demo's spec does not pay for it."""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from pathlib import Path

DEMO_SPLIT_SEED = 0


def pretraining_texts() -> list[str]:
    """CPython's help topics (79 texts, ~465 k characters), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_sft_examples(limit: int | None = None) -> list[dict[str, str]]:
    """Prompt → completion pairs from standard-library docstrings (see `rf_core.training.stdlib_docs`).

    The pairs are read in a fresh interpreter (`python -I -S`, standard library only), once per process: what
    this process has imported or patched (a library replacing `sys.excepthook`, logging handlers appearing in a
    signature's default) must not change the data set, or two processes of one fit would train on different data.
    """
    examples = _examples_from_a_clean_interpreter()
    return [dict(example) for example in (examples if limit is None else examples[:limit])]


@functools.cache
def _examples_from_a_clean_interpreter() -> tuple[dict[str, str], ...]:
    from rf_core.training import stdlib_docs

    script = Path(stdlib_docs.__file__)
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"reading the standard library's docstrings failed:\n{result.stderr[-2000:]}")
    return tuple(json.loads(result.stdout))


def demo_datasets(eval_size: int = 128) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The demo's (train, eval) split of `stdlib_sft_examples`, shuffled with a fixed seed."""
    examples = stdlib_sft_examples()
    if not 0 < eval_size < len(examples):
        raise ValueError(f"{eval_size=} must be between 1 and {len(examples) - 1}")
    random.Random(DEMO_SPLIT_SEED).shuffle(examples)
    return examples[eval_size:], examples[:eval_size]


def stdlib_preference_examples(limit: int | None = None, seed: int = DEMO_SPLIT_SEED) -> list[dict[str, str]]:
    """Preference rows (TRL's prompt / chosen / rejected) from the docstring pairs: chosen is the function's own
    docstring, rejected a plausible wrong one, another function's docstring drawn with a fixed seed (never the same
    text), so the same call gives the same rows in every process."""
    examples = stdlib_sft_examples()
    rng = random.Random(seed)
    rows = []
    for index, example in enumerate(examples if limit is None else examples[:limit]):
        other = examples[(index + rng.randrange(1, len(examples))) % len(examples)]["completion"]
        while other == example["completion"]:
            other = examples[rng.randrange(len(examples))]["completion"]
        rows.append({"prompt": example["prompt"], "chosen": example["completion"], "rejected": other})
    return rows


def demo_preference_datasets(eval_size: int = 64) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The DPO demo's (train, eval) split of `stdlib_preference_examples`, as `demo_datasets` splits its pairs."""
    examples = stdlib_preference_examples()
    random.Random(DEMO_SPLIT_SEED).shuffle(examples)
    return examples[eval_size:], examples[:eval_size]
