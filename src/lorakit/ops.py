"""Hot-path math: the fused LoRA and DoRA branches, each with a reference twin that must match it.

Plain LoRA, one adapter, for Linear and GPT-2 Conv1D bases (their factors are the same two Linears):

    y ← y + c·(x ⊙ m) Aᵀ Bᵀ + s·b_B          c = s/(1 − p) in training with dropout p > 0, else s
    x (N, in)  A (r, in)  B (out, r)  b_B (out,) (lora_bias)  y (N, out): the base output, updated in place
    m (N, in): the keep-mask of dropout.py (bool, 1 byte per element); no mask at all when p = 0 or in eval

Forward: h = (x ⊙ m) Aᵀ (N, r), then ``y.addmm_(h, Bᵀ, alpha=c)``: the scaling and dropout's 1/(1 − p) ride
in the GEMM's alpha, the update lands in the base output, no full-size temporary is made besides the
masked copy of x (freed at once). Autograd keeps x (by reference: q, k and v, or gate and up, read one
tensor, which the base layers keep anyway), h (N, r) and m; PEFT keeps the dropout noise and the dropped
copy as float tensors (8 bytes per element per module) and x·Aᵀ. A half-precision base's output is
promoted once to the adapters' float32 and cast back after the last adapter, as PEFT's ``y + branch``
does (layer.py ``_fused``).

Backward, g = ∂L/∂y (N, out), four matmuls (the minimum: one per factor gradient, two for ∂x):

    ∂y_in = g                        (the base output's gradient passes through, made contiguous once)
    gh    = c·g B                    (N, r)
    ∂B    = c·gᵀ h                   (out, r)        ∂b_B = s·Σ_rows g
    ∂A    = ghᵀ (x ⊙ m)              (r, in)         x ⊙ m recomputed, not stored
    ∂x    = (gh A) ⊙ m               (N, in)         autograd adds it to the base layer's ∂x

DoRA (arXiv:2402.09353), plain branch (no dropout, see variants.py for the formula and its dropout case),
with f = m_mag/n (out,), n = ‖W + s·B A‖ per row (detached), b the base bias, y the base output:

    out = f ⊙ (y − b + s·h Bᵀ) + b   =   f ⊙ y + s·h (f ⊙ B)ᵀ + (1 − f) ⊙ b        h = x Aᵀ

computed in place on y: one pass for f ⊙ y + (1 − f) ⊙ b, one addmm_ with the row-scaled B (out, r).
This path runs without active dropout or lora_bias (variants.dora_forward); DoRA with dropout recomputes
W·dropout(x) as PEFT does and stays on the reference.
It saves ``out`` itself instead of the (N, out) pre-scale tensor: autograd keeps one fewer full-size
tensor per module, and none at all where the next op keeps ``out`` anyway (v_proj, gate, up). Backward:

    g_z = g ⊙ f                      (N, out)        also the base output's gradient
    ∂m_mag = Σ_rows g ⊙ (out − b) / m_mag            (out − b = f ⊙ z, z the pre-scale tensor)
    gh = s·g_z B,  ∂B = s·g_zᵀ h,  ∂A = ghᵀ x,  ∂x = gh A

The division by m_mag needs m_mag ≠ 0 everywhere; the layer takes the reference path otherwise.

Mixed precision (``torch.autocast``, any device). PEFT's branch ``lora_B(lora_A(x))`` goes through
F.linear, which autocast runs in its lower dtype d (bfloat16 or float16): x, A, B and b_B are cast to d,
h and the update are d, and ``y + branch`` stays d because the base output y is d already. The fused path
computes in the same dtype: ``autocast_dtype`` (one C call when autocast is off everywhere) gives d, the
layer casts x once and A, B, b_B per adapter (casts autograd records, so ∂A and ∂B arrive in the factors'
float32 as with PEFT) and runs the same Function on all-d tensors, inside which autocast has nothing left
to cast. The only difference from PEFT is the rounding: PEFT rounds h Bᵀ to d, then s·h Bᵀ, then the sum,
while addmm_ rounds y + c·h Bᵀ once (at most a few ulps of d on the output, and closer to the exact sum).
float64 factors are never lowered (autocast leaves float64 alone). DoRA under autocast runs the reference
(variants.py), whose norm is computed with autocast off.

Compiled (``torch.compile``). TorchDynamo cannot trace the two Functions above: they write into their
input y (``mark_dirty``) and draw the mask with the in-place ``random_``, which cost a graph break per
layer and per draw (42 on a 2-layer Llama with all-linear LoRA and dropout). While Dynamo traces
(``torch.compiler.is_compiling()``) the same formula runs out of place in plain ops, ``add_lora``:

    h = (x ⊙ m) Aᵀ,   y' = y + c·h Bᵀ (+ s·b_B)       m from ``torch.ops.lorakit.keep_mask_`` (dropout.py)

AOTAutograd derives the backward (the four matmuls above) and its partitioner picks what to keep (x,
the bool m and h, as the Function does); inductor fuses the elementwise parts into their neighbours. The
mask op runs dropout.py's own draw, so a compiled model draws the masks eager mode draws from the same
seed, and compiled outputs and gradients equal eager ones within float32 rounding (tests/test_compile.py).
DoRA takes its reference formula while compiling (variants/dora.py), whose norm is then recomputed per
call instead of cached (the cache keys on ``data_ptr``, which Dynamo cannot guard). Eager mode is
unchanged: one ``is_compiling()`` test per layer call. Measured on CPU (inductor, regional compilation of
the decoder layers, lorakit.compiling): see that module.

Switch: ``LORAKIT_FUSED=0`` in the environment (read at import) or ``ops.FUSED = False`` selects the
reference path (layer.py's ``branch`` with ``nn.Dropout``, variants.py's ``dora_reference``); the kinds with
``Kind.fused`` set (Linear, Conv1D) take the fused path, every other kind (Embedding, ConvNd) always runs the
reference.
tests/test_ops.py checks both paths against each other, forward and every gradient, with the same masks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .dropout import keep_mask, traced_keep_mask

FUSED: bool = os.environ.get("LORAKIT_FUSED", "1") != "0"


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)  # ~0.1 µs; absent: ask the device


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast lowers matmuls to on x's device now; None when autocast is off there.

    The common case (no autocast anywhere) costs one C call, so the fused path asks once per forward (0.3 µs
    per layer call measured on the CI CPU, against tens of µs for the layer itself).
    """
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return None
    device_type = x.device.type  # "meta" and other devices without autocast: nothing to lower
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def lowered(dtype: torch.dtype, A: Tensor, B: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """A, B and bias cast to autocast's ``dtype`` as F.linear would cast them (float64 and None left alone)."""
    keep = (dtype, torch.float64)
    return (A if A.dtype in keep else A.to(dtype), B if B.dtype in keep else B.to(dtype),
            bias if bias is None or bias.dtype in keep else bias.to(dtype))


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])  # (..., k) -> (N, k), a view when t is contiguous


