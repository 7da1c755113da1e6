"""The quantization backends lorakit ships, registered by importing their modules (quant.py is the registry).

quant.py registers bitsandbytes' layers itself; the others register themselves on import: torchao's weight
formats (quant_torchao.py), HQQ's HQQLinear (quant_hqq.py), gptqmodel's GPTQ layers (quant_gptq.py). None of
them imports this module, and quant.py imports none of them.
"""

from __future__ import annotations

from . import quant_gptq, quant_hqq, quant_torchao  # noqa: F401  (each registers its backend on import)
