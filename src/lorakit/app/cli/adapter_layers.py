"""The adapted layers of a PEFT adapter file, read from its keys alone (no base model needed): what the
export engines (``export``, ``export_gguf``) fold and convert."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...codec import PREFIX, parse_key


@dataclass
class LayerFactors:
    """The file keys of one adapted layer: A, B and B's bias (lora_bias)."""

    A: str | None = None
    B: str | None = None
    bias: str | None = None


def layers_of(tensors: dict[str, Tensor]) -> dict[str, LayerFactors]:
    """Module path -> its factor keys, from the file keys alone (no base model needed)."""
    layers: dict[str, LayerFactors] = {}
    for key in tensors:
        parsed = parse_key(key) if key.startswith(PREFIX) else None
        if parsed is not None and parsed.role in ("A", "B", "bias"):  # A: rank in dim 0, B: in dim 1
            setattr(layers.setdefault(parsed.path[len(PREFIX):], LayerFactors()), parsed.role, key)
    return layers
