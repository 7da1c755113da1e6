"""VeLoRA (velora_config=VeloraConfig(...)) against the real peft 0.21.2, plus its formula, invariants and refusals.

The same seeded model is wrapped by peft and by lorakit; PEFT's adapter is made non-zero and its whole state dict
(lora_A, lora_B and the buffer v = lora_velora_embed) is copied into lorakit with ``load_state_dict(strict=True)``.
Outputs, gradients, v after training forwards, merges and saved folders must then agree to 1e-5 (float32).
The VeLoRA gradient itself is checked against the paper's formula written out here (``expected_grad_A``).
"""

from __future__ import annotations

import copy
import json
import math
import re

import peft
import pytest
import torch
from models import build, example_inputs
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.layer import LoraLayer

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class MLP(nn.Module):
    """16 -> 32 -> 8 (16 and 32 features: divisible and non-divisible group counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _model(name: str, seed: int = 0) -> nn.Module:
    if name != "mlp":
        return build(name, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP()


def _inputs(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if name != "mlp":
        return example_inputs(name, seed=1234 + seed)
    generator = torch.Generator().manual_seed(seed)
    return {"x": (torch.randn(3, 5, 16, generator=generator) + seed).requires_grad_(True)}


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# (id, model, LoraConfig kwargs, VeloraConfig kwargs)
CASES = [
    ("mlp-random-g5-scale", "mlp", dict(target_modules=["lin0", "lin1"]),
     dict(num_groups=5, init_type="random", scale=0.5)),
    ("mlp-batch-average-g4", "mlp", dict(target_modules=["lin0", "lin1"], lora_alpha=16), dict(num_groups=4)),
    ("mlp-once-g7-rslora-lora-bias", "mlp", dict(target_modules=["lin0"], use_rslora=True, lora_bias=True),
     dict(num_groups=7, init_type="batch_average_once")),
    ("gpt2-conv1d-once-g3-dropout", "gpt2", dict(target_modules=["c_attn", "c_fc"], lora_dropout=0.1),
     dict(num_groups=3, init_type="batch_average_once", scale=2.0)),
    ("llama-defaults", "llama", dict(target_modules=LLAMA_PROJ), dict()),
]
CASE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _config(lib, kwargs: dict, velora: dict | None, **extra):
    kwargs = {"r": 4, "lora_alpha": 8, **copy.deepcopy(kwargs), **extra}
    return lib.LoraConfig(**kwargs, velora_config=None if velora is None else lib.VeloraConfig(**velora))


def _pair(model_name: str, kwargs: dict, velora: dict, dtype: torch.dtype = torch.float32, **extra):
    """The same seeded model wrapped by peft and by lorakit with VeLoRA; PEFT's non-zero adapter copied in."""
    wrapped = []
    for lib in (peft, lorakit):
        torch.manual_seed(0)
        wrapped.append(lib.get_peft_model(_model(model_name).to(dtype), _config(lib, kwargs, velora), **extra))
    ref, ours = wrapped
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in sorted(ref.named_parameters()):
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator).to(param.dtype))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _embeds(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_velora_embed" in k}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _train_steps(model: nn.Module, model_name: str, steps: int = 2) -> list[dict]:
    """Outputs, gradients (of the adapter and of a float input) and v after each of ``steps`` training forwards."""
    model.train()
    record = []
    for step in range(steps):
        inputs = _inputs(model_name, seed=step)
        torch.manual_seed(3 + step)  # same dropout masks in both libraries
        out = _output(model, inputs)
        model.zero_grad()
        out.float().square().mean().backward()
        grads = _grads(model)
        if "x" in inputs:
            grads["input"] = inputs["x"].grad
        record.append({"out": out.detach(), "grads": grads, "embeds": _embeds(model)})
    return record


# ---- against peft ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, kwargs, velora", CASE_PARAMS)
def test_state_dict_outputs_gradients_and_v_match_peft(model_name, kwargs, velora):
    ref, ours = _pair(model_name, kwargs, velora)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}
    assert _embeds(ours)  # v is in the state dict, as PEFT keeps it
    inputs = _inputs(model_name)
    ref.eval(), ours.eval()
    torch.testing.assert_close(_output(ours, inputs), _output(ref, inputs), **TOL[torch.float32])
    expected, got = _train_steps(ref, model_name), _train_steps(ours, model_name)
    for step_expected, step_got in zip(expected, got, strict=True):
        torch.testing.assert_close(step_got, step_expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)],
                         ids=["bf16-autocast", "bf16-no-autocast", "fp16-autocast"])
