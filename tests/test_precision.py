"""precision: the auto decision from injected CPU flags and probe results, the refusals, the frozen base held
in bf16 with float32 adapters, and a tiny `lorakit train --precision bf16` whose adapter stays float32 and
loads in real peft to the same outputs as in lorakit."""

from __future__ import annotations

import json

import pytest
import torch
from models import tiny_llama
from safetensors import safe_open
from tiny_lm import save_tiny_llm, write_chat_jsonl

from lorakit import LoraConfig, get_peft_model, precision
from lorakit.app.cli import main
from lorakit.app.lm_loss import causal_lm_loss
from lorakit.precision import AUTO_MARGIN, Probe, decide, hold_frozen_in

FAST, SLOW = Probe(fp32_ms=22.4, bf16_ms=3.6), Probe(fp32_ms=10.0, bf16_ms=9.0)

# (requested, CPU flags, probe result, expected dtype)
DECISIONS = [
    ("fp32", ("amx_bf16",), FAST, torch.float32),
    ("bf16", ("amx_bf16",), SLOW, torch.bfloat16),  # an explicit request is not second-guessed by the probe
    ("bf16", ("avx512_bf16",), None, torch.bfloat16),
    ("auto", ("amx_bf16", "avx512_bf16"), FAST, torch.bfloat16),
    ("auto", ("avx512_bf16",), SLOW, torch.float32),  # has the instructions, but the probe finds no gain
    ("auto", ("amx_bf16",), Probe(fp32_ms=AUTO_MARGIN * 4.0, bf16_ms=4.0), torch.bfloat16),  # the margin itself
    ("auto", (), FAST, torch.float32),  # no bf16 instructions: not even probed
]


@pytest.mark.parametrize("requested,flags,probe,expected", DECISIONS)
def test_decide(requested, flags, probe, expected):
    probed = []

    def fake_probe():
        probed.append(1)
        return probe

    choice = decide(requested, "cpu", flags=lambda: flags, probe=fake_probe)
    assert choice.dtype == expected
    assert probed == ([1] if requested == "auto" and flags else [])
    assert choice.name == {torch.float32: "fp32", torch.bfloat16: "bf16"}[expected]


@pytest.mark.parametrize("requested,flags,match", [
    ("fp16", ("amx_bf16",), "precision must be one of auto, fp32, bf16; got 'fp16'"),
    ("bf16", (), "this CPU has none of amx_bf16, avx512_bf16.*use --precision fp32"),
])
def test_decide_refuses(requested, flags, match):
    with pytest.raises(ValueError, match=match):
        decide(requested, "cpu", flags=lambda: flags, probe=lambda: FAST)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert precision.cpu_bf16_flags(info) == ("amx_bf16", "avx512_bf16")
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
    assert precision.cpu_bf16_flags(info) == ()
    assert precision.cpu_bf16_flags(tmp_path / "missing") == ()


def test_probe_measures_both_dtypes():
    probe = precision.probe_speed(shape=(16, 32, 48), tries=1)
    assert probe.fp32_ms > 0 and probe.bf16_ms > 0 and probe.speedup == probe.fp32_ms / probe.bf16_ms


def test_frozen_base_in_bf16_adapters_in_fp32_and_a_step_in_your_own_loop():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    assert hold_frozen_in(model, torch.bfloat16) == frozen
    assert hold_frozen_in(model, torch.bfloat16) == 0  # idempotent
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if parameter.requires_grad else torch.bfloat16), name
        assert parameter.requires_grad == ("lora_" in name)
    for name, buffer in model.named_buffers():  # RoPE's inverse frequencies keep their float32 values
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    loss = causal_lm_loss(model, ids, torch.ones_like(ids), ids)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-precision")
    return save_tiny_llm(root / "model"), write_chat_jsonl(root / "chat.jsonl")


def _train(model_dir, data, output, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--samples", "0",
                 "--r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--batch-size", "4", "--lr", "1e-2",
                 "--time-limit", "0", "--save-every", "0", *extra])


def test_cli_refuses_bf16_on_a_cpu_without_it(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert _train(*tiny, tmp_path / "run", "--max-steps", "1", "--precision", "bf16") == 2
    err = capsys.readouterr().err.strip()
    assert "this CPU has none of amx_bf16, avx512_bf16" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "adapter").exists()


def test_cli_rejects_an_unknown_precision(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        _train(*tiny, tmp_path, "--precision", "fp16")
    assert raised.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_train_in_bf16_saves_a_float32_adapter_that_peft_loads(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))  # bf16 allowed on any CI CPU
    model_dir, data = tiny
    assert _train(model_dir, data, tmp_path, "--max-steps", "12", "--precision", "bf16") == 0
    out = capsys.readouterr().out
    assert "precision: frozen base in bf16, adapters and optimizer in fp32" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
        assert dtypes == {torch.float32}
        assert any(handle.get_tensor(key).abs().sum() > 0 for key in handle.keys() if "lora_B" in key)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())  # the final checkpoint
    assert state["run"]["settings"]["precision"] == "bf16"  # the resolved dtype: a resume does not re-probe
    import peft
    from transformers import AutoModelForCausalLM

    import lorakit

    ids = torch.tensor([[2, 5, 7, 12, 11, 13, 3, 7, 2, 6, 7]])
    outputs = []
    for library in (peft, lorakit):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        loaded = library.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {torch.float32}
        with torch.no_grad():
            outputs.append(loaded(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
