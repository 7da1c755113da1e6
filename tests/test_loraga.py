"""LoRA-GA (preprocess_loraga + init_lora_weights="lora_ga") against the real peft 0.21.2, and its invariants.

The same seeded tiny model is preprocessed by peft and by lorakit with the same train step, then wrapped with
the same seed: the attached gradients, A, B, the rewritten base weights W_res and the outputs must agree
(randomised SVD draws from the global RNG in the same order in both). Invariant: W_res + s·B A == W.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import build, example_inputs

import lorakit
from lorakit.inits import InitRequest
from lorakit.loraga import GRAD_ATTRIBUTE, lora_ga

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
# (id, model, LoraGAConfig kwargs, LoraConfig extras)
CASES = [
    ("llama-default", "llama", {}, {}),
    ("llama-A2rBr-weight_svd", "llama", dict(direction="A2rBr", scale="weight_svd"), {}),
    ("llama-ArBr-gd_scale-rslora", "llama", dict(direction="ArBr", scale="gd_scale"), dict(use_rslora=True)),
    ("llama-random-unit", "llama", dict(direction="random", scale="unit"), {}),
    ("gpt2-conv1d-stable-gamma4", "gpt2", dict(stable_gamma=4), {}),
]
CASE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _train_step(model, name: str):
    def step() -> None:
        for seed in (1, 2):
            inputs = example_inputs(name, seed=seed)
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return step


def _prepared(lib, name: str, ga: dict, extras: dict, cache_file=None):
    model = build(name, seed=0)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights="lora_ga",
                            lora_ga_config=lib.LoraGAConfig(**ga), **copy.deepcopy(extras))
    lib.preprocess_loraga(model, config, _train_step(model, name), cache_file=cache_file)
    grads = {n: getattr(m, GRAD_ATTRIBUTE).clone() for n, m in model.named_modules() if hasattr(m, GRAD_ATTRIBUTE)}
    torch.manual_seed(11)
    return lib.get_peft_model(model, config).eval(), grads


@pytest.mark.parametrize("name, ga, extras", CASE_PARAMS)
def test_gradients_factors_residual_and_outputs_match_peft(name, ga, extras):
    ref, ref_grads = _prepared(peft, name, ga, extras)
    ours, grads = _prepared(lorakit, name, ga, extras)
    assert sorted(grads) == sorted(ref_grads) and grads
    torch.testing.assert_close(grads, ref_grads, **TOL)
    ref_state, state = ref.state_dict(), ours.state_dict()
    assert sorted(state) == sorted(ref_state)
    torch.testing.assert_close(state, ref_state, **TOL)  # A, B and every (rewritten) base weight
    inputs = example_inputs(name)
    torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, **TOL)
    with ours.disable_adapter():  # W_res alone is not the base model
        assert (ours(**inputs).logits - build(name, seed=0)(**inputs).logits).abs().max() > 1e-4
    # the adapted model starts as the base model: W_res + s·B A == W
    torch.testing.assert_close(ours(**inputs).logits, build(name, seed=0)(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert not any(hasattr(m, GRAD_ATTRIBUTE) for m in ours.modules())  # used once


def test_init_formula_against_a_dense_svd():
    """ArB2r + stable from the textbook: A = V_{:r}ᵀ, B = U_{r:2r} S_{r:2r} d^¼/√γ (up to each vector's sign)."""
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(12, 3, generator=generator) @ torch.randn(3, 10, generator=generator)  # rank 3 < 2r + 1
    G = G + torch.randn(12, 10, generator=generator) @ torch.diag(torch.linspace(0.3, 0.01, 10))
    W = torch.randn(12, 10, generator=generator)
    r, s = 2, 3.0
    request = InitRequest(A_shape=(r, 10), B_shape=(12, r), r=r, scaling=s, weight=W, kind="Linear",
                          options={"grad": G, "lora_ga_config": {"direction": "ArB2r", "scale": "stable",
                                                                  "stable_gamma": 16}})
    result = lora_ga(request)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(result.A.abs(), Vh[:r].abs(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.B.abs(), (U[:, r:2 * r] * S[r:2 * r] * 12 ** 0.25 / 4).abs(), atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(result.base_weight + s * result.B @ result.A, W, atol=1e-5, rtol=1e-5)


def test_cache_file_is_read_by_both(tmp_path):
    ga = dict(direction="ArB2r")
    _, written = _prepared(lorakit, "llama", ga, {}, cache_file=str(tmp_path / "sub" / "grads.pt"))
    model = build("llama", seed=0)
    config = peft.LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(**ga))
    peft.preprocess_loraga(model, config, lambda: pytest.fail("the cache should be used"),
                           cache_file=str(tmp_path / "sub" / "grads.pt"))
    torch.testing.assert_close({n: getattr(m, GRAD_ATTRIBUTE) for n, m in model.named_modules()
                                if hasattr(m, GRAD_ATTRIBUTE)}, written, atol=0, rtol=0)


def test_save_load_and_conversion_to_plain_lora(tmp_path):
    ours, _ = _prepared(lorakit, "llama", {}, {})
    ours.save_pretrained(tmp_path / "init")
    with torch.no_grad():  # "training": move every factor
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    inputs = example_inputs("llama")
    trained = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    for lib in (peft, lorakit):  # the converted adapter runs on the ORIGINAL base model, in both libraries
        loaded = lib.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "plain").eval()
        assert loaded.peft_config["default"].r == 8
        torch.testing.assert_close(loaded(**inputs).logits, trained, atol=1e-4, rtol=1e-4)
    # a lora_ga adapter loaded without gradients: the factors come from the file, the base stays W (as PEFT)
    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    for lib in (peft, lorakit):
        loaded = lib.PeftModel.from_pretrained(build("llama", seed=0), saved).eval()
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(**inputs).logits, build("llama", seed=0)(**inputs).logits,
                                       atol=0, rtol=0)


