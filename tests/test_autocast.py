"""Mixed precision against the real peft 0.21.2: torch.autocast, half-precision bases, float32 adapters.

Every case builds one base layer (or the tiny Llama) twice from one seed, wraps one copy with peft and the
other with lorakit, makes peft's adapter non-zero and copies its state dict across, then runs both under
the same precision setting (``PRECISIONS``: the base dtype, the autocast dtype or none, and whether the
adapters are kept in float32) and compares the outputs, their dtypes, and the gradients of x and of every
trainable tensor (values and dtypes).

Tolerances come from the precision the computation really runs in, d (autocast's dtype, else the base's
dtype for a half-precision base): each rounding to d moves a value by at most eps(d)/2 of its magnitude.
lorakit's reference path (``ops.FUSED = False``) runs PEFT's ops in PEFT's order and is bit-identical to
it for plain LoRA (``test_reference_path_is_bit_identical_to_peft``). The fused path rounds y + s·h Bᵀ
once where PEFT rounds h Bᵀ, s·h Bᵀ and the sum (and the gradient's g B before rather than after the
scaling): a few roundings of terms bounded by the largest output, so outputs agree within 2·eps(d)·max|y|
and gradients, which sum such terms, within 4·eps(d)·max|∂|. DoRA's norm is float32 on both sides but PEFT
takes it of a d-rounded B A; the same bounds hold. The CUDA rows repeat every case on the GPU (``gpu``
marker, skipped without CUDA).
"""

from __future__ import annotations

import copy
import itertools

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import ops

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])
DEVICES = ["cpu", CUDA]
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

BASES = {  # kind -> (factory, input shape or None for token ids)
    "linear": (lambda: nn.Linear(12, 10), (3, 5, 12)),
    "conv1d_gpt2": (lambda: Conv1D(10, 12), (3, 5, 12)),  # weight (in, out)
    "embedding": (lambda: nn.Embedding(20, 10), None),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3), (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3), (2, 3, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(3, 6, 3), (2, 3, 5, 5, 5)),
}
VARIANTS = {  # LoraConfig arguments beyond the target
    "plain": dict(r=4, lora_alpha=8),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "lora_bias-rslora": dict(r=4, lora_alpha=8, lora_bias=True, use_rslora=True),
}
# name -> (base dtype, autocast dtype or None, autocast_adapter_dtype)
PRECISIONS = {
    "fp32-base-bf16-autocast": (FP32, BF16, True),
    "fp32-base-fp16-autocast": (FP32, FP16, True),
    "bf16-base-fp32-adapters": (BF16, None, True),
    "bf16-base-bf16-autocast": (BF16, BF16, True),
    "fp16-base-fp32-adapters": (FP16, None, True),
    "fp16-base-fp16-autocast": (FP16, FP16, True),
    "bf16-base-bf16-adapters": (BF16, None, False),
    "bf16-base-bf16-adapters-autocast": (BF16, BF16, False),
}


class Holder(nn.Module):
    """One target layer named ``layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def compute_dtype(precision: str) -> torch.dtype:
    """d: the lowest precision the case computes in (module docstring)."""
    base, autocast, _ = PRECISIONS[precision]
    return autocast or base


def bound(reference: torch.Tensor, dtype: torch.dtype, ulps: float) -> dict:
    """atol = ulps·eps(d)·max|reference| (rtol 0): the rounding budget of the module docstring."""
    scale = reference.detach().abs().max().item()
    return dict(atol=ulps * torch.finfo(dtype).eps * scale + 1e-30, rtol=0.0)


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Give peft's adapter non-zero B (and embedding A, magnitude, lora bias): every path carries signal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.normal_(0, 0.5)
            elif "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)


def pair(factory, config: dict, dtype: torch.dtype, adapter_fp32: bool, device: str) -> tuple[nn.Module, nn.Module]:
    """(peft model, lorakit model) on one base and one adapter state."""
    torch.manual_seed(0)
    base = Holder(factory()).to(device, dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["layer"], **config),
                                 autocast_adapter_dtype=adapter_fp32)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["layer"], **config),
                                  autocast_adapter_dtype=adapter_fp32)
    perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def step(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None, fused: bool = True, seed: int = 7
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(output, {name: gradient}) of one forward under ``autocast`` and a backward of Σ y²."""
    previous, ops.FUSED = ops.FUSED, fused
    try:
        model.zero_grad(set_to_none=True)
        x = x.detach().clone().requires_grad_(x.is_floating_point())
        torch.manual_seed(seed)
        with torch.autocast(x.device.type, dtype=autocast or BF16, enabled=autocast is not None):
            y = model(x)
        y.float().square().sum().backward()
    finally:
        ops.FUSED = previous
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    if x.is_floating_point():
        grads["x"] = x.grad
    return y.detach(), grads


