"""``accelerate launch`` of examples/accelerate_train.py on 2 CPU processes (gloo) matches one process, and
FSDP2 bf16 mixed precision refuses CPU with a clear error (the CUDA path needs a GPU and is untested here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_lm
import torch
from safetensors.torch import load_file

from lorakit import PeftModel
from lorakit.distributed import shard

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "accelerate_train.py"
CONFIG = ROOT / "examples" / "accelerate_config.yaml"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide AcceleratorState: an earlier test's Trainer (bf16 off) would make this
    file's Accelerator(mixed_precision="bf16") raise. Each test here starts and ends with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _train(command: list[str], model: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(SCRIPT), "--model", str(model), "--out", str(out), "--steps", "3"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("accelerate")
    model = tiny_lm.save_tiny_llm(tmp / "model")
    accelerate = Path(sys.executable).with_name("accelerate")
    _train([str(accelerate), "launch", "--config_file", str(CONFIG)], model, tmp / "two")
    _train([sys.executable], model, tmp / "one")
    return model, tmp / "two", tmp / "one"


def test_accelerate_launch_runs_two_ranks(runs: tuple[Path, Path, Path]) -> None:
    _, two, one = runs
    assert sorted(p.name for p in two.glob("rank*.done")) == ["rank0.done", "rank1.done"]
    assert {p.read_text().strip() for p in two.glob("rank*.done")} == {"2"}  # each rank saw world size 2
    assert (one / "rank0.done").read_text().strip() == "1"


def test_two_process_adapter_equals_single_process(runs: tuple[Path, Path, Path]) -> None:
    _, two, one = runs
    saved, single = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (two, one))
    assert saved.keys() == single.keys() and len(saved) == 8  # q_proj, v_proj x A, B x 2 layers
    for key in saved:
        torch.testing.assert_close(saved[key], single[key], atol=1e-5, rtol=1e-5)


def test_saved_adapter_loads_and_moved_from_init(runs: tuple[Path, Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model, two, _ = runs
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), two / "adapter")
    saved = load_file(two / "adapter" / "adapter_model.safetensors")
    params = dict(loaded.named_parameters())
    trained = {k: v for k, v in params.items() if "lora_" in k}
    assert len(trained) == len(saved) == 8
    torch.manual_seed(0)  # the script's seed: the same gaussian init, before training
    from lorakit import LoraConfig, get_peft_model
    init = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    for name, param in init.named_parameters():
        if "lora_" in name:
            assert not torch.allclose(param, trained[name]), name


def test_fsdp_bf16_on_a_cpu_without_bf16_units_is_a_clear_error(monkeypatch) -> None:
    from lorakit import precision

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    with pytest.raises(ValueError, match="bf16 mixed precision needs a CUDA device .* or a CPU with bf16 matmul.*"
                                         "CPU without amx_bf16 or avx512_bf16"):
        shard(model, mixed_precision="bf16")
    with pytest.raises(ValueError, match="unknown mixed_precision"):
        shard(model, mixed_precision="fp16")
    # with the instructions, the precision check passes: what stops this call is the missing process group
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    with pytest.raises(RuntimeError, match="cannot shard"):
        shard(model, mixed_precision="bf16")


def test_cli_mixed_precision_needs_fsdp(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lorakit.app.cli", "train", "--mixed-precision", "bf16",
                             "--output", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode != 0 and "--mixed-precision applies to FSDP2" in result.stdout + result.stderr


def test_accelerator_bf16_prepare_keeps_signature_trains_and_unwraps(tmp_path: Path) -> None:
    """accelerate's bf16 autocast wrapper goes around lorakit's per-instance forward: the signature still names
    the wrapped model's arguments, a step lowers the loss, and unwrapping gives lorakit's forward back."""
    import inspect

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from stack_cases import ROWS
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm.save_tiny_llm(tmp_path / "model")),
                           LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    lorakit_forward = model.forward
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        prepared, optimizer = accelerator.prepare(model, optimizer)
        assert {"input_ids", "labels", "adapter_names"} <= set(inspect.signature(prepared.forward).parameters)
        losses = []
        for _ in range(4):  # bf16 autocast on the fused LoRA op
            loss = prepared(input_ids=ROWS[:4], labels=ROWS[:4]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.05, losses
        unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        assert unwrapped is model and unwrapped.forward == lorakit_forward
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
