"""BD-LoRA (use_bdlora=BdLoraConfig(...)) against the real peft 0.21.2, plus its invariants and refusals.

The same seeded tiny Llama is wrapped by peft and by lorakit; PEFT's adapter is made non-zero, its state dict
(compact block-diagonal factors: A (r, in/N), B (out, r/N)) is copied into lorakit with
``load_state_dict(strict=True)``, and outputs, gradients, merges and saved folders must agree to 1e-5.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import build, example_inputs
from safetensors.torch import load_file

import lorakit
from lorakit.layer import LoraLayer
from lorakit.variants.bdlora import BlockDiagonalLinear

TOL = dict(atol=1e-5, rtol=1e-5)
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BD_A, BD_B = ["o_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"]

# (id, LoraConfig kwargs, BdLoraConfig kwargs)
CASES = [
    ("strict-n2", dict(target_modules=LLAMA_PROJ), dict(target_modules_bd_a=BD_A, target_modules_bd_b=BD_B,
                                                       nblocks=2)),
    ("loose-n4-dropout-rank-pattern", dict(target_modules=LLAMA_PROJ, r=8, lora_dropout=0.2,
                                           rank_pattern={"down_proj": 4}),
     dict(target_modules_bd_a=["down_proj"], target_modules_bd_b=["q_proj", "up_proj"], nblocks=4,
          match_strict=False)),
]
CASE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _config(lib, kwargs: dict, bd: dict):
    kwargs = {"r": 4, "lora_alpha": 8, **copy.deepcopy(kwargs)}
    return lib.LoraConfig(**kwargs, use_bdlora=lib.BdLoraConfig(**copy.deepcopy(bd)))


def _pair(kwargs: dict, bd: dict):
    """The same seeded Llama wrapped by peft and by lorakit with BD-LoRA; PEFT's non-zero adapter copied in."""
    wrapped = []
    for lib in (peft, lorakit):
        torch.manual_seed(0)
        wrapped.append(lib.get_peft_model(build("llama", seed=0), _config(lib, kwargs, bd)))
    ref, ours = wrapped
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in sorted(ref.named_parameters()):
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, bd", CASE_PARAMS)
def test_state_dict_outputs_and_gradients_match_peft(kwargs, bd):
    ref, ours = _pair(kwargs, bd)
    assert _shapes(ours) == _shapes(ref)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}
    inputs = example_inputs("llama")
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, **TOL)
    ref.train(), ours.train()
    outputs = []
    for model in (ref, ours):  # same seed, same dropout masks
        torch.manual_seed(3)
        outputs.append(model(**inputs).logits)
        outputs[-1].square().mean().backward()
    torch.testing.assert_close(outputs[1], outputs[0], **TOL)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    torch.testing.assert_close({n: p.grad for n, p in ours.named_parameters() if p.requires_grad}, grads, **TOL)


def test_compact_shapes_and_block_diagonal_delta():
    ref, ours = _pair(*CASES[0][1:])
    layers = dict(ours.named_modules())
    o_proj = layers["base_model.model.model.layers.0.self_attn.o_proj"]  # A block-diagonal: (r, in/N)
    q_proj = layers["base_model.model.model.layers.0.self_attn.q_proj"]  # B block-diagonal: (out, r/N)
    assert isinstance(o_proj.lora_A["default"], BlockDiagonalLinear) and o_proj.lora_A["default"].weight.shape == (4, 16)
    assert isinstance(q_proj.lora_B["default"], BlockDiagonalLinear) and q_proj.lora_B["default"].weight.shape == (32, 2)
    A = o_proj.lora_A["default"].weight.detach()  # ΔW = s·B diag(A_1, A_2), blocks of A_i: (2, 16)
    dense_A = torch.zeros(4, 32)
    dense_A[:2, :16], dense_A[2:, 16:] = A[:2], A[2:]
    expected = o_proj.lora_B["default"].weight.detach() @ dense_A * o_proj.scaling["default"]
    torch.testing.assert_close(o_proj.get_delta_weight("default"), expected, **TOL)
    ref_layer = dict(ref.named_modules())["base_model.model.model.layers.0.self_attn.o_proj"]
    # PEFT's own get_delta_weight multiplies the compact factors (wrong shape); its merge uses the dense one:
    ref_delta = peft.tuners.lora.variants.BdLoraLinearVariant._get_bdlora_delta_weight(ref_layer, "default")
    torch.testing.assert_close(o_proj.get_delta_weight("default"), ref_delta, **TOL)


