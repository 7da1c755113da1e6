"""save_pretrained never destroys what is at the path, and leaves the modes a plain write would (atomic.py).

Refused, with everything left as it was: a path that is a file (PEFT's ValueError), a folder (or a file in it)
that the saving user may not write. Tests run as root, who may write anywhere, so the read-only cases run
the save in a child process that drops to the user ``nobody``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import pytest
from models import build

import lorakit
from lorakit import LoraConfig, get_peft_model

CONFIG = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
REPO = Path(__file__).resolve().parents[1]


def _model(lib=lorakit):
    return lib.get_peft_model(build("llama"), lib.LoraConfig(**CONFIG))


def _tree(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """{relative path: (mode, owner, bytes or None for a folder)} of ``root`` and everything under it."""
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {str(p.relative_to(root)): (stat.S_IMODE(p.lstat().st_mode), p.lstat().st_uid,
                                       p.read_bytes() if p.is_file() else None) for p in paths}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saving_onto_a_file_is_refused_and_the_file_kept(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    os.chmod(target, 0o640)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"^Provided path \(.*notes\.txt\) should be a directory, not a file"):
        _model(peft).save_pretrained(target)  # PEFT's error ...
    with pytest.raises(ValueError, match=r"^Provided path \(.*notes\.txt\) should be a directory, not a file\. "
                                         r".*the file is left untouched"):
        _model().save_pretrained(target)  # ... is lorakit's first sentence
    assert _tree(tmp_path) == before  # the file, its mode, and no hidden temp sibling


# ---- read-only targets, saved by a non-root user --------------------------------------------------------------
SAVER = """
import json, os, sys, tempfile
sys.path[:0] = [{src!r}, {tests!r}]
from models import build
from lorakit import LoraConfig, get_peft_model
model = get_peft_model(build("llama"), LoraConfig(**{config!r}))
with tempfile.TemporaryDirectory() as warm_up:  # every lazy import done while root (Python's own files may be
    model.save_pretrained(warm_up)             # unreadable for nobody)
os.setgroups([]); os.setgid({gid}); os.setuid({uid})
try:
    model.save_pretrained({target!r})
    print(json.dumps(["saved", ""]))
except OSError as error:
    print(json.dumps([type(error).__name__, str(error)]))
"""


def _save_as_nobody(target: Path) -> tuple[str, str]:
    nobody = pwd.getpwnam("nobody")
    code = SAVER.format(uid=nobody.pw_uid, gid=nobody.pw_gid, src=str(REPO / "src"), tests=str(REPO / "tests"),
                        config=CONFIG, target=str(target))
    home = target.parent.parent / "home"
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "PYTHONPATH": "",
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=target.parent, check=False)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture
def shared_dir():
    """A folder ``nobody`` may write in (pytest's tmp_path is root's, 0o700), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the save as another user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to save as")
    root = Path(tempfile.mkdtemp(prefix="lorakit-save-"))
    os.chmod(root, 0o755)
    shared = root / "shared"
    for folder in (shared, root / "home"):
        folder.mkdir()
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    try:
        yield shared
    finally:
        shutil.rmtree(root)


# (who owns the existing adapter folder, its mode, a file in it made read-only)
READ_ONLY = {
    "own folder, mode 0o555": ("nobody", 0o555, None),
    "another user's folder, mode 0o755": ("root", 0o755, None),
    "writable folder, read-only adapter file": ("nobody", 0o755, "adapter_model.safetensors"),
}


@pytest.mark.parametrize("case", READ_ONLY)
def test_read_only_folder_is_refused_and_left_as_it_was(shared_dir, case):
    owner, mode, read_only_file = READ_ONLY[case]
    target = shared_dir / "adapter"
    _model().save_pretrained(target)
    user = pwd.getpwnam(owner)
    for path in [target, *target.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    if read_only_file:
        os.chmod(target / read_only_file, 0o444)
    os.chmod(target, mode)
    before = _tree(shared_dir)
    kind, message = _save_as_nobody(target)
    assert kind == "PermissionError", (kind, message)
    assert "cannot save" in message and "left as it was" in message, message
    assert _tree(shared_dir) == before  # the folder, its files, modes and owners, and no stray sibling


def test_writable_folder_of_nobody_is_saved_by_nobody(shared_dir):
    """The control: the same child process does save where a plain write could."""
    assert _save_as_nobody(shared_dir / "adapter") == ("saved", "")
    assert (shared_dir / "adapter" / "adapter_model.safetensors").is_file()


# ---- modes follow the umask, and a re-save keeps them -----------------------------------------------------------
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_current_umask_reads_without_changing(umask, mask):
    from lorakit.atomic import current_umask

    umask(mask)
    assert current_umask() == mask and current_umask() == mask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_new_save_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    model = _model()
    model.add_adapter("second", LoraConfig(**CONFIG))
    model.save_pretrained(tmp_path / "adapter")
    model.peft_config["default"].save_pretrained(tmp_path / "config")
    folders = [tmp_path / "adapter", tmp_path / "adapter" / "second", tmp_path / "config"]
    files = [p for folder in folders for p in folder.iterdir() if p.is_file()]
    assert len(files) == 6  # two configs, two weight files, and the model card README.md PEFT writes
    assert {str(p): _mode(p) for p in folders} == {str(p): 0o777 & ~mask for p in folders}
    assert {str(p): _mode(p) for p in files} == {str(p): 0o666 & ~mask for p in files}


@pytest.mark.parametrize("folder_mode, file_mode", [(0o755, 0o644), (0o750, 0o640), (0o700, 0o600), (0o775, 0o664)], ids=oct)
@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_resave_keeps_the_existing_modes(tmp_path, umask, mask, folder_mode, file_mode):
    target = tmp_path / "adapter"
    model = _model()
    model.save_pretrained(target)
    os.chmod(target, folder_mode)
    for path in target.iterdir():
        os.chmod(path, file_mode)
    (target / "NOTES.md").write_text("kept")
    os.chmod(target / "NOTES.md", 0o604)
    umask(mask)
    model.add_adapter("second", LoraConfig(**CONFIG))
    model.save_pretrained(target)
    assert _mode(target) == folder_mode
    assert {p.name: _mode(p) for p in target.iterdir()} == {
        "adapter_model.safetensors": file_mode, "adapter_config.json": file_mode, "README.md": file_mode,
        "NOTES.md": 0o604, "second": 0o777 & ~mask}
    assert {p.name: _mode(p) for p in (target / "second").iterdir()} == {
        "adapter_model.safetensors": 0o666 & ~mask, "adapter_config.json": 0o666 & ~mask}
    assert (target / "NOTES.md").read_text() == "kept"
