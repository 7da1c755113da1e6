"""HQQ bases (Half-Quadratic Quantization, Badri & Shaji 2023): LoRA over ``hqq.core.quantize.HQQLinear``.

HQQ stores W in groups of g weights along an axis, with a zero-point and a scale per group, fitted without
calibration data by minimising an lp (p < 1) reconstruction error with half-quadratic splitting:

    W ≈ deq(Q) = (W_q − z) · s        W_q ∈ {0, …, 2^b − 1}, one (z, s) per group of g
    (z, s) = argmin ‖W − (W_q − z) · s‖_p^p  (alternating shrinkage / closed-form steps)

``HQQLinear`` is its own module (not an nn.Linear), so it gets its own Kind through quant.py's backend
registry; LoRA's forward calls the layer as is: y = base_q(x) + s·B A x. Merges read deq(Q) and write back

    write_weight(m, W): Q ← HQQ quantize(W) in place, with the layer's nbits, group size, axis and options,

which is the quantization PEFT's merge runs on the same layer. hqq is imported only to requantize.
"""

from __future__ import annotations

import copy

from torch import Tensor

from .kinds import Base
from .quant import QuantBackend, register_quant_backend


def _requantize(module: Base, W: Tensor) -> None:
    """Q ← quantize(W) in the layer's own HQQ format, in place (the layer keeps its bias and device)."""
    settings = copy.deepcopy(module.quant_config)
    module._parameters.pop("W_q", None)  # HQQ assigns a plain tensor first and wraps it as a Parameter after
    module.quantize(W.to(device=module.device, dtype=module.compute_dtype), **settings)


register_quant_backend("hqq.core.quantize.HQQLinear",
                       QuantBackend("HqqLoraLinear", lambda m: m.dequantize(), _requantize, bits=4,  # deq(Q) (out, in)
                                    stored=lambda m: m.W_q))
