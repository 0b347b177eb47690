"""The Ray Tune contestant of the head-to-head benchmark: `ASHAScheduler` over the same 16 configs, each trial
training with the same function the engine uses (`bench.head_to_head_task.train_in_chunks`: one chunk per Tune
iteration, an eval after each), 2 trials at a time on 2 CPUs, one thread each.

Run by `bench/head_to_head.py` with the benchmark environment's Python (Ray is not a project dependency):

    .venv-bench/bin/python bench/head_to_head_ray.py --size size.json --eta 2 --out ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from bench.head_to_head_task import SLOTS, TaskSize, config_key, train_in_chunks  # noqa: E402

TRAVELLING_ENV = ("RF_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_")


def run_ray_asha(size: TaskSize, eta: int, storage: Path) -> dict[str, Any]:
    started = time.time()
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    ray.init(num_cpus=SLOTS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_ready = time.time()
    configs = size.configs()
    # Ray's worker processes do not see this process's environment: the engine's home (where the base model was
    # built once, before any clock started) and the offline switches travel with the trainable.
    environment = {name: value for name, value in os.environ.items() if name.startswith(TRAVELLING_ENV)}

    def trainable(params: dict[str, Any]) -> None:
        trial_start = time.time()
        os.environ.update(environment)
        config = configs[params["index"]]

        def report(row: dict[str, Any]) -> None:
            tune.report({**row, "trial_start": trial_start, "index": params["index"]})

        train_in_chunks(config, size, storage / "runs" / f"trial-{params['index']}", report, num_threads=1)

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"index": tune.grid_search(list(range(len(configs))))},
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                metric="eval_loss",
                mode="min",
                max_t=size.num_chunks,
                grace_period=1,
                reduction_factor=eta,
            ),
            max_concurrent_trials=SLOTS,
        ),
        run_config=tune.RunConfig(storage_path=str(storage / "tune"), name="asha", verbose=0),
    )
    fit_started = time.time()
    grid = tuner.fit()
    ended = time.time()
    points, trials = [], []
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"a Ray Tune trial failed: {result.error}")
        frame = result.metrics_dataframe
        rows = frame.to_dict("records")
        index = int(rows[0]["index"])
        trials.append({"key": config_key(configs[index]), "start": rows[0]["trial_start"], "end": rows[-1]["chunk_end"],
                       "chunks": len(rows)})  # fmt: skip
        points.extend(
            {"key": config_key(configs[index]), "run": index + 1, "chunk": int(row["chunk"]),
             "value": float(row["eval_loss"]), "time": float(row["time"])}
            for row in rows
        )  # fmt: skip
    ray.shutdown()
    return {
        "started": started,
        "fit_started": fit_started,
        "ended": ended,
        "ray_init_seconds": ray_ready - started,
        "points": points,
        "busy": [[trial["start"], trial["end"]] for trial in trials],
        "trials": trials,
        "settings": {"scheduler": "ASHAScheduler", "max_t": size.num_chunks, "grace_period": 1,
                     "reduction_factor": eta, "max_concurrent_trials": SLOTS, "ray": ray.__version__},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=Path, required=True, help="JSON of the task size (TaskSize.to_dict())")
    parser.add_argument("--eta", type=int, default=2)
    parser.add_argument("--storage", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    size = TaskSize.from_dict(json.loads(arguments.size.read_text()))
    results = run_ray_asha(size, arguments.eta, arguments.storage)
    arguments.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
