"""MonteCLoRA (monteclora_config=MontecloraConfig(...)) against the real peft 0.21.2, plus its invariants.

The same seeded model is wrapped by peft and by lorakit and PEFT's (perturbed) adapter is copied into lorakit.
Eval mode is plain LoRA and must agree to 1e-5. Training draws noise: PEFT's pre-drawn noise samples are
copied into lorakit's samplers, so training outputs, the variational loss and gradients can be compared
exactly too; the noise itself is checked against its distributions, and the formulas against float64 math.
"""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from models import build, example_inputs
from variant_parity import assert_merge_matches_peft, outputs, perturb_trainable
from safetensors.torch import load_file

import lorakit
from lorakit.variants.monteclora import MontecloraSampler

TOL = dict(atol=1e-5, rtol=1e-5)

# (id, model, LoraConfig kwargs, MontecloraConfig kwargs)
CASES = [
    ("llama-dropout-entropy", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_dropout=0.1),
     dict(num_samples=3, buffer_size=4, use_entropy=True, sample_scaler=0.05)),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn"], r=4), dict(num_samples=2, buffer_size=3)),
    ("mlp-rslora", "mlp", dict(target_modules=["lin1", "lin2"], r=6, use_rslora=True),
     dict(num_samples=4, buffer_size=5, sample_scaler=0.1, kl_loss_weight=0.01)),
]
CASE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _config(lib, kwargs: dict, mc: dict):
    return lib.LoraConfig(lora_alpha=8, monteclora_config=lib.MontecloraConfig(**mc), **copy.deepcopy(kwargs))


def _samplers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "MontecloraSampler"}


def _copy_noise(ref, ours) -> None:
    """Give each lorakit sampler the noise samples PEFT's sampler will use next, in the same order."""
    for name, sampler in _samplers(ref).items():
        pending = sampler.sampler.buffer[sampler.sampler.index:]
        ours.get_submodule(name).noise = tuple(torch.stack([s[k] for s in pending])
                                               for k in ("z_mvn", "z_wishart", "z_dirichlet"))
        ours.get_submodule(name).index = 0


def _pair(model_name: str, kwargs: dict, mc: dict):
    """peft's and lorakit's MonteCLoRA models on the same base; PEFT's perturbed adapter copied into lorakit."""
    ref, ours = (lib.get_peft_model(build(model_name, seed=0), _config(lib, kwargs, mc)) for lib in (peft, lorakit))
    perturb_trainable(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("model_name, kwargs, mc", CASE_PARAMS)
def test_keys_and_eval_outputs_match_peft(model_name, kwargs, mc):
    ref, ours = _pair(model_name, kwargs, mc)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}
    assert all(isinstance(m, MontecloraSampler) for m in _samplers(ours).values()) and _samplers(ours)
    inputs = example_inputs(model_name)
    ref.eval(), ours.eval()
    torch.testing.assert_close(outputs(ours, inputs), outputs(ref, inputs), **TOL)
    assert ours._get_monteclora_loss() == 0.0 == ref._get_monteclora_loss()  # eval mode: no variational loss
    assert all(s.noise is None for s in _samplers(ours).values())  # inference never draws noise


@pytest.mark.parametrize("model_name, kwargs, mc", CASE_PARAMS)
def test_training_steps_with_peft_noise_match_peft(model_name, kwargs, mc):
    ref, ours = _pair(model_name, kwargs, mc)
    _copy_noise(ref, ours)
    inputs = example_inputs(model_name)
    ref.train(), ours.train()
    for step in range(2):  # two samples of the buffer, the sampled Σ and w of step 0 feed step 1's loss
        losses = []
        for model in (ref, ours):
            model.zero_grad()
            torch.manual_seed(3 + step)  # same dropout masks
            out = outputs(model, inputs)
            variational = model._get_monteclora_loss()
            (out.square().mean() + variational).backward()
            losses.append((out, variational))
        torch.testing.assert_close(losses[1][0], losses[0][0], **TOL)
        torch.testing.assert_close(losses[1][1], losses[0][1], **TOL)
        grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        assert any("std_prior" in n for n in grads) and all(g is not None for g in grads.values())
        torch.testing.assert_close({n: p.grad for n, p in ours.named_parameters() if p.requires_grad}, grads,
                                   **TOL)
        torch.testing.assert_close({k: v for k, v in ours.state_dict().items() if "monteclora" in k},
                                   {k: v for k, v in ref.state_dict().items() if "monteclora" in k}, **TOL)