def test_half_precision_bases_match_peft(dtype, autocast):
    velora = dict(num_groups=5, init_type="random")
    ref, ours = _pair("mlp", dict(target_modules=["lin0", "lin1"]), velora, dtype, autocast_adapter_dtype=autocast)
    adapter_dtype = torch.float32 if autocast else dtype
    assert all(v.dtype == adapter_dtype for v in _embeds(ours).values())
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in ref.state_dict().items()}
    ref.train(), ours.train()
    results = []
    for model in (ref, ours):
        x = _inputs("mlp")["x"].detach().to(dtype).requires_grad_(True)
        out = model(x)
        out.float().square().mean().backward()
        results.append((out, _grads(model), x.grad))
    torch.testing.assert_close(results[1], results[0], **TOL[dtype])


@pytest.mark.parametrize("init_type", ["random", "batch_average"])
def test_autocast_matches_peft(init_type):
    """Under torch.autocast(bfloat16) the projection, the code c and the gradients follow PEFT's dtypes."""
    ref, ours = _pair("mlp", dict(target_modules=["lin0", "lin1"]), dict(num_groups=5, init_type=init_type))
    results = []
    for model in (ref, ours):
        model.train()
        x = _inputs("mlp")["x"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results.append((out, _grads(model), x.grad, _embeds(model)))
    assert results[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])


def test_random_v_is_a_unit_vector_drawn_in_the_base_dtype():
    model = lorakit.get_peft_model(_model("mlp").to(torch.bfloat16),
                                   _config(lorakit, dict(target_modules=["lin0"]), dict(num_groups=3, init_type="random")))
    v = model.base_model.model.lin0.lora_velora_embed["default"]
    assert v.dtype == torch.float32 and v.shape == (6,)  # D = ceil(16 / 3)
    assert torch.equal(v, v.to(torch.bfloat16).float())  # bf16 values (drawn and normalised as PEFT does)
    assert abs(torch.linalg.vector_norm(v).item() - 1) < 1e-2


@pytest.mark.parametrize("model_name, kwargs, velora", CASE_PARAMS)
def test_merge_matches_peft_and_equals_unmerged(model_name, kwargs, velora):
    ref, ours = _pair(model_name, kwargs, velora)
    inputs = _inputs(model_name)
    ref.eval(), ours.eval()
    unmerged = _output(ours, inputs)
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    ref.merge_adapter(), ours.merge_adapter()
    base = {k: v for k, v in ours.state_dict().items() if "base_layer" in k}
    torch.testing.assert_close(base, {k: v for k, v in ref.state_dict().items() if "base_layer" in k},
                               **TOL[torch.float32])
    torch.testing.assert_close(_output(ours, inputs), unmerged, **TOL[torch.float32])
    ours.unmerge_adapter()
    torch.testing.assert_close({k: v for k, v in ours.state_dict().items() if "base_layer" in k}, before,
                               **TOL[torch.float32])
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(_output(plain, inputs), unmerged, **TOL[torch.float32])


@pytest.mark.parametrize("model_name, kwargs, velora", CASE_PARAMS)
def test_save_load_both_ways_with_peft(model_name, kwargs, velora, tmp_path):
    ref, ours = _pair(model_name, kwargs, velora)
    _train_steps(ref, model_name, steps=1), _train_steps(ours, model_name, steps=1)  # v set by a batch
    inputs = _inputs(model_name)
    expected = _output(ref.eval(), inputs)
    ref.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "ours")
    ref_file, ours_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert any(k.endswith(".lora_velora_embed") for k in ref_file)
    torch.testing.assert_close(ours_file, ref_file, **TOL[torch.float32])
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text())["velora_config"] for d in ("peft", "ours")]
    assert configs[1] == configs[0]
    loaded = [lorakit.PeftModel.from_pretrained(_model(model_name), tmp_path / "peft"),
              peft.PeftModel.from_pretrained(_model(model_name), tmp_path / "ours")]
    for model in loaded:
        torch.testing.assert_close(_output(model.eval(), inputs), expected, **TOL[torch.float32])
        torch.testing.assert_close(_embeds(model), _embeds(ref), **TOL[torch.float32])
    assert loaded[0].peft_config["default"].velora_config == lorakit.VeloraConfig(**velora)


