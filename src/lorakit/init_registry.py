"""The registry of init methods: one ``Init`` entry per method owns every fact about it.

An init method is a pure function ``InitRequest -> InitResult | None`` (inits.py states the formulas); its
entry says what the rest of lorakit needs to know about it, so nothing else keeps a table of method names:

    needs_weight   the layer passes W as an (out, in·k) matrix (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA, MiCA)
    residual       it rewrites W to W_res with W_res + s·B₀A₀ = W (or ≈ W: LoftQ's quantised base)
    exact          B₀A₀ is exactly what the base lost (or 0): a trained adapter converts to plain LoRA exactly
    data_driven    it needs calibration data or a preprocess step (EVA, CorDA, LoRA-GA)
    repeatable     a new adapter built from an existing adapter's config (add_weighted_adapter) may use it again
    named          ``init_lora_weights`` accepts its name as a string ("default" is True, "none" is False)
    zeroes_bias    lora_B's bias (lora_bias=True) starts at 0; False keeps it as drawn (init_lora_weights=False)
    fresh          A and B are new tensors nothing else holds, so the layer adopts their storage
    attached       {base-layer attribute: option key}: data a preprocess step left on the base layer (CorDA's
                   eigens, LoRA-GA's gradient), popped by the layer into the request's options

This module imports nothing of lorakit (config.py validates names against it, inits.py fills it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class InitRequest:
    """What an init method may look at.

    Attributes:
        A_shape: shape of A: (r, in) for linear kinds, (r, in, *kernel) for convs, (r, num) for embeddings.
        B_shape: shape of B: (out, r), (out, r/groups, 1, ...) or (dim, r).
        r: the rank. scaling: s. embedding: the layer is an Embedding (PEFT inits it differently).
        options: the method's parsed options (e.g. {"niter": 16}, or {"bits": 4, "iters": 1} for LoftQ).
        weight: the base weight as an (out, in·k) float32 matrix (``Kind.matrix``), only for methods
            registered with ``needs_weight=True``; A and B results are in that layout, (r, in·k) and (out, r),
            and the layer reshapes them to the factors' shapes.
        kind: the base layer's Kind name ("Linear", "Conv2d", ...), for messages; empty when the caller
            does not say (then it is inferred from A_shape).
        undrawn: the factors were made without nn.Linear's kaiming draws (``Kind.undrawn_factors``); None:
            as a 2-D non-embedding layer (nn.Linear) is.
        calibrated: data-driven inits apply to this kind (``Kind.calibrated``); None: as for nn.Linear.
        weight_is_in_out: the base stores W as (in, out) (``Kind.weight_is_in_out``, GPT-2's Conv1D).
    """

    A_shape: tuple[int, ...]
    B_shape: tuple[int, ...]
    r: int
    scaling: float
    embedding: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    weight: Tensor | None = None
    kind: str = ""
    undrawn: bool | None = None
    calibrated: bool | None = None
    weight_is_in_out: bool = False

    @property
    def plain_linear(self) -> bool:
        """A 2-D non-embedding factor layout: what a request that names no kind facts is taken to be."""
        return not self.embedding and len(self.A_shape) == 2

    @property
    def factors_undrawn(self) -> bool:
        return self.plain_linear if self.undrawn is None else self.undrawn

    @property
    def data_driven_applies(self) -> bool:
        return self.plain_linear if self.calibrated is None else self.calibrated and not self.embedding


@dataclass(frozen=True)
class InitResult:
    """The factors to copy in, and a replacement base weight for methods that rewrite W."""

    A: Tensor
    B: Tensor
    base_weight: Tensor | None = None


InitFn = Callable[[InitRequest], "InitResult | None"]


@dataclass(frozen=True)
class Init:
    """One init method and its facts (the module docstring says what each means)."""

    name: str
    fn: InitFn
    needs_weight: bool = False
    residual: bool = False
    exact: bool = False
    data_driven: bool = False
    repeatable: bool = True
    named: bool = True
    zeroes_bias: bool = True
    fresh: bool = False
    attached: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __call__(self, request: InitRequest) -> InitResult | None:
        return self.fn(request)


INITS: dict[str, Init] = {}  # name -> entry, filled by inits.register_init


def named_inits() -> list[str]:
    """The names ``init_lora_weights`` accepts as strings, in registration order."""
    return [name for name, entry in INITS.items() if entry.named]
