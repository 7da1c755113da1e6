"""Shared steps of the tests against peft (variants, quantized bases, trainable tokens): perturbing PEFT's adapter,
reading a model's output, comparing gradients, and the merge / unmerge / unload check."""

from __future__ import annotations

import torch
from torch import nn

from lorakit import LoraLayer


def perturb_trainable(model: nn.Module, seed: int = 7, scale: float = 0.3) -> None:
    """Add scale·N(0, 1) (fixed seed, parameters in name order) to every trainable tensor, in place, so that
    a B initialised to zero takes part in the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's output tensor (a plain module's return value, or a transformers output's logits)."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_gradients_match(theirs: nn.Module, ours: nn.Module, atol: float, rtol: float) -> dict[str, torch.Tensor]:
    """After a backward through both: the same trainable parameter names, at least one, and each gradient of
    ours close to PEFT's (compared in float32); returns ours by name."""
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == mine.keys() and grads, (sorted(grads), sorted(mine))
    for name, grad in grads.items():
        assert grad is not None and mine[name] is not None, name
        torch.testing.assert_close(mine[name].float(), grad.float(), atol=atol, rtol=rtol, msg=name)
    return mine


def _base(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "base_layer" in k}


def assert_merge_matches_peft(ref: nn.Module, ours: nn.Module, inputs: dict, tol: dict) -> None:
    """merge_adapter writes PEFT's base weights and keeps the outputs; unmerge restores the base;
    merge_and_unload leaves no LoRA layer and the same outputs."""
    ref.eval(), ours.eval()
    unmerged = outputs(ours, inputs)
    before = {k: v.clone() for k, v in _base(ours).items()}
    ref.merge_adapter(), ours.merge_adapter()
    torch.testing.assert_close(_base(ours), _base(ref), **tol)
    torch.testing.assert_close(outputs(ours, inputs), unmerged, **tol)
    ours.unmerge_adapter()
    torch.testing.assert_close(_base(ours), before, **tol)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, inputs), unmerged, **tol)
