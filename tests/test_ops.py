"""The fused path (ops.py, dropout.py) against the reference path of the same layer, and the dropout law.

Each case builds one LoraLayer, runs it on the fused path with a seed, redraws the masks that run used
(dropout.keep_mask from the same seed, one per adapter with active dropout, in adapter order), and runs a
deep copy on the reference path (``ops.FUSED = False``: layer.py's ``_branch`` / variants.dora_reference)
with its nn.Dropout modules replaced by those masks. Output and every gradient (x, A, B, B.bias, DoRA's m)
must agree; the output dtypes must be identical.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from lorakit import ops
from lorakit.dropout import keep_mask, keep_probability
from lorakit.kinds import find_kind
from lorakit.layer import LayerSpec, LoraLayer

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
BASES = {  # name -> (in, out) -> base layer
    "linear": lambda i, o: nn.Linear(i, o),
    "linear_nobias": lambda i, o: nn.Linear(i, o, bias=False),
    "conv1d_gpt2": lambda i, o: Conv1D(o, i),  # weight (in, out)
}
# settings: (rslora, lora_bias, number of active adapters, input dims)
SETTINGS = {
    "plain-3d": (False, False, 1, 3),
    "rslora-bias-2d": (True, True, 1, 2),
    "two-adapters-3d": (False, True, 2, 3),
    "three-adapters-2d": (True, False, 3, 2),
}


class FixedMask(nn.Module):
    """Inverted dropout with a given keep-mask: x ⊙ m / (1 − p), the reference twin of a drawn mask."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.view(x.shape).to(x.dtype) / (1 - self.p)


def make_layer(base: str, dtype: torch.dtype, p: float, rslora: bool, lora_bias: bool, adapters: int,
               dora: bool = False, in_features: int = 12, out_features: int = 10) -> LoraLayer:
    torch.manual_seed(0)
    base_layer = BASES[base](in_features, out_features).to(dtype).requires_grad_(False)
    layer = LoraLayer(base_layer, find_kind(base_layer))
    names = [f"a{i}" for i in range(adapters)]
    for i, name in enumerate(names):
        spec = LayerSpec(r=4 + 2 * i, lora_alpha=8 + i, lora_dropout=p, use_rslora=rslora, lora_bias=lora_bias,
                         variant="dora" if dora else None)
        layer.update_layer(name, spec)
        with torch.no_grad():  # non-zero B (and bias): every gradient path carries signal
            layer.lora_B[name].weight.normal_(0, 0.5)
            if lora_bias:
                layer.lora_B[name].bias.normal_(0, 0.5)
            if dora:
                layer.lora_magnitude_vector[name].weight.mul_(torch.rand(out_features) + 0.5)
    layer.set_adapter(names)
    return layer


def run(layer: LoraLayer, x: torch.Tensor, grad: torch.Tensor, fused: bool, seed: int = 5,
        autocast: torch.dtype | None = None) -> tuple:
    """(output, {name: gradient}) of one forward (under ``autocast`` when given) and backward on the chosen path."""
    previous, ops.FUSED = ops.FUSED, fused
    try:
        torch.manual_seed(seed)
        x = x.detach().clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            y = layer(x)
        (y.float() * grad).sum().backward()
    finally:
        ops.FUSED = previous
    grads = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), {"x": x.grad, **grads}


def drawn_masks(layer: LoraLayer, rows: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """The masks the fused run drew with ``seed``: one (rows, in) mask per adapter with active dropout, in order."""
    torch.manual_seed(seed)
    return {name: keep_mask((rows, layer.in_features), layer.dropout_p(name)) for name in layer.active_adapters
            if layer.dropout_p(name) > 0}


def compare(layer: LoraLayer, x: torch.Tensor, autocast: torch.dtype | None = None) -> None:
    """Fused against reference with the same masks; under ``autocast`` both compute in its dtype d, whose
    tolerances apply (the fused path rounds y + c·h Bᵀ once, the reference rounds each op)."""
    reference = copy.deepcopy(layer)
    grad = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(2))
    y_fused, g_fused = run(layer, x, grad, fused=True, autocast=autocast)
    for name, mask in drawn_masks(layer, x.numel() // x.shape[-1]).items():
        reference.lora_dropout[name] = FixedMask(mask, layer.dropout_p(name))
    y_ref, g_ref = run(reference, x, grad, fused=False, autocast=autocast)
    dtype = autocast or x.dtype
    assert y_fused.dtype == y_ref.dtype == dtype
    tol = TOL[dtype]
    if autocast is None:
        torch.testing.assert_close(y_fused, y_ref, **tol)
    else:  # every adapter's sum rounds to d at a different point: one eps(d) of the largest output each, plus one
        ulps = len(layer.active_adapters) + 1
        torch.testing.assert_close(y_fused, y_ref, atol=ulps * torch.finfo(dtype).eps * y_ref.abs().max().item(),
                                   rtol=0)
    assert g_fused.keys() == g_ref.keys() and all(g is not None for g in g_fused.values())
    for name in g_ref:  # half-precision sums round in a different order: allow 4 ulps of the gradient's scale
        atol = max(tol["atol"], 4 * torch.finfo(dtype).eps * g_ref[name].abs().max().item())
        assert g_fused[name].dtype == g_ref[name].dtype, name
        torch.testing.assert_close(g_fused[name], g_ref[name], atol=atol, rtol=tol["rtol"],
                                   msg=lambda m, n=name: f"gradient {n}: {m}")


CASES = list(itertools.product(["linear", "linear_nobias", "conv1d_gpt2"], [torch.float32, torch.bfloat16,
                                                                           torch.float16],
                               [0.0, 0.1, 0.5], SETTINGS, [True, False]))


@pytest.mark.parametrize("base, dtype, p, setting, training", CASES,
                         ids=[f"{b}-{str(d)[6:]}-p{p}-{s}-{'train' if t else 'eval'}" for b, d, p, s, t in CASES])
def test_fused_equals_reference(base, dtype, p, setting, training):
    rslora, lora_bias, adapters, dims = SETTINGS[setting]
    layer = make_layer(base, dtype, p, rslora, lora_bias, adapters)
    layer.train(training)
    shape = (3, 5, 12) if dims == 3 else (7, 12)
    compare(layer, torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype))


