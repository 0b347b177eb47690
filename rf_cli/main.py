"""`rf`: steer experiments from a terminal.

    rf up [--port P] [--prefect-port P] | rf down [--force] | rf status   services that stay up
    rf server start [--rf-home DIR] [--host H] [--port P]     run the dashboard + API (owns the store)
    rf demo [--experiment NAME] [--chunks K] [--trainer dpo|grpo]  train the demo experiment
    rf experiments | rf runs EXP [--all] | rf ops EXP         look
    rf experiments delete EXP [--yes] [--force]               delete one, with its files
    rf experiments rename EXP NEW                             rename an ended one
    rf export EXP --to tensorboard DIR | mlflow URI | parquet DIR   results out
    rf stop|resume|delete EXP RUN                             queue an IC Op
    rf clone EXP RUN [--set k=v ...] [--config FILE.json] [--warm-start[=weights|weights+optimizer]]
    rf fit EXP --entrypoint MODULE:FUNCTION [--policy SPEC ...]  train an importable experiment, policies attached
    rf continue EXP [--policy SPEC ...]                       train an ended experiment on (runs and history kept)
    rf policy templates | apply | decisions | approve | dismiss  policies: IC Ops by rule, audited

Every listing and op command takes --json (for scripts) and --server URL (else $RF_SERVER_URL, else the server
recorded in $RF_HOME/server.json). Only the standard library and rf_core.client are imported up front, so the
command starts fast; the server and the demo import their heavy dependencies when asked for.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rf_core.client import RFClient, ServerError, ServerUnavailable
from rf_core.config import apply_overrides, parse_set_overrides
from rf_core.errors import InvalidRequest, NotFound, OpRejected
from rf_core.knobs import ConfigError
from rf_core.report import (
    experiment_metric,
    fit_state_text,
    format_table,
    progress_text,
    runs_table,
    runs_text,
    with_names,
)
from rf_core.services import PREFECT_PORT_ENV, RF_PORT_ENV, ServiceError
from rf_core.states import DECISION_STATUSES, RESERVED_PREFIX, WARM_START_MODES

EXIT_OK = 0
EXIT_REJECTED = 1  # the server refused the request (an illegal op, bad input, unknown experiment or run)
EXIT_UNAVAILABLE = 3  # no server to talk to


class UsageError(Exception):
    """A mistake in the command line that argparse cannot see (a bad --set, an unreadable --config)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rf", description="Interactive control of fine-tuning experiments.", formatter_class=_Formatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL", help="rf server URL (default: $RF_SERVER_URL or server.json)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    server = commands.add_parser("server", help="run the rf server (dashboard + JSON API)")
    server_commands = server.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    start = server_commands.add_parser("start", help="start the server in the foreground")
    start.add_argument("--rf-home", type=Path, default=None, help="store folder (default: $RF_HOME or ~/.rf)")
    start.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    start.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default 0)")
    start.add_argument("--exit-with-pid", type=int, default=None, metavar="PID", help="exit when PID is gone")
    start.set_defaults(handler=cmd_server_start)

    services_up = commands.add_parser(
        "up", help="start the rf server (dashboard + API) and a Prefect server in the background; they stay up"
    )
    services_up.add_argument("--port", type=int, default=None, help=f"rf server port (default ${RF_PORT_ENV} or 8765)")
    services_up.add_argument(
        "--prefect-port", type=int, default=None, help=f"Prefect server port (default ${PREFECT_PORT_ENV} or 4200)"
    )
    services_up.add_argument("--no-prefect", action="store_true", help="only the rf server")
    services_up.set_defaults(handler=cmd_up)
    services_down = commands.add_parser("down", help="stop the services `rf up` started")
    services_down.add_argument(
        "--force", action="store_true", help="even while fits run on them (they wait for the server to come back)"
    )
    services_down.set_defaults(handler=cmd_down)
    services_status = commands.add_parser(
        "status", parents=[common], help="the services' URLs and pids, and which experiments have a fit running"
    )
    services_status.set_defaults(handler=cmd_status)

    demo = commands.add_parser("demo", help="train the demo experiment (a tiny model on CPU)")
    demo.add_argument("--experiment", default=None, help="experiment name (default: demo-<timestamp>)")
    demo.add_argument("--chunks", type=int, default=4, help="chunks per epoch (default 4)")
    demo.add_argument(
        "--trainer",
        choices=("sft", "dpo", "grpo"),
        default="sft",
        help="sft (default): LoRA fine-tunes on docstrings; dpo: DPO runs on docstring preference pairs; grpo: GRPO "
        "runs rewarded for answering a signature with one sentence of about 12 words",
    )
    demo.add_argument("--max-configs", type=int, default=None, help="train at most N of the demo's configs")
    demo.add_argument("--cpu-slots", type=int, default=None, help="CPU slot workers")
    demo.add_argument(
        "--idle-timeout", type=float, default=30.0, help="seconds to wait for an op once every run is stopped"
    )
    demo.add_argument(
        "--ephemeral",
        action="store_true",
        default=None,
        help="temporary rf and Prefect servers that exit with the fit (default: the services `rf up` keeps up)",
    )
    demo.set_defaults(handler=cmd_demo)

    experiments = commands.add_parser("experiments", parents=[common], help="list, delete or rename experiments")
    experiments.set_defaults(handler=cmd_experiments)
    experiment_commands = experiments.add_subparsers(dest="experiments_command", metavar="ACTION")
    delete = experiment_commands.add_parser(
        "delete", parents=[common], help="delete an experiment: its runs, metrics, ops, checkpoints and exports"
    )
    delete.add_argument("experiment")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument(
        "--force", action="store_true", help="even while a live fit holds it (only when its lease cannot be trusted)"
    )
    delete.set_defaults(handler=cmd_experiments_delete)
    rename = experiment_commands.add_parser(
        "rename", parents=[common], help="rename an ended experiment: its rows, folder and kept spec"
    )
    rename.add_argument("experiment")
    rename.add_argument("new_name")
    rename.set_defaults(handler=cmd_experiments_rename)

    runs = commands.add_parser("runs", parents=[common], help="list an experiment's runs")
    runs.add_argument("experiment")
    runs.add_argument("--all", action="store_true", help="include deleted runs")
    runs.set_defaults(handler=cmd_runs)

    for kind, text in (
        ("stop", "stop a run"),
        ("resume", "resume a stopped run"),
        ("delete", "delete a run"),
    ):
        op = commands.add_parser(kind, parents=[common], help=f"{text} at its next chunk boundary")
        op.add_argument("experiment")
        op.add_argument("run_id", type=int, metavar="RUN")
        op.set_defaults(handler=cmd_simple_op, kind=kind)

    clone = commands.add_parser(
        "clone", parents=[common], help="clone a run with changes (applied at its next chunk boundary)"
    )
    clone.add_argument("experiment")
    clone.add_argument("run_id", type=int, metavar="RUN")
    clone.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a knob (VALUE is JSON, else a string); repeatable; a tagged value like "
        "'{\"$list\": [1e-4, 3e-4]}' makes one clone per value",
    )
    clone.add_argument("--config", type=Path, metavar="FILE.json", help="the clone's full config as a JSON file")
    clone.add_argument(
        "--warm-start",
        nargs="?",
        const="weights",
        default="off",
        choices=WARM_START_MODES,
        help="start from the parent's weights (bare flag: weights)",
    )
    clone.set_defaults(handler=cmd_clone, kind="clone")

    exporting = commands.add_parser(
        "export", parents=[common], help="export runs and metric points to TensorBoard, MLflow or Parquet"
    )
    exporting.add_argument("experiment")
    exporting.add_argument(
        "--to",
        nargs=2,
        required=True,
        metavar=("TARGET", "DEST"),
        help="tensorboard LOG_DIR | mlflow TRACKING_URI | parquet DIR",
    )
    exporting.set_defaults(handler=cmd_export)

    op_log = commands.add_parser("ops", parents=[common], help="list an experiment's IC Ops (the audit log)")
    op_log.add_argument("experiment")
    op_log.set_defaults(handler=cmd_ops)

    fit = commands.add_parser(
        "fit", help="train an importable experiment (module:function) in the foreground, policies attached"
    )
    fit.add_argument("experiment", help="experiment name in the store (created if new)")
    fit.add_argument("--entrypoint", required=True, metavar="MODULE:FUNCTION", help="returns the ExperimentSpec")
    fit.add_argument(
        "--policy",
        dest="policies",
        action="append",
        default=[],
        metavar="SPEC",
        help="a policy run at every chunk boundary: a template name, or JSON "
        '\'{"template": "asha", "params": {"eta": 2}, "mode": "propose"}\'; repeatable',
    )
    fit.add_argument("--chunks", type=int, default=None, help="chunks per epoch (default: the spec's)")
    fit.add_argument("--max-configs", type=int, default=None, help="train at most N of the spec's configs")
    fit.add_argument("--cpu-slots", type=int, default=None, help="CPU slot workers")
    fit.add_argument(
        "--idle-timeout", type=float, default=30.0, help="seconds to wait for an op once every run is stopped"
    )
    fit.add_argument("--server", metavar="URL", help="rf server URL (default: found or started for RF_HOME)")
    fit.add_argument(
        "--ephemeral",
        action="store_true",
        default=None,
        help="temporary rf and Prefect servers that exit with the fit (default: the services `rf up` keeps up)",
    )
    _add_ray_arguments(fit)
    _add_slot_arguments(fit)
    fit.set_defaults(handler=cmd_fit)

    resume_fit = commands.add_parser(
        "continue", help="train an ended experiment on: its runs, ids and metrics are kept, queued ops apply"
    )
    resume_fit.add_argument("experiment")
    resume_fit.add_argument("--policy", dest="policies", action="append", default=[], metavar="SPEC",
                            help="a policy run at every chunk boundary (as for `rf fit`); repeatable")  # fmt: skip
    resume_fit.add_argument("--cpu-slots", type=int, default=None, help="CPU slot workers")
    resume_fit.add_argument(
        "--idle-timeout", type=float, default=30.0, help="seconds to wait for an op once every run is stopped"
    )
    resume_fit.add_argument(
        "--force",
        action="store_true",
        help="take the experiment even from a fit whose lease is live: only when leases cannot be trusted (a store "
        "shared by machines whose clocks disagree); a crashed fit's experiment is taken without it",
    )
    resume_fit.add_argument("--server", metavar="URL", help="rf server URL (default: found or started for RF_HOME)")
    resume_fit.add_argument(
        "--ephemeral",
        action="store_true",
        default=None,
        help="temporary rf and Prefect servers that exit with the fit (default: the services `rf up` keeps up)",
    )
    _add_ray_arguments(resume_fit)
    _add_slot_arguments(resume_fit)
    resume_fit.set_defaults(handler=cmd_continue)

    policy = commands.add_parser("policy", help="policies: apply a template, list decisions, approve proposals")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    templates = policy_commands.add_parser("templates", help="the built-in templates and their parameters")
    templates.set_defaults(handler=cmd_policy_templates)

    apply = policy_commands.add_parser(
        "apply", parents=[common], help="let a policy decide once now, and queue (or propose) its ops"
    )
    apply.add_argument("experiment")
    apply.add_argument(
        "--template", required=True, metavar="NAME", help="a built-in template, or MODULE:ATTR naming your own"
    )
    apply.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a template parameter (VALUE is JSON, else a string); repeatable",
    )
    apply.add_argument(
        "--propose", action="store_true", help="propose the ops for a person to approve instead of queueing them"
    )
    apply.add_argument("--dry-run", action="store_true", help="print the ops it would submit and why; send nothing")
    apply.set_defaults(handler=cmd_policy_apply)

    decisions = policy_commands.add_parser(
        "decisions", parents=[common], help="policy decisions: ops queued, rejected, and proposals"
    )
    decisions.add_argument("experiment")
    decisions.add_argument("--policy", default=None, help="only this policy's decisions")
    decisions.add_argument(
        "--status",
        default=None,
        choices=DECISION_STATUSES,
        help="only decisions in this status (proposed: those waiting for a person)",
    )
    decisions.set_defaults(handler=cmd_policy_decisions)

    for action, text in (("approve", "queue a proposed op, as you"), ("dismiss", "turn a proposal down")):
        resolve = policy_commands.add_parser(action, parents=[common], help=text)
        resolve.add_argument("experiment")
        resolve.add_argument("decision_id", type=int, metavar="PROPOSAL")
        resolve.add_argument("--who", default=None, help="who decides (default: your user name)")
        resolve.set_defaults(handler=cmd_policy_resolve, approve=action == "approve")
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except OpRejected as exc:
        return _fail(f"op rejected: {'; '.join(exc.problems) or exc}", EXIT_REJECTED)
    except (InvalidRequest, NotFound, UsageError, ConfigError, ServiceError) as exc:
        return _fail(str(exc), EXIT_REJECTED)
    except ServerUnavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    except ServerError as exc:
        return _fail(f"server error: {exc}", EXIT_REJECTED)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int) -> int:
    print(f"rf: {message}", file=sys.stderr)
    return code


