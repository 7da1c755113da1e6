"""LoRA over torchao weight-only quantized bases (int8, int4 / intx), against real PEFT.

Both libraries get the same quantized weights (one tiny Llama checkpoint loaded by transformers with the same
``TorchAoConfig``) and the same adapter weights (PEFT's state dict copied into lorakit's model). torchao's
int4 ``Int4WeightOnlyConfig`` needs CUDA or the ``mslk`` kernels (not on this CPU); its CPU int4 is
``IntxWeightOnlyConfig(weight_dtype=torch.int4)``, which is what these tests use.
"""

from __future__ import annotations

import warnings

import pytest
import torch

torchao = pytest.importorskip("torchao")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TorchAoConfig  # noqa: E402

import lorakit  # noqa: E402
from lorakit.quant import dense_weight, find_backend  # noqa: E402
from variant_parity import assert_gradients_match  # noqa: E402

EXACT = dict(atol=0.0, rtol=0.0)
TOL = dict(atol=1e-5, rtol=1e-5)
IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4], [3, 3, 100, 17, 8, 6, 42, 120]])


def _int8():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def _int4_asym():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16), mapping_type=MappingType.ASYMMETRIC)


QUANT = {"int8": _int8, "int4": _int4, "int4-asym": _int4_asym}
VARIANTS = {"plain": dict(), "rslora": dict(use_rslora=True, lora_alpha=16), "dora": dict(use_dora=True)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama_torchao")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(checkpoint, quant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=TorchAoConfig(quant_type=QUANT[quant]()),
                                                    dtype=torch.float32)


def pair(checkpoint, quant, **config):
    """(PEFT model, lorakit model) on the same quantized base with the same adapter weights."""
    config = dict(target_modules="all-linear", init_lora_weights=False, r=4, **config)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load(checkpoint, quant), peft.LoraConfig(**config))
    ours = lorakit.get_peft_model(load(checkpoint, quant), lorakit.LoraConfig(**config))
    result = lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert not result.unexpected_keys
    return theirs, ours


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("quant", QUANT)
def test_backend_reads_the_dequantized_weight(checkpoint, quant):
    layer = load(checkpoint, quant).model.layers[0].self_attn.q_proj
    assert find_backend(layer) is not None and type(layer) is torch.nn.Linear
    torch.testing.assert_close(dense_weight(layer), layer.weight.dequantize().float(), **EXACT)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("quant", QUANT)
def test_outputs_and_gradients_equal_peft(checkpoint, quant, variant):
    theirs, ours = pair(checkpoint, quant, **VARIANTS[variant])
    theirs.train(), ours.train()
    out_theirs, out_ours = theirs(IDS).logits, ours(IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    out_theirs.square().mean().backward()
    out_ours.square().mean().backward()
    assert_gradients_match(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("quant", QUANT)
def test_merge_requantizes_exactly_as_peft_and_unmerge_restores(checkpoint, quant):
    theirs, ours = pair(checkpoint, quant)
    before = dense_weight(q_proj(ours).base_layer)
    theirs.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.merge_adapter()
    assert any("requantizing the merged weights" in str(w.message) for w in caught)
    ref, mine = q_proj(theirs).base_layer.weight, q_proj(ours).base_layer.weight
    assert type(mine) is type(ref)
    torch.testing.assert_close(mine.qdata, ref.qdata, **EXACT)  # the same codes as quantize_ gives PEFT
    torch.testing.assert_close(mine.scale, ref.scale, **EXACT)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    torch.testing.assert_close(q_proj(ours).base_layer.weight.qdata, q_proj(theirs).base_layer.weight.qdata, **EXACT)
    # unmerge requantizes W_merged − ΔW: two roundings, each at most half a quantization step per entry
    after = q_proj(ours).base_layer
    step = max(after.weight.scale.max().item(), ref.scale.max().item())
    assert (dense_weight(after) - before).abs().max().item() <= step * (1 + 1e-4)


@pytest.mark.parametrize("quant", QUANT)
def test_merge_and_unload_dequantize_is_an_exact_full_precision_merge(checkpoint, quant):
    theirs, ours = pair(checkpoint, quant)
    expected = ours(IDS).logits.detach()
    merged = ours.merge_and_unload(dequantize=True)
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and type(layer.weight) is torch.nn.Parameter
    assert layer.weight.dtype == torch.float32 and find_backend(layer) is None
    torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", QUANT)
def test_merge_and_unload_keeps_the_quantized_format(checkpoint, quant):
    theirs, ours = pair(checkpoint, quant)
    merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload()
    mine = merged_ours.model.layers[0].self_attn.q_proj.weight
    ref = merged_theirs.model.layers[0].self_attn.q_proj.weight
    assert type(mine) is type(ref)
    torch.testing.assert_close(mine.qdata, ref.qdata, **EXACT)
    torch.testing.assert_close(merged_ours(IDS).logits, merged_theirs(IDS).logits, **TOL)


@pytest.mark.parametrize("quant", QUANT)
def test_adapter_saved_from_torchao_base_loads_in_peft_on_the_same_base(checkpoint, quant, tmp_path):
    theirs, ours = pair(checkpoint, quant)
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(load(checkpoint, quant), tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits, theirs(IDS).logits, **TOL)


@pytest.mark.parametrize("quant", QUANT)
def test_memory_footprint_is_the_quantized_base_plus_the_factors(checkpoint, quant):
    """Parameter bytes: the quantized base is smaller than float32's, and LoRA adds exactly its factors."""
    def nbytes(model):
        total = 0
        for p in model.parameters():
            data = [getattr(p, name) for name in getattr(p, "tensor_data_names", [])] or [p]
            total += sum(t.numel() * t.element_size() for t in data)
        return total

    dense = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    quantized = load(checkpoint, quant)
    linear_dense = sum(m.weight.numel() * 4 for n, m in dense.named_modules()
                       if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    saved = nbytes(dense) - nbytes(quantized)
    assert saved >= linear_dense * (0.5 if quant == "int8" else 0.4)  # int8 (int4 is stored unpacked in int8)
    ours = lorakit.get_peft_model(quantized, lorakit.LoraConfig(target_modules="all-linear", r=4))
    factors = sum(p.numel() * 4 for p in ours.parameters() if p.requires_grad)
    assert nbytes(ours) == nbytes(load(checkpoint, quant)) + factors


def test_unknown_torchao_format_refuses_the_requantizing_merge_by_name(checkpoint):
    from lorakit.quant_torchao import REQUANTIZERS

    theirs, ours = pair(checkpoint, "int8")
    saved = REQUANTIZERS.pop("Int8Tensor")
    try:
        with pytest.raises(NotImplementedError, match="cannot requantize a torchao Int8Tensor weight"):
            ours.merge_adapter()
    finally:
        REQUANTIZERS["Int8Tensor"] = saved
