"""The causal-LM loss with the LM head computed only where the loss needs it, in chunks.

For hidden states h_i ∈ R^H at the M label positions i (labels ≠ ignore_index, after the shift), the
head W ∈ R^{V×H} (bias b) and targets t_i:

    z_i = W h_i + b ∈ R^V,      ℓ_i = logsumexp(z_i) − z_i[t_i],      L = Σ_i ℓ_i / M   ("mean")

    ∂ℓ_i/∂h_i = Wᵀ (p_i − e_{t_i}),   ∂ℓ_i/∂W = (p_i − e_{t_i}) h_iᵀ,   ∂ℓ_i/∂b = p_i − e_{t_i},   p_i = softmax(z_i)

The plain computation (``model(...).loss`` in transformers) builds z for every position of the batch, a
(tokens, V) tensor (8 x 128 x 49,152 floats = 192 MiB for SmolLM2 at batch 8), keeps it, its float32 copy and
its log-softmax for backward. Here z exists only for ``chunk`` label positions at a time: the gradient
with respect to h (and W, b when they train) is formed in the forward pass, chunk by chunk, and backward
only scales it by the incoming gradient. What autograd keeps is ∂L/∂h, an (M, H) tensor: M ≤ tokens and
H ≪ V. Positions whose label is ignored (prompts, padding) never reach the head at all.

Precision: z is computed in the dtype of h and W, or autocast's (bfloat16 under a bf16 base, as ``lm_head`` would) and
upcast to float32 before logsumexp, as transformers' loss does; the sums are float32 (float64 for
float64 inputs).

Why not a library: ``liger-kernel``'s fused linear cross-entropy is Triton (GPU only); ``cut-cross-entropy``
needs Triton for its kernels and its ``torch_compile`` fallback compiles with inductor on every new shape.
torch 2.13's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` chunks over rows but
gets every position (it cannot skip ignored labels before the head) and falls back to the full-logits
path, with a warning, for configurations it does not support. This file is ~100 lines of plain PyTorch.

Use it in your own loop: ``loss = causal_lm_loss(model, input_ids, attention_mask, labels)`` for a
transformers causal LM (a lorakit ``PeftModel`` or the bare model), or ``linear_cross_entropy(h, W, t)``
on tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:  # an FSDP2 root gathers its own parameters (the embeddings) only in its forward: it must run
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without distributed
    FSDPModule = ()  # type: ignore[assignment,misc]

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 4 Mi floats = 16 MiB in float32 (85 rows of SmolLM2's 49,152)


def default_chunk(vocab: int) -> int:
    """Rows per chunk so that one chunk's logits hold about CHUNK_ELEMENTS floats."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _chunk_losses(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, want: tuple[bool, bool, bool],
                  chunk: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(Σ ℓ_i in float32, ∂/∂h, ∂/∂W, ∂/∂b of that sum): the gradients only where ``want`` asks."""
    acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 inputs
    total = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if want[0] else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if want[1] else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if want[2] else None
    for start in range(0, h.shape[0], chunk):
        rows, t = h[start : start + chunk], target[start : start + chunk]
        z = torch.nn.functional.linear(rows, weight, bias).to(acc)
        lse = torch.logsumexp(z, dim=-1)
        total = total + (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
        if not any(want):
            continue
        d = z.sub_(lse[:, None]).exp_()  # p, in place of z
        d[torch.arange(len(t), device=d.device), t] -= 1.0  # p − e_t
        if grad_h is not None:
            grad_h[start : start + chunk] = d.to(h.dtype) @ weight
        if grad_w is not None:
            grad_w.addmm_(d.t(), rows.to(acc))
        if grad_b is not None:
            grad_b += d.sum(0)
    return total, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i ℓ_i with its gradients formed in forward (see the module docstring); backward scales them."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk: int,
                want: tuple[bool, bool, bool]) -> Tensor:  # type: ignore[override]
        total, grad_h, grad_w, grad_b = _chunk_losses(h, weight, bias, target, want, chunk)
        ctx.save_for_backward(grad_h, grad_w, grad_b)  # through autograd's hooks: what backward holds is visible
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple:  # type: ignore[override]
        grads = tuple(None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (*grads, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         chunk: int | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), target, ignore_index=...)`` without the
    (N, V) logits: only rows whose target is not ``ignore_index`` reach the head, ``chunk`` rows at a time.

    hidden: (..., H); target: (...) class ids; weight: (V, H); bias: (V,) or None. ``reduction`` is "mean"
    (over the kept rows; NaN when none is kept, as torch's) or "sum".

    Raises:
        ValueError: mismatched shapes, an unknown reduction, or a target id outside [0, V).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != target.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} needs target of shape "
                         f"{tuple(hidden.shape[:-1])} and weight (V, {hidden.shape[-1]}); got target "
                         f"{tuple(target.shape)} and weight {tuple(weight.shape)}")
    keep = target.reshape(-1) != ignore_index
    h, t = hidden.reshape(-1, hidden.shape[-1])[keep], target.reshape(-1)[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= weight.shape[0]):
        raise ValueError(f"linear_cross_entropy: target ids must lie in [0, {weight.shape[0]}) or equal "
                         f"ignore_index {ignore_index}; got ids from {int(t.min())} to {int(t.max())}")
    device = h.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        lower = torch.get_autocast_dtype(device)  # autocast's matmul dtype, applied here once, as F.linear would
        h, weight = h.to(lower), weight.to(lower)
        bias = None if bias is None else bias.to(lower)
        with torch.autocast(device, enabled=False):  # the float32 sums inside must stay float32
            return linear_cross_entropy(h, weight, t, bias, ignore_index, reduction, chunk)
    grad = torch.is_grad_enabled()
    want = (grad and h.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    chunk = chunk or default_chunk(weight.shape[0])
    total = _LinearCrossEntropy.apply(h, weight, bias, t, chunk, want) if any(want) \
        else _chunk_losses(h, weight, bias, t, want, chunk)[0]
    return total / t.numel() if reduction == "mean" else total


def head_and_body(model: nn.Module) -> tuple[nn.Linear, nn.Module] | None:
    """(the plain nn.Linear LM head, the decoder body) of a transformers causal LM, or None where the
    logits are more than ``head(body(x))`` (a LoRA-adapted or quantized head, logit scaling or soft-capping)
    or where the model's own forward must run (an FSDP2-sharded root; DDP wrappers have no head to find)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    if isinstance(model, FSDPModule) or isinstance(base, FSDPModule):
        return None
    get_head, get_body = getattr(base, "get_output_embeddings", None), getattr(base, "get_decoder", None)
    if get_head is None or get_body is None:
        return None
    head, body, config = get_head(), get_body(), getattr(base, "config", None)
    if type(head) is not nn.Linear or body is base or body is None:
        return None
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None
    return head, body


def causal_lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                   chunk: int | None = None) -> Tensor:
    """The next-token loss transformers' ``model(input_ids, attention_mask, labels=labels).loss`` gives
    (mean over label positions ≠ -100, labels shifted by one), through ``linear_cross_entropy``.

    Falls back to ``model(...).loss`` where ``head_and_body`` finds no plain head (the result is the same).
    """
    parts = head_and_body(model)
    if parts is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    head, body = parts
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias, chunk=chunk)
