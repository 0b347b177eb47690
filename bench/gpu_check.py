"""GPU check for slot workers: many LoRA runs time-sliced on one GPU through `rf_core`'s SlotTrainer.

Drives the trainer directly (no flow, no server, no DuckDB), so it runs wherever torch, transformers and peft do:
    PYTHONPATH=. python bench/gpu_check.py --out results.json
Reports, per mode: slot utilisation (time inside training loops / wall time), the per-chunk overhead outside the
training loop (eval + checkpoint + swap-in when the state comes back from disk), the cost of a swap through disk
as a fraction of a chunk, and whether LoRA runs share one copy of the base model in device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.common import build_llama_base  # noqa: E402
from rf_core.chunks import plan_chunks  # noqa: E402
from rf_core.config import normalize_config  # noqa: E402
from rf_core.messages import TrainTask  # noqa: E402
from rf_core.model_roots import ROOTS_ENV  # noqa: E402
from rf_core.training.data import demo_datasets  # noqa: E402
from rf_core.training.staging import default_staging_root  # noqa: E402
from rf_core.training.trainer import SlotTrainer  # noqa: E402

SHAPES = {
    # ~25 M parameters: the size the swap targets are set for.
    "25m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 7, "num_attention_heads": 8},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def build_base(folder: Path, shape: str) -> Path:
    return build_llama_base(folder, SHAPES[shape], max_positions=1024)


def run_mode(
    base_path: Path,
    device: str,
    runs: int,
    num_chunks: int,
    steps_per_chunk: int,
    swap_through_disk: bool,
    use_peft: bool,
    work: Path,
) -> dict[str, Any]:
    created: list[int] = []

    def create_model_fn(config: dict[str, Any]) -> tuple[Any, Any]:
        created.append(1)
        tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True), tokenizer

    train, evaluation = demo_datasets(eval_size=64)
    batch = 8
    train = train[: steps_per_chunk * num_chunks * batch]
    trainer = SlotTrainer(
        create_model_fn, train, evaluation, num_threads=4, device=device, staging_root=default_staging_root()
    )
    configs = [
        normalize_config(
            {
                "model_name_or_path": str(base_path),
                "use_peft": use_peft,
                "learning_rate": 1e-4 * (run + 1) if use_peft else 2e-5 * (run + 1),
                "per_device_train_batch_size": batch,
                "max_length": 64,
            }
        )
        for run in range(runs)
    ]
    plans = [plan_chunks(len(train), config, num_chunks) for config in configs]
    memory: dict[str, float] = {}
    outcomes = []
    overheads = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    for chunk_index in range(num_chunks):
        for run_id, config in enumerate(configs, start=1):
            task = TrainTask(
                experiment="gpu-check",
                run_id=run_id,
                config=config,
                chunk=plans[run_id - 1][chunk_index],
                run_dir=str(work / f"run-{run_id}"),
                seed=42,
            )
            began = time.perf_counter()
            outcome = trainer.train(task, lambda rows: None)
            sync()
            wall = time.perf_counter() - began
            if outcome.status == "failed":
                raise RuntimeError(f"run {run_id} chunk {chunk_index}: {outcome.error}\n{outcome.traceback}")
            outcomes.append(outcome)
            if chunk_index > 0:  # the first chunk also pays the base model load
                overheads.append((wall - outcome.train_seconds) / outcome.train_seconds)
            if swap_through_disk:
                trainer.release(run_id)  # the next chunk restores the state from its checkpoint file
            if device.startswith("cuda") and chunk_index == 0 and run_id in (1, runs):
                memory[f"allocated_after_run_{run_id}_MiB"] = torch.cuda.memory_allocated(device) / 2**20
    total = time.perf_counter() - start
    trainer.close()  # states are written behind: wait for the files before reading their sizes
    train_seconds = sum(o.train_seconds for o in outcomes)
    steady = [o.train_seconds for o in outcomes[runs:]]
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_path).parameters())
    return {
        "runs": runs,
        "chunks": num_chunks,
        "steps_per_chunk": steps_per_chunk,
        "use_peft": use_peft,
        "swap_through_disk": swap_through_disk,
        "base_models_created": len(created),
        "base_params_M": base_params / 1e6,
        "base_MiB_fp32": base_params * 4 / 2**20,
        "wall_s": total,
        "train_s": train_seconds,
        "utilisation": train_seconds / total,
        "median_chunk_train_s": statistics.median(steady),
        "median_overhead_fraction_of_chunk": statistics.median(overheads),
        "checkpoint_MiB": Path(outcomes[-1].checkpoint).stat().st_size / 2**20 if outcomes[-1].checkpoint else None,
        **memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="25m")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps-per-chunk", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"PYTHONPATH=. python bench/gpu_check.py --shape {args.shape} --runs {args.runs} "
        f"--chunks {args.chunks} --steps-per-chunk {args.steps_per_chunk}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[ROOTS_ENV] = tmp  # the base model is a local folder here
        base = build_base(Path(tmp) / "base", args.shape)
        modes = {
            "lora_warm_in_memory": (False, True, args.runs),
            "lora_swapped_through_disk": (True, True, args.runs),
            "full_swapped_through_disk": (True, False, 2),
        }
        for name, (swap, peft, runs) in modes.items():
            work = Path(tmp) / name
            results[name] = run_mode(base, args.device, runs, args.chunks, args.steps_per_chunk, swap, peft, work)
            print(name, json.dumps(results[name], indent=2), flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    warm, disk = results["lora_warm_in_memory"], results["lora_swapped_through_disk"]
    results["lora_swap_fraction_of_chunk"] = (
        disk["median_overhead_fraction_of_chunk"] - warm["median_overhead_fraction_of_chunk"]
    )
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
