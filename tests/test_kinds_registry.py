"""Adding a base-layer kind or an init method is one registry entry: no other file of lorakit changes.

A toy layer class defined here, ``ScaledInOut``, computes y = c · x W + b with W stored (in, out) and a fixed
gain c. Its Kind says: ΔW in W's layout is (B A)ᵀ and the branch is c · B A x, so that

    forward:  y' = c · x (W + s·ΔW) + b = base(x) + s · c · B A x        (what the branch adds)
    merge:    W ← W + s·(B A)ᵀ gives the same y' with the branch off.

The tests register it, run get_peft_model / forward / merge / save / load on it, and take it out again. The
same for a toy init: a residual method that moves W's first r columns into the adapter.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.init_registry import INITS, named_inits
from lorakit.inits import InitRequest, InitResult, register_init
from lorakit.kinds import KINDS, Kind, find_kind, register_kind

GAIN = 3.0


class ScaledInOut(nn.Module):
    """y = c · x W + b, W (in, out): a layer type lorakit knows nothing about."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return GAIN * x @ self.weight + self.bias


def _factors(m: ScaledInOut, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
    in_features, out_features = m.weight.shape
    return nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features, bias=lora_bias)


TOY_KIND = Kind(
    name="ScaledInOut",
    features=lambda m: (m.weight.shape[0], m.weight.shape[1]),
    make_factors=_factors,
    branch=lambda m, x, A, B: GAIN * B(A(x)),
    delta_weight=lambda m, A, B: (B @ A).T,  # (in, out), W's own layout
    weight_is_in_out=True,
    matrix=lambda m: m.weight.T,  # (out, in)
    set_matrix=lambda m, M: m.weight.copy_(M.T),
    linear_like=True,  # "all-linear" selects it
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.toy = ScaledInOut(6, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.toy(x))


@pytest.fixture
def toy_kind():
    register_kind(ScaledInOut, TOY_KIND)
    yield TOY_KIND
    KINDS.pop(ScaledInOut)


def _model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def test_a_registered_kind_gets_lora_forward_merge_save_and_load(toy_kind, tmp_path):
    x = torch.randn(2, 3, 6)
    model = get_peft_model(_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["toy"], init_lora_weights=False))
    layer = model.base_model.model.toy
    assert layer.kind is toy_kind and repr(layer).startswith("lora.ScaledInOut(")
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    with torch.no_grad():
        expected_toy = GAIN * x @ W + b + s * GAIN * (x @ A.T @ B.T)  # base(x) + s · c · B A x
        expected = model.base_model.model.head(expected_toy)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x), model.base_model.model.head(GAIN * x @ W + b))  # the branch adds

    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(_model(), str(tmp_path)).eval()  # same seed: same base weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)

    merged = model.merge_and_unload()
    assert type(merged.toy) is ScaledInOut
    torch.testing.assert_close(merged.toy.weight.detach(), W + s * (B @ A).T.detach(), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_a_registered_kinds_facts_are_read_from_its_entry(toy_kind):
    model = get_peft_model(_model(), LoraConfig(r=2, target_modules="all-linear"))
    assert find_kind(model.base_model.model.toy.base_layer) is toy_kind  # linear_like: "all-linear" picks it
    assert not toy_kind.fused  # its branch is not B(A(x)): ops.py's fused kernels must not run it
    with pytest.raises(ValueError, match="ScaledInOut does not support DoRA"):  # Kind.dora is None
        get_peft_model(_model(), LoraConfig(r=2, target_modules=["toy"], use_dora=True))


def test_an_unregistered_layer_type_is_refused():
    with pytest.raises(ValueError, match="unsupported type ScaledInOut"):
        get_peft_model(_model(), LoraConfig(r=2, target_modules=["toy"]))


# ---- a toy init: W's first r columns move into the adapter, W_res = W − s·B A ------------------------------
def _first_columns(request: InitRequest) -> InitResult:
    """B = W[:, :r] / s (out, r), A = I[:r] (r, in): s·B A holds W's first r columns, W_res the rest."""
    W = request.weight
    assert W is not None
    A = torch.eye(request.r, W.shape[1])
    B = W[:, : request.r] / request.scaling
    return InitResult(A=A, B=B, base_weight=W - request.scaling * B @ A)


@pytest.fixture
def toy_init():
    register_init("first_columns", needs_weight=True, residual=True, exact=True, repeatable=False)(_first_columns)
    yield INITS["first_columns"]
    INITS.pop("first_columns")


def test_a_registered_init_is_accepted_by_the_config_and_run_by_the_layer(toy_init, tmp_path):
    assert "first_columns" in named_inits() and toy_init.residual and toy_init.needs_weight
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5)).eval()
    W = base[0].weight.detach().clone()
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = base(x)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights="first_columns")
    model = get_peft_model(base, config)
    layer = model.base_model.model[0]
    s = layer.scaling["default"]
    torch.testing.assert_close(layer.lora_A["default"].weight.detach(), torch.eye(2, 6))
    torch.testing.assert_close(layer.lora_B["default"].weight.detach(), W[:, :2] / s)
    torch.testing.assert_close(layer.base_layer.weight[:, :2].detach(), torch.zeros(5, 2), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)  # residual: the model is unchanged
    model.save_pretrained(str(tmp_path))
    assert lorakit.LoraConfig.from_pretrained(str(tmp_path)).init_method.name == "first_columns"


def test_an_unregistered_init_name_is_refused():
    with pytest.raises(ValueError, match="invalid init_lora_weights"):
        LoraConfig(init_lora_weights="first_columns")
