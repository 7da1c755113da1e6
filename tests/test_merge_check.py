"""lorakit/merge_check.py: merge_and_unload(check=True) measures the merge (errors.GUARDS: merge_changed_outputs)."""

from __future__ import annotations

import pytest
import torch
from checks_support import LLAMA, randomize
from models import build, example_inputs

from lorakit import LoraConfig, LoraWarning, get_peft_model
from lorakit.layer import LoraLayer


# ---- merge that changes outputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_check_measures_the_change(dtype):
    model = get_peft_model(build("llama").to(dtype), LoraConfig(**LLAMA))
    randomize(model, scale=0.3)
    probe = example_inputs("llama")
    with torch.no_grad():
        expected = model(**probe).logits.double()
    merged = model.merge_and_unload(check=True, probe=probe)
    check = merged.lorakit_merge_check
    with torch.no_grad():
        actual = merged(**probe).logits.double()
    assert check.max_abs_change == pytest.approx((actual - expected).abs().max().item(), rel=1e-6, abs=1e-12)
    assert check.ok and check.dtype == str(dtype)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())


def test_merge_check_warns_when_a_merge_is_wrong(monkeypatch):
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model, scale=0.3)
    real = LoraLayer.merge

    def broken(self, *args, **kwargs):  # a variant that merges twice its delta
        real(self, *args, **kwargs)
        self.merged_adapters.clear()
        real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "merge", broken)
    with pytest.warns(LoraWarning, match="changed the model's outputs"):
        merged = model.merge_and_unload(check=True)  # the model's own dummy_inputs
    assert not merged.lorakit_merge_check.ok and merged.lorakit_merge_check.max_abs_change > 1e-3


def test_merge_check_needs_a_probe_without_dummy_inputs():
    model = get_peft_model(build("mlp"), LoraConfig(target_modules=["lin1", "lin2"], r=2))
    with pytest.raises(ValueError, match="probe="):
        model.merge_and_unload(check=True)
    assert any(isinstance(m, LoraLayer) for m in model.modules())  # nothing merged
    merged = model.merge_and_unload(check=True, probe=example_inputs("mlp")["x"])
    assert merged.lorakit_merge_check.max_abs_change < 1e-5
