"""LoRA on nn.Parameters (``target_parameters``, kinds_param.py) against the real peft 0.21.2 and the formula.

    2-D  W' = W + s·B A            3-D  W'[e] = W[e] + s·B_e A_e   ((B_e A_e)ᵀ for is_transposed experts)

Each case builds one seeded model, wraps a copy with peft and one with lorakit, checks the state-dict keys
are the same, copies peft's (non-zero) adapter into lorakit with ``load_state_dict(strict=True)`` and then
compares outputs and every adapter gradient (fp32, 1e-5), merges, unmerges and files both ways. The MoE
models are transformers 5.23's tiny Qwen3-MoE, Mixtral and GPT-OSS (whose experts are stored (E, in, out)),
run with the eager experts loop so that the CPU can run them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import peft
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import lorakit
from lorakit.layer import LoraLayer

TOL = dict(atol=1e-5, rtol=1e-5)


class LinearUsingParameter(nn.Module):
    """y = x W + b with W stored (in, out) and no nn.Linear inside (PEFT's test model)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class ParamMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.lin1 = nn.Linear(20, 6)
        self.lin2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


MOE_SIZES = dict(hidden_size=16, intermediate_size=12, moe_intermediate_size=8, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_local_experts=4,
                 num_experts_per_tok=2, vocab_size=50, head_dim=8)


def moe(model_type: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        config = AutoConfig.for_model(model_type, **MOE_SIZES)
        return AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    return make


def mlp_input() -> dict:
    return {"x": torch.randn(5, 10, generator=torch.Generator().manual_seed(1))}


def lm_input() -> dict:
    return {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# name -> (model factory, inputs, LoraConfig arguments)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict], dict]] = {
    "mlp-own-param": (ParamMLP, mlp_input, dict(target_parameters=["lin0.weight"])),
    "mlp-linear-weight": (ParamMLP, mlp_input, dict(target_parameters=["lin1.weight", "lin2.weight"])),
    "mlp-with-modules": (ParamMLP, mlp_input, dict(target_modules=["lin1"], target_parameters=["lin0.weight"])),
    "mlp-rank-pattern": (ParamMLP, mlp_input, dict(target_parameters=["lin0.weight", "lin1.weight"],
                                                   rank_pattern={"lin1.weight": 3}, alpha_pattern={"lin0.weight": 5})),
    "qwen3-moe": (moe("qwen3_moe"), lm_input, dict(target_parameters=EXPERTS)),
    "qwen3-moe-with-q": (moe("qwen3_moe"), lm_input, dict(target_parameters=EXPERTS[::-1], target_modules=["q_proj"])),
    "mixtral": (moe("mixtral"), lm_input, dict(target_parameters=["experts.down_proj"], use_rslora=True)),
    "gpt-oss": (moe("gpt_oss"), lm_input, dict(target_parameters=EXPERTS, target_modules=["o_proj"])),
}


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _pair(case: str, **extra: object) -> tuple[nn.Module, nn.Module, dict]:
    """(peft model, lorakit model with peft's adapter copied in, inputs), both in eval mode."""
    make, inputs, arguments = CASES[case]
    torch.manual_seed(0)
    base = make()
    arguments = {"r": 2, "init_lora_weights": False, **arguments, **extra}
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**arguments)).eval()
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**arguments)).eval()
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, inputs()


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_peft(case: str) -> None:
    ref, ours, inputs = _pair(case)
    y_ref, y_ours = _output(ref, inputs), _output(ours, inputs)
    torch.testing.assert_close(y_ours, y_ref, **TOL)
    (y_ref.square().sum()).backward()
    (y_ours.square().sum()).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
    assert sorted(ref_grads) == sorted(our_grads) and ref_grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(our_grads[name], grad, **TOL, msg=name)
    assert all(grad.abs().sum() > 0 for grad in our_grads.values())  # every factor reaches the output
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(_output(ours, inputs), _output(ours.get_base_model(), inputs), **TOL)


def _param_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer) and m.kind.name == "ParamWrapper"]


