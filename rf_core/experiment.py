"""The user-facing experiment: what to train (`ExperimentSpec`) and `Experiment.run_fit` to train it."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from rf_core.data_forms import dataset_for, keyed_dataset_problems
from rf_core.errors import ExperimentExists
from rf_core.functions import named_configs
from rf_core.paths import check_name
from rf_core.states import DEFAULT_METRIC, METRIC_MODES, metric_mode

# The orchestration layer registers the function that runs a fit under this entry-point group (pyproject.toml):
# the engine finds it by name and never imports the layer above it.
FIT_RUNNER_GROUP = "rf_core.fit_runner"


@dataclass
class ExperimentSpec:
    """Everything a fit needs besides the store: configs, the base-model factory, data and chunking.

    `create_model_fn(config) -> (base_model, tokenizer)` builds the *base*; the engine applies LoRA from the
    config's adapter knobs, so runs on the same base share one frozen copy per worker.
    """

    config_group: Any
    create_model_fn: Callable[[dict[str, Any]], tuple[Any, Any]]
    # Rows, or rows per trainer type ({"sft": ..., "dpo": ...}): each run uses its own type's (`dataset_for`).
    train_dataset: Sequence[Any] | Mapping[str, Sequence[Any]]
    eval_dataset: Sequence[Any] | Mapping[str, Sequence[Any]]
    num_chunks: int
    seed: int = 42
    compute_metrics: Callable[..., dict[str, float]] | None = None
    metric: str = DEFAULT_METRIC
    mode: str | None = None  # None: as the metric says (`rf_core.states.metric_mode`): max for accuracies, rewards
    keep_checkpoints: int | None = 2  # newest chunk checkpoints kept per run (plus what clones need); None: all
    # Functions configs may name (formatting_func, compute_metrics): {name: function} or a list (by __name__).
    functions: Mapping[str, Callable[..., Any]] | Sequence[Callable[..., Any]] | None = None
    # Whether configs may load models with trust_remote_code=true (code from the model's repository runs here).
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not callable(self.create_model_fn):
            raise ValueError(f"create_model_fn must be callable, got {self.create_model_fn!r}")
        if not isinstance(self.num_chunks, int) or isinstance(self.num_chunks, bool) or self.num_chunks < 1:
            raise ValueError(f"num_chunks must be an integer >= 1, got {self.num_chunks=}")
        keep = self.keep_checkpoints
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise ValueError(f"keep_checkpoints must be None or an integer >= 1, got {self.keep_checkpoints=}")
        if self.mode is None:
            self.mode = metric_mode(self.metric)
        if self.mode not in METRIC_MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode=}")
        problems = keyed_dataset_problems(self.train_dataset, "train_dataset")
        problems += keyed_dataset_problems(self.eval_dataset, "eval_dataset")
        if problems:
            raise ValueError("; ".join(problems))
        configs, _ = self.named_configs()  # a lambda or two functions of one name are refused here, not in a worker
        untrusted = [index for index, config in enumerate(configs, start=1) if not self.allows(config)]
        if untrusted:
            raise ValueError(
                f"config {untrusted[0]}: model_kwargs.trust_remote_code=true runs code from the model's repository; "
                "opt this experiment in with run_fit(..., trust_remote_code=True)"
            )

    def allows(self, config: Mapping[str, Any]) -> bool:
        """False when the config asks to run a model repository's code and this experiment has not opted in."""
        model_kwargs = config.get("model_kwargs") or {}
        return self.trust_remote_code or model_kwargs.get("trust_remote_code") is not True

    def num_train_rows(self, config: Mapping[str, Any]) -> int:
        """How many training rows a run of this config has (its trainer type's dataset); ValueError if none."""
        return len(dataset_for(self.train_dataset, config.get("trainer_type") or "sft", "train_dataset"))

    def named_configs(self) -> tuple[list[dict[str, Any]], dict[str, Callable[..., Any]]]:
        """The config group's configs with every function replaced by its registered name, and the registry."""
        return named_configs(self.config_group, self.functions)


