"""`lorakit train` never throws away a run (issue 18, item 3): divergence, signals, bad or full output
folders, exact resume with dropout, changed settings on resume, hostile checkpoints, a one-row dataset,
two runs into one folder, a missing extra, and staging folders left by killed writes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import save_tiny_llm, write_chat_jsonl

import lorakit.app.cli.train as train_command
from lorakit.app.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llm(root / "model"), write_chat_jsonl(root / "chat.jsonl")


def train(tiny, output, *extra):
    """A tiny run with the default dropout (0.1): rank 4, batch 4, no time limit, no samples, fp32 (``auto``
    times a probe, and two runs compared bit for bit must not depend on how busy the machine was)."""
    model, data = tiny
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(output), "--samples", "0",
                 "--r", "4", "--lora-alpha", "8", "--batch-size", "4", "--lr", "1e-2", "--time-limit", "0",
                 "--precision", "fp32", *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("training:") and line.strip()]  # tqdm's bar
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    def refuse(args):
        raise AssertionError("the model was loaded before the problem was reported")

    monkeypatch.setattr(train_command, "_load", refuse)


@pytest.fixture
def signal_at_step(monkeypatch):
    """``arm(signal, step)``: the signal arrives after optimizer step ``step`` (a real signal to this process).

    A fallback handler for the duration raises, so a command that ignores signals fails the test instead
    of killing the test run (SIGTERM's default action).
    """
    def fallback(number, frame):
        raise RuntimeError(f"signal {number} reached the default handler")

    previous = {number: signal.signal(number, fallback) for number in (signal.SIGINT, signal.SIGTERM)}
    should_save = train_command.should_save

    def arm(number, at):
        def hook(step, every, last):
            if step == at:
                os.kill(os.getpid(), number)
            return should_save(step, every, last)

        monkeypatch.setattr(train_command, "should_save", hook)

    yield arm
    for number, handler in previous.items():
        signal.signal(number, handler)


def checkpoint_step(output) -> int:
    return json.loads((output / "checkpoint" / "trainer_state.json").read_text())["step"]


# ---- non-finite loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_every", [1, 50])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys, save_every):
    status = train(tiny, tmp_path, "--lr", "1e30", "--max-steps", "6", "--save-every", str(save_every))
    line = one_error_line(capsys)
    assert status != 0 and "training diverged" in line and "not finite" in line and "--lr" in line, line
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()
    if save_every == 1:  # step 1 is finite (weights ~1e30), step 2 is not: the step-1 checkpoint is kept
        step = checkpoint_step(tmp_path)
        assert f"checkpoint (step {step})" in line and 1 <= step < 6
        weights = load_file(tmp_path / "checkpoint" / "adapter" / "adapter_model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    else:
        assert not (tmp_path / "checkpoint").exists() and "no checkpoint" in line


# ---- signals and exact resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tiny, tmp_path, capsys, signal_at_step, number):
    signal_at_step(number, 2)  # long before the first --save-every (50)
    assert train(tiny, tmp_path, "--max-steps", "5") == 130
    out = capsys.readouterr().out
    assert checkpoint_step(tmp_path) == 2 and not (tmp_path / "adapter").exists()
    assert f"interrupted ({signal.Signals(number).name}) after 2 of 5 steps" in out
    assert f"lorakit train --output {tmp_path} --resume" in out
    # the printed command alone resumes: model, data and LoRA settings come from the checkpoint
    assert main(["train", "--output", str(tmp_path), "--resume", "--samples", "0", "--time-limit", "0"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 5


@pytest.fixture(scope="module")
def straight_and_resumed(tiny, tmp_path_factory):
    """5 steps in one go, and 2 steps + SIGINT + resume for 3, both with dropout 0.1."""
    root = tmp_path_factory.mktemp("resume")
    assert train(tiny, root / "straight", "--max-steps", "5", "--save-every", "1") == 0
    should_save = train_command.should_save

    def hook(step, every, last):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return should_save(step, every, last)

    train_command.should_save = hook
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even where pytest started ignoring it
    try:
        assert train(tiny, root / "split", "--max-steps", "5", "--save-every", "1") == 130
    finally:
        train_command.should_save = should_save
        signal.signal(signal.SIGINT, previous)
    assert train(tiny, root / "split", "--max-steps", "5", "--resume") == 0
    return root / "straight", root / "split"


def test_resume_is_bit_exact_with_dropout(straight_and_resumed):
    """Same weights bit for bit: the optimizer moments and the torch/Python generator states are restored
    exactly (no tolerance: every operation replays on the same inputs in the same order)."""
    straight, resumed = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in straight_and_resumed)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    losses = [json.loads((f / "checkpoint" / "trainer_state.json").read_text())["losses"] for f in straight_and_resumed]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("flags, fragment", [
    (["--r", "8"], "--r cannot change on resume (checkpoint: 4, given: 8"),
    (["--batch-size", "2"], "--batch-size cannot change on resume"),
    (["--target-modules", "q_proj"], "--target-modules cannot change on resume"),
    (["--config", "x.json"], "--config cannot be given with --resume"),
])
def test_resume_refuses_a_setting_that_cannot_change(straight_and_resumed, tiny, tmp_path, capsys, no_model_load,
                                                     flags, fragment):
    import shutil

    shutil.copytree(straight_and_resumed[1] / "checkpoint", tmp_path / "checkpoint")
    assert main(["train", "--output", str(tmp_path), "--resume", *flags]) == 2
    line = one_error_line(capsys)
    assert fragment in line and "another --output" in line and len(line) < 400, line


def test_resume_with_a_new_lr_and_length_says_what_changed(straight_and_resumed, tmp_path, capsys):
    import shutil

    shutil.copytree(straight_and_resumed[1] / "checkpoint", tmp_path / "checkpoint")
    assert main(["train", "--output", str(tmp_path), "--resume", "--lr", "5e-3", "--max-steps", "7",
                 "--samples", "0", "--time-limit", "0"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 5 of 7" in out
    assert "--lr 0.005 (was 0.01): the learning-rate schedule continues" in out
    assert "--max-steps 7 (was 5)" in out
    saved = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert saved["step"] == 7 and saved["scheduler"]["base_lrs"] == [5e-3]
    assert saved["run"]["settings"]["lr"] == 5e-3 and saved["run"]["lora"]["r"] == 4  # kept from the checkpoint


# ---- hostile and damaged checkpoints --------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # what a malicious pickle would run


@pytest.mark.parametrize("damage", ["pickle", "json"])
def test_hostile_or_damaged_checkpoint_is_one_line(straight_and_resumed, tmp_path, capsys, damage):
    import pickle
    import shutil

    shutil.copytree(straight_and_resumed[1] / "checkpoint", tmp_path / "checkpoint")
    marker = tmp_path / "pwned"
    if damage == "pickle":  # an old-format checkpoint whose trainer_state.pt is a malicious pickle
        (tmp_path / "checkpoint" / "trainer_state.json").unlink()
        (tmp_path / "checkpoint" / "trainer_state.pt").write_bytes(pickle.dumps({"x": _Payload(str(marker))}))
    else:
        (tmp_path / "checkpoint" / "trainer_state.json").write_text('{"format": 2, "step": ')
    assert main(["train", "--output", str(tmp_path), "--resume"]) == 2
    line = one_error_line(capsys)
    assert "weights_only" not in line and not marker.exists()
    assert ("no longer reads pickles" if damage == "pickle" else "is damaged") in line, line


# ---- the output folder -------------------------------------------------------------------------------------------
def test_output_that_is_a_file_fails_before_the_model_loads(tiny, tmp_path, capsys, no_model_load):
    (tmp_path / "out").write_text("my notes")
    assert train(tiny, tmp_path / "out") == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert (tmp_path / "out").read_text() == "my notes"


def test_read_only_output_fails_before_the_model_loads():
    """As an unprivileged user (root writes anywhere): a forked child drops to uid 65534 and runs the check."""
    import shutil
    import tempfile

    from lorakit.app.cli.common import CliError
    from lorakit.app.cli.guard import claim_output

    root = tempfile.mkdtemp(prefix="lorakit-read-only-")  # /tmp itself: pytest's tmp_path is 0700 root's
    target = os.path.join(root, "adapter-runs")
    try:
        os.mkdir(target)
        os.chmod(root, 0o755)
        os.chmod(target, 0o555)
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # the child: never returns into pytest
            message = "no error"
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                with claim_output(train_command.Path(target)):
                    pass
            except CliError as error:
                message = str(error)
            except BaseException as error:  # noqa: BLE001  (reported to the parent, which fails the test)
                message = f"{type(error).__name__}: {error}"
            finally:
                os.write(writer, message.encode())
                os._exit(0)
        os.close(writer)
        os.waitpid(child, 0)
        with os.fdopen(reader) as pipe:
            message = pipe.read()
        assert message == f"--output {target} is read-only for this user; choose a folder you can write to", message
        assert not os.listdir(target)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
])
def test_disk_full_is_one_clear_line(tiny, tmp_path, capsys, monkeypatch, error):
    import lorakit.atomic

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(lorakit.atomic, "replace_folder", full)
    assert train(tiny, tmp_path, "--max-steps", "2", "--save-every", "1") == 2
    line = one_error_line(capsys)
    assert "the disk is full" in line and "free some space" in line and "inline_container" not in line, line


def test_too_little_free_space_is_refused_before_training(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    import lorakit.app.cli.guard as guard

    monkeypatch.setattr(guard.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert train(tiny, tmp_path, "--max-steps", "2") == 2
    line = one_error_line(capsys)
    assert "MiB free" in line and "need about" in line, line
    assert not (tmp_path / "checkpoint").exists()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_two_runs_into_one_folder_are_refused_and_stale_locks_taken_over(tiny, tmp_path, capsys):
    lock = tmp_path / ".lorakit.lock"
    tmp_path.mkdir(exist_ok=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid}\n")
        assert train(tiny, tmp_path, "--max-steps", "1") == 2
        line = one_error_line(capsys)
        assert f"another lorakit run (pid {sleeper.pid}) is writing into {tmp_path}" in line, line
        assert not (tmp_path / "adapter").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(f"{_dead_pid()}\n")  # a crashed run's lock
    assert train(tiny, tmp_path, "--max-steps", "1") == 0
    assert (tmp_path / "adapter").is_dir() and not lock.exists()


def test_stale_staging_folders_are_removed(tiny, tmp_path, capsys):
    stale = [tmp_path / ".checkpoint.lorakit-tmp-k1ll3d", tmp_path / ".adapter.lorakit-tmp-x",
             tmp_path / ".adapter.lorakit-old-4242"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    keep = tmp_path / "notes.lorakit-tmp-but-not-hidden"
    keep.mkdir()
    assert train(tiny, tmp_path, "--max-steps", "1") == 0
    assert not any(folder.exists() for folder in stale) and keep.is_dir()
    assert "removed 3 staging folder(s)" in capsys.readouterr().out


# ---- data and dependencies -------------------------------------------------------------------------------------
def test_one_row_dataset_says_it_went_to_the_held_out_split(tiny, tmp_path, capsys, no_model_load):
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "hello", "response": "hi"}\n')
    model, _ = tiny
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "1 row(s)" in line and "held-out split" in line and "--max-length" not in line, line


@pytest.mark.parametrize("module, package", [("matplotlib", "matplotlib"), ("tqdm", "tqdm"), ("yaml", "pyyaml")])
def test_missing_cli_extra_is_named_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch, no_model_load,
                                                           module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert train(tiny, tmp_path, "--max-steps", "1") == 2
    line = one_error_line(capsys)
    assert f"needs {package}" in line and "pip install 'lorakit[cli]'" in line, line


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    """read_trainer_state returns optimizer.state_dict() tensor for tensor, the schedule and the generator
    states as saved; the folder holds no pickle (safetensors + JSON only)."""
    import random

    from lorakit import LoraConfig, get_peft_model
    from lorakit.app.checkpoint import read_trainer_state, save_checkpoint
    from lorakit.app.training import TrainSettings, TrainState, make_optimizer

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)),
                           LoraConfig(r=2, target_modules=["0", "2"], lora_dropout=0.1))
    optimizer, scheduler = make_optimizer(model, TrainSettings(max_steps=10, lr=1e-2))
    for _ in range(3):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    random.random()
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    save_checkpoint(model, optimizer, scheduler, TrainState(3, 12, 1.5, [(1, 2.0), (2, 1.5), (3, 1.25)]),
                    tmp_path / "checkpoint", {"note": "kept"})
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "adapter", "optimizer.safetensors", "trainer_state.json"]
    saved = read_trainer_state(tmp_path / "checkpoint")
    expected = optimizer.state_dict()
    assert saved["optimizer"]["param_groups"] == expected["param_groups"]
    assert saved["optimizer"]["state"].keys() == expected["state"].keys()
    for index, values in expected["state"].items():
        for name, value in values.items():
            assert torch.equal(saved["optimizer"]["state"][index][name], value), (index, name)
    assert saved["scheduler"] == json.loads(json.dumps(scheduler.state_dict()))
    assert torch.equal(saved["rng"]["torch"], torch_state)
    assert (saved["rng"]["python"][0], tuple(saved["rng"]["python"][1]), saved["rng"]["python"][2]) == python_state
    assert saved["step"] == 3 and saved["losses"] == [[1, 2.0], [2, 1.5], [3, 1.25]] and saved["run"] == {"note": "kept"}


def test_missing_gguf_is_named_before_the_first_conversion(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "empty-cache"))  # the embedded model is not converted yet
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["train", "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "needs gguf (converting the embedded model once)" in line and "lorakit[cli]" in line, line
