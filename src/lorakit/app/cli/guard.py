"""What keeps a ``lorakit`` run from being lost: checks before the model loads, a lock, signals, full disks.

- ``missing_modules``: the command's Python dependencies, checked before anything heavy runs, so a
  ``pip install lorakit`` without ``[cli]`` fails in a second with the extra to install, not after training.
- ``claim_output``: the output folder must be a writable folder; one run at a time holds it (a lock file
  with the pid; a lock left by a dead process is taken over), and staging folders left by killed writes
  (``.NAME.lorakit-tmp-*``, see ``lorakit.atomic``) are removed.
- ``StopSignals``: the first SIGINT / SIGTERM asks the training loop to stop between steps (so the state
  can be checkpointed); a second SIGINT quits at once.
- ``disk_full``: ENOSPC, safetensors' StorageFull and torch's ``inline_container.cc`` write failure all
  mean "the disk is full"; the command says so in one line.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from .common import CliError

# import name -> (pip distribution, what the command uses it for)
PACKAGES = {"transformers": ("transformers", "models and tokenizers"), "tqdm": ("tqdm", "the progress bar"),
            "matplotlib": ("matplotlib", "the loss plot"), "yaml": ("pyyaml", "reading chatterbot-corpus"),
            "safetensors": ("safetensors", "adapter files"), "gguf": ("gguf", "converting the embedded model once")}
LOCK_NAME = ".lorakit.lock"
STAGING_PATTERNS = (".*.lorakit-tmp-*", ".*.lorakit-old-*")  # lorakit.atomic's staging and swap-backup names
DISK_FULL_SIGNS = ("No space left on device", "StorageFull", "inline_container.cc", "file write failed")


# ---- dependencies ---------------------------------------------------------------------------------------------
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or sys.modules[module] is None (blocked)
        return False


def check_dependencies(command: str, modules: tuple[str, ...]) -> None:
    """Raise one line naming every missing module of ``command`` and the extra that installs them.

    Raises:
        CliError: some module is not importable.
    """
    missing = [module for module in modules if not _installed(module)]
    if missing:
        needs = ", ".join(f"{PACKAGES.get(m, (m, ''))[0]} ({PACKAGES.get(m, ('', 'needed'))[1]})" for m in missing)
        raise CliError(f"lorakit {command} needs {needs}, which is not installed; install the command's extra "
                       f"with: pip install 'lorakit[cli]'")


# ---- the output folder ------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _check_folder(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise CliError(f"--output {output} is a file, not a folder; give a folder path (it is created if missing)")
    for name in ("adapter", "checkpoint"):
        if (output / name).exists() and not (output / name).is_dir():
            raise CliError(f"{output / name} is a file; the run writes a folder there. Move the file away or "
                           "choose another --output")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create --output {output}: {error.strerror or error}; choose a folder you can "
                       "write to") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise CliError(f"--output {output} is read-only for this user; choose a folder you can write to")


def _take_lock(lock: Path) -> None:
    """Create ``lock`` holding our pid; take it over from a dead pid; refuse a live one."""
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                owner = -1  # a half-written lock: its writer died between create and write
            if owner > 0 and owner != os.getpid() and _pid_alive(owner):
                raise CliError(f"another lorakit run (pid {owner}) is writing into {lock.parent}; wait for it to "
                               f"finish or choose another --output (if no such run exists, delete {lock})") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone
            continue
        except OSError as error:
            raise CliError(disk_full(error, lock.parent) or f"cannot write into --output {lock.parent}: "
                           f"{error.strerror or error}; choose a folder you can write to") from None
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        return
    raise CliError(f"another lorakit run keeps taking the lock {lock}; choose another --output")


def remove_stale_staging(output: Path) -> list[Path]:
    """Delete the staging folders a killed write left in ``output``; only call it while holding the lock."""
    stale = sorted(p for pattern in STAGING_PATTERNS for p in output.glob(pattern) if p.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def claim_output(output: Path, enabled: bool = True) -> Iterator[Path]:
    """Check ``output`` is a writable folder, lock it for this process, clear stale staging folders.

    With ``enabled=False`` (ranks other than 0 under torchrun) it does nothing.

    Raises:
        CliError: a file, a read-only folder, or another live run's lock.
    """
    if not enabled:
        yield output
        return
    _check_folder(output)
    lock = output / LOCK_NAME
    _take_lock(lock)
    try:
        stale = remove_stale_staging(output)
        if stale:
            print(f"removed {len(stale)} staging folder(s) left in {output} by a write that was killed: "
                  + ", ".join(p.name for p in stale))
        yield output
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def free_space_problem(output: Path, needed: int) -> str | None:
    """A sentence when the disk holding ``output`` has less than ``needed`` bytes free, else None."""
    try:
        free = shutil.disk_usage(output).free
    except OSError:
        return None
    if free >= needed:
        return None
    return (f"the disk holding {output} has {free / 2**20:.1f} MiB free, and this run's adapter and checkpoints "
            f"need about {needed / 2**20:.1f} MiB; free some space or choose another --output")


def disk_full(error: BaseException, where: Path | str) -> str | None:
    """The one-line message for a write that failed because the disk is full, or None for other errors."""
    text = str(error)
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(s in text for s in DISK_FULL_SIGNS):
        return (f"the disk is full: writing into {where} failed (no space left on the device); free some space "
                "or choose another --output")
    return None


# ---- signals --------------------------------------------------------------------------------------------------
class StopSignals:
    """While active, SIGINT / SIGTERM set ``reason`` (a polite stop); a second SIGINT raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> str | None:
        return self.reason

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.reason is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = name
        print(f"\n{name}: stopping after the current step and saving a checkpoint (Ctrl-C again quits at once, "
              "without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        for number in self.SIGNALS:
            if signal.getsignal(number) is signal.SIG_IGN:  # nohup, or a shell's background job: keep ignoring
                continue
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
