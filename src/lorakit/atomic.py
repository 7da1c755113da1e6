"""Crash-safe folder writes: readers see the old folder or the new one, never a mix.

``replace_folder(target, write)`` lets ``write`` fill a fresh sibling folder, carries over (as hard
links, so no data is copied) every entry of ``target`` that ``write`` did not produce, flushes it to disk,
and then swaps it with ``target`` in one atomic ``renameat2(RENAME_EXCHANGE)`` call. A crash before the
swap leaves ``target`` untouched (plus a stray ``.lorakit-tmp-*`` sibling); a crash after it leaves the
complete new folder. Two processes saving to one folder at once each swap a complete folder, so the last
swap wins whole. Where the kernel lacks the exchange call, two renames are used and the window between
them is the only non-atomic moment.

The swap is refused where a plain write would fail or do harm: a ``target`` that is a file, or a folder (or
a file in it that the write replaces) that this user may not write. The new folder and files get the modes
a plain write would leave: the old folder's and old files' modes (and owner, where allowed), and for new
ones the umask's (0o777 & ~umask for folders, files widened to 0o666 & ~umask), never a bare 0o700/0o600.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errnos
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False when the system has no such call."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: not supported here
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _carry_over(source: Path, destination: Path, dropped: set[str]) -> None:
    """Link every entry of ``source`` that ``destination`` lacks into it (recursing into shared folders)."""
    for entry in source.iterdir():
        twin = destination / entry.name
        if entry.name in dropped and entry.is_file():
            continue
        if entry.is_dir() and not entry.is_symlink():
            if twin.is_dir():
                _carry_over(entry, twin, dropped)
            elif not twin.exists():
                shutil.copytree(entry, twin, copy_function=_link_or_copy, symlinks=True)
        elif not twin.exists() and not twin.is_symlink():
            _link_or_copy(entry, twin)


def _link_or_copy(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, all at once: returns when all of them are on disk.

    The calls run concurrently, so the device flushes overlap instead of queueing: ~2 ms for an adapter
    folder where one fsync after the other took ~15 ms on the benchmark machine.
    """
    paths = []
    for folder, _, files in os.walk(root):
        paths += [Path(folder, name) for name in files if not os.path.islink(os.path.join(folder, name))]
        paths.append(Path(folder))
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        list(pool.map(_fsync, paths))  # list(): re-raises the first failure


def replace_folder(target: str | os.PathLike[str], write: Callable[[Path], None], *, owned: Iterable[str] = ()) -> None:
    """Write ``target`` atomically: ``write(tmp)`` fills a new folder that then replaces ``target`` whole.

    Entries of the old folder that ``write`` did not produce are kept, except files named in ``owned``
    (e.g. a stale ``adapter_model.bin`` next to a new ``adapter_model.safetensors``), which are dropped.

    Raises:
        ValueError: ``target`` is an existing file (it is left untouched).
        PermissionError: ``target``, a file in it that ``write`` replaces, or its parent folder is not
            writable by this user (nothing has changed then).
    """
    target = Path(os.path.realpath(target))  # write through a symlinked folder, as a plain write would
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_staging(target)
    try:
        write(staging)
        old = target if target.is_dir() else None
        follow_modes(staging, old)  # before the carry-over: its hard links already are the old files
        if old is not None:
            _carry_over(target, staging, set(owned))
        _sync_tree(staging)
        _swap_in(staging, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old folder after a swap, or the unused new one


def check_target(target: Path) -> None:
    """Refuse a ``target`` that a plain folder write could not or should not replace."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"Provided path ({target}) should be a directory, not a file. lorakit saves a folder "
                         "there and will not replace an existing file with one; the file is left untouched. "
                         "Choose a folder path (a new name or an existing folder)")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(errnos.EACCES, f"cannot save into {target}: the folder is not writable by this "
                              f"user (mode {_mode(target):#o}, owner uid {target.stat().st_uid}); it is left as "
                              "it was. Make it writable (chmod u+w) or choose another folder", str(target))


def _make_staging(target: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.lorakit-tmp-", dir=target.parent))
    except PermissionError as error:
        raise PermissionError(errnos.EACCES, f"cannot save {target}: its parent folder {target.parent} is not "
                              "writable by this user, and lorakit writes a new folder beside the old one and "
                              "swaps them (so a crash never leaves half a folder). Make the parent writable or "
                              "choose another folder", str(target.parent)) from error


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def current_umask() -> int:
    """This process's umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_modes(staging: Path, old: Path | None) -> None:
    """Give ``staging`` and everything written in it the modes a plain write into ``old`` would leave.

    An entry that replaces one of ``old``'s takes that one's mode (and owner, where this user may set it);
    so does ``staging`` itself. New folders get 0o777 & ~umask, new files their mode widened to
    0o666 & ~umask (writers such as tempfile.mkstemp or safetensors create 0o600 files).
    """
    umask = current_umask()
    _match(staging, old, 0o777 & ~umask)
    for folder, folders, files in os.walk(staging):
        here = Path(folder)
        twin_folder = None if old is None else old / here.relative_to(staging)
        for name in [*folders, *files]:
            path = here / name
            if not path.is_symlink():  # chmod would follow the link out of the folder
                fresh_mode = None if name in folders else (_mode(path) | 0o666) & ~umask  # a new folder keeps mkdir's
                _match(path, twin_folder / name if twin_folder is not None else None, fresh_mode)


def _match(path: Path, twin: Path | None, fresh_mode: int | None) -> None:
    """chmod ``path`` to ``twin``'s mode (refusing a twin file this user may not replace), else ``fresh_mode``."""
    if twin is not None and (twin.is_dir() if path.is_dir() else twin.is_file()) and not twin.is_symlink():
        if not os.access(twin, os.W_OK | (os.X_OK if twin.is_dir() else 0)):
            raise PermissionError(errnos.EACCES, f"cannot save {twin}: it is read-only for this user (mode "
                                  f"{_mode(twin):#o}); the folder is left as it was. Make it writable (chmod u+w) "
                                  "or choose another folder", str(twin))
        old = twin.stat()
        os.chmod(path, stat.S_IMODE(old.st_mode))
        here = path.stat()
        if (here.st_uid, here.st_gid) != (old.st_uid, old.st_gid):
            try:
                os.chown(path, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # only root may give a file away: the saver keeps it, as with any new file
    elif fresh_mode is not None and _mode(path) != fresh_mode:
        os.chmod(path, fresh_mode)


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        try:
            os.rename(staging, target)
            return
        except OSError:
            if not target.exists():
                raise  # otherwise another process created it meanwhile: exchange with it below
    if exchange(staging, target):
        return
    backup = target.with_name(f".{target.name}.lorakit-old-{os.getpid()}")
    os.rename(target, backup)
    os.rename(staging, target)
    os.rename(backup, staging)


def write_file_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write one file via a temporary sibling and ``os.replace``: the old or the new bytes, never half.

    The file keeps the old file's mode, or gets 0o666 & ~umask when new, as a plain write would.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errnos.EISDIR, f"cannot write the file {path}: a folder of that name exists; "
                                "choose another path", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _match(Path(temporary), path if path.exists() else None, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
