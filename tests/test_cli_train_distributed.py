"""`lorakit train` under torchrun (2 CPU processes, gloo): DDP and FSDP2 match one process, rank 0 alone
writes and prints, and checkpoints move between process counts and between DDP, FSDP2 and one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import save_tiny_llm, write_chat_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

# no --r / --lora-alpha: torchrun's own parser reads them as ambiguous abbreviations of its flags
FLAGS = ["--max-steps", "3", "--lora-dropout", "0", "--batch-size", "4", "--lr", "1e-2", "--samples", "0", "--time-limit", "0",
         "--save-every", "0"]
OUTPUTS = {"adapter", "checkpoint", "loss.png", "metrics.json"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(tiny, output: Path, *extra: str, procs: int = 1) -> subprocess.CompletedProcess:
    model, data = tiny
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(output), *FLAGS, *extra]
    if procs == 1:
        command = [sys.executable, "-m", "lorakit.cli", *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, f"--nproc-per-node={procs}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
                   "-m", "lorakit.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llm(root / "model"), write_chat_jsonl(root / "chat.jsonl")


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: (root / name, _train(tiny, root / name, *extra, procs=procs))
            for name, extra, procs in [("single", (), 1), ("ddp", (), 2), ("fsdp", ("--fsdp",), 2)]}


def _assert_adapters_equal(a: Path, b: Path, atol: float = 1e-5) -> float:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    worst = max(float((left[k] - right[k]).abs().max()) for k in left)
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_training_equals_one_process(runs, mode):
    single, _ = runs["single"]
    folder, _ = runs[mode]
    _assert_adapters_equal(single / "adapter", folder / "adapter")
    _assert_adapters_equal(single / "checkpoint" / "adapter", folder / "checkpoint" / "adapter")
    ours = json.loads((folder / "metrics.json").read_text())
    theirs = json.loads((single / "metrics.json").read_text())
    assert ours["steps"] == theirs["steps"] == 3
    assert ours["tokens"] == theirs["tokens"]  # global tokens, not rank 0's share
    assert ours["held_out_loss_after"] == pytest.approx(theirs["held_out_loss_after"], abs=1e-5)
    # the optimizer state is saved in the one-process layout, whole (FSDP2 gathers its shards)
    saved = [torch.load(f / "checkpoint" / "trainer_state.pt", weights_only=True) for f in (single, folder)]
    assert saved[0]["optimizer"]["param_groups"] == saved[1]["optimizer"]["param_groups"]
    for index, moments in saved[0]["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved[1]["optimizer"]["state"][index][name], moments[name],
                                       atol=1e-6, rtol=1e-4)
    # the reported (global mean) losses match too
    for (s1, l1), (s2, l2) in zip(saved[0]["losses"], saved[1]["losses"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_rank_zero_writes_and_prints(runs, mode):
    folder, done = runs[mode]
    assert {p.name for p in folder.iterdir()} == OUTPUTS
    assert not list(folder.parent.glob(f".{folder.name}*"))  # no leftover staging folders
    assert {p.name for p in (folder / "checkpoint").iterdir()} == {"adapter", "trainer_state.pt"}
    for line in ("trainable params:", "held-out loss before training", "held-out loss after training",
                 "adapter (PEFT format):", "distributed: 2 processes"):
        assert done.stdout.count(line) == 1, (line, done.stdout)
    assert ("FSDP2" if mode == "fsdp" else "DDP") in done.stdout
    assert done.stderr.count("?step/s]") == 1, done.stderr  # one progress bar (tqdm's first, bare render)


def test_checkpoints_resume_across_process_counts(runs, tiny, tmp_path):
    """A one-process checkpoint resumed under FSDP2 == resumed in one process; an FSDP2 one resumed in one."""
    results = {}
    for name, source, extra, procs in [("single", "single", (), 1), ("fsdp", "single", ("--fsdp",), 2),
                                       ("from_fsdp", "fsdp", (), 1)]:
        shutil.copytree(runs[source][0] / "checkpoint", tmp_path / name / "checkpoint")
        done = _train(tiny, tmp_path / name, "--max-steps", "4", "--resume", *extra, procs=procs)
        assert "resumed from" in done.stdout and "at step 3" in done.stdout
        results[name] = tmp_path / name / "adapter"
    _assert_adapters_equal(results["single"], results["fsdp"])
    _assert_adapters_equal(results["single"], results["from_fsdp"])


def test_fsdp_needs_torchrun(tiny, tmp_path, monkeypatch, capsys):
    from lorakit.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, data = tiny
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path), "--fsdp",
                 *FLAGS]) == 2
    assert "--fsdp shards over several processes" in capsys.readouterr().err
