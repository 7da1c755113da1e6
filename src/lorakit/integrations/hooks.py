"""Post-import hooks and function replacement: the two tools lorakit's integrations are built from.

``when_imported(name, hook)`` runs ``hook(module)`` right after module ``name`` has executed (at once if it
already has), before any other module can bind names from it. ``replace(owner, name, wrap)`` swaps
``owner.name`` (a module function or a class attribute) for ``wrap(original)`` and, for module functions,
rebinds the name in every already-imported module of the same package that holds the original (``from x
import f`` copies). A replaced object keeps the original as ``__lorakit_original__``; replacing twice is a
no-op. Nothing here imports transformers, TRL or accelerate.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

Hook = Callable[[ModuleType], None]
_PENDING: dict[str, list[Hook]] = {}
_LOCK = threading.RLock()


def _run(module: ModuleType, hooks: list[Hook]) -> None:
    for hook in hooks:
        try:
            hook(module)
        except Exception as error:  # an integration must never break the user's import
            warnings.warn(f"lorakit could not register with {module.__name__} ({type(error).__name__}: {error}); "
                          "lorakit models may not be recognised there", RuntimeWarning, stacklevel=2)


class _HookedLoader(importlib.abc.Loader):
    """Runs the real loader, then the hooks. The module sees the real loader as its ``__loader__``."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self.loader = loader
        self.name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        with _LOCK:  # taken here, not in find_spec: a find_spec without an import must not use up the hooks
            hooks = _PENDING.pop(self.name, [])
        _run(module, hooks)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds hooked modules with the other finders and wraps their loader."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        with _LOCK:
            if name not in _PENDING:
                return None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _HookedLoader(spec.loader, name)
            return spec


_FINDER = _PostImportFinder()


def when_imported(name: str, hook: Hook) -> None:
    """Run ``hook(module)`` once module ``name`` is imported (now, if it already is)."""
    with _LOCK:
        module = sys.modules.get(name)
        if module is None:
            _PENDING.setdefault(name, []).append(hook)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    _run(module, [hook])


def replace(owner: ModuleType | type, name: str, wrap: Callable[[Any], Callable[..., Any]]) -> None:
    """Swap ``owner.name`` for ``wrap(original)`` (classmethods stay classmethods); idempotent."""
    raw = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name)
    if raw is None:
        raise AttributeError(f"{owner!r} has no attribute {name!r} to register with")
    is_classmethod = isinstance(raw, classmethod)
    original = raw.__func__ if is_classmethod else raw
    if hasattr(original, "__lorakit_original__"):
        return
    wrapper: Any = functools.wraps(original)(wrap(original))
    wrapper.__lorakit_original__ = original
    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)
    if isinstance(owner, ModuleType):
        package = owner.__name__.partition(".")[0]
        for module_name, module in list(sys.modules.items()):
            # vars(), not getattr(): a lazy package module would import on a missing name
            if module_name.partition(".")[0] == package and vars(module).get(name) is original:
                setattr(module, name, wrapper)
