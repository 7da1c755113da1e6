"""The package layout (issue 16, part 3): the app (``lorakit.app``) sits beside the library and the core never
imports it, not even inside a function; ``import lorakit`` loads none of the app's heavy dependencies.

The scan resolves relative imports against each file's package, so ``from ..app import x`` in a subpackage
counts the same as ``import lorakit.app``. ``__main__.py`` is the ``python -m lorakit`` entry point, not core.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorakit"
APP = "lorakit.app"
ENTRY_POINTS = {PACKAGE / "__main__.py"}
CORE_FILES = sorted(p for p in PACKAGE.rglob("*.py")
                    if p.relative_to(PACKAGE).parts[0] != "app" and p not in ENTRY_POINTS)

# modules `import lorakit` must leave unloaded, and why
NOT_IMPORTED = {
    "transformers": "only the app (and the user) needs it; integrations/ hooks wait for the user's import",
    "matplotlib": "the training loss plot (app/training.py)",
    "lorakit.app": "the core never imports the app",
    "torch.distributed.fsdp": "about 0.5 s; distributed.py looks it up only once something imported it",
}


def module_name(path: Path) -> str:
    parts = ["lorakit", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every absolute module name an import statement anywhere in ``source`` (function bodies included) may load:
    ``from X import a`` counts X and X.a, relative X resolved against ``module``; ``import_module("...")`` and
    ``__import__("...")`` calls with a constant name count too."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            found.add(node.args[0].value)
    return found


def imports_app(source: str, module: str, is_package: bool = False) -> set[str]:
    return {name for name in imported_modules(source, module, is_package)
            if name == APP or name.startswith(APP + ".")}


# (source, the importing module, is it a package __init__, does it import the app)
SCANNER_CASES = [
    ("import lorakit.app", "lorakit.model", False, True),
    ("import lorakit.app.cli as cli", "lorakit.model", False, True),
    ("from lorakit.app.training import train_loop", "lorakit.model", False, True),
    ("from lorakit import app", "lorakit.model", False, True),
    ("from .app import memory", "lorakit.model", False, True),
    ("from . import app", "lorakit.model", False, True),
    ("from . import io, app", "lorakit.model", False, True),
    ("from ..app.sft import collate", "lorakit.variants.dora", False, True),
    ("from .. import app", "lorakit.integrations.trl", False, True),
    ("from .app import cli", "lorakit", True, True),
    ("def f():\n    from .app.training import evaluate\n    return evaluate", "lorakit.model", False, True),
    ("class C:\n    def m(self):\n        import lorakit.app.memory", "lorakit.tuner", False, True),
    ("import importlib\nimportlib.import_module('lorakit.app.cli')", "lorakit.model", False, True),
    ("from . import io", "lorakit.model", False, False),
    ("from .application import x", "lorakit.model", False, False),
    ("import lorakit.apply", "lorakit.model", False, False),
    ("from ..app import x", "lorakit.model", False, False),  # lorakit.model's `..` is above lorakit: not the app
    ("from .app import x", "lorakit.variants.dora", False, False),  # lorakit.variants.app, not lorakit.app
    ("'''see lorakit.app.cli'''", "lorakit.model", False, False),
]


@pytest.mark.parametrize("source, module, is_package, expected", SCANNER_CASES)
def test_the_scanner_finds_every_form_of_importing_the_app(source, module, is_package, expected) -> None:
    assert bool(imports_app(source, module, is_package)) is expected


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_module_never_imports_the_app(path: Path) -> None:
    found = imports_app(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}: the core must not import lorakit.app"


def test_the_scan_covers_the_core_and_skips_the_app() -> None:
    names = {module_name(p) for p in CORE_FILES}
    assert {"lorakit", "lorakit.model", "lorakit.distributed", "lorakit.integrations.trainer"} <= names
    assert not {n for n in names if n == APP or n.startswith(APP + ".")} and "lorakit.__main__" not in names


@pytest.fixture(scope="module")
def modules_after_import() -> set[str]:
    """sys.modules after a bare ``import lorakit`` in a fresh interpreter."""
    code = "import json, sys, lorakit; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("name", sorted(NOT_IMPORTED))
def test_import_lorakit_leaves_unloaded(name: str, modules_after_import: set[str]) -> None:
    assert "lorakit" in modules_after_import and "lorakit.model" in modules_after_import
    loaded = sorted(m for m in modules_after_import if m == name or m.startswith(name + "."))
    assert not loaded, f"import lorakit loaded {loaded[:5]} ({NOT_IMPORTED[name]})"


# (how the command is reached, the callable it runs)
COMMANDS = [
    ("pyproject console script", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["lorakit"]),
    ("python -m lorakit", "lorakit.__main__:main"),
]


@pytest.mark.parametrize("where, target", COMMANDS, ids=[row[0] for row in COMMANDS])
def test_every_way_to_the_command_runs_the_app_cli(where: str, target: str) -> None:
    from lorakit.app.cli import main

    module, function = target.split(":")
    assert getattr(import_module(module), function) is main, where
