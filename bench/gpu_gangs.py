"""GPU check for multi-device work: runs land on the slot the scheduler chose, each worker holds its base model
once, and a DeepSpeed ZeRO-2 run (world size 1) trains the same trajectory as plain training.

Drives `rf_core`'s slot workers directly (SlotPool, the scheduler's `assign`, train tasks and gangs); a small
in-process metric sink stands in for the rf server, so it runs wherever torch, transformers, peft and DeepSpeed do:
    PYTHONPATH=. python bench/gpu_gangs.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from bench.gpu_check import build_base  # noqa: E402
from rf_core.chunks import plan_chunks  # noqa: E402
from rf_core.config import normalize_config  # noqa: E402
from rf_core.experiment import ExperimentSpec  # noqa: E402
from rf_core.messages import ChunkOutcome, Gang, TrainTask  # noqa: E402
from rf_core.model_roots import ROOTS_ENV  # noqa: E402
from rf_core.scheduler import RunnableRun, assign  # noqa: E402
from rf_core.training.gang import free_address  # noqa: E402
from rf_core.training.worker import SlotPool, SpecSource, train_with_retry  # noqa: E402

BASE_ENV = "RF_GPU_GANGS_BASE"
BATCH, MAX_LENGTH, STEPS_PER_CHUNK, NUM_CHUNKS = 8, 64, 10, 3
NUM_TRAIN = BATCH * STEPS_PER_CHUNK * NUM_CHUNKS


def _load_base(config: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.environ[BASE_ENV]
    return (
        AutoModelForCausalLM.from_pretrained(folder, local_files_only=True),
        AutoTokenizer.from_pretrained(folder, local_files_only=True),
    )


def spec() -> ExperimentSpec:
    """The workers' experiment: the locally built base, the demo data (imported by each worker)."""
    from rf_core.training.data import demo_datasets

    train, evaluation = demo_datasets(eval_size=32)
    return ExperimentSpec(
        config_group=_config(0),
        create_model_fn=_load_base,
        train_dataset=train[:NUM_TRAIN],
        eval_dataset=evaluation,
        num_chunks=NUM_CHUNKS,
        seed=42,
    )


def _config(run: int, **overrides: Any) -> dict[str, Any]:
    return normalize_config(
        {
            "model_name_or_path": os.environ[BASE_ENV],
            "learning_rate": 1e-4 * (run + 1),
            "lora_dropout": 0.0,
            "per_device_train_batch_size": BATCH,
            "max_length": MAX_LENGTH,
            **overrides,
        }
    )


