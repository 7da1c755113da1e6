"""QA-LoRA (quantization-aware LoRA, arXiv:2309.14717, as PEFT 0.21.2 runs it): ``use_qalora=True``.

A GPTQ layer quantizes W in groups of g input features. QA-LoRA gives A one column per group, and feeds it the
group-pooled input, so that B A stays constant within each quantization group (and could be folded into the
group zero points):

    x̄_j = (in/g) · mean(x_{jg}, …, x_{jg+g−1})     j = 0 … in/g − 1           x̄ (…, in/g)
    y   = base_q(x) + s · B A x̄(dropout(x))         A (r, in/g)   B (out, r)

``qalora_group_size`` is g (default 16); ``in_features`` must be a multiple of it. As in PEFT, it runs on GPTQ
layers only (quant_gptq.py): every other target gets plain LoRA. A is freshly drawn as nn.Linear draws it
(kaiming-uniform, a = √5), B follows the init. Merging is refused, as in PEFT.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import explain, warn
from . import Variant, VariantLayer, register_variant

if TYPE_CHECKING:
    from ..kinds import Kind
    from ..config import LoraConfig
    from ..layer import LayerSpec

GPTQ_KIND = "GPTQLoraLinear"  # quant_gptq.KIND_NAME


def pooled(x: Tensor, group: int) -> Tensor:
    """x̄ = (in/g) · mean over consecutive groups of g features, (…, in) -> (…, in/g)."""
    groups = x.shape[-1] // group
    return x.reshape(*x.shape[:-1], groups, group).mean(dim=-1) * groups


def _init(group: int, layer: VariantLayer, adapter_name: str, A: Tensor, B: Tensor, s: float) -> dict[str, nn.Module]:
    """A (r, in/g), drawn as nn.Linear draws it.

    Raises:
        ValueError: in_features is not a multiple of g (PEFT's sentence first).
    """
    if layer.in_features % group:
        raise ValueError(f"`use_qalora=True` requires `module.in_features` ({layer.in_features}) to be"
                         f"divisible by 'qalora_group_size' ({group}) " + explain(
                             "in_features not divisible by qalora_group_size", where=layer.kind.name,
                             got=layer.in_features, fix="pick a qalora_group_size that divides in_features"))
    pooled_A = nn.Linear(layer.in_features // group, A.shape[0], bias=False, device=A.device, dtype=A.dtype)
    nn.init.kaiming_uniform_(pooled_A.weight, a=math.sqrt(5))
    return {"lora_A": pooled_A}


def _forward(group: int, layer: VariantLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + s·B A x̄(dropout(x))."""
    A, B = layer.factors(adapter_name)
    x = layer.apply_dropout(adapter_name, x.to(A.weight.dtype))
    delta: Tensor = B(A(pooled(x, group))) * layer.scaling[adapter_name]
    return y + delta.to(y.dtype)


def _merge(layer: VariantLayer, adapter_name: str, W: Tensor, sign: float) -> Tensor:
    """Raises: NotImplementedError: as PEFT (QA-LoRA's pooled A has no dense ΔW here)."""
    raise NotImplementedError("QALoRA for GPTQ layers does not support 'merge'. " + explain(
        "cannot merge a QA-LoRA adapter", where=layer.kind.name, fix="keep the adapter unmerged"))


def _dense(layer: VariantLayer, adapter_name: str) -> tuple[Tensor, Tensor]:
    raise NotImplementedError("QALoRA for GPTQ layers does not support 'get_delta_weight'.")


def _shapes(group: int, r: int, kind: Kind, base: nn.Module) -> dict[str, tuple[int, ...]]:
    return {"lora_A": (r, kind.features(base)[0] // group)}


def _bind(spec: LayerSpec) -> Variant:
    (group,) = spec.variant_options
    return replace(QALORA, init=partial(_init, group), forward=partial(_forward, group),
                   shapes=partial(_shapes, group, spec.r))


def _applies(kind: Kind, base: nn.Module) -> bool:
    """QA-LoRA on GPTQ layers; any other target gets plain LoRA, as in PEFT, with a warning (PEFT is silent)."""
    if kind.name == GPTQ_KIND:
        return True
    warn(f"use_qalora=True: {kind.name} targets get plain LoRA; QA-LoRA runs on GPTQ layers only (as in PEFT)")
    return False


def _options(name: str, config: LoraConfig) -> tuple[Any, ...]:
    return (config.qalora_group_size,)


QALORA: Variant = register_variant("qalora", Variant(
    init=partial(_init, 16), forward=partial(_forward, 16), merge=_merge, shapes=partial(_shapes, 16, 0),
    dense=_dense, bind=_bind, select=lambda config: bool(config.use_qalora), options=_options,
    applies=_applies))
