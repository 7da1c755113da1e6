"""torchao weight-only quantized bases: an ``nn.Linear`` whose ``weight`` is a torchao tensor subclass.

torchao (``quantize_(model, Int8WeightOnlyConfig())``, ``IntxWeightOnlyConfig(weight_dtype=torch.int4, ...)``)
keeps the layer an ``nn.Linear`` and swaps its weight for a quantized tensor that dispatches ``F.linear``
itself, so LoRA's forward needs nothing: y = base_q(x) + s·B A x. Only merge / unmerge / DoRA's norm / the
residual inits read or write W, through quant.py's backend (registered here by the weight's class):

    Int8Tensor                 W ≈ q · scale                    q int8, one scale per row or per group
    IntxUnpackedToInt8Tensor   W ≈ (q − zero_point) · scale     q in [−2^(b−1), 2^(b−1)) per group, b ≤ 8

    dense_weight(m)  = deq(Q)                        (out, in) float32
    write_weight(m, W): Q ← from_hp(W) with the old tensor's block size, bit width, mapping and activation
                        quantization, so a merged layer is quantized exactly as ``quantize_`` would quantize it.

torchao is never imported here to look a type up: the backend is keyed on the class name, and torchao is
imported only to requantize a weight it already made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import explain
from .kinds import Base
from .quant import QuantBackend, register_weight_backend


def _int8(old: Any, W: Tensor) -> Tensor:  # old: a torchao Int8Tensor
    """Int8Tensor.from_hp(W) with the old weight's granularity (per row, or per group of block_size[-1])."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerGroup, PerRow

    group = old.block_size[-1]
    granularity = PerRow() if group == W.shape[-1] else PerGroup(group)
    new: Tensor = Int8Tensor.from_hp(W, granularity, act_quant_kwargs=old.act_quant_kwargs)
    return new


def _intx(old: Any, W: Tensor) -> Tensor:  # old: a torchao IntxUnpackedToInt8Tensor
    """IntxUnpackedToInt8Tensor.from_hp(W) with the old block size, bit width and (a)symmetric mapping."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quant_primitives import MappingType

    mapping = MappingType.SYMMETRIC if not old.zero_point.any() else MappingType.ASYMMETRIC
    new: Tensor = IntxUnpackedToInt8Tensor.from_hp(W, tuple(old.block_size), old.target_dtype, mapping_type=mapping,
                                                   activation_quantization=old.activation_quantization)
    return new


REQUANTIZERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {  # tensor class name -> (old, W) -> new Q
    "Int8Tensor": _int8,
    "IntxUnpackedToInt8Tensor": _intx,
}


def _requantize(module: Base, W: Tensor) -> None:
    """Q ← quantize(W) in the old weight's format, in place of the module's weight.

    Raises:
        NotImplementedError: a torchao weight format lorakit cannot rebuild (merge_and_unload(dequantize=True)
            still works for any format that dequantizes).
    """
    old = module.weight
    requantize = REQUANTIZERS.get(type(old).__name__)
    if requantize is None:
        raise NotImplementedError(explain(
            f"cannot requantize a torchao {type(old).__name__} weight after a merge", where=type(module).__name__,
            expected=f"one of {sorted(REQUANTIZERS)}",
            fix="use merge_and_unload(dequantize=True) for a full-precision merge, or keep the adapter unmerged"))
    new = requantize(old, W.to(device=old.device, dtype=old.dtype))
    module.weight = nn.Parameter(new, requires_grad=False)


register_weight_backend("torchao.utils.TorchAOBaseTensor",
                        QuantBackend("TorchaoLoraLinear", lambda m: m.weight.dequantize(),  # deq(Q) (out, in)
                                     _requantize, bits=8, keeps_dtype=True))
