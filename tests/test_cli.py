"""The real `rf` command against a real server subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rf_cli.main import build_parser
from rf_core.client import RFClient
from tests.test_server_api import CONFIG, start_server, stop

RF = [sys.executable, "-m", "rf_cli.main"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RFClient, Path]]:
    home = tmp_path_factory.mktemp("rf_home")
    process, info = start_server(home)
    client = RFClient(info["url"])
    client.create_experiment("exp", [CONFIG, {**CONFIG, "learning_rate": 1e-4}, {**CONFIG, "r": 16}], num_chunks=4)
    yield client, home
    stop(process)


def rf(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `rf ARGS` finding the server the way a user does: through RF_HOME's server.json."""
    environment = {key: value for key, value in os.environ.items() if key != "RF_SERVER_URL"}
    environment.update(RF_HOME=str(home), **(env or {}))
    return subprocess.run([*RF, *args], capture_output=True, text=True, timeout=60, env=environment)


def test_stop_is_accepted_with_exit_0_and_a_readable_line(served: tuple[RFClient, Path]) -> None:
    client, home = served
    result = rf(home, "stop", "exp", "1")
    assert result.returncode == 0, result.stderr
    (op,) = [op for op in client.list_ops("exp") if op["run_id"] == 1]
    assert result.stdout.strip() == f"op {op['op_id']} queued: stop run 1 (applies at run 1's next chunk boundary)"
    assert op["source"] == "cli" and op["who"]


def test_a_rejected_stop_exits_non_zero_with_the_reason_and_writes_nothing(
    served: tuple[RFClient, Path],
) -> None:
    client, home = served
    client.submit_op("exp", "stop", 2)
    ops_before = client.list_ops("exp")
    result = rf(home, "stop", "exp", "2")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"rf: op rejected: run 2 will already be stopped by op {ops_before[-1]['op_id']}"
    ]
    assert "Traceback" not in result.stderr
    assert client.list_ops("exp") == ops_before


def test_listings_print_json_that_parses(served: tuple[RFClient, Path]) -> None:
    _, home = served
    runs = json.loads(rf(home, "runs", "exp", "--json").stdout)
    assert [run["run_id"] for run in runs][:3] == [1, 2, 3]
    assert {"status", "config", "train_loss", "latest_metric", "pending_ops"} <= set(runs[0])
    ops = json.loads(rf(home, "ops", "exp", "--json").stdout)
    assert all({"op_id", "kind", "status"} <= set(op) for op in ops)
    experiments = json.loads(rf(home, "experiments", "--json").stdout)
    assert "exp" in [row["name"] for row in experiments]


def test_runs_json_gives_every_evaluation_metric_latest_and_best(served: tuple[RFClient, Path]) -> None:
    client, home = served
    rows = [
        {"experiment": "exp", "run_id": 3, "step": step, "name": name, "value": value, "time": 1000.0 + step}
        for step, name, value in [(4, "eval_loss", 3.0), (8, "eval_loss", 2.0), (12, "eval_loss", 2.5),
                                  (4, "rougeL", 0.2), (8, "rougeL", 0.1), (8, "train_loss", 9.0)]
    ]  # fmt: skip
    client.log_metrics("cli-run-metrics", rows)
    runs = {run["run_id"]: run for run in json.loads(rf(home, "runs", "exp", "--json").stdout)}
    metrics = runs[3]["metrics"]
    assert set(metrics) == {"eval_loss", "rougeL"}  # the per-step training series stay out
    assert metrics["eval_loss"] == {"latest": 2.5, "latest_step": 12, "min": 2.0, "max": 3.0, "best": 2.0, "points": 3}
    assert metrics["rougeL"]["best"] == 0.2 and metrics["rougeL"]["latest"] == 0.1  # higher is better: HF's rule
    assert runs[1]["metrics"] == {}


def test_readable_runs_and_ops_tables(served: tuple[RFClient, Path]) -> None:
    _, home = served
    runs = rf(home, "runs", "exp").stdout
    header = runs.splitlines()[1]
    for column in (
        "run",
        "status",
        "source",
        "parent",
        "progress",
        "train loss",
        "eval_loss",
        "learning_rate",
        "r",
    ):
        assert column in header
    ops = rf(home, "ops", "exp").stdout.splitlines()[0]
    for column in ("op", "run", "kind", "source", "who", "status", "reason", "submitted", "applied"):
        assert column in ops


