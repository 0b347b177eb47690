"""The engine's training loop against TRL's `SFTTrainer` on the same SFT job, and what generation-based evaluation
costs per chunk boundary.

1. Throughput: the same conversational data (`messages` rows rendered with the chat template, packing off), the same
   random-init Llama base, the same LoRA and optimizer settings, one epoch each, alternated `--repeats` times in one
   process with the same thread count. Tokens/s counts the tokens both train on (rows unpadded; TRL's prepared dataset
   and the engine's tokenization are equal, a test checks it). The loss curves are printed side by side (their data
   orders differ: each shuffles with its own seed scheme).
2. Evaluation cost: one chunk boundary's evaluation of a LoRA run with `predict_with_generate` and ROUGE-L, on the
   whole eval set and with `eval_subset`; the ratio of their `eval_seconds`.

    python bench/sft_vs_trl.py [--smoke] [--out bench/results/sft_vs_trl.json]
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

SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4}  # fmt: skip
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2}  # fmt: skip
THREADS = 2


def conversations(count: int) -> list[dict[str, Any]]:
    """The stdlib docstring pairs as chat turns: a user asks for a function's documentation, the assistant answers."""
    from rf_core.training.data import stdlib_sft_examples

    return [
        {"messages": [{"role": "user", "content": f"Document this function:\n{pair['prompt']}"},
                      {"role": "assistant", "content": pair["completion"]}]}
        for pair in stdlib_sft_examples(limit=count)
    ]  # fmt: skip


def job(smoke: bool) -> dict[str, Any]:
    return {
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "learning_rate": 5e-4, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "per_device_train_batch_size": 4 if smoke else 8, "gradient_accumulation_steps": 1,
        "num_train_epochs": 1, "max_length": 128 if smoke else 512, "seed": 17, "eval_strategy": "no",
    }  # fmt: skip


def load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rf_core.training.models import TINY_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True), tokenizer


def run_engine(folder: Path, rows: list[dict[str, Any]], settings: dict[str, Any], scratch: Path) -> dict[str, Any]:
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer

    config = normalize_config({"model_name_or_path": str(folder), **settings})
    trainer = SlotTrainer(lambda _: load(folder), rows, None, num_threads=THREADS)
    trainer.prepare([config])  # tokenizing is not training: TRL's map runs before its timer too
    data = trainer._tokenized_data("train", trainer._bases[str(folder)].tokenizer, config)
    emitted: list[dict[str, Any]] = []
    seconds = 0.0
    for chunk in plan_chunks(len(rows), config, 1):
        outcome = trainer.train(TrainTask("bench", 1, config, chunk, str(scratch), 0), emitted.extend)
        assert outcome.status != "failed", outcome.traceback
        seconds += outcome.train_seconds
    trainer.close()
    losses = [row["value"] for row in emitted if row["name"] == "train_loss"]
    return {"seconds": seconds, "tokens": int(data.lengths.sum()), "losses": losses}


