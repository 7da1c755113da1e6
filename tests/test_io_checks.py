"""The load's check of the adapter's base model (io.base_model_mismatch; errors.GUARDS: different_base_model)."""

from __future__ import annotations

import pytest
import torch
from checks_support import LLAMA, lora_warnings
from models import build
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import AdapterLoadError, LoraConfig, PeftModel, get_peft_model


# ---- a different base model ---------------------------------------------------------------------------------
def named(model: torch.nn.Module, name: str) -> torch.nn.Module:
    model.config._name_or_path = name
    return model


def test_other_base_name_with_fitting_shapes_warns(tmp_path):
    model = get_peft_model(named(build("llama"), "org/model-a"), LoraConfig(**LLAMA))
    model.save_pretrained(tmp_path / "a")
    found = lora_warnings(lambda: PeftModel.from_pretrained(named(build("llama"), "org/model-b"), tmp_path / "a"))
    assert any("'org/model-a'" in m and "'org/model-b'" in m for m in found), found
    same = lora_warnings(lambda: PeftModel.from_pretrained(named(build("llama"), "/local/copy/model-a"), tmp_path / "a"))
    assert not any("trained on base model" in m for m in same), same


def test_other_base_name_joins_the_shape_error(tmp_path):
    model = get_peft_model(named(build("llama"), "org/model-a"), LoraConfig(**LLAMA))
    model.save_pretrained(tmp_path / "a")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterLoadError) as error:
        PeftModel.from_pretrained(named(other, "org/model-b"), tmp_path / "a")
    text = str(error.value)
    assert "8 problem(s)" in text and "trained on base model 'org/model-a'" in text and "'org/model-b'" in text
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
