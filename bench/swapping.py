"""Swapping benchmark: what moving a run between slot workers costs, the engine against plain HF `Trainer`, and
the memory a worker needs for many LoRA runs of one base.

    .venv/bin/python bench/swapping.py --out bench/results/swapping.json          # the figures in BENCHMARKS.md
    .venv/bin/python bench/swapping.py --smoke                                    # seconds; keeps the script alive

Three measurements, each a ratio taken in this one invocation, on this machine:

1. swap: one run trained in 50-step chunks that alternate between two SlotTrainers (two workers' worth of state),
   so every boundary is a swap out (snapshot into the staging area, or into memory for the disk path) and a swap
   in on the other trainer. Reported: median over chunks of (swap in + swap out seconds) / (training seconds of
   that chunk), for the tiny demo model with LoRA, and a ~25 M-parameter Llama with LoRA and fully fine-tuned,
   through /dev/shm and through disk.
2. vs HF Trainer: one LoRA config trained by the engine (no swaps, eval at each of 4 chunk boundaries) against
   `transformers.Trainer` on the same tokenized data, batch size, schedule and eval cadence; samples/s ratio,
   alternating the two, median of the repeats.
3. memory: a fresh process loads the 25 M base and trains 8 LoRA runs one chunk each, keeping all 8 states warm;
   peak RSS against (RSS after imports) + base weights + 8 x run state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.common import build_llama_base  # noqa: E402
from rf_core.chunks import plan_chunks  # noqa: E402
from rf_core.config import normalize_config  # noqa: E402
from rf_core.messages import TrainTask  # noqa: E402
from rf_core.model_roots import ROOTS_ENV  # noqa: E402
from rf_core.training.data import demo_datasets, tokenize_examples  # noqa: E402
from rf_core.training.staging import STAGING_ENV, default_staging_root, persist_staged  # noqa: E402
from rf_core.training.trainer import SlotTrainer  # noqa: E402

SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "25m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 7, "num_attention_heads": 8},
}
THREADS = max(1, (os.cpu_count() or 2) // 2)  # what one of the two default CPU slots gets
BATCH, MAX_LENGTH = 8, 64
# The 25 M model trains its swap-benchmark chunks on smaller batches, so 6 chunks of 50 steps fit in minutes on a
# CPU; a shorter chunk makes a swap a larger fraction of it, so this only makes the figure harder to meet.
SWAP_BATCH = {"tiny": (8, 64), "25m": (4, 32)}


def build_base(folder: Path, shape: str) -> Path:
    return build_llama_base(folder, SHAPES[shape], max_positions=256)


def _loader(base_path: Path):
    def create_model_fn(config: dict[str, Any]) -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True), tokenizer

    return create_model_fn


def _config(base_path: Path, use_peft: bool, **overrides: Any) -> dict[str, Any]:
    return normalize_config(
        {
            "model_name_or_path": str(base_path),
            "use_peft": use_peft,
            "r": 16,
            "lora_alpha": 32,
            "learning_rate": 1e-4 if use_peft else 2e-5,
            "per_device_train_batch_size": BATCH,
            "max_length": MAX_LENGTH,
            "warmup_steps": 5,
            **overrides,
        }
    )


def _task(run_id: int, config: dict[str, Any], chunk: Any, work: Path) -> TrainTask:
    return TrainTask("bench", run_id, config, chunk, str(work / f"run-{run_id}"), seed=42, keep_checkpoints=2)


def _ok(outcome: Any) -> Any:
    if outcome.status != "ok" and outcome.status != "completed":
        raise RuntimeError(f"{outcome.error}\n{outcome.traceback}")
    return outcome


# ----------------------------------------------------------------------------------------------- 1. swap


def measure_swap(
    base_path: Path, shape: str, use_peft: bool, through_shm: bool, chunks: int, steps: int, work: Path
) -> dict:
    """One run, `chunks` chunks of `steps` steps over 2 epochs, each chunk on the other of two trainers."""
    chunks_per_epoch = (chunks + 1) // 2
    batch, max_length = SWAP_BATCH[shape]
    train, _ = demo_datasets(eval_size=16)
    train = train[: chunks_per_epoch * steps * batch]
    staging_root = default_staging_root() if through_shm else None
    trainers = [
        SlotTrainer(_loader(base_path), train, None, num_threads=THREADS, staging_root=staging_root) for _ in range(2)
    ]
    config = _config(base_path, use_peft, num_train_epochs=2, per_device_train_batch_size=batch, max_length=max_length)
    plan = plan_chunks(len(train), config, chunks_per_epoch)
    fractions, swap_ms, train_s = [], [], []
    for trainer in trainers:
        trainer.prepare([config])
    for chunk in plan:
        slot = chunk.index % 2
        outcome = _ok(trainers[slot].train(_task(1, config, chunk, work), lambda rows: None))
        trainers[1 - slot].release(1)
        if chunk.index > 0:  # the first chunk has nothing to swap in
            fractions.append(outcome.state_seconds / outcome.train_seconds)
            swap_ms.append(outcome.state_seconds * 1000)
            train_s.append(outcome.train_seconds)
    for trainer in trainers:
        trainer.close()
    state_bytes = Path(outcome.checkpoint).stat().st_size
    persist_staged(staging_root, work)
    return {
        "model": shape,
        "batch": batch,
        "max_length": max_length,
        "use_peft": use_peft,
        "through": "/dev/shm" if through_shm else "disk",
        "steps_per_chunk": plan[1].num_steps,
        "swaps": len(fractions),
        "state_MiB": state_bytes / 2**20,
        "median_swap_ms": statistics.median(swap_ms),
        "median_chunk_train_s": statistics.median(train_s),
        "median_swap_fraction": statistics.median(fractions),
        "max_swap_fraction": max(fractions),
    }


# ---------------------------------------------------------------------------------------- 2. HF Trainer


def measure_engine_vs_hf(base_path: Path, samples: int, repeats: int, work: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    train, evaluation = demo_datasets(eval_size=64)
    train = train[:samples]
    config = _config(base_path, True, lr_scheduler_type="linear")
    num_chunks = 4
    steps = len(plan_chunks(len(train), config, 1)) and plan_chunks(len(train), config, 1)[0].num_steps
    eval_every = steps // num_chunks
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenized_train = tokenize_examples(train, tokenizer, MAX_LENGTH)
    tokenized_eval = tokenize_examples(evaluation, tokenizer, MAX_LENGTH)

    def rows(data: Any) -> list[dict[str, torch.Tensor]]:
        return [
            {name: tensor[i] for name, tensor in padded.items()}
            for padded in [data.batch(list(range(len(data))), width=MAX_LENGTH)]  # fixed-length rows, as before
            for i in range(len(data))
        ]

    hf_train, hf_eval = rows(tokenized_train), rows(tokenized_eval)

    def engine_run(index: int) -> float:
        trainer = SlotTrainer(
            _loader(base_path), train, evaluation, num_threads=THREADS, staging_root=default_staging_root()
        )
        trainer.prepare([config])  # the engine's workers do this before their first chunk
        begin = time.perf_counter()
        for chunk in plan_chunks(len(train), config, num_chunks):
            _ok(trainer.train(_task(1, config, chunk, work / f"engine-{index}"), lambda rows: None))
        elapsed = time.perf_counter() - begin
        trainer.close()
        return len(train) / elapsed

    def hf_run(index: int) -> float:
        torch.set_num_threads(THREADS)
        model = AutoModelForCausalLM.from_pretrained(base_path)
        model = get_peft_model(
            model,
            LoraConfig(
                r=config["r"],
                lora_alpha=config["lora_alpha"],
                lora_dropout=config["lora_dropout"],
                target_modules=config["target_modules"],
                task_type="CAUSAL_LM",
            ),
        )
        arguments = TrainingArguments(
            output_dir=str(work / f"hf-{index}"),
            per_device_train_batch_size=BATCH,
            per_device_eval_batch_size=config["per_device_eval_batch_size"],
            learning_rate=config["learning_rate"],
            weight_decay=config["weight_decay"],
            max_grad_norm=config["max_grad_norm"],
            lr_scheduler_type=config["lr_scheduler_type"],
            warmup_steps=config["warmup_steps"],
            num_train_epochs=1,
            eval_strategy="steps",
            eval_steps=eval_every,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=42,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=arguments, train_dataset=hf_train, eval_dataset=hf_eval)
        begin = time.perf_counter()
        trainer.train()
        return len(train) / (time.perf_counter() - begin)

    engine, hf = [], []
    for index in range(repeats):
        engine.append(engine_run(index))
        hf.append(hf_run(index))
    ratios = [e / h for e, h in zip(engine, hf, strict=True)]
    return {
        "samples": len(train),
        "steps": steps,
        "eval_every_steps": eval_every,
        "engine_samples_per_s": engine,
        "hf_trainer_samples_per_s": hf,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
    }


# -------------------------------------------------------------------------------------------- 3. memory


def measure_memory(base_path: Path, runs: int, work: Path) -> dict:
    """In a fresh process, so the peak RSS is this worker's alone."""
    output = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(base_path), str(runs), str(work)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def memory_child(base_path: Path, runs: int, work: Path) -> None:
    def rss_mib() -> float:
        # The high-water mark of this process's own memory: unlike getrusage's ru_maxrss, VmHWM starts afresh at
        # exec, so the parent's memory at fork does not count.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    after_imports = rss_mib()
    train, _ = demo_datasets(eval_size=16)
    train = train[: 4 * BATCH * 4]
    trainer = SlotTrainer(_loader(base_path), train, None, num_threads=THREADS, staging_root=default_staging_root())
    configs = [_config(base_path, True, learning_rate=1e-4 * (run + 1)) for run in range(runs)]
    for run_id, config in enumerate(configs, start=1):
        _ok(trainer.train(_task(run_id, config, plan_chunks(len(train), config, 4)[0], work), lambda rows: None))
    trainer.close()
    peak = rss_mib()
    state = trainer._runs[1]
    adapter_ids = {id(parameter) for run in trainer._runs.values() for parameter in run.trainable.values()}
    host = state.model  # the one PEFT model wrapping the shared base
    base_mib = sum(p.numel() * p.element_size() for p in host.parameters() if id(p) not in adapter_ids) / 2**20
    adapter = sum(p.numel() * p.element_size() for p in state.trainable.values())
    # Weights, their gradients (freed between steps, but part of the peak) and AdamW's two moments.
    run_state_mib = 4 * adapter / 2**20
    budget = after_imports + base_mib + runs * run_state_mib + 300
    print(
        json.dumps(
            {
                "runs_warm": len(trainer._runs),
                "base_models_loaded": len(trainer._bases),
                "rss_after_imports_MiB": after_imports,
                "base_weights_MiB": base_mib,
                "run_state_MiB": run_state_mib,
                "peak_rss_MiB": peak,
                "budget_MiB": budget,
                "within_budget": peak <= budget,
                "peak_minus_imports_base_and_states_MiB": peak - after_imports - base_mib - runs * run_state_mib,
            }
        )
    )


