"""LoRA over HQQ-quantized bases (``hqq.core.quantize.HQQLinear``), against real PEFT.

Both libraries get the same quantized weights (one tiny Llama whose projections are replaced by HQQLinear with
the same settings, deterministic) and the same adapter weights (PEFT's state dict copied into lorakit's model).
"""

from __future__ import annotations

import warnings

import pytest
import torch

hqq_quantize = pytest.importorskip("hqq.core.quantize")
peft = pytest.importorskip("peft")

from models import tiny_llama  # noqa: E402

import lorakit  # noqa: E402
from lorakit.quant import dense_weight, find_backend  # noqa: E402
from variant_parity import assert_gradients_match  # noqa: E402

EXACT = dict(atol=0.0, rtol=0.0)
TOL = dict(atol=1e-5, rtol=1e-5)
IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4], [3, 3, 100, 17, 8, 6, 42, 120]])
SETTINGS = {"4bit-g64": dict(nbits=4, group_size=64), "3bit-g32": dict(nbits=3, group_size=32),
            "8bit-g64": dict(nbits=8, group_size=64)}
VARIANTS = {"plain": dict(), "rslora": dict(use_rslora=True, lora_alpha=16), "dora": dict(use_dora=True)}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantized_llama(setting: str) -> torch.nn.Module:
    """tiny_llama (seed 0) with every projection an HQQLinear (float32 compute, CPU)."""
    model = tiny_llama()
    settings = hqq_quantize.BaseQuantizeConfig(**SETTINGS[setting])
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            model.set_submodule(name, hqq_quantize.HQQLinear(module, settings, compute_dtype=torch.float32,
                                                             device="cpu"))
    return model


def pair(setting, **config):
    config = dict(target_modules=list(PROJECTIONS), init_lora_weights=False, r=4, **config)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(quantized_llama(setting), peft.LoraConfig(**config))
    ours = lorakit.get_peft_model(quantized_llama(setting), lorakit.LoraConfig(**config))
    assert not lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs)).unexpected_keys
    return theirs, ours


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_backend_reads_deq_and_the_repr_names_peft_s_class():
    _, ours = pair("4bit-g64")
    base = q_proj(ours).base_layer
    assert find_backend(base) is not None
    torch.testing.assert_close(dense_weight(base), base.dequantize().float(), **EXACT)
    assert repr(q_proj(ours)).startswith("lora.HqqLoraLinear(")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_outputs_and_gradients_equal_peft(setting, variant):
    theirs, ours = pair(setting, **VARIANTS[variant])
    out_theirs, out_ours = theirs(IDS).logits, ours(IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    out_theirs.square().mean().backward()
    out_ours.square().mean().backward()
    assert_gradients_match(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("setting", SETTINGS)
def test_merge_and_unmerge_requantize_exactly_as_peft(setting):
    theirs, ours = pair(setting)
    theirs.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.merge_adapter()
    assert any("requantizing the merged weights" in str(w.message) for w in caught)
    torch.testing.assert_close(q_proj(ours).base_layer.W_q, q_proj(theirs).base_layer.W_q, **EXACT)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)
    theirs.unmerge_adapter(), ours.unmerge_adapter()
    torch.testing.assert_close(q_proj(ours).base_layer.W_q, q_proj(theirs).base_layer.W_q, **EXACT)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)


def test_merge_and_unload_dequantize_is_an_exact_full_precision_merge():
    _, ours = pair("4bit-g64")
    expected = ours(IDS).logits.detach()
    merged = ours.merge_and_unload(dequantize=True)
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_adapter_saved_over_hqq_loads_in_peft_on_the_same_base(tmp_path):
    theirs, ours = pair("4bit-g64")
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(quantized_llama("4bit-g64"), tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits, theirs(IDS).logits, **TOL)


def test_parameter_bytes_are_the_packed_base_plus_the_factors():
    dense = tiny_llama()
    quantized = quantized_llama("4bit-g64")
    nbytes = lambda model: sum(t.numel() * t.element_size() for t in model.parameters())  # noqa: E731
    projections = sum(m.weight.numel() * 4 for n, m in dense.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS)
    # 4-bit codes packed two per byte: the projections shrink to 1/8 of their float32 bytes (meta is not a Parameter)
    assert nbytes(dense) - nbytes(quantized) == projections - projections // 8
    ours = lorakit.get_peft_model(quantized, lorakit.LoraConfig(target_modules=list(PROJECTIONS), r=4))
    factors = sum(p.numel() * 4 for p in ours.parameters() if p.requires_grad)
    assert nbytes(ours) == nbytes(quantized_llama("4bit-g64")) + factors