def test_low_cpu_mem_usage_load_keeps_v_a_buffer(tmp_path):
    ref, _ = _pair("mlp", dict(target_modules=["lin0"]), dict(num_groups=4, init_type="random"))
    ref.save_pretrained(tmp_path)
    model = lorakit.PeftModel.from_pretrained(_model("mlp"), tmp_path, low_cpu_mem_usage=True)
    layer = model.base_model.model.lin0
    assert "default" in layer.lora_velora_embed._buffers and not any("velora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(layer.lora_velora_embed["default"],
                               ref.base_model.model.lin0.lora_velora_embed["default"], atol=0, rtol=0)


@pytest.mark.parametrize("adapter_names", [["one", "two", "__base__"], ["two", "two", "one"]], ids=["mixed", "grouped"])
def test_mixed_batch_matches_peft(adapter_names):
    models = []
    for lib in (peft, lorakit):
        torch.manual_seed(0)
        model = lib.get_peft_model(_model("mlp"), _config(lib, dict(target_modules=["lin0", "lin1"]),
                                                           dict(num_groups=4, init_type="random"), init_lora_weights=False),
                                   adapter_name="one")
        model.add_adapter("two", _config(lib, dict(target_modules=["lin0"]), dict(num_groups=2), init_lora_weights=False))
        models.append(model)
    ref, ours = models
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _inputs("mlp")["x"].detach()
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x, adapter_names=adapter_names), ref(x, adapter_names=adapter_names),
                               **TOL[torch.float32])


# ---- the formula -----------------------------------------------------------------------------------------------
def expected_grad_A(x: torch.Tensor, grad_h: torch.Tensor, v: torch.Tensor, G: int, scale: float) -> torch.Tensor:
    """∂L/∂A = (∂L/∂h)ᵀ x̂: rows of x cut into G zero-padded sub-tokens of D = ⌈K/G⌉, x̂_tg = λ⟨x_tg, v⟩ v."""
    K = x.shape[-1]
    D = math.ceil(K / G)
    rows = torch.cat([x.reshape(-1, K), x.new_zeros(x.reshape(-1, K).shape[0], G * D - K)], dim=1)
    x_hat = torch.stack([scale * (rows[:, g * D:(g + 1) * D] @ v)[:, None] * v for g in range(G)], 1)
    return grad_h.reshape(-1, grad_h.shape[-1]).T @ x_hat.reshape(rows.shape[0], -1)[:, :K]


@pytest.mark.parametrize("num_groups, scale, init_type", [(4, 1.0, "batch_average"), (5, 0.5, "random"),
                                                          (3, 2.0, "batch_average_once")])
def test_gradients_follow_the_velora_formula(num_groups, scale, init_type):
    model = lorakit.get_peft_model(
        _model("mlp"), _config(lorakit, dict(target_modules=["lin0"]), dict(num_groups=num_groups, scale=scale,
                                                                            init_type=init_type), init_lora_weights=False))
    layer = model.base_model.model.lin0
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = _inputs("mlp")["x"]
    grad_y = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    model.train()
    out = model(x)
    out.backward(grad_y)
    v = layer.lora_velora_embed["default"]
    if init_type != "random":  # v = mean sub-token / its norm (padding included)
        D = math.ceil(16 / num_groups)
        rows = torch.cat([x.detach().reshape(-1, 16), torch.zeros(15, num_groups * D - 16)], 1)
        mean = rows.reshape(-1, D).mean(0)
        torch.testing.assert_close(v, mean / mean.norm(), **TOL[torch.float32])
    # the exact gradient of y wrt h = A x, through lin1, relu and B
    with torch.no_grad():
        h = x.detach() @ A.T
        pre = model.base_model.model.lin0.base_layer(x.detach()) + s * h @ B.T
        grad_pre = (grad_y @ model.base_model.model.lin1.weight) * (pre > 0)
        grad_h = s * grad_pre @ B
    torch.testing.assert_close(A.grad, expected_grad_A(x.detach(), grad_h, v, num_groups, scale), **TOL[torch.float32])
    torch.testing.assert_close(B.grad, s * grad_pre.reshape(-1, 32).T @ h.reshape(-1, 4), **TOL[torch.float32])
    W0 = model.base_model.model.lin0.base_layer.weight
    torch.testing.assert_close(x.grad, grad_pre @ (W0 + s * B @ A).detach(), **TOL[torch.float32])  # exact