def inputs(kind: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    shape = BASES[kind][1]
    generator = torch.Generator().manual_seed(1)
    if shape is None:
        return torch.randint(0, 20, (3, 5), generator=generator).to(device)
    return torch.randn(*shape, generator=generator).to(device, dtype)


def assert_matches(ours: tuple, theirs: tuple, dtype: torch.dtype, out_ulps: float = 2, grad_ulps: float = 4) -> None:
    (y_ours, g_ours), (y_theirs, g_theirs) = ours, theirs
    assert y_ours.dtype == y_theirs.dtype
    torch.testing.assert_close(y_ours, y_theirs, **bound(y_theirs, dtype, out_ulps))
    assert g_ours.keys() == g_theirs.keys()
    for name, grad in g_theirs.items():
        assert grad is not None and g_ours[name] is not None, name
        assert g_ours[name].dtype == grad.dtype, name
        torch.testing.assert_close(g_ours[name], grad, **bound(grad, dtype, grad_ulps),
                                   msg=lambda m, n=name: f"gradient {n}: {m}")


# Train mode everywhere (eval differs only for DoRA, whose norm is cached in eval: an extra eval row), the
# fused path (the default); the reference path only where it differs from it (the fused kinds).
CASES = [(kind, variant, precision, training, fused) for kind, variant, precision in
         itertools.product(BASES, VARIANTS, PRECISIONS) if not (kind == "embedding" and variant != "plain" and
                                                                 variant != "dora")
         for training, fused in ([(True, True)] + [(False, True)] * (variant == "dora")
                                 + [(True, False)] * (kind in ("linear", "conv1d_gpt2") and variant != "plain"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, variant, precision, training, fused", CASES,
                         ids=["-".join([k, v, p, "train" if t else "eval", "fused" if f else "reference"])
                              for k, v, p, t, f in CASES])
def test_layer_matches_peft(kind, variant, precision, training, fused, device):
    base_dtype, autocast, adapter_fp32 = PRECISIONS[precision]
    theirs, ours = pair(BASES[kind][0], VARIANTS[variant], base_dtype, adapter_fp32, device)
    theirs.train(training)
    ours.train(training)
    x = inputs(kind, FP32 if autocast else base_dtype, device)
    assert_matches(step(ours, x, autocast, fused), step(theirs, x, autocast), compute_dtype(precision))


REFERENCE_CASES = [(kind, precision) for kind in BASES for precision in PRECISIONS if PRECISIONS[precision][1]]


@pytest.mark.parametrize("kind, precision", REFERENCE_CASES)
def test_reference_path_is_bit_identical_to_peft(kind, precision):
    """Plain LoRA on the reference path runs PEFT's ops in PEFT's order: the same bits, output and gradients."""
    base_dtype, autocast, adapter_fp32 = PRECISIONS[precision]
    theirs, ours = pair(BASES[kind][0], VARIANTS["plain"], base_dtype, adapter_fp32, "cpu")
    x = inputs(kind, FP32 if autocast else base_dtype, "cpu")
    (y_ours, g_ours), (y_theirs, g_theirs) = step(ours, x, autocast, fused=False), step(theirs, x, autocast)
    torch.testing.assert_close(y_ours, y_theirs, atol=0, rtol=0)
    for name in g_theirs:
        torch.testing.assert_close(g_ours[name], g_theirs[name], atol=0, rtol=0)


DROPOUT_CASES = list(itertools.product(["linear", "conv1d_gpt2", "conv2d"], ["plain", "dora"],
                                       ["fp32-base-bf16-autocast", "bf16-base-bf16-autocast",
                                        "fp32-base-fp16-autocast"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, variant, precision", DROPOUT_CASES)
def test_dropout_in_training_matches_peft(kind, variant, precision, device):
    """The reference path draws nn.Dropout's mask from the same seed as PEFT: same masks, so the same numbers
    (the fused path's compact masks are checked against the reference in test_ops.py)."""
    base_dtype, autocast, adapter_fp32 = PRECISIONS[precision]
    config = {**VARIANTS[variant], "lora_dropout": 0.3}
    theirs, ours = pair(BASES[kind][0], config, base_dtype, adapter_fp32, device)
    x = inputs(kind, FP32, device)
    expected = step(theirs, x, autocast)
    assert_matches(step(ours, x, autocast, fused=False), expected, compute_dtype(precision))
    without_dropout = step(ours.eval(), x, autocast)[0]  # the mask did change the output
    assert not torch.equal(without_dropout, expected[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_fused_dropout_under_autocast_runs_in_autocast_dtype(dtype, device):
    """The fused path (not a fallback) with dropout under autocast: output in d, gradients in fp32."""
    theirs, ours = pair(BASES["linear"][0], {**VARIANTS["plain"], "lora_dropout": 0.5}, FP32, True, device)
    x = inputs("linear", FP32, device)
    y, grads = step(ours.train(), x, dtype)
    assert y.dtype == dtype and all(g.dtype == FP32 for g in grads.values())
    y_eval, _ = step(ours.eval(), x, dtype)
    assert not torch.equal(y, y_eval)
    with torch.autocast(device, dtype=dtype):
        out = ours.base_model.model.layer(x.clone().requires_grad_(True))
    assert type(out.grad_fn).__name__ == "LoraBranchBackward" and out.dtype == dtype


def test_dora_norm_ignores_autocast():
    """‖W + s·B A‖ by the low-rank identity subtracts nearly equal terms: under autocast it must stay float32."""
    from lorakit.variants.dora import row_norm

    generator = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(*shape, generator=generator) for shape in [(16, 64), (4, 64), (16, 4)])
    expected = torch.linalg.vector_norm(W + 0.5 * B @ A, dim=1)
    with torch.autocast("cpu", dtype=BF16):
        norm = row_norm(W, A, B, 0.5)
    assert norm.dtype == FP32
    torch.testing.assert_close(norm, expected, atol=1e-5, rtol=1e-5)


# ---- the tiny Llama: whole-model forward, backward, generate, mixed batches, merging, training ----------------
# Errors add up over the model's 2 decoder layers of 7 adapted modules each, in forward and again in backward:
# 4·eps(d)·max for the logits, 16·eps(d)·max for the gradients (measured: 1.4 and 4.7 for bf16).
LLAMA = {"plain": dict(target_modules="all-linear", r=4, lora_alpha=8),
         "dora": dict(target_modules="all-linear", r=4, lora_alpha=8, use_dora=True)}


def llama_pair(config: dict, device: str, names: tuple[str, ...] = ("default",)) -> tuple[nn.Module, nn.Module]:
    from models import build

    base = build("llama", seed=0).to(device)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), adapter_name=names[0])
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**config))
        ours.add_adapter(name, lorakit.LoraConfig(**config))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def token_batch(device: str, rows: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(4)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def llama_step(model: nn.Module, batch: dict, dtype: torch.dtype, fused: bool = True) -> tuple:
    previous, ops.FUSED = ops.FUSED, fused
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(batch["input_ids"].device.type, dtype=dtype):
            out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
    finally:
        ops.FUSED = previous
    return out.logits.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("variant", LLAMA)
def test_llama_logits_and_gradients_match_peft(variant, dtype, device):
    theirs, ours = llama_pair(LLAMA[variant], device)
    theirs.train()
    ours.train()
    batch = token_batch(device)
    expected = llama_step(theirs, batch, dtype)
    assert_matches(llama_step(ours, batch, dtype), expected, dtype, out_ulps=4, grad_ulps=16)
    if variant == "plain" and device == "cpu":  # PEFT's ops in PEFT's order through the whole model
        logits, grads = llama_step(ours, batch, dtype, fused=False)
        torch.testing.assert_close(logits, expected[0], atol=0, rtol=0)
        for name, grad in expected[1].items():
            torch.testing.assert_close(grads[name], grad, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_generate_under_autocast_matches_peft(dtype, device):
    """Greedy generate() under autocast, one adapter and a mixed batch (adapter_names).

    The tiny model's logits are nearly flat (max ≈ 0.5 over 128 tokens), so a rounding-level difference can
    flip an argmax between near-ties. The reference path (PEFT's ops in PEFT's order) must give PEFT's
    very tokens; the fused path must pick, at every step, a token whose logit under PEFT is within the
    rounding bound (4·eps·max|logits|, doubled for the KV cache's different op order) of PEFT's best.
    """
    theirs, ours = llama_pair(LLAMA["plain"], device, names=("default", "other"))
    with torch.no_grad():  # a distinct second adapter
        for name, param in theirs.named_parameters():
            if "lora_B.other" in name:
                param.normal_(0, 0.4)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    prompt = token_batch(device, rows=3, length=4)
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    for kwargs in ({}, {"adapter_names": ["other", "__base__", "default"]}):
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            expected = theirs.generate(**prompt, **settings, **kwargs)
            generated = ours.generate(**prompt, **settings, **kwargs)
            ops.FUSED = False
            try:
                reference = ours.generate(**prompt, **settings, **kwargs)
            finally:
                ops.FUSED = True
            logits = theirs(input_ids=generated, **kwargs).logits[:, 3:-1]  # (rows, 8, vocab): steps 4..11
        assert generated.shape == (3, 12)
        if device == "cpu":
            torch.testing.assert_close(reference, expected, atol=0, rtol=0)
        chosen = logits.gather(-1, generated[:, 4:, None]).squeeze(-1)
        gap = logits.max(-1).values - chosen  # 0 where the fused path chose PEFT's argmax
        assert (gap <= bound(logits, dtype, 8)["atol"]).all(), gap


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("names", [["default", "other", "__base__", "other"],  # each adapter's rows a slice
                                   ["default", "other", "default", "__base__"]])  # "default" gathered
def test_mixed_adapter_batch_under_autocast_matches_peft(names, dtype, device):
    theirs, ours = llama_pair(LLAMA["plain"], device, names=("default", "other"))
    theirs.eval()
    ours.eval()
    batch = token_batch(device, rows=4)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        expected = theirs(**batch, adapter_names=names).logits
        mixed = ours(**batch, adapter_names=names).logits
        alone = {}
        for name in set(names) - {"__base__"}:
            ours.set_adapter(name)
            alone[name] = ours(**batch).logits
        with ours.disable_adapter():
            alone["__base__"] = ours(**batch).logits
    assert mixed.dtype == expected.dtype
    torch.testing.assert_close(mixed, expected, **bound(expected, dtype, 4))
    for row, name in enumerate(names):  # each row as if its adapter ran alone
        torch.testing.assert_close(mixed[row], alone[name][row], **bound(alone[name][row], dtype, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("variant", LLAMA)
def test_merged_under_autocast_matches_unmerged_and_peft(variant, dtype, device):
    theirs, ours = llama_pair(LLAMA[variant], device)
    theirs.eval()
    ours.eval()
    batch = token_batch(device)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        unmerged = ours(**batch).logits
        ours.merge_adapter()
        theirs.merge_adapter()
        merged, expected = ours(**batch).logits, theirs(**batch).logits
        ours.unmerge_adapter()
        again = ours(**batch).logits
    assert merged.dtype == unmerged.dtype == expected.dtype == dtype
    torch.testing.assert_close(merged, expected, **bound(expected, dtype, 4))
    torch.testing.assert_close(merged, unmerged, **bound(unmerged, dtype, 4))
    torch.testing.assert_close(again, unmerged, **bound(unmerged, dtype, 4))


# Each step's logits agree within 4·eps·max|logits| (≈ 0.016 for bf16 here, max|logits| ≈ 0.5), which moves a
# token's cross-entropy by at most twice that; AdamW's first steps normalise gradients, so these differences
# carry into the next steps without growing much over six (measured: at most 0.006).
LOSS_ATOL = 0.03


@pytest.mark.parametrize("device", DEVICES)
def test_training_loop_under_bf16_autocast_lowers_the_loss_like_peft(device):
    """A plain loop (AdamW, 6 steps, one batch) under bf16 autocast: the loss falls, step by step as PEFT's."""
    losses = {}
    for library, model in zip(("peft", "lorakit"), llama_pair(LLAMA["plain"], device), strict=True):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch = token_batch(device, rows=4, length=12)
        losses[library] = []
        for _ in range(6):
            with torch.autocast(device, dtype=BF16):
                loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[library].append(loss.item())
    ours, theirs = torch.tensor(losses["lorakit"]), torch.tensor(losses["peft"])
    assert ours[-1] < ours[0] - 0.08, losses  # measured: 4.896 -> 4.756 on both
    torch.testing.assert_close(ours, theirs, atol=LOSS_ATOL, rtol=0, msg=lambda m: f"{m}\n{losses}")
