"""Behaviour of the fast get_peft_model and save + load paths (issue 9; their speed is in benchmarks/).

- the default init draws A once (PEFT draws nn.Linear's A and B first and throws them away);
- init_lora_weights=False still gives random factors, and keeps a random LoRA bias;
- loading an adapter draws no random numbers (its factors are never initialised, only loaded) and loads
  exactly the saved tensors; set_peft_model_state_dict never aliases the caller's tensors;
- a failing fsync of any one file aborts the save and keeps the previous adapter;
- injection pauses Python's garbage collector and restores it as it was.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from models import build

import lorakit
import lorakit.atomic
from lorakit.io import get_peft_model_state_dict, set_peft_model_state_dict
from lorakit.layer import LoraLayer

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def _layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_default_init_draws_A_once_in_module_order():
    base = build("llama")
    torch.manual_seed(7)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=TARGETS))
    after = torch.rand(3)
    torch.manual_seed(7)
    for layer in _layers(model):  # kaiming-uniform(a=√5): U(-1/√in, 1/√in), nothing drawn for B
        bound = 1 / math.sqrt(layer.in_features)
        expected = torch.empty(4, layer.in_features).uniform_(-bound, bound)
        torch.testing.assert_close(layer.lora_A["default"].weight, expected, rtol=0, atol=1e-7)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)  # and nothing else was drawn


@pytest.mark.parametrize("init, bias_random", [(False, True), (True, False)])
def test_lora_bias_is_zero_except_with_init_false(init, bias_random):
    model = lorakit.get_peft_model(build("llama"), lorakit.LoraConfig(r=4, target_modules=TARGETS, lora_bias=True,
                                                                     init_lora_weights=init))
    for layer in _layers(model):
        B = layer.lora_B["default"]
        assert torch.isfinite(layer.lora_A["default"].weight).all() and torch.isfinite(B.weight).all()
        assert bool(torch.count_nonzero(B.bias)) == bias_random
        assert bool(torch.count_nonzero(B.weight)) == (init is False)  # False: B random too (PEFT's nn.Linear)
        if bias_random:
            assert B.bias.abs().max() <= 1 / math.sqrt(4)  # nn.Linear(r, out)'s bias bound 1/√r


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_load_draws_nothing_and_restores_the_saved_tensors(tmp_path, how):
    saved = lorakit.get_peft_model(build("llama"), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in saved.named_parameters():
            if "lora_" in name:
                param.normal_()
    saved.save_pretrained(tmp_path / "a")
    expected = get_peft_model_state_dict(saved)
    torch.manual_seed(3)
    if how == "from_pretrained":
        loaded = lorakit.PeftModel.from_pretrained(build("llama"), tmp_path / "a")
        name = "default"
    else:
        loaded = lorakit.get_peft_model(build("llama"), lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
        torch.manual_seed(3)
        loaded.load_adapter(tmp_path / "a", adapter_name="other")
        name = "other"
    after = torch.rand(3)
    torch.manual_seed(3)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)
    got = get_peft_model_state_dict(loaded, adapter_name=name)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_set_peft_model_state_dict_copies_the_callers_tensors():
    model = lorakit.get_peft_model(build("llama"), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    state = {k: torch.randn(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, state)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    for value in state.values():
        value.zero_()
    for key, value in get_peft_model_state_dict(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_a_failing_fsync_of_one_file_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = lorakit.get_peft_model(build("llama"), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    model.save_pretrained(tmp_path / "a")
    first = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    real = lorakit.atomic._fsync

    def fsync(path):
        if path.name == "adapter_model.safetensors":
            raise OSError(5, "I/O error")
        real(path)

    monkeypatch.setattr(lorakit.atomic, "_fsync", fsync)
    with torch.no_grad():
        for layer in _layers(model):
            layer.lora_B["default"].weight.fill_(1.0)
    with pytest.raises(OSError, match="I/O error"):
        model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folder left behind


@pytest.mark.parametrize("enabled", [True, False])
def test_injection_restores_the_garbage_collector(enabled):
    seen = []
    original = LoraLayer.update_layer

    def spy(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return original(self, *args, **kwargs)

    (gc.enable if enabled else gc.disable)()
    try:
        LoraLayer.update_layer = spy
        lorakit.get_peft_model(build("llama"), lorakit.LoraConfig(r=4, target_modules=TARGETS))
        assert seen and not any(seen)
        assert gc.isenabled() == enabled
    finally:
        LoraLayer.update_layer = original
        gc.enable()