# -- commands -----------------------------------------------------------------------------------------------


def cmd_server_start(args: argparse.Namespace) -> int:
    from rf_core import paths

    server = importlib.import_module("dash_app.server")  # Dash is heavy: only this command pays for it
    home = args.rf_home if args.rf_home is not None else paths.rf_home()
    return server.serve(Path(home), args.host, args.port, args.exit_with_pid)


def cmd_up(args: argparse.Namespace) -> int:
    from rf_core import services

    try:
        started = services.up(port=args.port, prefect=not args.no_prefect, prefect_port_number=args.prefect_port)
    except services.ServiceError as exc:
        raise UsageError(str(exc)) from None
    for line in services.describe(started):
        print(line)
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from rf_core import services

    try:
        stopped = services.down(force=args.force)
    except services.ServiceError as exc:
        raise UsageError(str(exc)) from None
    print("\n".join(f"stopped the {what}" for what in stopped) or "nothing that `rf up` started is running")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from rf_core import services

    running = services.status()
    rows: list[dict[str, Any]] = []
    url = args.server or os.environ.get("RF_SERVER_URL") or (running["rf"] or {}).get("url")
    if url:
        rows = [row for row in RFClient(url).list_experiments() if row["status"] != "finished"]
    if args.json:
        return _print_json({**running, "experiments": rows})
    for name, title in (("rf", "rf server (dashboard + API)"), ("prefect", "Prefect server")):
        service = running[name]
        if service is None:
            print(f"{title}: not running (`rf up` starts it)")
            continue
        shown = str(service["url"]).removesuffix("/api")
        started = "started by rf up" if service.get("owned") else "not started by rf up"
        print(f"{title}: {shown}  (pid {service.get('pid') or 'unknown'}, {started})")
    if not url:
        return EXIT_OK
    if not rows:
        print("no experiment has a fit running")
    for row in rows:
        print(f"experiment {row['name']}: {fit_state_text(row)}  {services.dashboard_url(url, row['name'])}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from rf_core.exporters import ExportError, export

    target, destination = args.to
    try:
        written = export(_client(args), args.experiment, target, destination)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        return _print_json(written)
    where = written.get("folder") or written.get("tracking_uri")
    what = f"{len(written['runs'])} runs" if "runs" in written else ", ".join(written["files"].values())
    print(f"exported {what} of {args.experiment} to {target} at {where}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    demo = importlib.import_module("rf_cli.demo")  # Prefect and torch load only for the demo
    return int(demo.main(args) or 0)


def cmd_experiments(args: argparse.Namespace) -> int:
    experiments = _client(args).list_experiments()
    if args.json:
        return _print_json(experiments)
    if not experiments:
        print("no experiments yet")
        return EXIT_OK
    rows = [
        [
            row["name"],
            fit_state_text(row),
            sum(row.get("run_counts", {}).values()),
            ", ".join(f"{count} {status}" for status, count in sorted(row.get("run_counts", {}).items())),
            row["num_chunks"],
            f"{row['metric']} ({row['mode']})",
            _when(row["created_at"]),
        ]
        for row in experiments
    ]
    print(format_table(["experiment", "status", "runs", "by status", "chunks/epoch", "metric", "created"], rows))
    return EXIT_OK


def cmd_experiments_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        answer = input(f"delete experiment {args.experiment!r} with its runs, metrics and checkpoints? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_OK
    deleted = _client(args).delete_experiment(args.experiment, force=args.force)
    if args.json:
        return _print_json(deleted)
    rows = deleted["deleted_rows"]
    print(
        f"deleted experiment {args.experiment!r}: {rows['runs']} runs, {rows['metrics']} metric rows, "
        f"{rows['ops']} ops, and {deleted['deleted_folder']}"
    )
    return EXIT_OK


def cmd_experiments_rename(args: argparse.Namespace) -> int:
    renamed = _client(args).rename_experiment(args.experiment, args.new_name)
    if args.json:
        return _print_json(renamed)
    rows = renamed["moved_rows"]
    print(f"renamed experiment {args.experiment!r} to {args.new_name!r}: {rows['runs']} runs, {rows['metrics']} metric "
          f"rows, {rows['ops']} ops; its folder is now {renamed['folder']}")  # fmt: skip
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    client = _client(args)
    snapshot = client.experiment_snapshot(args.experiment, include_deleted=args.all)
    if args.json:
        summaries = client.run_metrics(args.experiment)
        return _print_json([{**run, "metrics": summaries.get(run["run_id"], {})} for run in snapshot["runs"]])
    print(format_runs(snapshot))
    return EXIT_OK


def cmd_simple_op(args: argparse.Namespace) -> int:
    return _submit(args, payload=None)


def cmd_clone(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"warm_start": args.warm_start}
    if args.config is not None:
        try:
            payload["config"] = json.loads(args.config.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read --config {args.config}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"--config {args.config} is not valid JSON: {exc}") from None
    if args.overrides:
        overrides = parse_set_overrides(args.overrides)
        if args.config is not None:
            # A saved config plus --set tweaks is the natural way to edit one: merge them here.
            if not isinstance(payload["config"], dict):
                raise UsageError(f"--config {args.config} must hold a JSON object to apply --set to")
            payload["config"] = apply_overrides(payload["config"], overrides)
        else:
            payload["overrides"] = overrides
    return _submit(args, payload)


def cmd_ops(args: argparse.Namespace) -> int:
    op_rows = _client(args).list_ops(args.experiment)
    if args.json:
        return _print_json(op_rows)
    if not op_rows:
        print(f"no ops for experiment {args.experiment} yet")
        return EXIT_OK
    print(format_ops(op_rows))
    return EXIT_OK


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ray",
        dest="ray_address",
        metavar="ADDRESS",
        help='run the slot workers on this Ray cluster ("auto", "host:port"; needs the ray extra)',
    )
    parser.add_argument("--ray-slots", type=int, default=None, help="slots on the Ray cluster")
    parser.add_argument(
        "--ray-gpus-per-slot", type=int, choices=(0, 1), default=0, help="1: each Ray slot gets a GPU"
    )  # fmt: skip


def _add_slot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads-per-slot", type=int, default=None, help="torch threads per CPU slot (default: cores / slots)"
    )
    parser.add_argument(
        "--evaluate-beside",
        choices=("on", "off"),
        default=None,
        help="evaluate a chunk's boundary in a thread of its own while the slot's next chunk trains (no policy "
        "attached; default: on where the slots' training threads leave a core per slot free)",
    )


def _slot_options(args: argparse.Namespace) -> dict[str, Any]:
    beside = {"on": True, "off": False, None: None}[args.evaluate_beside]
    return {"cpu_threads_per_slot": args.threads_per_slot, "evaluate_beside_training": beside}


def _ray_options(args: argparse.Namespace) -> dict[str, Any]:
    if not args.ray_address:
        return {}
    return {"ray_address": args.ray_address, "ray_slots": args.ray_slots, "ray_gpus_per_slot": args.ray_gpus_per_slot}


def cmd_fit(args: argparse.Namespace) -> int:
    _run_fit_flow(
        args.experiment,
        entrypoint=args.entrypoint,
        **_ray_options(args),
        **_slot_options(args),
        cpu_slots=args.cpu_slots,
        idle_timeout=args.idle_timeout,
        server_url=args.server,
        num_chunks=args.chunks,
        max_configs=args.max_configs,
        policies=_policy_specs(args.policies),
        ephemeral=args.ephemeral,
    )
    return EXIT_OK


def cmd_continue(args: argparse.Namespace) -> int:
    from rf_core.server_process import ensure_server, stop_server
    from rf_core.services import ephemeral_requested, up

    policies = _policy_specs(args.policies)
    url, temporary_server = args.server or os.environ.get("RF_SERVER_URL"), None
    fit_server = url  # one given is used as it is
    if url is None and ephemeral_requested(args.ephemeral):
        url, temporary_server = ensure_server()  # the fit would start one anyway; we need it first, to read
        fit_server = url
    elif url is None:
        url = up(prefect=False)["rf"]["url"]  # the fit finds these services again (and revives them if they die)
    try:
        experiment = RFClient(url).get_experiment(args.experiment)
        if not experiment.get("spec_ref"):
            from rf_core.kept_specs import load_kept_spec

            try:
                load_kept_spec(args.experiment)  # fails here, with the reason, before anything heavy starts
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        reserved = str(experiment.get("fit_owner") or "").startswith(RESERVED_PREFIX)  # started for this command
        if experiment["status"] == "running" and not reserved and not args.force:
            raise UsageError(
                f"experiment {args.experiment} has a live fit; its ops apply there (a fit that stopped renewing "
                "its lease shows as crashed within seconds and is taken over without --force)"
            )
        _run_fit_flow(
            args.experiment,
            entrypoint=experiment.get("spec_ref"),  # none: the spec kept when a script or notebook ran it
            num_chunks=int(experiment["num_chunks"]),
            **_ray_options(args),
            **_slot_options(args),
            cpu_slots=args.cpu_slots,
            idle_timeout=args.idle_timeout,
            server_url=fit_server,
            policies=policies,
            continue_experiment=True,
            force_takeover=args.force,
            ephemeral=args.ephemeral,
        )
    finally:
        stop_server(temporary_server)
    return EXIT_OK


def _policy_specs(texts: Sequence[str]) -> list[dict[str, Any]] | None:
    """`--policy` values as JSON policy specs, each built once so a typo fails before anything heavy starts."""
    from rf_core.policies_runner import PolicySpec

    try:
        specs = [PolicySpec.from_json(_policy_spec_arg(text)) for text in texts]
        for spec in specs:
            spec.build()
    except ValueError as exc:
        raise UsageError(f"--policy: {exc}") from None
    return [spec.to_json() for spec in specs] or None


def _run_fit_flow(experiment: str, ephemeral: bool | None = None, **options: Any) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    fit_flow = importlib.import_module("flows.fit")  # Prefect and torch load only when a fit is asked for
    fit_flow.run_flow(experiment, ephemeral=ephemeral, **options)


def cmd_policy_templates(args: argparse.Namespace) -> int:
    import inspect

    from rf_core.policies import TEMPLATES

    for name, cls in TEMPLATES.items():
        parameters = [
            ("*" if parameter.kind == parameter.VAR_POSITIONAL else "")
            + parameter_name
            + ("" if parameter.default is parameter.empty else f"={json.dumps(parameter.default)}")
            for parameter_name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter_name != "self"
        ]
        summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        print(f"{name}({', '.join(parameters)})\n    {summary}\n")
    return EXIT_OK


def cmd_policy_apply(args: argparse.Namespace) -> int:
    from rf_core.policies_runner import PolicySpec, apply_policy, format_outcomes

    try:
        spec = PolicySpec(args.template, _parse_params(args.params), "propose" if args.propose else "act")
        policy = spec.build()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    outcomes = apply_policy(_client(args), args.experiment, policy, mode=spec.mode, dry_run=args.dry_run, who=_who())
    if args.json:
        return _print_json([outcome.to_json() for outcome in outcomes])
    print(format_outcomes(policy.name, outcomes, args.dry_run))
    return EXIT_OK


def cmd_policy_decisions(args: argparse.Namespace) -> int:
    rows = _client(args).list_policy_decisions(args.experiment, policy=args.policy, status=args.status)
    if args.json:
        return _print_json(rows)
    if not rows:
        filtered = " match" if args.policy or args.status else ""
        print(f"no policy decisions for experiment {args.experiment}{filtered}")
        return EXIT_OK
    print(format_decisions(rows))
    return EXIT_OK


def cmd_policy_resolve(args: argparse.Namespace) -> int:
    who = args.who or _who()
    result = _client(args).resolve_proposal(args.experiment, args.decision_id, args.approve, who)
    if args.json:
        return _print_json(result)
    decision, op = result["decision"], result["op"]
    if op is not None:
        print(f"proposal {decision['decision_id']} approved by {who}: {describe_queued_op(op)}")
    else:
        print(f"proposal {decision['decision_id']} dismissed by {who}")
    return EXIT_OK


def format_decisions(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["id", "policy", "run", "chunk", "kind", "status", "op", "why", "decided", "by"]
    table = [
        [
            row["decision_id"],
            row["policy"],
            row["run_id"],
            row["boundary"],
            _decision_kind(row),
            row["status"],
            row.get("op_id"),
            row["reason"] + (f" [rejected: {'; '.join(row['problems'])}]" if row.get("problems") else ""),
            _when(row["decided_at"]),
            row.get("resolved_by"),
        ]
        for row in rows
    ]
    return format_table(headers, table)


def _decision_kind(row: dict[str, Any]) -> str:
    payload = row.get("payload") or {}
    if row["kind"] != "clone" or not payload.get("overrides"):
        return row["kind"]
    return "clone " + ", ".join(f"{key}={_knob(value)}" for key, value in payload["overrides"].items())


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`--param key=value` pairs; a value that is not JSON is a string (so `metric=eval_loss` needs no quotes)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param takes KEY=VALUE, got {item!r}")
        try:
            params[key.strip()] = json.loads(raw)
        except ValueError:
            params[key.strip()] = raw
    return params


def _policy_spec_arg(text: str) -> Any:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--policy {text!r} is not valid JSON: {exc}") from None
    return text


# -- helpers ------------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> RFClient:
    return RFClient(args.server)


def _submit(args: argparse.Namespace, payload: dict[str, Any] | None) -> int:
    client = _client(args)
    op = client.submit_op(args.experiment, args.kind, args.run_id, payload, source="cli", who=_who())
    if args.json:
        return _print_json(op)
    print(describe_queued_op(op))
    experiment = client.get_experiment(args.experiment)
    if experiment.get("status") != "running":
        continued = _continue_through_deployment(client, experiment)
        if continued is not None:
            print(
                f"experiment {args.experiment} had no fit running: continuing it through deployment "
                f"{continued.deployment} (flow run {continued.flow_run}); the op applies there"
            )
        else:
            print(
                f"note: experiment {args.experiment} has no fit running; the op waits in the queue until one runs "
                f"it (`rf continue {args.experiment}` starts one)"
            )
    return EXIT_OK


def _continue_through_deployment(client: RFClient, experiment: dict[str, Any]) -> Any:
    """Start the fit deployment for an ended experiment when a Prefect server serves one (flows.continuation)."""
    if not os.environ.get("PREFECT_API_URL"):
        return None  # without a Prefect server there is nothing to start: skip importing Prefect at all
    try:
        from flows.continuation import continue_through_deployment

        continued = continue_through_deployment(experiment)
    except Exception as error:  # the op is queued either way; say why the fit did not start
        print(f"warning: could not start the rf-fit deployment: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    if continued is not None:
        # A second op right behind this one must not start a second fit on the same experiment.
        client.reserve_fit(experiment["name"], f"deployment {continued.deployment}, flow run {continued.flow_run}")
    return continued


def describe_queued_op(op: dict[str, Any]) -> str:
    run_id = op["run_id"]
    what = f"{op['kind']} run {run_id}"
    if op["kind"] == "clone":
        count = int(op["payload"].get("count") or len(op["payload"].get("configs", [])))
        warm = op["payload"].get("warm_start", "off")
        what += f" into {count} new run{'s' if count != 1 else ''}"
        if warm != "off":
            what += f", warm-started ({warm})"
    return f"op {op['op_id']} queued: {what} (applies at run {run_id}'s next chunk boundary)"


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


def _print_json(data: Any) -> int:
    print(json.dumps(data, indent=2))
    return EXIT_OK


def format_runs(snapshot: dict[str, Any]) -> str:
    experiment = snapshot["experiment"]
    if not snapshot["runs"]:
        return f"experiment {experiment['name']} has no runs to show (--all includes deleted runs)"
    metric = experiment_metric(snapshot)
    knobs, runs = runs_table(snapshot)
    headers = ["run", "status", "source", "parent", "progress", "train loss", metric, f"best {metric}", *knobs]
    rows = [
        [
            row.run_id,
            row.status + (f" ({', '.join(row.pending_op_kinds)} queued)" if row.pending_op_kinds else ""),
            row.source,
            row.parent_id,
            progress_text(row),
            _number(row.train_loss),
            _number(row.latest_metric),
            _number(row.best_metric),
            *(_knob(row.knobs[knob]) for knob in knobs),
        ]
        for row in runs
    ]
    headers, rows = with_names(headers, runs, rows)
    header = f"experiment {experiment['name']} ({fit_state_text(experiment)}, {experiment['num_chunks']} chunks/epoch)"
    return header + "\n" + format_table(headers, rows)


def format_ops(op_rows: Sequence[dict[str, Any]]) -> str:
    headers = ["op", "run", "kind", "source", "who", "status", "reason / result", "submitted", "applied", "why"]
    rows = [
        [
            op["op_id"],
            op["run_id"],
            _op_kind(op),
            op["source"],
            op.get("who"),
            op["status"],
            op.get("reason") or _result(op.get("result")),
            _when(op["submitted_at"]),
            _when(op.get("applied_at")),
            ((op.get("payload") or {}).get("policy") or {}).get("reason"),  # a policy's op says why
        ]
        for op in op_rows
    ]
    return format_table(headers, rows)


def _op_kind(op: dict[str, Any]) -> str:
    if op["kind"] != "clone":
        return op["kind"]
    payload = op.get("payload") or {}
    warm = payload.get("warm_start", "off")
    return f"clone x{payload.get('count', 1)}" + ("" if warm == "off" else f" ({warm})")


def _result(result: Any) -> str | None:
    if not result:
        return None
    if result.get("created_run_ids"):
        return "created " + runs_text(result["created_run_ids"])
    if "to" in result:
        return f"{result.get('from')} -> {result['to']}"
    return json.dumps(result)


def _number(value: Any) -> str | None:
    return None if value is None else f"{value:.4f}"


def _knob(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        return f"{value:.3g}"
    return value if isinstance(value, str) else json.dumps(value)


def _when(epoch_seconds: float | None) -> str | None:
    if epoch_seconds is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_seconds))


if __name__ == "__main__":
    sys.exit(main())