# ------------------------------------------------------------------------------------- 4. an alpha sweep


def measure_alpha_sweep(base_path: Path, work: Path, rounds: int, steps: int) -> dict:
    """One worker training 12 LoRA runs of one rank in turn, over lora_alpha {8, 16, 32, 64} x lora_dropout
    {0, 0.05, 0.1}: each chunk call's wall time after the first round (setup, training, checkpoint, eval-free),
    and how many adapters the host holds at the end."""
    train, _ = demo_datasets(eval_size=16)
    train = train[: rounds * steps * BATCH]
    trainer = SlotTrainer(_loader(base_path), train, None, num_threads=THREADS)
    knobs = [(alpha, dropout) for alpha in (8, 16, 32, 64) for dropout in (0.0, 0.05, 0.1)]
    configs = [_config(base_path, True, lora_alpha=alpha, lora_dropout=dropout) for alpha, dropout in knobs]
    plans = [plan_chunks(len(train), config, rounds) for config in configs]
    chunk_s: list[float] = []
    for chunk_index in range(rounds):
        for run_id, (config, plan) in enumerate(zip(configs, plans, strict=True), start=1):
            started = time.perf_counter()
            _ok(trainer.train(_task(run_id, config, plan[chunk_index], work), lambda rows: None))
            if chunk_index:  # the first round creates each run
                chunk_s.append(time.perf_counter() - started)
    trainer.flush()
    host = next(iter(trainer._bases.values())).lora_host
    return {
        "runs": len(configs),
        "steps_per_chunk": steps,
        "chunk_call_median_ms": round(statistics.median(chunk_s) * 1000, 1),
        "chunk_call_p95_ms": round(sorted(chunk_s)[int(0.95 * (len(chunk_s) - 1))] * 1000, 1),
        "adapters_in_host": len(host.peft_config) if host is not None else 0,
    }


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--steps-per-chunk", type=int, default=50)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="engine vs HF Trainer repeats")
    parser.add_argument(
        "--parts", default="swap,hf,memory", help="which measurements: swap, hf, memory, alpha (an alpha sweep)"
    )
    parser.add_argument("--cases", default="", help="only swap cases whose name contains this, e.g. 'full'")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        base, runs, work = args.memory_child
        memory_child(Path(base), int(runs), Path(work))
        return
    torch.set_num_threads(THREADS)
    steps = 3 if args.smoke else args.steps_per_chunk
    chunks = (3 if args.smoke else args.swaps) + 1
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, {_cpu_model()}",
        "threads_per_slot": THREADS,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python bench/swapping.py"
        + (" --smoke" if args.smoke else "")
        + (f" --parts {args.parts}" if args.parts != "swap,hf,memory" else "")
        + (f" --cases '{args.cases}'" if args.cases else ""),
    }
    # A private staging area (inherited by the memory probe's process), removed with everything in it at the end.
    staging = Path(tempfile.mkdtemp(prefix="rf-bench-", dir="/dev/shm"))
    os.environ[STAGING_ENV] = str(staging)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            os.environ[ROOTS_ENV] = str(root)  # the benchmark's base models are local folders here
            bases = {shape: build_base(root / shape, shape) for shape in (("tiny",) if args.smoke else ("tiny", "25m"))}
            swap_cases = [("tiny", True, True), ("tiny", True, False)]
            if not args.smoke:
                # The 25 M model trains slowly on CPU: its swaps are measured on the default path (/dev/shm) only.
                swap_cases += [("25m", True, True), ("25m", False, True)]
            parts = set(args.parts.split(","))
            if "swap" in parts:
                results["swap"] = {}
                for shape, use_peft, shm in swap_cases:
                    name = f"{shape} {'LoRA' if use_peft else 'full'} via {'shm' if shm else 'disk'}"
                    if args.cases not in name:
                        continue
                    work = root / name.replace(" ", "-")
                    results["swap"][name] = measure_swap(bases[shape], shape, use_peft, shm, chunks, steps, work)
                    print(name, json.dumps(results["swap"][name]), flush=True)
            if "alpha" in parts:
                results["alpha_sweep"] = measure_alpha_sweep(bases["tiny"], root / "alpha", 3 if args.smoke else 5, 5)
                print("alpha sweep", json.dumps(results["alpha_sweep"]), flush=True)
            if "hf" in parts:
                results["vs_hf_trainer"] = measure_engine_vs_hf(
                    bases["tiny"], 64 if args.smoke else 1600, 1 if args.smoke else args.repeats, root / "hf"
                )
                print("vs HF Trainer", json.dumps(results["vs_hf_trainer"]), flush=True)
            if "memory" in parts:
                memory_base = bases["tiny" if args.smoke else "25m"]
                results["memory_8_lora_runs"] = measure_memory(memory_base, 8, root / "memory")
                print("memory", json.dumps(results["memory_8_lora_runs"]), flush=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