class LoraBranch(torch.autograd.Function):
    """y ← y + c·(x ⊙ m) Aᵀ Bᵀ + s·b_B in place (module docstring); returns y."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, s: float,
                p: float, mask: Tensor | None) -> Tensor:
        x2, y2 = _rows(x), y.view(-1, y.shape[-1])
        if p > 0 and mask is None:
            mask = keep_mask(x2.shape, p, x.device)
        c = s / (1.0 - p) if p > 0 else s
        h = torch.mm(x2 if mask is None else x2 * mask, A.t())  # (N, r)
        y2.addmm_(h, B.t(), alpha=c)
        if bias is not None:
            y2.add_(bias, alpha=s)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, mask, A, B)
        ctx.c, ctx.s, ctx.has_bias = c, s, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, h, mask, A, B = ctx.saved_tensors
        c = ctx.c
        g2 = _rows(g)
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[1:5]
        grad_x = grad_A = grad_B = grad_bias = None
        if need_B:
            grad_B = torch.mm(g2.t(), h).mul_(c)  # (out, r)
        if need_bias and ctx.has_bias:
            grad_bias = g2.sum(0).mul_(ctx.s)
        if need_x or need_A:
            gh = torch.mm(g2, B).mul_(c)  # (N, r)
            if need_A:
                x2 = _rows(x)
                grad_A = torch.mm(gh.t(), x2 if mask is None else x2 * mask)  # (r, in)
            if need_x:
                grad_x = torch.mm(gh, A)
                if mask is not None:
                    grad_x.mul_(mask)
                grad_x = grad_x.view(x.shape)
        # g2 is g made contiguous (a copy when g is a transposed view, e.g. q/k/v's): handing it on saves the
        # base layer's backward a second copy of the same gradient
        return g2.view(g.shape), grad_x, grad_A, grad_B, grad_bias, None, None, None


def writable(y: Tensor) -> Tensor:
    """y, or a tensor with y's values that an in-place Function may write into without copying.

    A non-contiguous y is copied. A contiguous view (F.linear with a bias on 3-D input returns a view of its
    2-D addmm result, GPT-2's Conv1D too) is re-labelled with ``_unsafe_view``, which autograd does not
    track as a view: written in place as a view it would get a CopySlices node that clones the whole
    gradient in backward. The base it aliases is the base layer's fresh output, which nothing else reads.
    """
    if not y.is_contiguous():
        return y.contiguous()
    if y._base is not None and torch.is_grad_enabled():
        view: Tensor = torch.ops.aten._unsafe_view(y, y.shape)
        return view
    return y


def add_lora_(y: Tensor, x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, s: float, p: float = 0.0,
              mask: Tensor | None = None) -> Tensor:
    """y + s·B A dropout_p(x) (+ s·b_B), written into y when y is contiguous (a new tensor otherwise).

    Args:
        y: (..., out) the running output, in A's dtype. x: (..., in) in A's dtype. A: (r, in). B: (out, r).
        bias: lora_B's bias or None. s: the scaling. p: dropout probability (0: none, e.g. in eval).
        mask: (N, in) bool keep-mask to use instead of drawing one (tests); N = x.numel() // in.
    """
    if torch.compiler.is_compiling():
        return add_lora(y, x, A, B, bias, s, p, mask)
    out: Tensor = LoraBranch.apply(writable(y), x, A, B, bias, s, p, mask)  # type: ignore[no-untyped-call]
    return out  # (torch's stub leaves Function.apply untyped)


def add_lora(y: Tensor, x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, s: float, p: float = 0.0,
             mask: Tensor | None = None) -> Tensor:
    """y + c·((x ⊙ m) Aᵀ) Bᵀ + s·b_B out of place: ``add_lora_``'s traceable twin (module docstring, "Compiled").

    Same arguments and result as ``add_lora_``, and the same mask (drawn through ``dropout.traced_keep_mask``);
    autograd and the compiler's partitioner derive the backward and what it keeps.
    """
    if p > 0 and mask is None:
        mask = traced_keep_mask((x.numel() // x.shape[-1], x.shape[-1]), p, x.device)
    c = s / (1.0 - p) if p > 0 else s
    h = torch.nn.functional.linear(x if mask is None else x * mask.view(x.shape), A)  # (..., r)
    y = torch.add(y, torch.nn.functional.linear(h, B), alpha=c)
    return y if bias is None else torch.add(y, bias, alpha=s)


class DoraBranch(torch.autograd.Function):
    """out = f ⊙ y + s·(x Aᵀ)(f ⊙ B)ᵀ + (1 − f) ⊙ b in place on y, f = m/n (module docstring); returns y."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, x: Tensor, A: Tensor, B: Tensor, m: Tensor, n: Tensor, bias: Tensor | None,
                s: float) -> Tensor:
        y2 = y.view(-1, y.shape[-1])
        f = m / n  # (out,)
        h = torch.mm(_rows(x), A.t())  # (N, r)
        if bias is None:
            y2.mul_(f)
        else:  # f ⊙ y + (1 − f) ⊙ b in one pass
            torch.addcmul((1 - f) * bias, y2, f, out=y2)
        y2.addmm_(h, (B * f[:, None]).t(), alpha=s)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, y, A, B, m, f, bias)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, h, out, A, B, m, f, bias = ctx.saved_tensors
        s = ctx.s
        g2, out2 = _rows(g), out.view(-1, out.shape[-1])
        need_y, need_x, need_A, need_B, need_m = ctx.needs_input_grad[:5]
        g_z = g2 * f  # (N, out)
        grad_m = grad_A = grad_B = grad_x = None
        if need_m:
            grad_m = (g2 * out2).sum(0)  # Σ_rows g ⊙ out
            if bias is not None:
                grad_m.sub_(g2.sum(0) * bias)
            grad_m.div_(m)
        if need_B:
            grad_B = torch.mm(g_z.t(), h).mul_(s)
        if need_x or need_A:
            gh = torch.mm(g_z, B).mul_(s)
            if need_A:
                grad_A = torch.mm(gh.t(), _rows(x))
            if need_x:
                grad_x = torch.mm(gh, A).view(x.shape)
        grad_y = g_z.view(g.shape) if need_y else None
        return grad_y, grad_x, grad_A, grad_B, grad_m, None, None, None


def dora_(y: Tensor, x: Tensor, A: Tensor, B: Tensor, m: Tensor, n: Tensor, bias: Tensor | None,
          s: float) -> Tensor:
    """DoRA's output f ⊙ (y − b + s·B A x) + b with f = m/n, written into y (module docstring).

    Args:
        y: (..., out) the running output. x: (..., in). A: (r, in). B: (out, r). m: (out,) the magnitude
        (m ≠ 0). n: (out,) the detached row norm. bias: the base layer's bias or None. All in A's dtype.
    """
    out: Tensor = DoraBranch.apply(writable(y), x, A, B, m, n, bias, s)  # type: ignore[no-untyped-call]
    return out  # (torch's stub leaves Function.apply untyped)