@pytest.mark.parametrize("x_shape, out, num_groups, scale, bias", [
    ((6, 10), 4, 3, 1.0, True), ((2, 3, 16), 5, 4, 0.5, False), ((2, 2, 7), 3, 8, 2.0, True)],
    ids=["2d-padded-bias", "3d-divisible", "more-groups-than-features"])
def test_velora_linear_matches_peft_function_and_formula(x_shape, out, num_groups, scale, bias):
    """VeloraLinear: y = x Wᵀ + b exactly; ∂W from x̂, ∂x and ∂b exact; the same as PEFT's VeloraFunction."""
    from peft.tuners.lora.velora import VeloraFunction

    from lorakit.variants.velora import VeloraLinear, unit

    generator = torch.Generator().manual_seed(0)
    x, W = torch.randn(x_shape, generator=generator), torch.randn(out, x_shape[-1], generator=generator)
    b = torch.randn(out, generator=generator) if bias else None
    D = math.ceil(x_shape[-1] / num_groups)
    v = unit(torch.randn(D, generator=generator))
    grad_y = torch.randn(*x_shape[:-1], out, generator=generator)
    results = []
    for function in (VeloraFunction, VeloraLinear):
        leaves = [t.clone().requires_grad_(True) for t in (x, W) + ((b,) if bias else ())]
        y = function.apply(leaves[0], leaves[1], leaves[2] if bias else None, v, num_groups, scale)
        y.backward(grad_y)
        results.append((y, [t.grad for t in leaves]))
    torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])
    y, (grad_x, grad_W, *grad_b) = results[1]
    g = grad_y.reshape(-1, out)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b), **TOL[torch.float32])
    torch.testing.assert_close(grad_x, (g @ W).reshape(x_shape), **TOL[torch.float32])
    torch.testing.assert_close(grad_W, expected_grad_A(x, grad_y, v, num_groups, scale), **TOL[torch.float32])
    if bias:
        torch.testing.assert_close(grad_b[0], g.sum(0), **TOL[torch.float32])


def test_one_feature_per_group_gives_plain_lora_gradients():
    """D = 1 (G >= K) and λ = 1: x̂ = ⟨x, v⟩v = x for v = ±1, so VeLoRA's gradients are plain LoRA's."""
    grads = []
    for velora in (dict(num_groups=16), None):
        torch.manual_seed(0)
        model = lorakit.get_peft_model(_model("mlp"), _config(lorakit, dict(target_modules=["lin0"]), velora,
                                                              init_lora_weights=False))
        model.train()
        model(**_inputs("mlp")).square().sum().backward()
        grads.append(_grads(model))
    torch.testing.assert_close(grads[0], grads[1], **TOL[torch.float32])


def test_velora_saves_less_for_backward_than_plain_lora():
    saved = []
    for velora in (dict(num_groups=4, init_type="random"), None):
        model = lorakit.get_peft_model(nn.Sequential(nn.Linear(128, 64, bias=False)),
                                       _config(lorakit, dict(target_modules=["0"]), velora))
        model.train()
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(torch.randn(8, 4, 128)).square().mean()
        loss.backward()
        saved.append(total)
    assert saved[0] < saved[1]


# ---- the v update policy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("init_type, updates", [("batch_average", [True, True]), ("batch_average_once", [True, False]),
                                                ("random", [False, False])])
def test_v_updates_per_init_type_and_only_in_training_forwards(init_type, updates):
    model = lorakit.get_peft_model(_model("mlp"), _config(lorakit, dict(target_modules=["lin0"]),
                                                          dict(num_groups=4, init_type=init_type)))
    layer = model.base_model.model.lin0
    initial = layer.lora_velora_embed["default"].clone()
    assert layer.lora_velora_initialized["default"] is (init_type == "random")
    if init_type != "random":
        assert not initial.any()
    model.eval()
    model(**_inputs("mlp", seed=5))
    model.train()
    with torch.no_grad():
        model(**_inputs("mlp", seed=6))
    assert torch.equal(layer.lora_velora_embed["default"], initial)  # eval / no_grad forwards leave v alone
    previous = initial
    for step, updated in enumerate(updates):
        x = _inputs("mlp", seed=step)["x"].detach()
        model(x)
        v = layer.lora_velora_embed["default"]
        mean = x.reshape(-1, 4, 4).reshape(-1, 4).mean(0)
        expected = mean / mean.norm() if updated else previous
        torch.testing.assert_close(v, expected, **TOL[torch.float32])
        previous = v.clone()
    assert layer.lora_velora_initialized["default"] is True