def test_formula_three_d_and_transposed() -> None:
    """ΔW[e] = B_e A_e, with A_e = rows e·r.. of A and B_e = B.reshape(out, r, E)[:, :, e]; transposed for GPT-OSS."""
    for case in ("qwen3-moe", "gpt-oss"):
        _, ours, _ = _pair(case)
        layer = next(m for m in _param_layers(ours) if m.parameter_name == "down_proj")
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        W = getattr(layer.base_layer if not isinstance(layer.base_layer, LoraLayer) else layer.base_layer.base_layer,
                    "down_proj")
        E, r = W.shape[0], 2
        expected = torch.stack([B[:, e::E] @ A[e * r:(e + 1) * r] for e in range(E)])
        if case == "gpt-oss":
            expected = expected.transpose(1, 2)
        torch.testing.assert_close(layer.get_delta_weight("default"), expected * layer.scaling["default"], **TOL)


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_unload(case: str) -> None:
    ref, ours, inputs = _pair(case)
    with torch.no_grad():
        y = _output(ours, inputs)
        before = {n: p.clone() for n, p in ours.named_parameters() if "lora_" not in n}
        ours.merge_adapter()
        assert all(layer.merged for layer in _param_layers(ours))
        torch.testing.assert_close(_output(ours, inputs), y, **TOL)
        changed = [n for n, p in ours.named_parameters() if n in before and not torch.equal(p, before[n])]
        assert changed  # the targeted parameters hold W + s·ΔW now
        ours.unmerge_adapter()
        for name, param in ours.named_parameters():
            if name in before:
                torch.testing.assert_close(param, before[name], **TOL, msg=name)
        merged_ref, merged_ours = ref.merge_and_unload(), ours.merge_and_unload()
        assert not any(isinstance(m, LoraLayer) for m in merged_ours.modules())
        torch.testing.assert_close(_output(merged_ours, inputs), _output(merged_ref, inputs), **TOL)
        torch.testing.assert_close(_output(merged_ours, inputs), y, **TOL)


@pytest.mark.parametrize("case", ["mlp-with-modules", "qwen3-moe-with-q", "gpt-oss"])
@pytest.mark.parametrize("writer", ["peft", "lorakit"])
def test_files_both_ways(case: str, writer: str, tmp_path) -> None:
    ref, ours, inputs = _pair(case)
    saver, make, _ = (ref, lorakit, ours) if writer == "peft" else (ours, peft, ref)
    saver.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(CASES[case][2]["target_parameters"])
    torch.manual_seed(0)
    loaded = make.PeftModel.from_pretrained(CASES[case][0](), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded, inputs), _output(saver, inputs), **TOL)
    assert sorted(peft.get_peft_model_state_dict(ref)) == sorted(lorakit.get_peft_model_state_dict(ours))


def test_second_adapter_same_parameters_matches_peft() -> None:
    ref, ours, inputs = _pair("qwen3-moe")
    for model, library in ((ref, peft), (ours, lorakit)):
        model.add_adapter("other", library.LoraConfig(r=3, target_parameters=EXPERTS, init_lora_weights=False))
    ours.load_state_dict(ref.state_dict(), strict=True)
    for name in ("other", "default"):
        ref.set_adapter(name)
        ours.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(_output(ours, inputs), _output(ref, inputs), **TOL)


def test_nesting_and_repr_follow_peft() -> None:
    """The first parameter in the module's own order is innermost, whatever the list's order; repr as PEFT's."""
    ref, ours, _ = _pair("qwen3-moe-with-q")
    for model in (ref, ours):
        experts = model.base_model.model.model.layers[0].mlp.experts
        assert (experts.parameter_name, experts.base_layer.parameter_name) == ("down_proj", "gate_up_proj")
    assert repr(ours.base_model.model.model.layers[0].mlp) == repr(ref.base_model.model.model.layers[0].mlp)
    assert ours.targeted_parameter_names == ref.targeted_parameter_names
    assert ours.targeted_module_names == ref.targeted_module_names


