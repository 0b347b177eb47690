"""The house rules of the tree, checked: three rooms for three processes.

- `import rf_core` and `import rf_core.control` load no torch, no transformers and no Prefect (the CLI and the rf
  server import them and must start fast);
- only `rf_core/control/` imports duckdb (the store is the only code that speaks SQL);
- only `rf_core/training/` imports torch, transformers, peft, deepspeed, trl or datasets at module level;
- `rf_core` never imports `flows` or `dash_app` (the engine does not reach up; the fit flow registers itself).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RF_CORE = PROJECT_ROOT / "rf_core"
HEAVY = ("torch", "transformers", "peft", "deepspeed", "trl", "datasets", "prefect", "dash", "duckdb", "ray")
TORCH_FAMILY = {"torch", "transformers", "peft", "deepspeed", "trl", "datasets"}


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module a file imports (absolute names), or only those imported when the module itself is imported."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.If) and top_level_only:
            continue  # `if TYPE_CHECKING:` blocks import nothing at run time
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.add(argument.value)
    return found


def roots(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def engine_files(under: Path = RF_CORE) -> list[Path]:
    return sorted(under.rglob("*.py"))


@pytest.mark.parametrize("module", ["rf_core", "rf_core.control", "rf_core.client", "rf_core.planner"])
def test_importing_the_engine_loads_nothing_heavy(module: str) -> None:
    code = f"import sys, {module}\nprint(','.join(sorted(name for name in {HEAVY!r} if name in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    loaded = set(filter(None, result.stdout.strip().split(",")))
    allowed = {"duckdb"} if module == "rf_core.control" else set()
    assert loaded <= allowed, f"import {module} loads {sorted(loaded - allowed)}"


def test_only_the_control_room_imports_duckdb() -> None:
    offenders = [
        str(path.relative_to(PROJECT_ROOT))
        for path in engine_files()
        if "duckdb" in roots(imported_modules(path)) and RF_CORE / "control" not in path.parents
    ]
    offenders += [
        str(path.relative_to(PROJECT_ROOT))
        for folder in ("flows", "rf_cli", "dash_app")
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py"))
        if "duckdb" in roots(imported_modules(path))
    ]
    assert offenders == [], f"only rf_core/control/ may import duckdb: {offenders}"


def test_only_the_training_room_imports_torch_when_loaded() -> None:
    offenders = [
        str(path.relative_to(PROJECT_ROOT))
        for path in engine_files()
        if RF_CORE / "training" not in path.parents
        and roots(imported_modules(path, top_level_only=True)) & TORCH_FAMILY
    ]
    assert offenders == [], f"torch and friends belong in rf_core/training/: {offenders}"


def test_the_engine_never_imports_the_layers_above_it() -> None:
    offenders = {
        str(path.relative_to(PROJECT_ROOT)): sorted(roots(imported_modules(path)) & {"flows", "dash_app", "rf_cli"})
        for path in engine_files()
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_checks_above_can_fail(tmp_path: Path) -> None:
    # The helpers see imports inside functions and through importlib, the way rf_core reached `flows` before.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import importlib\ndef run():\n    import duckdb\n    return importlib.import_module('flows.fit')\n"
    )
    assert {"duckdb", "flows"} <= roots(imported_modules(sample))
    assert roots(imported_modules(sample, top_level_only=True)) == {"importlib"}
