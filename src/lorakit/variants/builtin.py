"""lorakit's own variants, registered in this order (``select_variant`` and ``call_context`` follow it).

Importing this module registers them; ``lorakit/__init__.py`` imports it first. The registry
(``variants/__init__.py``) and the layer never import a variant, so a variant may import anything above them.
"""

from __future__ import annotations

import sys

from . import alora, arrow, bdlora, dora, kasa, mica, monteclora, qalora, velora  # noqa: F401  (each registers itself)
from .bdlora import BlockDiagonalLinear
from .kasa import KasaConfig
from .monteclora import MontecloraConfig, MontecloraSampler

__all__ = ["BlockDiagonalLinear", "KasaConfig", "MontecloraConfig", "MontecloraSampler"]

# PEFT exports these from its lora package, so lorakit.variants.<name> resolves them too (the peer suite's shim
# reads lorakit.variants.BlockDiagonalLinear); published from here because the registry imports no variant.
for _name in __all__:
    setattr(sys.modules[__package__ or "lorakit.variants"], _name, globals()[_name])
