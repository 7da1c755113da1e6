"""Registry of init methods for the LoRA factors: pure functions from shapes (and W) to tensors.

Each function receives an ``InitRequest`` and returns an ``InitResult`` (or None to keep the factors as
created). It touches no module and no adapter-name dict; ``LoraLayer`` copies the result in. A new
method is one registered function plus a test of its invariant; ``layer.py`` does not change.

Methods registered later (PiSSA, OLoRA, LoftQ, EVA, CorDA, orthogonal) arrive with issue 5; until then
``LoraConfig.not_yet_supported`` makes get_peft_model refuse them by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class InitRequest:
    """What an init method may look at.

    Attributes:
        A_shape: shape of A: (r, in) for linear kinds, (r, in, *kernel) for convs, (r, num) for embeddings.
        B_shape: shape of B: (out, r), (out, r/groups, 1, ...) or (dim, r).
        r: the rank. scaling: s. embedding: the layer is an Embedding (PEFT inits it differently).
        options: the method's parsed options (e.g. {"niter": 16}).
        weight: the base weight as an (out, in·k) float32 matrix (``Kind.matrix``), only for methods
            registered with ``needs_weight=True``; A and B results are in that layout, (r, in·k) and (out, r),
            and the layer reshapes them to the factors' shapes.
    """

    A_shape: tuple[int, ...]
    B_shape: tuple[int, ...]
    r: int
    scaling: float
    embedding: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    weight: Tensor | None = None


@dataclass(frozen=True)
class InitResult:
    """The factors to copy in, and a replacement base weight for methods that rewrite W."""

    A: Tensor
    B: Tensor
    base_weight: Tensor | None = None


InitFn = Callable[[InitRequest], "InitResult | None"]
INITS: dict[str, InitFn] = {}
NEEDS_WEIGHT: set[str] = set()  # methods that read the base weight (the layer passes it only to these)


def register_init(name: str, *, needs_weight: bool = False) -> Callable[[InitFn], InitFn]:
    """Decorator: register an init method under the name ``config.parse_init`` produces."""

    def decorate(fn: InitFn) -> InitFn:
        INITS[name] = fn
        if needs_weight:
            NEEDS_WEIGHT.add(name)
        return fn

    return decorate


def _kaiming_uniform(shape: tuple[int, ...]) -> Tensor:
    """U(-b, b), b = 1/sqrt(fan_in): kaiming-uniform with a = sqrt(5), nn.Linear's and nn.ConvNd's default."""
    return torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))


@register_init("default")
def default(request: InitRequest) -> InitResult:
    """LoRA's init (arXiv:2106.09685): B = 0 so B A = 0 and the adapted model starts as the base.

    Linear/Conv: A ~ kaiming-uniform(a=√5), B = 0.   Embedding: A = 0, B ~ N(0, 1).
    """
    if request.embedding:
        return InitResult(A=torch.zeros(request.A_shape), B=torch.randn(request.B_shape))
    return InitResult(A=_kaiming_uniform(request.A_shape), B=torch.zeros(request.B_shape))


@register_init("gaussian")
def gaussian(request: InitRequest) -> InitResult:
    """A ~ N(0, (1/r)²), B = 0 (PEFT's "gaussian"); embeddings as in ``default``."""
    if request.embedding:
        return default(request)
    return InitResult(A=torch.randn(request.A_shape) / request.r, B=torch.zeros(request.B_shape))


@register_init("none")
def keep(request: InitRequest) -> None:
    """``init_lora_weights=False``: keep the factors as created (random, so B A != 0; for tests)."""
    return None
