"""KaSA (kasa_config=KasaConfig(...)) against the real peft 0.21.2, plus its invariants and refusals.

The same seeded model is wrapped by peft and by lorakit: the truncated base weights must agree (the SVD is
deterministic), the adapter keys too; PEFT's adapter is then made non-zero and copied into lorakit, and
outputs, gradients, the regulariser, merges and saved folders must agree to 1e-5.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import build, example_inputs
from variant_parity import outputs, perturb_trainable
from safetensors.torch import load_file

import lorakit
from lorakit.layer import LoraLayer

TOL = dict(atol=1e-5, rtol=1e-5)

# (id, model, LoraConfig kwargs, KasaConfig kwargs)
CASES = [
    ("llama-dropout", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_dropout=0.1), {}),
    ("mlp-rslora-rank-pattern", "mlp", dict(target_modules=["lin1", "lin2"], r=6, use_rslora=True,
                                            rank_pattern={"lin2": 2}), dict(beta=0.5, gamma=0.25)),
]
CASE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _config(lib, kwargs: dict, kasa: dict):
    return lib.LoraConfig(lora_alpha=8, kasa_config=lib.KasaConfig(**kasa), **copy.deepcopy(kwargs))


def _pair(model_name: str, kwargs: dict, kasa: dict):
    """peft's and lorakit's KaSA models on the same base; PEFT's non-zero adapter copied into lorakit."""
    ref, ours = (lib.get_peft_model(build(model_name, seed=0), _config(lib, kwargs, kasa)) for lib in (peft, lorakit))
    perturb_trainable(ref)
    truncated = {k: v for k, v in ours.state_dict().items() if "base_layer" in k}
    torch.testing.assert_close(truncated, {k: v for k, v in ref.state_dict().items() if "base_layer" in k}, **TOL)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("model_name, kwargs, kasa", CASE_PARAMS)
def test_init_truncates_w_to_its_top_singular_components(model_name, kwargs, kasa):
    original = build(model_name, seed=0)
    model = lorakit.get_peft_model(build(model_name, seed=0), _config(lorakit, kwargs, kasa))
    reference = peft.get_peft_model(build(model_name, seed=0), _config(peft, kwargs, kasa))
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in reference.named_parameters() if p.requires_grad}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert layers
    for name, layer in layers:
        r = layer.r["default"]
        W0 = original.get_submodule(name.removeprefix("base_model.model.")).weight.detach().double()
        W = layer.base_layer.weight.detach().double()
        sigma0, sigma = torch.linalg.svdvals(W0), torch.linalg.svdvals(W)
        k = min(W.shape)
        torch.testing.assert_close(sigma[:k - r], sigma0[:k - r], atol=1e-5, rtol=1e-5)  # top k − r kept
        assert float(sigma[k - r:].max()) < 1e-5  # r smallest dropped
        assert layer.lora_B["default"].weight.abs().sum() == 0 and layer.lora_diag["default"].shape == (r,)
        assert layer.lora_diag["default"].requires_grad
    inputs = example_inputs(model_name)
    model.eval()
    with model.disable_adapter():
        disabled = outputs(model, inputs)
    torch.testing.assert_close(outputs(model, inputs), disabled, atol=0, rtol=0)  # B = 0
    assert not torch.allclose(disabled, outputs(original.eval(), inputs), atol=1e-4)  # truncation stays


@pytest.mark.parametrize("model_name, kwargs, kasa", CASE_PARAMS)
def test_outputs_gradients_and_regulariser_match_peft(model_name, kwargs, kasa):
    ref, ours = _pair(model_name, kwargs, kasa)
    inputs = example_inputs(model_name)
    torch.testing.assert_close(outputs(ours.eval(), inputs), outputs(ref.eval(), inputs), **TOL)
    ref.train(), ours.train()
    for model in (ref, ours):  # same seed, same dropout masks
        torch.manual_seed(3)
        (outputs(model, inputs).square().mean() + model._get_kasa_loss()).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert any("lora_diag" in n for n in grads)
    torch.testing.assert_close({n: p.grad for n, p in ours.named_parameters() if p.requires_grad}, grads, **TOL)
    torch.testing.assert_close(ours.base_model._get_kasa_loss("default"), ref.base_model._get_kasa_loss("default"),
                               **TOL)
    assert ours._get_kasa_loss(["missing"]) == 0.0 == ref._get_kasa_loss(["missing"])


def test_regulariser_is_beta_diag_norm_plus_gamma_orthogonality():
    ref, ours = _pair(*CASES[1][1:])
    beta, gamma = CASES[1][3]["beta"], CASES[1][3]["gamma"]
    expected = 0.0
    for layer in (m for m in ours.modules() if isinstance(m, LoraLayer)):
        A, B, d = (t.detach().double() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                                 layer.lora_diag["default"]))
        eye = torch.eye(d.numel(), dtype=torch.float64)
        expected += beta * float((d * d).sum()) + gamma * (float(torch.linalg.matrix_norm(B.T @ B - eye))
                                                           + float(torch.linalg.matrix_norm(A @ A.T - eye)))
    assert abs(float(ours._get_kasa_loss()) - expected) <= 1e-5 * max(1.0, expected)