def run_trl(folder: Path, rows: list[dict[str, Any]], settings: dict[str, Any], scratch: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(THREADS)
    model, tokenizer = load(folder)
    arguments = SFTConfig(
        output_dir=str(scratch / "trl"), max_length=settings["max_length"], packing=False, report_to="none",
        use_cpu=True, bf16=False, learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler_type"], warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=settings["per_device_train_batch_size"], gradient_accumulation_steps=1,
        num_train_epochs=1, logging_steps=1, save_strategy="no", eval_strategy="no", seed=settings["seed"],
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                      target_modules=settings["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    timer = TrainTimer()

    trainer = SFTTrainer(model=model, args=arguments, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora, callbacks=[timer])  # fmt: skip
    tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": timer.seconds, "tokens": int(tokens), "losses": losses}


def eval_cost(folder: Path, rows: list[dict[str, Any]], settings: dict[str, Any], scratch: Path, subset: int) -> dict:
    """eval_seconds of one boundary with generation + ROUGE-L: the whole eval set, then `subset` rows of it."""
    from rf_core.chunks import plan_chunks
    from rf_core.config import normalize_config
    from rf_core.messages import TrainTask
    from rf_core.training.trainer import SlotTrainer

    evaluation = rows[:64]
    figures = {}
    for name, eval_subset in (("all", None), ("subset", subset)):
        config = normalize_config({
            "model_name_or_path": str(folder), **settings, "eval_strategy": "chunk", "eval_subset": eval_subset,
            "max_steps": 2, "compute_metrics": "rougeL", "predict_with_generate": True,
            "generation_config": {"max_new_tokens": 32}, "per_device_eval_batch_size": 16,
        })  # fmt: skip
        trainer = SlotTrainer(lambda _: load(folder), rows, evaluation, num_threads=THREADS)
        trainer.prepare([config])
        chunk = plan_chunks(len(rows), config, 1)[0]
        outcome = trainer.train(TrainTask("bench", 1, config, chunk, str(scratch / name), 0), lambda _: None)
        assert outcome.status != "failed", outcome.traceback
        trainer.close()
        figures[name] = {"eval_rows": eval_subset or len(evaluation), "eval_seconds": outcome.eval_seconds,
                         "train_seconds": outcome.train_seconds, "rougeL": outcome.eval_metrics["rougeL"]}  # fmt: skip
    figures["subset_cost_ratio"] = figures["subset"]["eval_seconds"] / figures["all"]["eval_seconds"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few rows: checks the script runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sft_vs_trl.json"))
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="rf-bench-sft-"))
    home = isolated_environment(scratch)
    smoke = args.smoke
    folder = build_llama_base(home / "models" / "bench-llama", SMOKE_SHAPE if smoke else SHAPE, 1024)
    rows = conversations(24 if smoke else args.rows)
    settings = job(smoke)
    repeats = 1 if smoke else args.repeats
    attempts: dict[str, list[dict[str, Any]]] = {"engine": [], "trl": []}
    for repeat in range(repeats):
        attempts["engine"].append(run_engine(folder, rows, settings, scratch / f"engine-{repeat}"))
        attempts["trl"].append(run_trl(folder, rows, settings, scratch / f"trl-{repeat}"))
    rates = {name: [a["tokens"] / a["seconds"] for a in runs] for name, runs in attempts.items()}
    engine_tokens, trl_tokens = attempts["engine"][0]["tokens"], attempts["trl"][0]["tokens"]
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": {"shape": SMOKE_SHAPE if smoke else SHAPE, "threads": THREADS},
        "job": {**settings, "rows": len(rows), "data": "messages rows, chat template, packing off"},
        "tokens": {"engine": engine_tokens, "trl": trl_tokens},
        "tokens_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "tokens_per_second_all": rates,
        "ratio_engine_over_trl": statistics.median(rates["engine"]) / statistics.median(rates["trl"]),
        "losses": {name: runs[0]["losses"] for name, runs in attempts.items()},
        "eval_cost": eval_cost(folder, rows, settings, scratch / "eval", 4 if smoke else 16),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"tokens trained: engine {engine_tokens}, TRL {trl_tokens}")
    for name, value in results["tokens_per_second"].items():
        print(f"{name:>6}: {value:,.0f} tokens/s (median of {repeats}: {', '.join(f'{v:,.0f}' for v in rates[name])})")
    print(f"engine / TRL SFTTrainer: {results['ratio_engine_over_trl']:.3f}x")
    engine_losses, trl_losses = results["losses"]["engine"], results["losses"]["trl"]
    print("step  engine loss  TRL loss")
    for step in sorted({0, len(engine_losses) // 4, len(engine_losses) // 2, len(engine_losses) - 1}):
        trl = trl_losses[step] if step < len(trl_losses) else float("nan")
        print(f"{step + 1:>4}  {engine_losses[step]:>11.4f}  {trl:>8.4f}")
    cost = results["eval_cost"]
    print(f"generation eval per boundary: {cost['all']['eval_seconds']:.2f} s on {cost['all']['eval_rows']} rows, "
          f"{cost['subset']['eval_seconds']:.2f} s with eval_subset={cost['subset']['eval_rows']} "
          f"({cost['subset_cost_ratio']:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
