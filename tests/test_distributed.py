"""DDP and FSDP2 LoRA training on 2 CPU processes (gloo) match one process on the same global batch.

One ``torchrun --nproc-per-node=2 tests/dist_worker.py`` launch trains with DDP, then FSDP2, and writes
each rank's full adapter, rank 0's saved PEFT folder and the inject-after-shard error as files.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker
from lorakit.distributed import check_not_sharded, fsdp2_wrap_plan
from lorakit.io import adapter_state_dict

TOL = dict(atol=1e-5, rtol=1e-5)
WORKER = Path(__file__).with_name("dist_worker.py")
MODES = ["ddp", "fsdp2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--nproc-per-node=2", f"--master-port={_free_port()}", str(WORKER),
                             str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dist_worker.train_single(out)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_ranks_hold_identical_adapters(run: Path, mode: str) -> None:
    rank0, rank1 = (torch.load(run / f"{mode}_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 8  # q_proj, v_proj x A, B x 2 layers
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_saved_adapter_equals_single_process(run: Path, mode: str) -> None:
    single = load_file(run / "single" / "adapter_model.safetensors")
    saved = load_file(run / mode / "adapter_model.safetensors")
    assert saved.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(saved[key], single[key], **TOL)
    initial = adapter_state_dict(dist_worker.build())
    assert all(not torch.allclose(saved[k], initial[k]) for k in saved)  # training moved every factor
    assert (run / mode / "adapter_config.json").is_file()


def test_inject_after_fully_shard_raises(run: Path) -> None:
    for rank in (0, 1):
        assert (run / f"inject_after_shard_rank{rank}.txt").read_text().startswith(
            "inject adapters before fully_shard: parameters added after sharding stay plain")


def test_wrap_plan_is_blocks_then_root() -> None:
    peft_model = dist_worker.build()
    layers = peft_model.base_model.model.model.layers
    assert fsdp2_wrap_plan(peft_model) == [*layers, peft_model]
    check_not_sharded(peft_model)  # an unsharded model passes