def test_clone_with_set_and_warm_start(served: tuple[RFClient, Path]) -> None:
    client, home = served
    warm = rf(home, "clone", "exp", "3", "--set", "learning_rate=5e-4", "--warm-start")
    assert warm.returncode == 1 and "run 3 has no trained state yet" in warm.stderr
    cold = rf(home, "clone", "exp", "3", "--set", 'learning_rate={"$list": [1e-4, 2e-4]}', "--json")
    assert cold.returncode == 0, cold.stderr
    op = json.loads(cold.stdout)
    assert op["payload"]["count"] == 2 and op["payload"]["warm_start"] == "off"
    assert [config["r"] for config in op["payload"]["configs"]] == [16, 16]


def test_clone_from_a_config_file(served: tuple[RFClient, Path], tmp_path: Path) -> None:
    _, home = served
    config_file = tmp_path / "clone.json"
    config_file.write_text(json.dumps({**CONFIG, "learning_rate": 3e-4}))
    result = rf(home, "clone", "exp", "3", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    assert "into 1 new run" in result.stdout
    config_file.write_text("{oops")
    broken = rf(home, "clone", "exp", "3", "--config", str(config_file))
    assert broken.returncode == 1 and "is not valid JSON" in broken.stderr and "Traceback" not in broken.stderr


def test_server_flag_overrides_discovery(served: tuple[RFClient, Path], tmp_path: Path) -> None:
    client, _ = served
    result = rf(tmp_path, "experiments", "--server", client.url)  # this RF_HOME has no server of its own
    assert result.returncode == 0 and "exp" in result.stdout


def test_no_server_is_a_clear_one_line_error(tmp_path: Path) -> None:
    result = rf(tmp_path, "runs", "exp")
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"rf: no rf server is running for RF_HOME={tmp_path.resolve()}; start one with `rf server start`, "
        "or point RF_SERVER_URL / --server at one"
    )


def test_unknown_experiment_and_run(served: tuple[RFClient, Path]) -> None:
    _, home = served
    missing = rf(home, "runs", "nope")
    assert missing.returncode == 1 and missing.stderr.strip() == "rf: no experiment named 'nope'"
    unknown_run = rf(home, "delete", "exp", "42")
    assert unknown_run.returncode == 1 and "experiment exp has no run 42" in unknown_run.stderr


def test_the_cli_imports_fast_and_without_heavy_packages() -> None:
    code = (
        "import sys, time\n"
        "started = time.perf_counter()\n"
        "import rf_cli.main\n"
        "elapsed = time.perf_counter() - started\n"
        "heavy = [name for name in ('torch', 'prefect', 'dash', 'duckdb', 'flask', 'transformers') "
        "if name in sys.modules]\n"
        "print(elapsed, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed, heavy = result.stdout.split(" ", 1)
    assert heavy.strip() == "[]"
    assert float(elapsed) < 1.0


def test_rf_runs_completes_within_a_second(served: tuple[RFClient, Path]) -> None:
    _, home = served
    rf(home, "runs", "exp")  # warm the file cache
    started = time.perf_counter()
    result = rf(home, "runs", "exp")
    assert result.returncode == 0
    assert time.perf_counter() - started < 1.5  # < 1 s on an idle machine; slack for a loaded one


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["clone", "e", "1"], "off"),
        (["clone", "e", "1", "--warm-start"], "weights"),
        (["clone", "e", "1", "--warm-start=weights+optimizer"], "weights+optimizer"),
    ],
)
def test_bare_warm_start_means_weights(argv: list[str], expected: str) -> None:
    assert build_parser().parse_args(argv).warm_start == expected


def test_demo_and_server_start_parse_their_flags() -> None:
    demo = build_parser().parse_args(
        [
            "demo",
            "--experiment",
            "d",
            "--chunks",
            "3",
            "--max-configs",
            "2",
            "--cpu-slots",
            "1",
            "--idle-timeout",
            "5",
        ]
    )
    assert (demo.experiment, demo.chunks, demo.max_configs, demo.cpu_slots, demo.idle_timeout) == (
        "d",
        3,
        2,
        1,
        5.0,
    )
    start = build_parser().parse_args(["server", "start", "--rf-home", "/tmp/x", "--port", "8050"])
    assert (str(start.rf_home), start.port, start.host) == ("/tmp/x", 8050, "127.0.0.1")


def test_a_malformed_set_is_a_one_line_error(served: tuple[RFClient, Path]) -> None:
    _, home = served
    result = rf(home, "clone", "exp", "3", "--set", "learning_rate")
    assert result.returncode == 1
    assert result.stderr.strip() == "rf: --set expects key=value, got 'learning_rate'"