def test_refusals_keep_peft_sentences():
    model = build("llama", seed=0)
    no_ga = lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="If you want to use LoRA-GA"):
        lorakit.preprocess_loraga(model, no_ga, lambda: None)
    config = lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="lora_ga",
                                lora_ga_config=lorakit.LoraGAConfig())
    lorakit.preprocess_loraga(model, config, _train_step(model, "llama"))
    with pytest.raises(ValueError, match="lora_ga_config must be provided"):
        lorakit.get_peft_model(model, no_ga)
    embeddings_only = lorakit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="lora_ga",
                                         lora_ga_config=lorakit.LoraGAConfig())
    with pytest.raises(ValueError, match="No supported layers found"):
        lorakit.preprocess_loraga(build("llama", seed=0), embeddings_only, lambda: None)


def test_config_round_trips_as_peft_writes_it(tmp_path):
    config = lorakit.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=lorakit.LoraGAConfig(scale="unit"))
    config.save_pretrained(str(tmp_path))
    ref = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert ref.lora_ga_config == peft.LoraGAConfig(scale="unit")
    ref.save_pretrained(str(tmp_path / "ref"))
    assert lorakit.LoraConfig.from_pretrained(str(tmp_path / "ref")).lora_ga_config == lorakit.LoraGAConfig(scale="unit")


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bfloat16_base_matches_peft(autocast_adapter_dtype):
    """A, B are rounded to the base dtype before W_res = W − s·B A (PEFT's order), with or without autocast."""
    states = []
    for lib in (peft, lorakit):
        model = build("llama", seed=0).to(torch.bfloat16)
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="lora_ga",
                                lora_ga_config=lib.LoraGAConfig())
        lib.preprocess_loraga(model, config, _train_step(model, "llama"))
        torch.manual_seed(11)
        wrapped = lib.get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
        states.append({k: v.float() for k, v in wrapped.state_dict().items()})
        assert wrapped.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == \
            (torch.float32 if autocast_adapter_dtype else torch.bfloat16)
    torch.testing.assert_close(states[1], states[0], atol=1e-5, rtol=1e-5)