def test_zero_mean_batch_gives_the_all_ones_direction():
    model = lorakit.get_peft_model(_model("mlp"), _config(lorakit, dict(target_modules=["lin0"]), dict(num_groups=4)))
    model.train()
    model(torch.zeros(2, 16))
    torch.testing.assert_close(model.base_model.model.lin0.lora_velora_embed["default"], torch.full((4,), 0.5))


def test_delete_adapter_removes_v_and_its_flag():
    model = lorakit.get_peft_model(_model("mlp"), _config(lorakit, dict(target_modules=["lin0"]), dict(num_groups=4)),
                                   adapter_name="a")
    model.add_adapter("b", _config(lorakit, dict(target_modules=["lin0"]), dict(num_groups=2)))
    layer = model.base_model.model.lin0
    model.delete_adapter("a")
    assert list(layer.lora_velora_embed.keys()) == ["b"] and list(layer.lora_velora_initialized) == ["b"]
    assert [k for k in model.state_dict() if "velora" in k] == ["base_model.model.lin0.lora_velora_embed.b"]


# ---- config --------------------------------------------------------------------------------------------------
def test_config_defaults_and_json_match_peft(tmp_path):
    assert lorakit.VeloraConfig().__dict__ == peft.VeloraConfig().__dict__
    config = _config(lorakit, dict(target_modules=["lin0"]), dict(num_groups=3, scale=0.25, init_type="random"))
    config.save_pretrained(tmp_path)
    by_peft = peft.LoraConfig.from_pretrained(tmp_path).velora_config
    assert isinstance(by_peft, peft.VeloraConfig) and by_peft.__dict__ == config.velora_config.__dict__
    _config(peft, dict(target_modules=["lin0"]), dict(num_groups=5)).save_pretrained(tmp_path / "peft")
    assert lorakit.LoraConfig.from_pretrained(tmp_path / "peft").velora_config == lorakit.VeloraConfig(num_groups=5)


def test_config_accepts_a_dict_and_refuses_other_types():
    config = lorakit.LoraConfig(velora_config={"num_groups": 2, "init_type": "random"})
    assert config.velora_config == lorakit.VeloraConfig(num_groups=2, init_type="random")
    for lib in (peft, lorakit):
        with pytest.raises(TypeError, match="`VeloraConfig` must be a `VeloraConfig`, a dict, or None."):
            lib.LoraConfig(velora_config="random")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_groups=0), "`num_groups` should be positive, got 0."),
    (dict(scale=0.0), "`scale` should be positive, got 0.0."),
    (dict(init_type="svd"), "Unsupported `init_type` 'svd'. Supported values are 'batch_average_once', "
                            "'batch_average', and 'random'."),
], ids=["num-groups", "scale", "init-type"])
def test_invalid_velora_config_raises_peft_sentence(kwargs, message):
    for lib in (peft, lorakit):
        with pytest.raises(ValueError, match=re.escape(message)):
            lib.VeloraConfig(**kwargs)


# ---- refusals ------------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.mha = nn.MultiheadAttention(8, 2)


@pytest.mark.parametrize("target, message", [
    ("emb", "Invalid or unsupported variant combination: ('velora_config',)"),
    ("conv", "VeLoRA does not support adapting conv layers."),
    ("mha", "MultiheadAttention does not support VeLoRA, please set `velora_config=None`."),
])
def test_other_layer_kinds_are_refused_with_peft_sentence(target, message):
    for lib in (peft, lorakit):
        with pytest.raises(ValueError, match=re.escape(message)):
            lib.get_peft_model(Mixed(), _config(lib, dict(target_modules=[target]), dict(num_groups=2)))


def test_velora_with_dora_is_refused():
    for lib in (peft, lorakit):
        with pytest.raises(ValueError):
            lib.get_peft_model(_model("mlp"), _config(lib, dict(target_modules=["lin0"]), dict(), use_dora=True))