def test_an_experiment_is_deleted_with_its_files_after_a_confirmation(served: tuple[RFClient, Path]) -> None:
    client, home = served
    client.create_experiment("doomed", [CONFIG, CONFIG], num_chunks=2)
    client.log_metrics("doomed-1", [{"experiment": "doomed", "run_id": 1, "step": 1, "name": "train_loss",
                                     "value": 1.0, "time": 1.0}])  # fmt: skip
    folder = home / "experiments" / "doomed" / "runs" / "1"
    folder.mkdir(parents=True)
    refused = rf(home, "experiments", "delete", "doomed", "--yes")
    assert refused.returncode == 1 and "has a live fit" in refused.stderr and "force" in refused.stderr
    client.set_experiment_status("doomed", "finished")
    kept = subprocess.run([*RF, "experiments", "delete", "doomed"], input="n\n", capture_output=True, text=True,
                          timeout=60, env={**os.environ, "RF_HOME": str(home)})  # fmt: skip
    assert "nothing deleted" in kept.stdout and "doomed" in [e["name"] for e in client.list_experiments()]
    deleted = rf(home, "experiments", "delete", "doomed", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted experiment 'doomed': 2 runs, 1 metric rows, 0 ops" in deleted.stdout
    assert "doomed" not in [e["name"] for e in client.list_experiments()] and not folder.parent.parent.exists()
    assert client.get_metrics("exp") is not None  # the other experiments are untouched
    gone = rf(home, "experiments", "delete", "doomed", "--yes")
    assert gone.returncode == 1 and "no experiment named 'doomed'" in gone.stderr
    client.create_experiment("doomed", [CONFIG], num_chunks=2)  # the name is free again


def test_an_ended_experiment_is_renamed_with_its_folder_and_stored_paths(served: tuple[RFClient, Path]) -> None:
    client, home = served
    client.create_experiment("before", [CONFIG, CONFIG], num_chunks=2)
    client.log_metrics("before-1", [{"experiment": "before", "run_id": 1, "step": 1, "name": "train_loss",
                                     "value": 1.0, "time": 1.0}])  # fmt: skip
    old_folder = home / "experiments" / "before"
    checkpoint = old_folder / "runs" / "1" / "chunk-0"
    checkpoint.mkdir(parents=True)
    (old_folder / "spec.pkl").write_bytes(b"kept")
    attempt = client.chunk_start("before", 1, 0, slot=0, total_chunks=2)
    client.chunk_end("before", attempt, {"run_id": 1, "chunk_index": 0, "status": "ok", "step": 1, "epoch": 0,
                                         "samples": 8, "checkpoint": str(checkpoint)})  # fmt: skip
    refused = rf(home, "experiments", "rename", "before", "after")
    assert refused.returncode == 1 and "cannot be renamed now: a live fit holds it" in refused.stderr
    client.set_experiment_status("before", "finished")
    taken = rf(home, "experiments", "rename", "before", "exp")
    assert taken.returncode == 1 and "experiment 'exp' already exists" in taken.stderr
    bad = rf(home, "experiments", "rename", "before", "no/slashes")
    assert bad.returncode == 1 and "experiment name" in bad.stderr

    renamed = rf(home, "experiments", "rename", "before", "after")
    assert renamed.returncode == 0, renamed.stderr
    assert "renamed experiment 'before' to 'after': 2 runs, 1 metric rows, 0 ops" in renamed.stdout
    names = [experiment["name"] for experiment in client.list_experiments()]
    assert "after" in names and "before" not in names
    new_folder = home / "experiments" / "after"
    assert not old_folder.exists() and (new_folder / "spec.pkl").read_bytes() == b"kept"
    run = client.get_run("after", 1)
    assert run["checkpoint"] == str(new_folder / "runs" / "1" / "chunk-0") and Path(run["checkpoint"]).is_dir()
    assert [row["value"] for row in client.get_metrics("after")] == [1.0]
    assert len(client.timeline("after")) == 1


def test_fit_and_continue_hand_the_slot_options_to_the_fit_flow(monkeypatch) -> None:
    from rf_cli import main as cli

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(cli, "_run_fit_flow", lambda experiment, **options: calls.append(options))
    fit = ["fit", "e", "--entrypoint", "m:f"]
    args = build_parser().parse_args([*fit, "--threads-per-slot", "1", "--evaluate-beside", "on"])
    args.handler(args)
    assert (calls[0]["cpu_threads_per_slot"], calls[0]["evaluate_beside_training"]) == (1, True)
    args = build_parser().parse_args(fit)
    args.handler(args)
    assert (calls[1]["cpu_threads_per_slot"], calls[1]["evaluate_beside_training"]) == (None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*fit, "--evaluate-beside", "maybe"])
