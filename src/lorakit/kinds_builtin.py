"""The base-layer kinds lorakit ships beyond kinds.py's own (Linear, Conv1D, Embedding, ConvNd), registered by
importing their modules: nn.MultiheadAttention (kinds_mha.py). The quantized linear kinds come with their
backends (quant_backends.py); ParamWrapper kinds are made per parameter (kinds_param.py).

kinds.py is the registry and imports none of its plug-ins; none of them imports this module.
"""

from __future__ import annotations

from . import kinds_mha  # noqa: F401  (registers nn.MultiheadAttention's Kind on import)
