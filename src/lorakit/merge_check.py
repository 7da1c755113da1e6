"""``merge_and_unload(check=True, probe=...)``: the merge measured on a probe batch (errors.GUARDS:
merge_changed_outputs).

A merge replaces y = W x + s·B A x by (W + s·B A) x rounded to the weight's dtype, so y may move by a few
ulps per layer. The check runs the probe before and after, records max |y_merged − y_unmerged| next to the
bound ``MERGE_TOLERANCE_ULPS · eps(dtype) · max(1, max|y|)`` and warns above it (or on NaN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import explain, warn


@dataclasses.dataclass(frozen=True)
class MergeCheck:
    """max |merged - unmerged| over a probe batch, next to the bound the dtype allows."""

    max_abs_change: float
    tolerance: float
    dtype: str

    @property
    def ok(self) -> bool:
        return self.max_abs_change <= self.tolerance


# Rounding of W + s·BA to the weight dtype, accumulated over a few layers: a multiple of eps times |output|.
MERGE_TOLERANCE_ULPS = 32


def _probe_inputs(model: nn.Module, probe: object) -> object:
    if probe is None:
        probe = getattr(model, "dummy_inputs", None)  # transformers' PreTrainedModel has one
    if probe is None:
        raise ValueError(explain("merge_and_unload(check=True) needs a probe batch", where=type(model).__name__,
                                 got="a model without dummy_inputs",
                                 fix="pass probe=<a tensor, a tuple of arguments or a dict of keyword arguments>"))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def move(value: object) -> object:
        return value.to(device) if isinstance(value, Tensor) else value

    if isinstance(probe, dict):
        return {k: move(v) for k, v in probe.items()}
    return tuple(move(v) for v in probe) if isinstance(probe, (tuple, list)) else move(probe)


def _first_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise ValueError(f"merge check: the model's output ({type(output).__name__}) holds no tensor to compare")


def _run(model: nn.Module, inputs: object) -> Tensor:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            output = (model(**inputs) if isinstance(inputs, dict)
                      else model(*inputs) if isinstance(inputs, tuple) else model(inputs))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return _first_tensor(output).detach()


def checked_merge(model: nn.Module, unload: Callable[[], nn.Module], probe: object = None) -> nn.Module:
    """``unload()`` (merge and unload), measuring max |y_merged - y_unmerged| on a probe batch.

    Tolerance: ``MERGE_TOLERANCE_ULPS · eps(dtype) · max(1, max|y|)``. The result is recorded as
    ``merged.lorakit_merge_check`` (a MergeCheck); a change above the tolerance (or NaN) warns.

    Raises:
        ValueError: no probe given and the model has no ``dummy_inputs`` (nothing was merged then).
    """
    inputs = _probe_inputs(model, probe)
    before = _run(model, inputs)
    merged = unload()
    after = _run(merged, inputs)
    change = (after.double() - before.double()).abs().max().item() if before.numel() else 0.0
    dtype = before.dtype if before.is_floating_point() else torch.float32
    scale = max(1.0, before.double().abs().max().item()) if before.numel() else 1.0
    check = MergeCheck(change, MERGE_TOLERANCE_ULPS * torch.finfo(dtype).eps * scale, str(dtype))
    setattr(merged, "lorakit_merge_check", check)  # torch types Module attributes as Tensor | Module
    if not check.ok:  # also catches NaN
        warn(f"merge_and_unload changed the model's outputs by up to {change:.3g} on the probe batch, above the "
             f"{check.tolerance:.3g} that {dtype} rounding explains; compare generations before using the merged "
             "model (a variant or quantized layer may not merge exactly)")
    return merged
