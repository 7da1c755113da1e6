"""The fused LoRA op under ``torch.autocast(cpu, bfloat16)``: bf16 matmuls, float32 factors, honest bounds.

A float32 Linear (or GPT-2 Conv1D) with float32 LoRA factors runs under autocast; the fused path lowers x,
A, B once and runs every matmul of forward and backward in bfloat16 (checked op by op with a dispatch
mode), while A and B stay float32 and get float32 gradients. The result is compared, element by element,
with the float64 formula of ops.py on the same dropout mask:

    out = x Wᵀ + b + c·((x ⊙ m) Aᵀ) Bᵀ           ∂A = c·(g B)ᵀ (x ⊙ m)      ∂B = c·gᵀ ((x ⊙ m) Aᵀ)

Bound: u = 2⁻⁸ is bfloat16's unit roundoff (8 significant bits). Each operand is rounded once to bf16
(relative error ≤ u), products accumulate in float32 (2⁻²⁴ per term, negligible at these sizes), and each
intermediate that is stored in bf16 (h = (x ⊙ m) Aᵀ, the base output, the output, g B) is rounded once
more. A result built through k roundings deviates from the exact value by at most k·u times the same
expression taken in absolute values (|x| |W|ᵀ + |b| + c·(|x ⊙ m| |A|ᵀ) |B|ᵀ for the output), to first
order. The longest chain has 5 (∂A: g, B, the product g B, x, and the final sum's rounding to float32
is below u); K = 6 leaves room for second-order terms. The same bound holds for the compiled graph
(aot_eager), whose out-of-place sum y + c·h Bᵀ rounds twice where addmm_ rounds once.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.dropout import keep_mask

U = 2.0**-8  # bfloat16 unit roundoff
K = 6  # roundings in the longest chain, generously (module docstring)
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
           torch.ops.aten.bmm.default, torch.ops.aten.matmul.default, torch.ops.aten.linear.default}
BASES = {"linear": lambda: nn.Linear(48, 40), "conv1d_gpt2": lambda: Conv1D(40, 48)}
CASES = [(kind, p, compiled) for kind in BASES for p in (0.0, 0.1) for compiled in (False, True)]


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the floating operands of every matmul that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.append((str(func), dtypes))
        return func(*args, **(kwargs or {}))


def _graph_recorder(seen: list) -> object:
    """An aot_eager-like backend that records the operand dtypes of every matmul node of the forward and
    backward graphs (a dispatch mode cannot run inside torch.compile)."""
    from torch._dynamo.backends.common import aot_autograd

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        for node in gm.graph.nodes:
            if node.target in MATMULS:
                values = [arg.meta["val"] for arg in node.args if isinstance(arg, torch.fx.Node)]
                seen.append((str(node.target), {v.dtype for v in values if v.is_floating_point()}))
        return gm.forward

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _model(kind: str, p: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("layer", BASES[kind]())
    model = lorakit.get_peft_model(net, lorakit.LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["layer"]))
    with torch.no_grad():
        model.base_model.model.layer.lora_B["default"].weight.normal_(0, 0.3)
    return model.train()


def _reference(layer, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, p: float) -> dict:
    """(value, absolute-value twin) of out, ∂A, ∂B in float64 (module docstring)."""
    W = layer.base_layer.weight.double()
    W = W.T if layer.kind.weight_is_in_out else W  # (out, in)
    b, A, B = layer.base_layer.bias.double(), layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    c = layer.scaling["default"] / (1 - p)
    x, g = x.double().reshape(-1, x.shape[-1]), g.double().reshape(-1, g.shape[-1])
    xm = x if mask is None else x * mask
    pairs = {}
    for name, (xv, xmv, Wv, bv, Av, Bv, gv) in {"value": (x, xm, W, b, A, B, g),
                                                  "abs": tuple(t.abs() for t in (x, xm, W, b, A, B, g))}.items():
        pairs[name] = {"out": xv @ Wv.T + bv + c * (xmv @ Av.T) @ Bv.T,
                       "A": c * (gv @ Bv).T @ xmv, "B": c * gv.T @ (xmv @ Av.T)}
    return pairs


@pytest.mark.parametrize("kind,p,compiled", CASES, ids=[f"{k}-p{p}-{'compiled' if c else 'eager'}" for k, p, c in CASES])
def test_autocast_bf16_matmuls_fp32_factors(kind: str, p: float, compiled: bool) -> None:
    model = _model(kind, p)
    layer = model.base_model.model.layer
    recorder = MatmulDtypes()
    run = torch.compile(model, backend=_graph_recorder(recorder.seen), fullgraph=True) if compiled else model
    x = torch.randn(4, 6, 48, generator=torch.Generator().manual_seed(1))
    g = torch.randn(4, 6, 40, generator=torch.Generator().manual_seed(2)).bfloat16().float()  # exact in bf16
    if compiled:
        torch._dynamo.reset()
        with torch.autocast("cpu", torch.bfloat16):
            run(x)  # compiles outside the recording
    torch.manual_seed(3)
    with recorder if not compiled else contextlib.nullcontext(), torch.autocast("cpu", torch.bfloat16):
        out = run(x)
        out.backward(g.to(out.dtype))
    torch.manual_seed(3)
    mask = keep_mask((24, 48), p) if p > 0 else None  # the draw the layer made from the same seed
    assert out.dtype == torch.bfloat16
    assert len(recorder.seen) >= 6 and all(dtypes == {torch.bfloat16} for _, dtypes in recorder.seen), recorder.seen
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == A.grad.dtype == B.grad.dtype == torch.float32
    reference = _reference(layer, x, g, mask, p)
    got = {"out": out.double().reshape(-1, 40), "A": A.grad.double(), "B": B.grad.double()}
    for name, value in got.items():
        error = (value - reference["value"][name]).abs()
        bound = K * U * reference["abs"][name] + 1e-30
        assert bool((error <= bound).all()), f"{name}: max error/bound {float((error / bound).max()):.3f}"
        assert float((error / bound).max()) > 0  # bf16 really rounded: not an fp32 computation in disguise
    torch._dynamo.reset()