AUTOCAST_CASES = list(itertools.product(["linear", "linear_nobias", "conv1d_gpt2"], [torch.bfloat16, torch.float16],
                                        [0.0, 0.1], SETTINGS, [True, False]))


@pytest.mark.parametrize("base, autocast, p, setting, training", AUTOCAST_CASES,
                         ids=[f"{b}-{str(d)[6:]}-p{p}-{s}-{'train' if t else 'eval'}" for b, d, p, s, t in AUTOCAST_CASES])
def test_fused_equals_reference_under_autocast(base, autocast, p, setting, training):
    """A float32 layer under CPU autocast: the fused path runs in autocast's dtype, as the reference does."""
    rslora, lora_bias, adapters, dims = SETTINGS[setting]
    layer = make_layer(base, torch.float32, p, rslora, lora_bias, adapters)
    layer.train(training)
    shape = (3, 5, 12) if dims == 3 else (7, 12)
    compare(layer, torch.randn(*shape, generator=torch.Generator().manual_seed(1)), autocast)
    with torch.autocast("cpu", dtype=autocast):  # the fused Function itself ran, not a fallback
        assert type(layer(torch.randn(*shape, requires_grad=True)).grad_fn).__name__ == "LoraBranchBackward"


def test_autocast_dtype_is_none_without_autocast_and_follows_the_device():
    x = torch.randn(2, 3)
    assert ops.autocast_dtype(x) is None
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert ops.autocast_dtype(x) == dtype
            assert ops.autocast_dtype(x.to("meta")) is None  # autocast is on for "cpu" only
        with torch.autocast("cpu", dtype=dtype, enabled=False):
            assert ops.autocast_dtype(x) is None


DORA_CASES = list(itertools.product(["linear", "linear_nobias", "conv1d_gpt2"], [2, 3], [True, False]))


@pytest.mark.parametrize("base, dims, training", DORA_CASES)
def test_fused_dora_equals_reference(base, dims, training):
    layer = make_layer(base, torch.float32, 0.0, False, False, 1, dora=True)
    layer.train(training)
    shape = (3, 5, 12) if dims == 3 else (7, 12)
    compare(layer, torch.randn(*shape, generator=torch.Generator().manual_seed(1)))


