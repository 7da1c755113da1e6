"""GPTQ bases (arXiv:2210.17323) made by gptqmodel: LoRA over its packed quantized linear layers.

GPTQ stores W (out, in) as b-bit codes per group of g input rows with a scale and a zero per group and column:

    deq(Q)ᵀ = (q − z) · s            (in, out): ``dequantize_weight()`` of gptqmodel's layers

LoRA's forward calls the quantized layer as is (y = base_q(x) + s·B A x); DoRA and the residual inits read
deq(Q) through quant.py. Requantizing needs GPTQ's calibration (its Hessian), which a merge does not have, so
merging into a GPTQ layer is refused (PEFT cannot merge into GPTQ layers either); ``merge_and_unload(
dequantize=True)`` merges into float layers instead. QA-LoRA (``use_qalora``, variants/qalora.py) runs on these
layers only, as in PEFT.
"""

from __future__ import annotations

from torch import Tensor

from .errors import explain
from .kinds import Base
from .quant import QuantBackend, register_quant_backend

KIND_NAME = "GPTQLoraLinear"  # PEFT prints lora.GPTQLoraLinear


def _requantize(module: Base, W: Tensor) -> None:
    """Raises: NotImplementedError: GPTQ needs calibration data to quantize W; a merge has none."""
    raise NotImplementedError(explain(
        "cannot merge into a GPTQ layer", where=type(module).__name__,
        expected="an unmerged adapter, or a full-precision merge",
        fix="use merge_and_unload(dequantize=True) (float layers), or keep the adapter unmerged"))


register_quant_backend("gptqmodel.nn_modules.qlinear.BaseQuantLinear",
                       QuantBackend(KIND_NAME, lambda m: m.dequantize_weight().T,  # deq(Q), gptqmodel's (in, out)
                                    _requantize, bits=4, stored=lambda m: m.qweight))
