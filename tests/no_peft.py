"""Run Python in a child process where peft is absent, as far as any check can tell.

The child's ``sitecustomize`` (first on its PYTHONPATH) replaces the path finder on ``sys.meta_path`` with one
that cannot see peft: ``import peft`` fails, ``importlib.util.find_spec("peft")`` is None and
``importlib.metadata`` finds no peft distribution, which is how transformers, TRL and accelerate decide that
peft is not installed. ``run`` checks that they agree before running the code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SITECUSTOMIZE = '''
import importlib.machinery
import sys


class PathFinderWithoutPeft:
    """importlib's PathFinder, blind to the package peft (imports and distribution metadata)."""

    @staticmethod
    def hidden(name):
        return name == "peft" or name.startswith("peft.")

    def find_spec(self, name, path=None, target=None):
        return None if self.hidden(name) else importlib.machinery.PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        for distribution in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            if (distribution.metadata["Name"] or "").lower() != "peft":
                yield distribution

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [PathFinderWithoutPeft() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''

CHECK = '''
import importlib.metadata, importlib.util
try:
    import peft
except ImportError:
    pass
else:
    raise SystemExit("peft is importable in the no-peft child")
assert importlib.util.find_spec("peft") is None
try:
    importlib.metadata.version("peft")
except importlib.metadata.PackageNotFoundError:
    pass
else:
    raise SystemExit("peft metadata is visible in the no-peft child")
from transformers.utils import is_peft_available
from accelerate.utils import is_peft_available as accelerate_sees_peft
import trl.trainer.sft_trainer as sft
assert not is_peft_available() and not accelerate_sees_peft() and not sft.is_peft_available()
'''

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, folder: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` (after CHECK) in a child without peft; ``folder`` receives the sitecustomize.py."""
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(folder), str(ROOT / "src"), str(ROOT / "tests")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHECK + code], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=folder)