def test_delta_weight_is_scaled_b_diag_a():
    _, ours = _pair(*CASES[0][1:])
    layer = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    A, B, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
    torch.testing.assert_close(layer.get_delta_weight("default"), layer.scaling["default"] * B @ torch.diag(d) @ A,
                               **TOL)


@pytest.mark.parametrize("model_name, kwargs, kasa", CASE_PARAMS)
def test_merge_and_unmerge_match_peft(model_name, kwargs, kasa):
    ref, ours = _pair(model_name, kwargs, kasa)
    inputs = example_inputs(model_name)
    ref.eval(), ours.eval()
    unmerged = outputs(ours, inputs)
    truncated = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    ref.merge_adapter(), ours.merge_adapter()
    merged = {k: v for k, v in ours.state_dict().items() if "base_layer" in k}
    torch.testing.assert_close(merged, {k: v for k, v in ref.state_dict().items() if "base_layer" in k}, **TOL)
    torch.testing.assert_close(outputs(ours, inputs), unmerged, **TOL)
    ours.unmerge_adapter()  # back to the truncated W, not the original one
    torch.testing.assert_close({k: v for k, v in ours.state_dict().items() if "base_layer" in k}, truncated, **TOL)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    out = plain(**inputs)
    torch.testing.assert_close(out if isinstance(out, torch.Tensor) else out.logits, unmerged, **TOL)


@pytest.mark.parametrize("model_name, kwargs, kasa", CASE_PARAMS)
def test_save_load_both_ways_onto_the_original_base(model_name, kwargs, kasa, tmp_path):
    ref, ours = _pair(model_name, kwargs, kasa)
    inputs = example_inputs(model_name)
    expected = outputs(ref.eval(), inputs)
    ref.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "ours")
    ref_file, ours_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert any(k.endswith(".lora_diag") for k in ours_file)
    torch.testing.assert_close(ours_file, ref_file, atol=0, rtol=0)
    assert lorakit.LoraConfig.from_pretrained(tmp_path / "peft").kasa_config == lorakit.KasaConfig(**kasa)
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").kasa_config == peft.KasaConfig(**kasa)
    loaded = [lorakit.PeftModel.from_pretrained(build(model_name, seed=0), tmp_path / "peft"),  # original W:
              peft.PeftModel.from_pretrained(build(model_name, seed=0), tmp_path / "ours")]  # truncated again
    for model in loaded:
        torch.testing.assert_close(outputs(model.eval(), inputs), expected, **TOL)


@pytest.mark.parametrize("model_name, targets, r, match", [
    ("gpt2", ["c_attn"], 4, r"KaSA does not support `fan_in_fan_out=True` layers \(e\.g\. Conv1D\)"),
    ("mlp", ["emb"], 4, r"Invalid or unsupported variant combination: \('kasa_config',\)"),
    ("mlp", ["conv"], 2, r"Invalid or unsupported variant combination: \('kasa_config',\)"),
    ("mlp", ["lin2"], 5, r"KaSA requires `r` \(5\) to be smaller than min\(in_features, out_features\) \(5\)"),
], ids=["conv1d", "embedding", "conv2d", "r-not-below-min-dimension"])
def test_unsupported_targets_are_refused_like_peft(model_name, targets, r, match):
    for lib in (peft, lorakit):
        model = build(model_name, seed=0)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=match):
            lib.get_peft_model(model, lib.LoraConfig(target_modules=targets, r=r, kasa_config=lib.KasaConfig()))
        if lib is lorakit:  # the refusal leaves the user's model as it was
            torch.testing.assert_close(model.state_dict(), before, atol=0, rtol=0)


@pytest.mark.parametrize("kasa_first", [True, False])
def test_kasa_and_plain_adapters_cannot_share_a_model(kasa_first):
    kasa = lorakit.LoraConfig(target_modules=["lin1"], r=4, kasa_config=lorakit.KasaConfig())
    plain = lorakit.LoraConfig(target_modules=["lin1"], r=4)
    first, second = (kasa, plain) if kasa_first else (plain, kasa)
    model = lorakit.get_peft_model(build("mlp", seed=0), first)
    with pytest.raises(ValueError, match="KaSA cannot be combined with adapters that don't use KaSA"):
        model.add_adapter("second", second)
    assert list(model.peft_config) == ["default"]
    if kasa_first:  # several KaSA adapters are fine
        model.add_adapter("other_kasa", copy.deepcopy(first))
        assert list(model.peft_config) == ["default", "other_kasa"]


def test_kasa_config_validation_and_json_round_trip(tmp_path):
    for name in ("beta", "gamma"):
        with pytest.raises(ValueError, match=f"`{name}` must be non-negative"):
            lorakit.KasaConfig(**{name: -1.0})
    with pytest.raises(TypeError, match="`KasaConfig` must be a `KasaConfig`, a dict, or None"):
        lorakit.LoraConfig(kasa_config=123)
    config = lorakit.LoraConfig(kasa_config={"beta": 0.5})
    assert config.kasa_config == lorakit.KasaConfig(beta=0.5, gamma=1e-3)
    assert lorakit.KasaConfig() == lorakit.KasaConfig(beta=1e-4, gamma=1e-3)  # PEFT's defaults
    config.save_pretrained(tmp_path)
    assert peft.LoraConfig.from_pretrained(tmp_path).kasa_config == peft.KasaConfig(beta=0.5)