def test_sampled_average_formula_in_float64():
    ref, ours = _pair(*CASES[2][1:])
    layer = ours.get_submodule("base_model.model.lin1")
    sampler = layer.lora_monteclora_sampler["default"]
    sampler.draw_noise()
    z, z_w, z_d = (t[0].double() for t in sampler.noise)
    sigma = sampler.std_prior.detach().double()
    pi = sampler.expert_weights_prior.detach().double()
    n, eps = pi.numel(), 0.1
    var = (torch.exp(2 * sigma) * torch.diagonal(z_w)).clamp_min(1e-3)
    E = eps * z * var.sqrt()  # (n, in, r)
    alpha = torch.exp(pi)
    d = (1 / alpha) * (1 - 2 / n) + (1 / alpha).sum() / n**2
    w = torch.softmax(torch.sqrt(d + 1e-6) * z_d + torch.log(alpha) - torch.log(alpha).mean(), dim=0)
    A, B = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    A_avg = (w[:, None, None] * (A.T + E)).sum(0).T  # (r, in)
    x = torch.randn(7, layer.in_features)
    layer.train()
    y = layer(x)
    expected = layer.base_layer(x).double() + layer.scaling["default"] * x.double() @ A_avg.T @ B.T
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler.gaussian_var_prior.double(), torch.diag(var), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sampler.expert_weights.double(), w, atol=1e-6, rtol=1e-5)


def test_variational_loss_formula_in_float64():
    _, ours = _pair(*CASES[0][1:])
    ours.train()
    outputs(ours, example_inputs("llama"))  # samples Σ and w
    total = 0.0
    samplers = _samplers(ours).values()
    for sampler in samplers:
        a = torch.exp(sampler.expert_weights_prior.detach().double())
        a0 = torch.full_like(a, 0.1)
        v = torch.exp(2 * sampler.std_prior.detach().double())
        Sigma = torch.diagonal(sampler.gaussian_var_prior.detach().double()).clamp_min(1e-6)
        r, n = v.numel(), a.numel()
        kl_d = (math.lgamma(a.sum()) - math.lgamma(a0.sum()) + sum(math.lgamma(x) - math.lgamma(y) for x, y in
                zip(a.tolist(), a0.tolist())) + float(((a - a0) * (torch.digamma(a) - torch.digamma(a.sum()))).sum()))
        kl_w = 0.5 * (-r * float(torch.log(v).sum()) + r * float(v.sum()) - r * r)
        kl_n = n * 0.5 * (float(Sigma.sum()) - float(torch.log(Sigma).sum()) - r)
        entropy = float(sampler.expert_weights.detach().double().square().sum())  # use_entropy=True
        total += 1e-5 * (kl_d + kl_w + kl_n) + entropy
    expected = total / len(samplers)
    assert abs(float(ours._get_monteclora_loss()) - expected) <= 1e-5 * max(1.0, abs(expected))
    assert float(ours._get_monteclora_loss("default")) == float(ours._get_monteclora_loss())
    assert ours._get_monteclora_loss(["missing"]) == 0.0


def test_noise_follows_its_distributions_and_refills():
    sampler = MontecloraSampler(3, 4, lorakit.MontecloraConfig(num_samples=5, buffer_size=400))
    torch.manual_seed(0)
    sampler.draw_noise()
    z, z_w, z_d = sampler.noise
    assert z.shape == (400, 5, 3, 4) and z_w.shape == (400, 4, 4) and z_d.shape == (400, 5)
    for normal in (z, z_d):  # N(0, 1): mean within 5 standard errors, variance within 10%
        assert abs(float(normal.mean())) < 5 / math.sqrt(normal.numel()) and abs(float(normal.var()) - 1) < 0.1
    torch.testing.assert_close(z_w, z_w.transpose(1, 2))  # symmetric, positive semi-definite up to rounding
    eigenvalues = torch.linalg.eigvalsh(z_w.double())
    assert bool((eigenvalues >= -1e-5 * eigenvalues[:, -1:]).all())
    diag = torch.diagonal(z_w, dim1=1, dim2=2)  # Wishart(df = r = 4, I): diagonal ~ χ²(4), mean 4, var 8
    assert abs(float(diag.mean()) - 4) < 5 * math.sqrt(8 / diag.numel())
    first = [t.clone() for t in sampler.noise]
    sampler.train()
    for _ in range(400):
        sampler()
    assert sampler.index == 400 and all(torch.equal(a, b) for a, b in zip(first, sampler.noise))
    sampler()  # used up: a new buffer is drawn
    assert sampler.index == 1 and not torch.equal(first[0], sampler.noise[0])
    torch.testing.assert_close(sampler.expert_weights.sum(), torch.tensor(1.0))
    assert bool((sampler.expert_weights > 0).all())