class MetricSink:
    """Takes the workers' metric batches as the rf server would, and keeps the rows."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        lock = threading.Lock()
        rows = self.rows

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    rows.extend(body.get("rows", []))
                payload = json.dumps({"stored": True}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def series(self, run_id: int, name: str) -> dict[int, float]:
        return {row["step"]: row["value"] for row in self.rows if row["run_id"] == run_id and row["name"] == name}

    def close(self) -> None:
        self._server.shutdown()


def _task(run_id: int, config: dict[str, Any], chunk_index: int, work: Path, gang: Gang | None = None) -> TrainTask:
    chunk = plan_chunks(NUM_TRAIN, config, NUM_CHUNKS)[chunk_index]
    return TrainTask("gpu-gangs", run_id, config, chunk, str(work / f"run-{run_id}"), seed=42, gang=gang)


def check_placement(pool: SlotPool, devices: list[str], runs: int, work: Path) -> dict[str, Any]:
    """LoRA runs scheduled over the slots chunk by chunk, as the fit loop does; each outcome says where it ran."""
    configs = {run_id: _config(run_id) for run_id in range(1, runs + 1)}
    done = dict.fromkeys(configs, 0)
    placements: list[dict[str, Any]] = []
    in_flight: dict[Future[ChunkOutcome], tuple[int, int]] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(devices)) as executor:
        while any(count < NUM_CHUNKS for count in done.values()) or in_flight:
            busy = {slot for _, slot in in_flight.values()}
            busy_runs = {run_id for run_id, _ in in_flight.values()}
            runnable = [
                RunnableRun(run_id, count, NUM_CHUNKS)
                for run_id, count in done.items()
                if count < NUM_CHUNKS and run_id not in busy_runs
            ]
            free = [slot for slot in range(len(devices)) if slot not in busy]
            for assignment in assign(runnable, free):
                task = _task(assignment.run_id, configs[assignment.run_id], done[assignment.run_id], work)
                future = executor.submit(pool[assignment.slot].train, task)
                in_flight[future] = (assignment.run_id, assignment.slot)
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in finished:
                run_id, slot = in_flight.pop(future)
                outcome = future.result()
                if outcome.status == "failed":
                    raise RuntimeError(f"run {run_id} on slot {slot}: {outcome.error}\n{outcome.traceback}")
                done[run_id] += 1
                placements.append(
                    {
                        "run": run_id,
                        "chunk": outcome.chunk_index,
                        "slot": slot,
                        "slot_device": devices[slot],
                        "trained_on": outcome.device,
                        "peak_mib": outcome.device_peak_mib,
                        "train_s": outcome.train_seconds,
                    }
                )
    wall = time.perf_counter() - started
    peaks: dict[int, float] = {}
    for entry in placements:
        if entry["peak_mib"] is not None:
            peaks[entry["slot"]] = max(peaks.get(entry["slot"], 0.0), entry["peak_mib"])
    return {
        "runs": runs,
        "chunks_per_run": NUM_CHUNKS,
        "slots": devices,
        "chunks": len(placements),
        "every_chunk_on_its_slots_device": all(e["trained_on"] == e["slot_device"] for e in placements),
        "runs_per_slot": {
            slot: sorted({e["run"] for e in placements if e["slot"] == slot}) for slot in range(len(devices))
        },
        "peak_mib_per_gpu_slot": peaks,
        "wall_s": wall,
        "train_s": sum(entry["train_s"] for entry in placements),
        "placements": placements,
    }


def check_deepspeed(
    pool: SlotPool, sink: MetricSink, slot: int, reference_slot: int, work: Path, stage: int
) -> dict[str, Any]:
    """The same LoRA config trained through a ZeRO engine (a gang of one) and plainly, chunk by chunk."""
    trajectories = {}
    seconds = {}
    deepspeed_run = 100 + 2 * stage
    for run_id, strategy in ((deepspeed_run, "deepspeed"), (deepspeed_run + 1, "ddp")):
        config = _config(3, strategy=strategy, zero_stage=stage)
        chosen = slot if strategy == "deepspeed" else reference_slot
        train_s = 0.0
        for chunk_index in range(NUM_CHUNKS):
            gang = (
                Gang(rank=0, world_size=1, address=free_address(), slots=(chosen,), strategy=strategy)
                if strategy == "deepspeed"
                else None
            )
            outcome = train_with_retry([pool[chosen]], _task(run_id, config, chunk_index, work, gang))
            if outcome.status == "failed":
                raise RuntimeError(f"{strategy} chunk {chunk_index}: {outcome.error}\n{outcome.traceback}")
            train_s += outcome.train_seconds
        seconds[strategy] = train_s
        time.sleep(1.0)  # the workers' metric writers flush every 0.5 s
        trajectories[strategy] = sink.series(run_id, "train_loss")
    deepspeed, plain = trajectories["deepspeed"], trajectories["ddp"]
    shards = work / f"run-{deepspeed_run}" / "deepspeed" / f"step-{STEPS_PER_CHUNK * NUM_CHUNKS}"
    return {
        "steps": len(deepspeed),
        "max_relative_loss_difference": max(
            abs(deepspeed[step] - plain[step]) / abs(plain[step]) for step in plain if step in deepspeed
        )
        if deepspeed and plain
        else None,
        "first_last_loss_deepspeed": [deepspeed[min(deepspeed)], deepspeed[max(deepspeed)]] if deepspeed else None,
        "first_last_loss_plain": [plain[min(plain)], plain[max(plain)]] if plain else None,
        "train_s_deepspeed": seconds["deepspeed"],
        "train_s_plain": seconds["ddp"],
        "shard_files": sorted(path.name for path in shards.iterdir()) if shards.is_dir() else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="25m")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    # One GPU here: two slot workers share it, and a CPU slot shows that placement follows the slot.
    devices = ["cuda:0", "cuda:0", "cpu"] if cuda else ["cpu", "cpu"]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"PYTHONPATH=. python bench/gpu_gangs.py --shape {args.shape} --runs {args.runs} "
        f"--zero-stages {' '.join(map(str, args.zero_stages))}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[ROOTS_ENV] = tmp
        os.environ.setdefault("RF_HOME", str(Path(tmp) / "home"))
        base = build_base(Path(tmp) / "base", args.shape)
        os.environ[BASE_ENV] = str(base)
        base_params = sum(parameter.numel() for parameter in _load_base({})[0].parameters())
        results["base_params_M"] = base_params / 1e6
        results["base_MiB_fp32"] = base_params * 4 / 2**20
        sink = MetricSink()
        source = SpecSource(entrypoint="bench.gpu_gangs:spec")
        started = time.perf_counter()
        with SlotPool(devices, source, sink.url, Path(tmp) / "spool", threads_per_slot=4) as pool:  # type: ignore[arg-type]
            results["workers_ready_s"] = time.perf_counter() - started
            results["placement"] = check_placement(pool, devices, args.runs, Path(tmp) / "placement")
            print(json.dumps({k: v for k, v in results["placement"].items() if k != "placements"}, indent=2))
            for stage in args.zero_stages:
                key = f"deepspeed_zero{stage}_world1"
                try:
                    results[key] = check_deepspeed(pool, sink, 0, 1, Path(tmp) / "deepspeed", stage)
                except Exception as exc:  # report it; the placement figures stand on their own
                    results[key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(key, json.dumps(results[key], indent=2))
        sink.close()
    peaks = results["placement"]["peak_mib_per_gpu_slot"]
    if peaks:
        results["peak_over_base"] = statistics.fmean(peaks.values()) / results["base_MiB_fp32"]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
