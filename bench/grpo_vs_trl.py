"""The engine's GRPO runs against TRL's `GRPOTrainer` on the same job: steps/s, in one process, alternated.

The same prompts (standard-library signatures), the same random-init Llama base, the same LoRA and optimizer
settings, 4 completions per prompt of at most `max_completion_length` tokens sampled at temperature 1 (a random-init
model almost never samples its end-of-sequence token, so both generate the full length), the same two reward
functions, one epoch each, alternated `--repeats` times with the same thread count. Each samples with its own RNG,
so their rewards differ step by step; the tokens generated are reported beside the rates.

    python bench/grpo_vs_trl.py [--smoke] [--out bench/results/grpo_vs_trl.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TrainTimer, build_llama_base, isolated_environment  # noqa: E402
from bench.sft_vs_trl import SHAPE, SMOKE_SHAPE, THREADS, load  # noqa: E402
from rf_core.demo import length_reward, sentence_reward  # noqa: E402


def prompts(count: int) -> list[dict[str, str]]:
    from rf_core.demo_data import stdlib_sft_examples

    return [{"prompt": row["prompt"]} for row in stdlib_sft_examples(limit=count)]


def job(smoke: bool) -> dict[str, Any]:
    return {
        "trainer_type": "grpo", "reward_funcs": ["sentence_reward", "length_reward"], "num_generations": 4,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_completion_length": 8 if smoke else 32,
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "learning_rate": 1e-4, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "num_train_epochs": 1, "max_length": 256, "seed": 17, "eval_strategy": "no",
    }  # fmt: skip


FUNCTIONS = {"sentence_reward": sentence_reward, "length_reward": length_reward}


def run_engine(folder: Path, rows: list[dict[str, Any]], settings: dict[str, Any], scratch: Path) -> dict[str, Any]:
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer

    config = normalize_config({"model_name_or_path": str(folder), **settings})
    trainer = SlotTrainer(lambda _: load(folder), rows, None, functions=FUNCTIONS, num_threads=THREADS)
    trainer.prepare([config])
    emitted: list[dict[str, Any]] = []
    seconds, steps = 0.0, 0
    for chunk in plan_chunks(len(rows), config, 1):
        outcome = trainer.train(TrainTask("bench", 1, config, chunk, str(scratch), 0), emitted.extend)
        assert outcome.status != "failed", outcome.traceback
        seconds += outcome.train_seconds
        steps += chunk.num_steps
    trainer.close()
    lengths = [row["value"] for row in emitted if row["name"] == "completions/mean_length"]
    rewards = [row["value"] for row in emitted if row["name"] == "reward"]
    return {"seconds": seconds, "steps": steps, "mean_completion_length": statistics.mean(lengths), "rewards": rewards}


def run_trl(folder: Path, rows: list[dict[str, Any]], settings: dict[str, Any], scratch: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(THREADS)
    model, tokenizer = load(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arguments = GRPOConfig(
        output_dir=str(scratch / "trl"), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        learning_rate=settings["learning_rate"], lr_scheduler_type=settings["lr_scheduler_type"], warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=1, num_generations=settings["num_generations"],
        max_completion_length=settings["max_completion_length"], num_train_epochs=1, logging_steps=1,
        save_strategy="no", eval_strategy="no", seed=settings["seed"], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                      target_modules=settings["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    timer = TrainTimer()

    trainer = GRPOTrainer(model=model, reward_funcs=[sentence_reward, length_reward], args=arguments,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=lora, callbacks=[timer])  # fmt: skip
    trainer.train()
    history = trainer.state.log_history
    return {
        "seconds": timer.seconds,
        "steps": int(trainer.state.global_step),
        "mean_completion_length": statistics.mean(
            entry["completions/mean_length"] for entry in history if "completions/mean_length" in entry
        ),
        "rewards": [entry["reward"] for entry in history if "reward" in entry],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few prompts: checks the script runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/grpo_vs_trl.json"))
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="rf-bench-grpo-"))
    home = isolated_environment(scratch)
    smoke = args.smoke
    folder = build_llama_base(home / "models" / "bench-llama", SMOKE_SHAPE if smoke else SHAPE, 1024)
    rows = prompts(8 if smoke else args.prompts)
    settings = job(smoke)
    repeats = 1 if smoke else args.repeats
    attempts: dict[str, list[dict[str, Any]]] = {"engine": [], "trl": []}
    for repeat in range(repeats):
        attempts["engine"].append(run_engine(folder, rows, settings, scratch / f"engine-{repeat}"))
        attempts["trl"].append(run_trl(folder, rows, settings, scratch / f"trl-{repeat}"))
    rates = {name: [a["steps"] / a["seconds"] for a in runs] for name, runs in attempts.items()}
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": {"shape": SMOKE_SHAPE if smoke else SHAPE, "threads": THREADS},
        "job": {**settings, "prompts": len(rows), "data": "stdlib signatures as prompts"},
        "steps": {name: runs[0]["steps"] for name, runs in attempts.items()},
        "mean_completion_length": {
            name: statistics.mean(run["mean_completion_length"] for run in runs) for name, runs in attempts.items()
        },
        "steps_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "steps_per_second_all": rates,
        "ratio_engine_over_trl": statistics.median(rates["engine"]) / statistics.median(rates["trl"]),
        "rewards": {name: runs[0]["rewards"] for name, runs in attempts.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"optimizer steps: {results['steps']}, mean completion length: {results['mean_completion_length']}")
    for name, value in results["steps_per_second"].items():
        print(f"{name:>6}: {value:.3f} steps/s (median of {repeats}: {', '.join(f'{v:.3f}' for v in rates[name])})")
    print(f"engine / TRL GRPOTrainer: {results['ratio_engine_over_trl']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