def load_entrypoint(ref: str) -> ExperimentSpec:
    """Import `module:function` and call it; it must return an ExperimentSpec.

    This is how deployments, `rf continue` and worker processes get an experiment: by import path, never by
    code sent over the wire.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"experiment entrypoint must look like 'package.module:function', got {ref!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import experiment module {module_name!r} from {ref!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (entrypoint {ref!r})")
    spec = factory() if callable(factory) and not isinstance(factory, ExperimentSpec) else factory
    if not isinstance(spec, ExperimentSpec):
        raise ValueError(f"entrypoint {ref!r} returned {type(spec).__name__}, expected an ExperimentSpec")
    return spec


class Experiment:
    """A named experiment in the store. `run_fit` trains its config group in chunks through the Prefect fit flow."""

    def __init__(self, name: str, *, server_url: str | None = None) -> None:
        self.name = check_name("experiment", name)
        self.server_url = server_url

    def run_fit(
        self,
        config_group: Any,
        create_model_fn: Callable[[dict[str, Any]], tuple[Any, Any]],
        train_dataset: Sequence[Any] | Mapping[str, Sequence[Any]],
        eval_dataset: Sequence[Any] | Mapping[str, Sequence[Any]],
        num_chunks: int,
        seed: int = 42,
        *,
        compute_metrics: Callable[..., dict[str, float]] | None = None,
        functions: Mapping[str, Callable[..., Any]] | Sequence[Callable[..., Any]] | None = None,
        metric: str = DEFAULT_METRIC,
        mode: str | None = None,
        keep_checkpoints: int | None = 2,
        policies: Sequence[Any] | None = None,
        cpu_slots: int | None = None,
        idle_timeout: float = 30.0,
        entrypoint: str | None = None,
        resume: bool = False,
        ephemeral: bool | None = None,
        trust_remote_code: bool = False,
        cpu_threads_per_slot: int | None = None,
        evaluate_beside_training: bool | None = None,
    ) -> dict[str, Any]:
        """Train every config of `config_group` in `num_chunks` chunks per epoch; returns the final snapshot.

        Functions defined in a notebook or script travel to the slot workers by cloudpickle. Give `entrypoint`
        (`module:function` returning the same ExperimentSpec) to make the experiment resumable by
        `rf continue` and runnable as a Prefect deployment.

        A config may hold functions for `formatting_func` and `compute_metrics` (`List([qa_format, chat_format])`
        grids over them); `functions={"qa": qa_format, ...}` registers more by name, so a Clone-Modify, a policy or
        the CLI can switch a run to any of them by name (a function in the config group registers itself under its
        `__name__`). `compute_metrics` here is the experiment's default for configs that name none.

        `train_dataset` and `eval_dataset` are rows, or rows per trainer type, `{"sft": sft_rows, "dpo":
        preference_rows}`, when runs of several trainer types train together (each on its own).

        `policies` run at every chunk boundary: `rf_core.policies.Policy` objects (acting; they may be defined
        right here), template names, or JSON specs `{"template", "params", "mode": "act" | "propose"}`.

        A config's `model_kwargs` may set `trust_remote_code=True` (the model's repository runs its own code in the
        slot workers) only when `trust_remote_code=True` is given here too; a clone asking for it without that
        opt-in fails with the reason.

        An experiment of this name that exists already is refused, unless `resume=True`: then its fit goes on with
        this spec's functions and data: its runs, ids, metrics and queued ops are kept (ops queued after its last
        fit apply now), runs that can train resume from their checkpoints, and `config_group` adds no runs.

        The fit runs on the services that stay up (`rf up`'s rf server and Prefect server, started now when none
        answers and left running, so the dashboard outlives the fit); `ephemeral=True` (or RF_EPHEMERAL=1) uses
        temporary ones that exit with the fit instead.

        `cpu_threads_per_slot` and `evaluate_beside_training` are the fit flow's (`flows.fit.rf_fit`): how many
        torch threads each CPU slot trains with, and whether a slot evaluates a boundary while its next chunk trains.
        """
        spec = ExperimentSpec(
            config_group=config_group,
            create_model_fn=create_model_fn,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            num_chunks=num_chunks,
            seed=seed,
            compute_metrics=compute_metrics,
            functions=functions,
            metric=metric,
            mode=mode,
            keep_checkpoints=keep_checkpoints,
            trust_remote_code=trust_remote_code,
        )
        try:
            return fit_runner()(
                self.name,
                spec,
                entrypoint=entrypoint,
                cpu_slots=cpu_slots,
                idle_timeout=idle_timeout,
                server_url=self.server_url,
                policies=policies,
                resume=resume,
                ephemeral=ephemeral,
                cpu_threads_per_slot=cpu_threads_per_slot,
                evaluate_beside_training=evaluate_beside_training,
            )
        except ExperimentExists as exc:
            hint = (
                f"to train experiment {self.name!r} on (its runs, metrics and queued ops kept), call "
                "run_fit(..., resume=True)"
            )
            raise ExperimentExists([*exc.problems, hint]) from None

    def results(self) -> Any:
        """One row per run (a pandas DataFrame): state, lineage, the experiment's metric, every knob, and the latest
        and best value of every evaluation metric (`<name>_latest`, `<name>_best`)."""
        from rf_core.results import results_frame

        with self._client() as client:
            return results_frame(client.experiment_snapshot(self.name), client.run_metrics(self.name))

    def metrics(self, names: Sequence[str] | None = None, run_ids: Sequence[int] | None = None) -> Any:
        """Every metric point (a long pandas DataFrame: run_id, step, name, value, chunk, time), optionally only
        some metric names or runs."""
        from rf_core.results import metrics_frame

        with self._client() as client:
            return metrics_frame(client.get_metrics(self.name, run_ids=run_ids, names=names))

    def to_parquet(self, folder: str | Path) -> dict[str, Path]:
        """Write `results.parquet` and `metrics.parquet` into `folder`; returns their paths."""
        from rf_core.results import write_parquet

        return write_parquet(self.results(), self.metrics(), Path(folder))

    def export(self, to: str, destination: str | Path) -> dict[str, Any]:
        """Export the runs and every metric point to "tensorboard" (a log folder), "mlflow" (a tracking URI) or
        "parquet" (a folder); see rf_core.exporters. Returns what was written."""
        from rf_core.exporters import export

        with self._client() as client:
            return export(client, self.name, to, destination)

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        """A client of this experiment's rf server: the given or running one, else a temporary one for the call."""
        from rf_core.client import NoServerRunning, RFClient, discover_server_url
        from rf_core.server_process import ensure_server, stop_server

        url, process = self.server_url or os.environ.get("RF_SERVER_URL"), None
        if not url:
            try:
                url = discover_server_url()
            except NoServerRunning:
                url, process = ensure_server()
        try:
            yield RFClient(url)
        finally:
            stop_server(process)


def fit_runner() -> Callable[..., dict[str, Any]]:
    """The registered `run_fit(experiment, spec, **options)` of the orchestration layer (the Prefect fit flow).

    Loaded only when a fit is asked for, so `import rf_core` stays free of Prefect and torch.
    """
    runners = list(entry_points(group=FIT_RUNNER_GROUP))
    if not runners:
        raise RuntimeError(
            f"no fit runner is registered under the entry-point group {FIT_RUNNER_GROUP!r}: install the project "
            "(pip install -e .) so that its fit flow registers itself"
        )
    return runners[0].load()
