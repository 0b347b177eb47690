"""The spec of an experiment started from in-memory functions (a script or a notebook), kept on the machine that ran
it, so `rf continue` can train the experiment on after its fit ended.

The spec is serialised by value with cloudpickle into `$RF_HOME/experiments/<name>/spec.pkl`, readable by its owner
only. It is never sent over HTTP: only processes that can read `$RF_HOME` load it, as they would the user's own
code. Functions defined in a script, a notebook or another function travel inside it; functions from importable
modules are kept by name and must still import when it is loaded.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from rf_core import paths

SPEC_FILE = "spec.pkl"


def spec_path(experiment: str, home: Path | None = None) -> Path:
    return paths.experiment_dir(experiment, home) / SPEC_FILE


def keep_spec(experiment: str, spec: Any, home: Path | None = None) -> Path:
    """Write `spec` for `experiment` (atomically, mode 0600); returns the file."""
    import cloudpickle

    target = spec_path(experiment, home)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".spec-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            cloudpickle.dump(spec, file)
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def load_kept_spec(experiment: str, home: Path | None = None) -> Any:
    """The spec kept for `experiment`; ValueError saying why it cannot be loaded."""
    target = spec_path(experiment, home)
    if not target.is_file():
        raise ValueError(
            f"experiment {experiment!r} was started from in-memory functions and no spec of it is kept in "
            f"{target.parent} (it ran on another machine or RF_HOME, or before specs were kept): continue it from "
            "Python with Experiment(name).run_fit(..., resume=True)"
        )
    try:
        with open(target, "rb") as file:
            return pickle.load(file)  # noqa: S301 - the owner's own file, like the owner's own code
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"the kept spec of experiment {experiment!r} needs module {exc.name!r}, which does not import here: "
            "run `rf continue` where that module is on the path, or continue from Python with "
            "Experiment(name).run_fit(..., resume=True)"
        ) from None
    except (AttributeError, ImportError) as exc:
        raise ValueError(
            f"the kept spec of experiment {experiment!r} names code that no longer exists ({exc}): continue it from "
            "Python with Experiment(name).run_fit(..., resume=True)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(
            f"the kept spec of experiment {experiment!r} in {target} cannot be read ({type(exc).__name__}: {exc}): "
            "continue it from Python with Experiment(name).run_fit(..., resume=True)"
        ) from None