REFUSED = {  # LoraConfig arguments -> the sentence PEFT 0.21.2 raises with (lorakit adds its explanation after it)
    "dropout": (dict(target_parameters=["lin0.weight"], lora_dropout=0.1), "lora_dropout != 0"),
    "dora": (dict(target_parameters=["lin0.weight"], use_dora=True), "use_dora=True"),
    "lora-bias": (dict(target_parameters=["lin0.weight"], lora_bias=True), "lora_bias=True"),
    "one-d": (dict(target_parameters=["lin0.bias"]), "1 dimensional Parameter, but only 2d and 3d"),
    "both": (dict(target_parameters=["lin1.weight"], target_modules=["lin1"]), "Trying to wrap an `nn.Parameter`"),
    "nothing": (dict(target_parameters=["nothing"]), "no `target_parameters` found"),
    "no-dot-suffix": (dict(target_parameters=["eight"]), "no `target_parameters` found"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_as_peft_refuses(case: str) -> None:
    arguments, sentence = REFUSED[case]
    for library in (peft, lorakit):
        with pytest.raises(ValueError, match=sentence.replace("(", r"\(")):
            library.get_peft_model(ParamMLP(), library.LoraConfig(**arguments))


def test_refusals_of_adapters_batches_and_types() -> None:
    ref, ours, inputs = _pair("mlp-own-param")
    for model, library in ((ref, peft), (ours, lorakit)):
        with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
            model.add_adapter("other", library.LoraConfig(target_parameters=["lin1.weight"]))
        with pytest.raises(ValueError, match="does not support mixed adapter batches"):
            model(**inputs, adapter_names=["default"] * 5)
        with pytest.raises(TypeError, match="`target_parameters` must be a list of strings or None"):
            library.LoraConfig(target_parameters="lin0.weight")


def test_unmatched_modules_only_warn_when_parameters_match() -> None:
    """target_modules that match nothing next to target_parameters that match: PEFT warns and goes on."""
    with pytest.warns(UserWarning, match="no module was matched"):
        model = lorakit.get_peft_model(ParamMLP(), lorakit.LoraConfig(target_modules=["nothing"],
                                                                       target_parameters=["lin0.weight"]))
    assert model.targeted_parameter_names == ["lin0.weight"] and model.targeted_module_names == []


@pytest.mark.parametrize("dtype, autocast", [(torch.float64, True), (torch.bfloat16, True), (torch.float16, False)])
def test_factor_dtype_follows_peft(dtype: torch.dtype, autocast: bool) -> None:
    """fp64 experts get fp64 factors, bf16 ones fp32 (autocast_adapter_dtype) or their own dtype without it."""
    torch.manual_seed(0)
    base = moe("qwen3_moe")().to(dtype)
    dtypes = []
    for library in (peft, lorakit):
        model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(target_parameters=EXPERTS),
                                       autocast_adapter_dtype=autocast)
        dtypes.append({p.dtype for n, p in model.named_parameters() if "lora_" in n})
    assert dtypes[0] == dtypes[1] and len(dtypes[1]) == 1


def test_bf16_experts_train_float32_factors() -> None:
    """A bf16 base gets float32 factors and a bf16 output, as PEFT's autocast_adapter_dtype."""
    torch.manual_seed(0)
    base = moe("qwen3_moe")().to(torch.bfloat16)
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(target_parameters=EXPERTS, init_lora_weights=False))
    layer = _param_layers(ours)[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    y = _output(ours, lm_input())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("init", [True, False, "gaussian"])
@pytest.mark.parametrize("case", ["mlp-own-param", "qwen3-moe", "gpt-oss"])
def test_inits_draw_their_factors(case: str, init: object) -> None:
    """Every factor is drawn (finite, bounded); True and "gaussian" start at the base output (B = 0), False not."""
    make, inputs, arguments = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=2, init_lora_weights=init,
                                                                          **arguments)).eval()
    for layer in _param_layers(ours):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.isfinite(A).all() and A.abs().max() < 10 and A.abs().max() > 0
        assert torch.isfinite(B).all() and B.abs().max() < 10
        assert (B.abs().max() > 0) == (init is False)
    with torch.no_grad():
        difference = (_output(ours, inputs()) - _output(base, inputs())).abs().max()
    assert (difference > 1e-3) if init is False else (difference == 0)


class _Shifted(nn.Module):
    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return 2 * W + 0.5


def test_parametrized_weight_gets_delta_after_the_parametrization() -> None:
    """W = f(W₀) by torch.nn.utils.parametrize: the forward uses f(W₀) + s·ΔW, as PEFT; f itself is kept."""
    torch.manual_seed(0)
    base = ParamMLP()
    torch.nn.utils.parametrize.register_parametrization(base.lin1, "weight", _Shifted())
    inputs = mlp_input()
    arguments = dict(r=2, target_parameters=["lin1.weight"], init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**arguments))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**arguments))
    ours.load_state_dict(ref.state_dict(), strict=True)
    layer = ours.base_model.model.lin1
    expected_weight = 2 * base.lin1.parametrizations.weight.original + 0.5 + layer.get_delta_weight("default")
    lin1_out = torch.nn.functional.linear(torch.relu(base.lin0(inputs["x"])), expected_weight, base.lin1.bias)
    expected = base.lin2(torch.relu(lin1_out))
    torch.testing.assert_close(_output(ours, inputs), expected, **TOL)
    torch.testing.assert_close(_output(ours, inputs), _output(ref, inputs), **TOL)
    assert len(layer.base_layer.parametrizations.weight) == 1  # the call's own step is gone again
    with pytest.raises(ValueError, match="cannot merge into a parametrized parameter"):
        ours.merge_adapter()
    torch.testing.assert_close(_output(ours.unload(), inputs), _output(base, inputs), **TOL)


class _RootParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.zeros(4, 4))
        self.lin = nn.Linear(4, 4)


def test_top_level_parameter_is_refused_as_peft() -> None:
    for library in (peft, lorakit):
        with pytest.raises(ValueError, match=r"Targeting an nn.Parameter on the top-level module is not supported"):
            library.get_peft_model(_RootParam(), library.LoraConfig(target_parameters=["param"]))


def test_unmatched_parameters_only_warn_when_modules_match() -> None:
    """Parameters that match nothing next to modules that match: PEFT warns, and its ParamWrapper-only refusals
    (lora_dropout here) do not apply, since no wrapper is built."""
    for library in (peft, lorakit):
        with pytest.warns(Warning, match="no parameter was matched"):
            model = library.get_peft_model(ParamMLP(), library.LoraConfig(target_modules=["lin1"], lora_dropout=0.1,
                                                                          target_parameters=["nothing"]))
        assert model.targeted_module_names == ["lin1"]
        assert not getattr(model, "targeted_parameter_names", [])