def test_dora_with_dropout_and_plain_adapter_together():
    """DoRA with dropout keeps the reference (nn.Dropout); a plain adapter before it runs fused."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoraLayer(base.requires_grad_(False), find_kind(base))
    layer.update_layer("plain", LayerSpec(r=4, lora_alpha=8))
    layer.update_layer("dora", LayerSpec(r=4, lora_alpha=8, lora_dropout=0.3, variant="dora"))
    with torch.no_grad():
        for name in ("plain", "dora"):
            layer.lora_B[name].weight.normal_()
    layer.set_adapter(["plain", "dora"])
    grad = torch.randn(7, 10)
    outputs = [run(layer if fused else copy.deepcopy(layer), torch.randn(7, 12, generator=torch.Generator()
                                                                         .manual_seed(1)), grad, fused)
               for fused in (True, False)]  # same seed: the DoRA adapter draws the same nn.Dropout mask
    torch.testing.assert_close(outputs[0][0], outputs[1][0], **TOL[torch.float32])
    torch.testing.assert_close(outputs[0][1], outputs[1][1], **TOL[torch.float32])


def test_shared_input_is_saved_by_reference_and_the_mask_is_compact():
    """q and v read one x: both branches keep that very tensor (no copy), a bool mask and x·Aᵀ (N, r)."""
    q, v = (make_layer("linear", torch.float32, 0.1, False, False, 1) for _ in range(2))
    x = torch.randn(6, 12, requires_grad=True)
    for layer in (q, v):
        y = layer(x)
        saved = y.grad_fn.saved_tensors
        assert saved[0] is x or saved[0].data_ptr() == x.data_ptr()
        assert saved[1].shape == (6, 4)  # h = (x ⊙ m) Aᵀ
        assert saved[2].dtype == torch.bool and saved[2].shape == (6, 12)
    q.eval()
    assert q(x).grad_fn.saved_tensors[2] is None  # eval: no mask at all


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_gradient_checkpointing_redraws_the_same_mask(autocast):
    """The recompute (under the autocast state checkpoint saved) draws the same masks: identical numbers."""
    layer = make_layer("linear", torch.float32, 0.5, False, True, 2)
    x = torch.randn(4, 6, 12)
    grad = torch.randn(4, 6, 10)
    plain = run(layer, x, grad, fused=True, autocast=autocast)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    x_ckpt = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = checkpoint(layer, x_ckpt, use_reentrant=False)
    (y.float() * grad).sum().backward()
    torch.testing.assert_close(y.detach(), plain[0], atol=0, rtol=0)
    torch.testing.assert_close(x_ckpt.grad, plain[1]["x"], atol=0, rtol=0)
    for name, param in layer.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, plain[1][name], atol=0, rtol=0)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_mask_law(p):
    """Keep fraction ≈ 1 − p (5σ), p within 2⁻¹⁷, independent draws and positions, the 1/(1 − p) scale exact."""
    n = 1 << 20
    assert abs(keep_probability(p) - (1 - p)) <= 2.0 ** -17
    first, second = keep_mask((1024, 1024), p), keep_mask((1024, 1024), p)
    q = keep_probability(p)
    sigma = math.sqrt(q * (1 - q) / n)
    for mask in (first, second):
        assert mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - q) < 5 * sigma
    both = (first & second).float().mean().item()  # independent draws: P(both kept) = q²
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)
    neighbours = (first[:, :-1] & first[:, 1:]).float().mean().item()  # neighbouring elements independent too
    assert abs(neighbours - q * q) < 6 * math.sqrt(q * q * (1 - q * q) / n)
    columns = first.float().mean(0)  # no column (position within a word) is biased
    assert (columns - q).abs().max().item() < 6 * math.sqrt(q * (1 - q) / 1024)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_scale_is_exact(p):
    """With A = B = I and s = 1 the branch returns x ⊙ m / (1 − p) for the drawn mask m."""
    base = nn.Linear(16, 16).requires_grad_(False)
    layer = LoraLayer(base, find_kind(base))
    layer.update_layer("a", LayerSpec(r=16, lora_alpha=16, lora_dropout=p))
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(torch.eye(16))
        layer.lora_B["a"].weight.copy_(torch.eye(16))
    layer.set_adapter("a")
    x = torch.randn(64, 16)
    torch.manual_seed(9)
    with torch.no_grad():
        delta = layer(x) - base(x)
    torch.manual_seed(9)
    mask = keep_mask((64, 16), p)
    torch.testing.assert_close(delta, x * mask / (1 - p), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("rows", [[0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 3, 0, 1, 2, 3], [3, 3, 4, 4, 0, 1, 2, 4]])
def test_mixed_batch_fused_equals_reference(rows, autocast):
    """Contiguous row runs (slices) and scattered rows (gather + index_add_) match the reference; 4 = base."""
    layer = make_layer("linear", torch.float32, 0.1, False, True, 4)
    layer.eval()
    names = [*layer.active_adapters, "__base__"]
    adapter_names = [names[i] for i in rows]
    grouped: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        grouped.setdefault(name, []).append(row)
    x = torch.randn(8, 5, 12)
    dtype = autocast or torch.float32
    enabled = dict(device_type="cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    outputs = []
    for fused in (True, False):
        layer._routes = (8, [(name, torch.tensor(r)) for name, r in grouped.items()])
        ops.FUSED = fused
        try:
            with torch.no_grad(), torch.autocast(**enabled):
                outputs.append(layer(x))
        finally:
            ops.FUSED, layer._routes = True, None
    assert outputs[0].dtype == outputs[1].dtype == dtype
    torch.testing.assert_close(outputs[0], outputs[1], **TOL[dtype])
    for row, name in enumerate(adapter_names):  # each row equals that adapter alone
        with torch.no_grad(), torch.autocast(**enabled):
            if name == "__base__":
                expected = layer.base_layer(x[row])
            else:
                layer.set_adapter(name)
                expected = layer(x[row])
        torch.testing.assert_close(outputs[0][row], expected, **TOL[dtype])


@pytest.mark.parametrize("value, fused", [("0", False), ("1", True), (None, True)])
def test_environment_switch(value, fused):
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_FUSED"}
    if value is not None:
        env["LORAKIT_FUSED"] = value
    out = subprocess.run([sys.executable, "-c", "from lorakit import ops; print(ops.FUSED)"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(fused)


@pytest.mark.parametrize("base", ["linear", "conv1d_gpt2"])
def test_biased_base_output_is_written_without_copy_slices(base):
    """F.linear with a bias (and Conv1D) return a view on 3-D input; the branch must not become CopySlices."""
    layer = make_layer(base, torch.float32, 0.0, False, False, 1)
    x = torch.randn(2, 3, 12, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoraBranchBackward"
