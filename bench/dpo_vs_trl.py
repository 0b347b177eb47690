"""The engine's DPO runs against TRL's `DPOTrainer` on the same job: steps/s, in one process, alternated.

The same preference pairs (the standard library's docstrings: chosen is a function's own, rejected another's), the
same random-init Llama base, the same LoRA and optimizer settings, the reference the base with the adapter off, no
dropout (TRL's default), one epoch each, alternated `--repeats` times with the same thread count. A test checks that
both tokenize and collate the pairs the same way; each shuffles with its own seed scheme, so the curves differ in
order only. Also: the engine's DPO run chunked through disk (4 chunks, every one swapped out and in) against the
same run in one chunk, to show what a swap costs a DPO run.

    python bench/dpo_vs_trl.py [--smoke] [--out bench/results/dpo_vs_trl.json]
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


def pairs(count: int) -> list[dict[str, str]]:
    from rf_core.demo_data import stdlib_preference_examples

    return stdlib_preference_examples(limit=count)


def job(smoke: bool) -> dict[str, Any]:
    return {
        "trainer_type": "dpo", "beta": 0.1, "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "learning_rate": 5e-4,
        "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "per_device_train_batch_size": 4 if smoke else 8, "gradient_accumulation_steps": 1, "num_train_epochs": 1,
        "max_length": 128 if smoke else 256, "seed": 17, "eval_strategy": "no",
    }  # fmt: skip


def run_engine(
    folder: Path, rows: list[dict[str, Any]], settings: dict[str, Any], scratch: Path, chunks: int = 1
) -> dict[str, Any]:
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer

    config = normalize_config({"model_name_or_path": str(folder), **settings})
    trainers = [SlotTrainer(lambda _: load(folder), rows, None, num_threads=THREADS) for _ in range(min(chunks, 2))]
    for trainer in trainers:
        trainer.prepare([config])  # tokenizing is not training: TRL's map runs before its timer too
    emitted: list[dict[str, Any]] = []
    seconds, state_seconds, steps = 0.0, 0.0, 0
    for chunk in plan_chunks(len(rows), config, chunks):
        trainer = trainers[chunk.index % len(trainers)]
        outcome = trainer.train(TrainTask("bench", 1, config, chunk, str(scratch), 0), emitted.extend)
        assert outcome.status != "failed", outcome.traceback
        seconds += outcome.train_seconds
        state_seconds += outcome.state_seconds
        steps += chunk.num_steps
        if chunks > 1:
            trainer.flush()
            trainer.release(1)  # the next chunk starts from disk, on the other trainer
    for trainer in trainers:
        trainer.close()
    losses = [row["value"] for row in emitted if row["name"] == "train_loss"]
    margins = [row["value"] for row in emitted if row["name"] == "rewards/margins"]
    return {"seconds": seconds, "state_seconds": state_seconds, "steps": steps, "losses": losses, "margins": margins}


def run_trl(folder: Path, rows: list[dict[str, Any]], settings: dict[str, Any], scratch: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    model, tokenizer = load(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arguments = DPOConfig(
        output_dir=str(scratch / "trl"), max_length=settings["max_length"], report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, beta=settings["beta"], learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler_type"], warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=settings["per_device_train_batch_size"], gradient_accumulation_steps=1,
        num_train_epochs=1, logging_steps=1, save_strategy="no", eval_strategy="no", seed=settings["seed"],
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                      target_modules=settings["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    timer = TrainTimer()

    trainer = DPOTrainer(model=model, args=arguments, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora, callbacks=[timer])  # fmt: skip
    trainer.train()
    history = trainer.state.log_history
    return {
        "seconds": timer.seconds,
        "steps": int(trainer.state.global_step),
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "margins": [entry["rewards/margins"] for entry in history if "rewards/margins" in entry],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few rows: checks the script runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dpo_vs_trl.json"))
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="rf-bench-dpo-"))
    home = isolated_environment(scratch)
    smoke = args.smoke
    folder = build_llama_base(home / "models" / "bench-llama", SMOKE_SHAPE if smoke else SHAPE, 1024)
    rows = pairs(24 if smoke else args.rows)
    settings = job(smoke)
    repeats = 1 if smoke else args.repeats
    attempts: dict[str, list[dict[str, Any]]] = {"engine": [], "trl": [], "engine_4_chunks_swapped": []}
    for repeat in range(repeats):
        attempts["engine"].append(run_engine(folder, rows, settings, scratch / f"engine-{repeat}"))
        attempts["trl"].append(run_trl(folder, rows, settings, scratch / f"trl-{repeat}"))
        swapped = run_engine(folder, rows, settings, scratch / f"swapped-{repeat}", chunks=4)
        attempts["engine_4_chunks_swapped"].append(swapped)
    rates = {name: [a["steps"] / a["seconds"] for a in runs] for name, runs in attempts.items()}
    swapped = attempts["engine_4_chunks_swapped"]
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": {"shape": SMOKE_SHAPE if smoke else SHAPE, "threads": THREADS},
        "job": {**settings, "pairs": len(rows), "data": "stdlib docstring preference pairs, strings"},
        "steps": {name: runs[0]["steps"] for name, runs in attempts.items()},
        "steps_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "steps_per_second_all": rates,
        "ratio_engine_over_trl": statistics.median(rates["engine"]) / statistics.median(rates["trl"]),
        "swap_seconds_per_chunk": statistics.median(run["state_seconds"] / 4 for run in swapped),
        "losses": {name: runs[0]["losses"] for name, runs in attempts.items()},
        "margins": {name: runs[0]["margins"] for name, runs in attempts.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"optimizer steps: {results['steps']}")
    for name, value in results["steps_per_second"].items():
        print(f"{name:>24}: {value:.3f} steps/s (median of {repeats}: {', '.join(f'{v:.3f}' for v in rates[name])})")
    print(f"engine / TRL DPOTrainer: {results['ratio_engine_over_trl']:.3f}x")
    print(f"state in and out per chunk of the swapped run: {results['swap_seconds_per_chunk'] * 1000:.0f} ms")
    engine_losses, trl_losses = results["losses"]["engine"], results["losses"]["trl"]
    print("step  engine loss  TRL loss  engine margin  TRL margin")
    for step in sorted({0, len(engine_losses) // 2, len(engine_losses) - 1}):
        trl = trl_losses[step] if step < len(trl_losses) else float("nan")
        trl_margin = results["margins"]["trl"][step] if step < len(results["margins"]["trl"]) else float("nan")
        print(f"{step + 1:>4}  {engine_losses[step]:>11.4f}  {trl:>8.4f}  "
              f"{results['margins']['engine'][step]:>13.4f}  {trl_margin:>10.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
