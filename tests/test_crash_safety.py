"""Crash safety of save_pretrained: SIGKILL at every kind of point of a save, and concurrent savers.

A forked child saves version 2 over version 1 (or back) and kills itself (SIGKILL) at the k-th "point" of the
save: before and after every file write (mid-file too), hard link, rename, fsync, the atomic exchange and the
clean-up. The folder must then load as one complete version, both adapters from the same one, never a mix.
``LORAKIT_CRASH_TRIALS`` (default 25) sets the number of kills; test_faults.py kills at random *times* instead.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from torch import nn

import lorakit.atomic
import lorakit.io
from lorakit import LoraConfig, PeftModel, get_peft_model

TRIALS = int(os.environ.get("LORAKIT_CRASH_TRIALS", "25"))
X = torch.linspace(-1, 1, 48).reshape(3, 16)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def base() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


def version(number: int) -> PeftModel:
    """Two adapters ("default" in the folder, "other" in other/) whose every factor depends on ``number``."""
    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=4 * number, target_modules=["0", "2"]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2 * number, target_modules=["2"]))
    gen = torch.Generator().manual_seed(number)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    return model


def outputs(model: PeftModel) -> list[torch.Tensor]:
    result = []
    for name in ("default", "other"):
        model.set_adapter(name)
        with torch.no_grad():
            result.append(model(X))
    return result


def which_version(folder: Path, expected: dict[int, list[torch.Tensor]]) -> int:
    """The one version the folder holds completely; fails on a mix or a broken folder."""
    model = PeftModel.from_pretrained(base(), folder)
    model.load_adapter(folder, "other", subfolder="other")
    got = outputs(model)
    matches = [v for v, want in expected.items() if all(torch.equal(g, w) for g, w in zip(got, want))]
    assert len(matches) == 1, "the folder holds a mix of versions"
    return matches[0]


class Points:
    """Counts the points of a save; the process SIGKILLs itself at point ``kill_at`` (None: never)."""

    def __init__(self) -> None:
        self.count, self.kill_at = 0, None

    def tick(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def around(self, function):
        def wrapped(*args, **kwargs):
            self.tick()
            result = function(*args, **kwargs)
            self.tick()
            return result
        return wrapped


@pytest.fixture
def points(monkeypatch) -> Points:
    probe = Points()

    def save_file(tensors, filename, metadata=None):  # a kill can land with half the file written
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            probe.tick()
            handle.write(data[: len(data) // 2])
            handle.flush()
            probe.tick()
            handle.write(data[len(data) // 2:])
        probe.tick()

    monkeypatch.setattr(lorakit.io, "save_file", save_file)
    for module, name in [(os, "link"), (os, "rename"), (os, "replace"), (os, "fsync"), (os, "mkdir"),
                         (lorakit.atomic, "exchange"), (shutil, "rmtree"), (shutil, "copy2"), (Path, "write_text")]:
        monkeypatch.setattr(module, name, probe.around(getattr(module, name)))
    return probe


def run_child(work, timeout: float = 60.0) -> int:
    """Fork; the child runs ``work()`` and exits 0 (or dies); returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("a saving child hung")


def test_sigkill_at_every_point_of_save_leaves_old_or_new(tmp_path, points):
    models = {1: version(1), 2: version(2)}
    expected = {number: outputs(model) for number, model in models.items()}
    folder = tmp_path / "adapter"
    models[1].save_pretrained(folder)
    points.count = 0
    models[2].save_pretrained(tmp_path / "scratch")  # one save of the same shape: how many points it has
    total = points.count
    assert total >= 20, total
    current, killed, outcomes = 1, 0, {"old": 0, "new": 0}
    rng = random.Random(int(os.environ.get("LORAKIT_CRASH_SEED", "0")))
    spread = [1 + (i * total) // min(TRIALS, total) for i in range(min(TRIALS, total))]  # evenly, then random
    plan = spread + [rng.randint(1, total) for _ in range(TRIALS - len(spread))]
    tried = set(plan)
    for kill_at in plan:
        new = 3 - current
        points.count, points.kill_at = 0, kill_at
        status = run_child(lambda new=new: models[new].save_pretrained(folder))
        points.kill_at = None
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (kill_at, status)
        killed += 1
        found = which_version(folder, expected)
        assert found in (current, new)
        outcomes["old" if found == current else "new"] += 1
        current = found
        leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("adapter", "scratch")]
        assert all(name.startswith(".adapter.lorakit-") for name in leftovers), leftovers
        assert not [p for p in folder.rglob("*") if ".lorakit-" in p.name]
    assert killed == TRIALS and outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    print(f"{TRIALS} kills at {len(tried)} of {total} save points: {outcomes}, nothing lost")
    models[3 - current].save_pretrained(folder)  # crash leftovers do not block the next save
    assert which_version(folder, expected) == 3 - current


@pytest.mark.parametrize("exists", [True, False], ids=["over an adapter", "new folder"])
def test_concurrent_saves_end_with_one_complete_adapter(tmp_path, exists):
    models = {1: version(1), 2: version(2)}
    expected = {number: outputs(model) for number, model in models.items()}
    folder = tmp_path / "adapter"
    if exists:
        models[1].save_pretrained(folder)
    rounds = 8

    def saver(number: int):
        def work():
            for _ in range(rounds):
                models[number].save_pretrained(folder)
        return work

    pids = []
    for number in (1, 2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                saver(number)()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses
    assert which_version(folder, expected) in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left behind
