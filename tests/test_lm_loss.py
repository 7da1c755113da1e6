"""lm_loss: the chunked, label-positions-only LM-head cross-entropy equals the plain full-logits computation
(loss and gradients, fp32 tight and bf16 bounded, with ignored labels), keeps no (tokens, vocab) tensor for
backward, and ``causal_lm_loss`` equals transformers' ``model(..., labels=...).loss`` on a LoRA model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import tiny_llama

from lorakit import LoraConfig, get_peft_model
from lorakit.app.lm_loss import causal_lm_loss, head_and_body, linear_cross_entropy

TOKENS, HIDDEN, VOCAB = 96, 16, 300


def _case(dtype: torch.dtype, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, TOKENS // 4, HIDDEN, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(VOCAB, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, VOCAB, (4, TOKENS // 4), generator=g)
    t[:, :5] = -100  # prompt positions
    t[0, -7:] = -100  # padding
    return h, w, b, t


def _plain(h, w, b, t, reduction="mean"):
    return F.cross_entropy(F.linear(h, w, b).to(torch.promote_types(h.dtype, torch.float32)).reshape(-1, VOCAB), t.reshape(-1), reduction=reduction)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


# (dtype, chunk, bias, reduction, tolerance on the loss, tolerance on gradients relative to their max)
CASES = [
    (torch.float32, 7, False, "mean", 1e-6, 1e-5),
    (torch.float32, 1, True, "sum", 1e-6, 1e-5),
    (torch.float32, 1000, True, "mean", 1e-6, 1e-5),
    (torch.float64, 13, True, "mean", 1e-12, 1e-11),
    # bf16: both compute the logits with bf16 inputs (float32 accumulate) and upcast; the gradient matmuls
    # round p − e_t to bf16 here and the logits' gradient to bf16 in the plain path: a few bf16 ulps (2^-8)
    (torch.bfloat16, 16, False, "mean", 1e-5, 2e-2),
]


@pytest.mark.parametrize("dtype,chunk,bias,reduction,loss_tol,grad_tol", CASES)
def test_equals_plain_cross_entropy(dtype, chunk, bias, reduction, loss_tol, grad_tol):
    h, w, b, t = _case(dtype, bias=bias)
    plain = _plain(h, w, b, t, reduction)
    fused = linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk=chunk)
    assert fused.dtype == torch.float32 or dtype == torch.float64
    torch.testing.assert_close(fused.double(), plain.double(), rtol=loss_tol, atol=loss_tol)
    for got, want in zip(_grads(fused, (h, w, b)), _grads(plain, (h, w, b)), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = want.abs().max().item()
        assert (got.double() - want.double()).abs().max().item() <= grad_tol * scale


def test_ignored_rows_get_zero_gradient_and_upstream_scale_applies():
    h, w, _, t = _case(torch.float32)
    (grad,) = torch.autograd.grad(3.0 * linear_cross_entropy(h, w, t), h)
    (plain,) = torch.autograd.grad(3.0 * _plain(h, w, None, t), h)
    assert torch.equal(grad[t == -100], torch.zeros_like(grad[t == -100]))
    torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


def test_no_grad_and_frozen_weight():
    h, w, _, t = _case(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), _plain(h, w, None, t))
    frozen = w.detach()
    (got,) = torch.autograd.grad(linear_cross_entropy(h, frozen, t), h)
    (want,) = torch.autograd.grad(_plain(h, frozen, None, t), h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _largest_saved(loss_fn) -> int:
    """The numel of the largest tensor autograd saves for backward while ``loss_fn()`` runs."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return max(sizes, default=0)


def test_nothing_of_size_tokens_by_vocab_is_saved():
    h, w, _, t = _case(torch.float32)
    frozen = w.detach()  # the tied, frozen head of a LoRA run
    plain = _largest_saved(lambda: _plain(h, frozen, None, t))
    fused = _largest_saved(lambda: linear_cross_entropy(h, frozen, t, chunk=8))
    assert plain >= TOKENS * VOCAB  # the invariant can fail: the plain path keeps the full logits
    assert fused == int((t != -100).sum()) * HIDDEN  # ∂L/∂h of the kept rows, nothing of width V


@pytest.mark.parametrize("bad,match", [
    (dict(reduction="none"), "reduction must be"),
    (dict(target=torch.full((4, TOKENS // 4), VOCAB)), r"target ids must lie in \[0, 300\)"),
    (dict(target=torch.zeros(3, 5, dtype=torch.long)), "needs target of shape"),
])
def test_bad_input_is_explained(bad, match):
    h, w, _, t = _case(torch.float32)
    args = dict(target=t) | bad
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, args.pop("target"), **args)


def test_causal_lm_loss_equals_transformers_loss_on_a_lora_model():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    ids = torch.randint(0, model.config.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, 7:] = -100
    assert head_and_body(model) is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want = torch.autograd.grad(plain, trainable)
    fused = causal_lm_loss(model, ids, mask, labels, chunk=4)
    got = torch.autograd.grad(fused, trainable)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_lora_adapted_head_falls_back_to_the_model():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    assert head_and_body(model) is None
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    torch.testing.assert_close(causal_lm_loss(model, ids, None, ids),
                               model(input_ids=ids, labels=ids).loss)


def test_under_autocast_it_computes_as_f_linear_would():
    h, w, _, t = _case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _plain(h, w, None, t)  # F.linear lowers to bf16 under autocast; the loss upcasts
        fused = linear_cross_entropy(h, w, t, chunk=16)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)  # the same bf16 logits, float32 sums
    got, want = _grads(fused, (h, w)), _grads(plain, (h, w))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()  # bf16 rounding of p − e_t (see CASES)
