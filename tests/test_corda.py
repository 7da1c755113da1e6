"""CorDA (arXiv:2406.05223): ``preprocess_corda`` + ``init_lora_weights="corda"`` against PEFT 0.21.2.

* invariant: W_res + s·B A == W on every target, and the adapted model's output at init equals the base's;
* "ipm" keeps the largest covariance-weighted singular triplets, "kpm" the smallest (of one spectrum);
* parity with PEFT's CorDA on a tiny Llama (B A and W_res, sign-invariant by construction);
* cache_file / covariance_file round trips, the error without preprocess_corda, and the
  ``path_initial_model_for_weight_conversion`` save path (loads in PEFT and lorakit on the original base).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import CordaConfig, LoraConfig, get_peft_model, preprocess_corda

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (1, 16), generator=generator) for _ in range(4)]  # PEFT's hook wants batch 1


def run_on(model, data=None):
    data = batches() if data is None else data
    return lambda: [model(input_ids=ids) for ids in data]


def corda_config(library=lorakit, method="ipm", **kw):
    if library is peft:
        from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                               corda_config=PeftCordaConfig(corda_method=method, **kw))
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method=method, **kw))


def factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{short name: (B A, W_res, s)} of every adapted layer."""
    return {name.split("model.model.")[-1]: (m.lora_B["default"].weight @ m.lora_A["default"].weight,
                                             m.base_layer.weight.detach().clone(), m.scaling["default"])
            for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def corda_model(method="ipm", **kw):
    model = tiny_llama()
    config = corda_config(method=method, **kw)
    preprocess_corda(model, config, run_model=run_on(model))
    return get_peft_model(model, config)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_residual_plus_adapter_is_base(method):
    base = tiny_llama()
    model = corda_model(method)
    weights = dict(base.named_parameters())
    got = factors(model)
    assert len(got) == 2 * len(TARGETS)
    for name, (BA, W_res, s) in got.items():
        torch.testing.assert_close(W_res + s * BA, weights[name + ".weight"], atol=1e-5, rtol=0)
        assert BA.abs().max() > 1e-3  # a real, non-zero adapter
    ids = batches()[0]
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert not any(hasattr(m, "eigens") for m in model.modules())  # used once, then dropped (as PEFT)


def test_ipm_and_kpm_take_opposite_ends_of_one_spectrum():
    model = tiny_llama()
    linear = model.model.layers[0].self_attn.q_proj  # (32, 32): full rank r = 32 gives the whole spectrum
    full = dataclasses.replace(corda_config(), r=32, target_modules=["layers.0.self_attn.q_proj"])
    preprocess_corda(model, full, run_model=run_on(model))
    whole = linear.eigens
    U, S, V = whole.U_WC.double(), whole.S_WC.double(), whole.V_WC.double()
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, linear.weight.double(), atol=1e-5, rtol=0)  # W = U S Vᵀ
    assert torch.all(S[:-1] >= S[1:])
    for method, expected in (("ipm", S[:4]), ("kpm", S[-4:])):
        config = dataclasses.replace(full, r=4, corda_config=CordaConfig(corda_method=method))
        preprocess_corda(model, config, run_model=run_on(model))
        torch.testing.assert_close(linear.eigens.S_WC.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def peft_corda():
    if "attr" not in sys.modules:  # peft's corda.py imports attrs only for a plain dataclass decorator
        try:
            import attr  # noqa: F401
        except ImportError:
            sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
    return peft_preprocess_corda


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_parity_with_peft(method, peft_corda):
    reference = tiny_llama()
    config = corda_config(peft, method)
    peft_corda(reference, config, run_model=run_on(reference))
    expected = factors(peft.get_peft_model(reference, config))
    got = factors(corda_model(method))
    assert got.keys() == expected.keys()
    for name, (BA, W_res, s) in got.items():
        torch.testing.assert_close(BA, expected[name][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(W_res, expected[name][1], atol=1e-4, rtol=0)
        assert s == expected[name][2]


def test_cache_and_covariance_files(tmp_path):
    files = {"cache_file": str(tmp_path / "c" / "cache.pt"), "covariance_file": str(tmp_path / "v" / "cov.pt")}
    first = factors(corda_model(**files))
    assert (tmp_path / "c" / "cache.pt").exists() and (tmp_path / "v" / "cov.pt").exists()
    model = tiny_llama()
    config = corda_config(**files)
    preprocess_corda(model, config)  # from the cache: no run_model needed
    again = factors(get_peft_model(model, config))
    only_covariance = tiny_llama()
    preprocess_corda(only_covariance, corda_config(covariance_file=files["covariance_file"]))
    from_covariance = factors(get_peft_model(only_covariance, corda_config()))
    for name, (BA, W_res, _) in first.items():
        for other in (again, from_covariance):
            torch.testing.assert_close(other[name][0], BA, atol=1e-6, rtol=0)
            torch.testing.assert_close(other[name][1], W_res, atol=1e-6, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="preprocess_corda"):
        get_peft_model(tiny_llama(), corda_config())
    with pytest.raises(ValueError, match="run_model"):
        preprocess_corda(tiny_llama(), corda_config())
    model = tiny_llama()
    preprocess_corda(model, corda_config(), run_model=run_on(model))
    with pytest.raises(ValueError, match="does not fit"):  # preprocessed for r=4, adapted with r=2
        get_peft_model(model, dataclasses.replace(corda_config(), r=2))


def test_conversion_to_plain_lora_loads_on_the_original_base(tmp_path):
    model = corda_model("ipm")
    model.save_pretrained(str(tmp_path / "init"))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for ids in batches()[:2]:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ids = batches()[3]
    trained = model(input_ids=ids).logits.detach()
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    written = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8
    for library in (peft, lorakit):
        loaded = library.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain"))
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=1e-4, rtol=1e-4)