@pytest.mark.parametrize("kwargs, bd", CASE_PARAMS)
def test_merge_matches_peft_and_equals_unmerged(kwargs, bd):
    ref, ours = _pair(kwargs, bd)
    inputs = example_inputs("llama")
    ref.eval(), ours.eval()
    unmerged = ours(**inputs).logits
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    ref.merge_adapter(), ours.merge_adapter()
    base = {k: v for k, v in ours.state_dict().items() if "base_layer" in k}
    torch.testing.assert_close(base, {k: v for k, v in ref.state_dict().items() if "base_layer" in k}, **TOL)
    torch.testing.assert_close(ours(**inputs).logits, unmerged, **TOL)
    ours.unmerge_adapter()
    torch.testing.assert_close({k: v for k, v in ours.state_dict().items() if "base_layer" in k}, before, **TOL)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(**inputs).logits, unmerged, **TOL)


@pytest.mark.parametrize("kwargs, bd", CASE_PARAMS)
def test_save_load_both_ways_with_peft(kwargs, bd, tmp_path):
    ref, ours = _pair(kwargs, bd)
    inputs = example_inputs("llama")
    expected = ref.eval()(**inputs).logits
    ref.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "ours")
    ref_file, ours_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in ref_file.items()}
    torch.testing.assert_close(ours_file, ref_file, atol=0, rtol=0)
    loaded = [lorakit.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "peft"),
              peft.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "ours")]
    for model in loaded:
        torch.testing.assert_close(model.eval()(**inputs).logits, expected, **TOL)


def test_init_block_diagonal_b_is_zero_and_a_is_kaiming():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(build("llama", seed=0), _config(lorakit, *CASES[0][1:]))
    inputs = example_inputs("llama")
    with model.disable_adapter():
        base = model(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, base, atol=0, rtol=0)  # every B starts at zero
    layers = dict(model.named_modules())
    q_B = layers["base_model.model.model.layers.0.self_attn.q_proj"].lora_B["default"].weight
    o_A = layers["base_model.model.model.layers.0.self_attn.o_proj"].lora_A["default"].weight
    assert q_B.abs().sum() == 0
    assert o_A.abs().max() <= (6 / 16) ** 0.5 and o_A.abs().max() > 0.5 * (6 / 16) ** 0.5  # kaiming a=0, fan_in 16


def test_config_round_trips_through_peft(tmp_path):
    config = _config(lorakit, *CASES[1][1:])
    config.save_pretrained(tmp_path)
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.use_bdlora.nblocks == 4 and loaded.use_bdlora.match_strict is False
    assert lorakit.LoraConfig.from_pretrained(tmp_path).use_bdlora == config.use_bdlora


@pytest.mark.parametrize("bd", [dict(target_modules_bd_a=["o_proj"], target_modules_bd_b=["o_proj", "q_proj"]),
                                dict(target_modules_bd_a=["o_proj"], nblocks=0)], ids=["overlap", "nblocks-0"])
def test_invalid_bdlora_config_is_refused(bd):
    with pytest.raises(ValueError, match="use_bdlora"):
        lorakit.LoraConfig(use_bdlora=lorakit.BdLoraConfig(**bd))


@pytest.mark.parametrize("kwargs, bd", [
    (dict(target_modules=["q_proj", "o_proj"]), dict(target_modules_bd_a=["o_proj"], nblocks=2)),  # q unmatched
    (dict(target_modules=["q_proj"]), dict(target_modules_bd_a=["proj"], target_modules_bd_b=["q_proj"])),  # both
    (dict(target_modules=["o_proj"], r=3), dict(target_modules_bd_a=["o_proj"], nblocks=2)),  # r % N
    (dict(target_modules=["o_proj"]), dict(target_modules_bd_a=["o_proj"], nblocks=3)),  # in_features % N
    (dict(target_modules=["embed_tokens"]), dict(target_modules_bd_b=["embed_tokens"], nblocks=2)),  # Embedding
], ids=["unmatched-strict", "both-lists", "rank-indivisible", "features-indivisible", "embedding"])
def test_invalid_targets_are_refused_like_peft(kwargs, bd):
    for lib in (peft, lorakit):
        with pytest.raises(ValueError):
            lib.get_peft_model(build("llama", seed=0), _config(lib, kwargs, bd))


def test_bdlora_with_dora_or_lora_bias_is_refused():
    bd = lorakit.BdLoraConfig(target_modules_bd_a=["o_proj"])
    with pytest.raises(ValueError, match="use_bdlora"):
        lorakit.LoraConfig(use_dora=True, use_bdlora=bd)
    with pytest.raises(ValueError, match="lora_bias"):
        lorakit.LoraConfig(lora_bias=True, use_bdlora=bd)
