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

from lorakit.app.checkpoint import read_trainer_state
from tiny_lm import save_tiny_llm, write_chat_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

# no --r / --lora-alpha: torchrun's own parser reads them as ambiguous abbreviations of its flags
FLAGS = ["--max-steps", "3", "--lora-dropout", "0", "--batch-size", "4", "--lr", "1e-2", "--samples", "0", "--time-limit", "0",
         "--save-every", "0", "--precision", "fp32"]  # one process would pick bf16 on an AMX CPU: compare like with like
OUTPUTS = {"adapter", "checkpoint", "loss.png", "metrics.json"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(tiny, output: Path, *extra: str, procs: int = 1) -> subprocess.CompletedProcess:
    model, data = tiny
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(output), *FLAGS, *extra]
    if procs == 1:
        command = [sys.executable, "-m", "lorakit.app.cli", *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, f"--nproc-per-node={procs}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
                   "-m", "lorakit.app.cli", *args]
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


def _adam_float_bound(run: Path, model: Path) -> dict[str, float]:
    """How far two runs whose gradients differ only by float rounding may end apart, per adapter tensor.

    One process sums each gradient over its batch in one matmul; two processes sum halves and all-reduce, so
    each gradient element is a sum of n terms in another order: |δg| <= n·u·Σ|terms| (u = 2^-24, n = tokens
    per step), with Σ|terms| taken as G, the tensor's largest gradient. AdamW then divides by √v̂ + ε: its step
    u_t = m̂_t/(√v̂_t + ε) has |∂u_t/∂g_t| <= (1-β1)/((1-β1^t)·ε), reached where an element's gradient is
    about ε (1e-8): there a rounding-level δg moves the weight by lr·δg/ε, far more than rounding. Measured
    on this tiny model: gradients agree to 7u of G, but a down_proj lora_A element with g = 3.2e-9 (δg =
    3.4e-11) ends 1.2e-5 (DDP) / 1.7e-5 (FSDP2) apart, which broke the old fixed 1e-5. So per tensor
        |δw| <= Σ_t lr·(1-β1)/(1-β1^t) · n·u·G / ε,
    with G bounded from the saved moments: v_T = Σ_t (1-β2)·β2^(T-t)·g_t², so |g_t| <= √(v_T/((1-β2)·β2^(T-1))).
    Where G is large (lora_B: ~0.1) this allows a whole Adam step; the gradients themselves are compared
    through the moments (linear and quadratic in them) in test_distributed_training_equals_one_process.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    state = read_trainer_state(run / "checkpoint")
    group, steps = state["optimizer"]["param_groups"][0], state["step"]
    beta1, beta2 = group["betas"]
    # the optimizer holds the trainable parameters in module order, lora_A before lora_B
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    names = [f"base_model.model.{name}.lora_{side}.weight" for name, _ in base.named_modules() for side in "AB"
             if f"base_model.model.{name}.lora_A.weight" in saved]
    assert sorted(names) == sorted(saved)
    tokens_per_step = state["tokens"] / steps
    amplification = sum(group["initial_lr"] * (1 - beta1) / (1 - beta1 ** t) for t in range(1, steps + 1)) / group["eps"]
    bounds = {}
    for index, name in enumerate(names):
        v = state["optimizer"]["state"][index]["exp_avg_sq"]
        assert v.shape == saved[name].shape, name
        largest_gradient = float((v.max() / ((1 - beta2) * beta2 ** (steps - 1))).sqrt())
        bounds[name] = amplification * tokens_per_step * 2.0 ** -24 * largest_gradient
    return bounds


def _assert_adapters_equal(a: Path, b: Path, bounds: dict[str, float]) -> None:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys() == bounds.keys()
    for name in left:
        worst = float((left[name] - right[name]).abs().max())
        assert worst <= bounds[name], (name, worst, bounds[name])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_training_equals_one_process(runs, tiny, mode):
    single, _ = runs["single"]
    folder, _ = runs[mode]
    bounds = _adam_float_bound(single, tiny[0])
    _assert_adapters_equal(single / "adapter", folder / "adapter", bounds)
    _assert_adapters_equal(single / "checkpoint" / "adapter", folder / "checkpoint" / "adapter", bounds)
    ours = json.loads((folder / "metrics.json").read_text())
    theirs = json.loads((single / "metrics.json").read_text())
    assert ours["steps"] == theirs["steps"] == 3
    assert ours["tokens"] == theirs["tokens"]  # global tokens, not rank 0's share
    assert ours["held_out_loss_after"] == pytest.approx(theirs["held_out_loss_after"], abs=1e-5)
    # the optimizer state is saved in the one-process layout, whole (FSDP2 gathers its shards)
    saved = [read_trainer_state(f / "checkpoint") for f in (single, folder)]
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
    assert {p.name for p in (folder / "checkpoint").iterdir()} == {"adapter", "optimizer.safetensors", "trainer_state.json"}
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
        results[name] = tmp_path / name
    bounds = _adam_float_bound(results["single"], tiny[0])
    _assert_adapters_equal(results["single"] / "adapter", results["fsdp"] / "adapter", bounds)
    _assert_adapters_equal(results["single"] / "adapter", results["from_fsdp"] / "adapter", bounds)


def test_fsdp_needs_torchrun(tiny, tmp_path, monkeypatch, capsys):
    from lorakit.app.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, data = tiny
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path), "--fsdp",
                 *FLAGS]) == 2
    assert "--fsdp shards over several processes" in capsys.readouterr().err