def test_zero_sample_scaler_makes_training_equal_to_eval():
    _, ours = _pair("mlp", CASES[2][2], dict(num_samples=4, buffer_size=2, sample_scaler=0.0))
    inputs = example_inputs("mlp")
    eval_out = outputs(ours.eval(), inputs)
    torch.testing.assert_close(outputs(ours.train(), inputs), eval_out, atol=1e-6, rtol=1e-6)  # Σ w_k = 1
    _, noisy = _pair("mlp", CASES[2][2], dict(num_samples=4, buffer_size=2, sample_scaler=0.5))
    noisy.train()
    first, second = outputs(noisy, inputs), outputs(noisy, inputs)
    assert not torch.allclose(first, second, atol=1e-4)  # each training step samples anew


@pytest.mark.parametrize("model_name, kwargs, mc", CASE_PARAMS)
def test_merge_and_unmerge_match_peft(model_name, kwargs, mc):
    ref, ours = _pair(model_name, kwargs, mc)
    assert_merge_matches_peft(ref, ours, example_inputs(model_name), TOL)


@pytest.mark.parametrize("model_name, kwargs, mc", CASE_PARAMS)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load_both_ways_with_peft(model_name, kwargs, mc, low_cpu_mem_usage, tmp_path):
    ref, ours = _pair(model_name, kwargs, mc)
    inputs = example_inputs(model_name)
    expected = outputs(ref.eval(), inputs)
    ref.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "ours")
    ref_file, ours_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    torch.testing.assert_close(ours_file, ref_file, atol=0, rtol=0)
    assert lorakit.LoraConfig.from_pretrained(tmp_path / "peft").monteclora_config == lorakit.MontecloraConfig(**mc)
    loaded = lorakit.PeftModel.from_pretrained(build(model_name, seed=0), tmp_path / "peft",
                                               low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(outputs(loaded.eval(), inputs), expected, **TOL)
    assert {n for n, _ in loaded.named_buffers() if "monteclora" in n} == \
        {n for n, _ in ours.named_buffers() if "monteclora" in n}  # Σ and w stay buffers
    torch.testing.assert_close({k: v for k, v in loaded.state_dict().items() if "monteclora" in k},
                               {k: v for k, v in ref.state_dict().items() if "monteclora" in k}, atol=0, rtol=0)
    back = peft.PeftModel.from_pretrained(build(model_name, seed=0), tmp_path / "ours")
    torch.testing.assert_close(outputs(back.eval(), inputs), expected, **TOL)


@pytest.mark.parametrize("targets", [["emb"], ["conv"]], ids=["embedding", "conv2d"])
def test_unsupported_targets_are_refused_like_peft(targets):
    for lib in (peft, lorakit):
        with pytest.raises(ValueError, match=r"Invalid or unsupported variant combination: \('monteclora_config',\)"):
            lib.get_peft_model(build("mlp", seed=0), _config(lib, dict(target_modules=targets, r=2), {}))


def test_config_defaults_validation_and_json_round_trip(tmp_path):
    assert lorakit.MontecloraConfig() == lorakit.MontecloraConfig(
        num_samples=8, use_entropy=False, dirichlet_prior=0.1, sample_scaler=1e-4, kl_loss_weight=1e-5,
        buffer_size=150)
    for name in ("num_samples", "dirichlet_prior", "buffer_size"):
        with pytest.raises(ValueError, match=f"`{name}` must be greater than 0."):
            lorakit.MontecloraConfig(**{name: 0})
    config = lorakit.LoraConfig(monteclora_config={"num_samples": 2})
    assert config.monteclora_config == lorakit.MontecloraConfig(num_samples=2)
    config.save_pretrained(tmp_path)
    assert peft.LoraConfig.from_pretrained(tmp_path).monteclora_config == peft.MontecloraConfig(num_samples=2)


def test_low_cpu_mem_usage_load_keeps_sampler_buffers_as_buffers():
    config = _config(lorakit, dict(target_modules=["lin1"], r=4), dict(num_samples=2, buffer_size=2))
    source = lorakit.get_peft_model(build("mlp", seed=0), copy.deepcopy(config))
    state = lorakit.get_peft_model_state_dict(source)
    model = lorakit.get_peft_model(build("mlp", seed=0), copy.deepcopy(config))
    model.add_adapter("b", copy.deepcopy(config), low_cpu_mem_usage=True)  # the adapter's tensors are empty (meta)
    sampler = model.get_submodule("base_model.model.lin1.lora_monteclora_sampler.b")
    assert sampler.gaussian_var_prior.is_meta
    lorakit.set_peft_model_state_dict(model, state, adapter_name="b", low_cpu_mem_usage=True)
    assert {n for n, _ in sampler.named_buffers()} == {"gaussian_var_prior", "expert_weights"}
    assert {n for n, _ in sampler.named_parameters()} == {"std_prior", "expert_weights_prior"}
    loaded = {k: v for k, v in sampler.state_dict().items()}
    expected = source.get_submodule("base_model.model.lin1.lora_monteclora_sampler.default").state_dict()
    torch.testing.assert_close(loaded, dict(expected), atol=0, rtol=0)
