"""MiCA (init_lora_weights="mica") against the real peft 0.21.2, plus its invariants and refusals.

The same seeded model is wrapped by peft and by lorakit: the init must agree exactly (B = the minor left
singular vectors of W, A = 0), B must stay frozen, and after A is made non-zero outputs, gradients, merges
and saved folders must agree to 1e-5.
"""

from __future__ import annotations

import peft
import pytest
import torch
from models import build, example_inputs
from variant_parity import assert_merge_matches_peft, outputs, perturb_trainable
from safetensors.torch import load_file

import lorakit
from lorakit.layer import LoraLayer

TOL = dict(atol=1e-5, rtol=1e-5)

# (id, model, LoraConfig kwargs): Linear (Llama), GPT-2 Conv1D, a plain MLP's Linear + Embedding
CASES = [
    ("llama-linear", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_fc"], r=4, lora_dropout=0.1)),
    ("mlp-linear-embedding-rslora", "mlp", dict(target_modules=["lin1", "emb"], r=8, use_rslora=True,
                                                rank_pattern={"emb": 3})),
]
CASE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _wrap(lib, model_name: str, kwargs: dict):
    torch.manual_seed(0)
    return lib.get_peft_model(build(model_name, seed=0), lib.LoraConfig(init_lora_weights="mica", **kwargs))


def _trained_pair(model_name: str, kwargs: dict):
    """peft's and lorakit's MiCA models with the same non-zero A (PEFT's, perturbed) copied into lorakit."""
    ref, ours = _wrap(peft, model_name, kwargs), _wrap(lorakit, model_name, kwargs)
    perturb_trainable(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("model_name, kwargs", CASE_PARAMS)
def test_init_matches_peft_exactly_and_is_the_minor_subspace(model_name, kwargs):
    ref, ours = _wrap(peft, model_name, kwargs), _wrap(lorakit, model_name, kwargs)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert our_state.keys() == ref_state.keys()
    torch.testing.assert_close(our_state, ref_state, atol=0, rtol=0)
    assert _trainable(ours) == _trainable(ref)
    inputs = example_inputs(model_name)
    with ours.disable_adapter():
        base = outputs(ours.eval(), inputs)
    torch.testing.assert_close(outputs(ours, inputs), base, atol=0, rtol=0)  # A = 0: the base model
    for layer in (m for m in ours.modules() if isinstance(m, LoraLayer)):
        A, B = layer.factors("default") if layer.kind.embedding else (f.weight for f in layer.factors("default"))
        assert A.requires_grad and not B.requires_grad
        A, B = A.detach(), B.detach()
        assert A.abs().sum() == 0
        W = layer.kind.matrix(layer.base_layer).detach().double()  # (out, K)
        r = layer.r["default"]
        sigma = torch.linalg.svdvals(W)
        torch.testing.assert_close(B.double().T @ B.double(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
        # ‖Bᵀ W‖² = Σ of the r smallest σ²: B spans the minor left-singular subspace
        torch.testing.assert_close((B.double().T @ W).square().sum(), sigma[-r:].square().sum(), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("model_name, kwargs", CASE_PARAMS)
def test_outputs_gradients_and_a_training_step_match_peft(model_name, kwargs):
    ref, ours = _trained_pair(model_name, kwargs)
    inputs = example_inputs(model_name)
    torch.testing.assert_close(outputs(ours.eval(), inputs), outputs(ref.eval(), inputs), **TOL)
    ref.train(), ours.train()
    frozen_before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora" in n and not p.requires_grad}
    assert frozen_before and all("lora_B" in n or "lora_embedding_B" in n for n in frozen_before)
    for model in (ref, ours):  # same seed, same dropout masks
        torch.manual_seed(3)
        outputs(model, inputs).square().mean().backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    torch.testing.assert_close({n: p.grad for n, p in ours.named_parameters() if p.requires_grad}, grads, **TOL)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), **TOL)
    torch.testing.assert_close({n: p for n, p in ours.named_parameters() if n in frozen_before}, frozen_before,
                               atol=0, rtol=0)  # B never moved


def test_b_stays_frozen_through_set_adapter_set_requires_grad_and_other_adapters():
    kwargs = CASES[0][2]
    ref, ours = _wrap(peft, "llama", kwargs), _wrap(lorakit, "llama", kwargs)
    for model, lib in ((ref, peft), (ours, lorakit)):
        model.add_adapter("plain", lib.LoraConfig(target_modules=["q_proj"], r=2))
        model.set_adapter("plain")
        model.set_adapter("default")
        model.set_requires_grad("default", True)
    assert _trainable(ours) == _trainable(ref)
    assert not any("lora_B.default" in name for name in _trainable(ours))
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ours.delete_adapter("plain")
    ours.set_adapter("default")
    assert not any("lora_B" in name for name in _trainable(ours)) and any("lora_A" in n for n in _trainable(ours))


@pytest.mark.parametrize("model_name, kwargs", CASE_PARAMS)
def test_merge_and_unmerge_match_peft(model_name, kwargs):
    ref, ours = _trained_pair(model_name, kwargs)
    assert_merge_matches_peft(ref, ours, example_inputs(model_name), TOL)


@pytest.mark.parametrize("model_name, kwargs", CASE_PARAMS)
def test_save_load_both_ways_with_peft(model_name, kwargs, tmp_path):
    ref, ours = _trained_pair(model_name, kwargs)
    inputs = example_inputs(model_name)
    expected = outputs(ref.eval(), inputs)
    ref.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "ours")
    ref_file, ours_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    torch.testing.assert_close(ours_file, ref_file, atol=0, rtol=0)
    assert lorakit.LoraConfig.from_pretrained(tmp_path / "peft").init_lora_weights == "mica"
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").init_lora_weights == "mica"
    loaded = [lorakit.PeftModel.from_pretrained(build(model_name, seed=0), tmp_path / "peft", is_trainable=True),
              peft.PeftModel.from_pretrained(build(model_name, seed=0), tmp_path / "ours", is_trainable=True)]
    for model in loaded:
        torch.testing.assert_close(outputs(model.eval(), inputs), expected, **TOL)
    assert _trainable(loaded[0]) == _trainable(loaded[1])  # a loaded MiCA adapter still trains A only


@pytest.mark.parametrize("model_name, kwargs, match", [
    ("mlp", dict(target_modules=["conv"]), r"Invalid or unsupported variant combination: \('mica',\)"),
    ("mlp", dict(target_modules=["lin2"], r=6), r"MiCA requires `r` <= min\(in_features, out_features\) but got "
                                                r"r=6 for a layer with weight shape \(5, 32\) \(max usable r is 5\)"),
    ("mlp", dict(target_modules=["emb"], r=9), r"MiCA requires `r` <= min\(num_embeddings, embedding_dim\) but got "
                                               r"r=9 for an embedding layer with weight shape \(20, 8\)"),
], ids=["conv", "r-too-large-linear", "r-too-large-embedding"])
def test_refusals_match_peft(model_name, kwargs, match):
    for lib in (peft, lorakit):
        with pytest.raises(ValueError, match=match):
            _wrap(lib, model_name, kwargs)


def test_mica_r_equal_to_min_dimension_uses_every_singular_vector():
    ref, ours = (_wrap(lib, "mlp", dict(target_modules=["lin2"], r=5)) for lib in (peft, lorakit))
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_base_init_matches_peft_exactly(dtype):
    """B is rounded to the base dtype and kept in the adapter's float32, as PEFT does."""
    states = []
    for lib in (peft, lorakit):
        model = lib.get_peft_model(build("mlp", seed=0).to(dtype),
                                   lib.LoraConfig(target_modules=["lin1", "emb"], r=4, init_lora_weights="mica"))
        states.append({k: v for k, v in model.state_dict().items() if "lora" in k})
    assert all(v.dtype == torch.float32 for v in states[1].values())
    torch.testing.assert_close(states[1], states[0], atol=0, rtol=0)
