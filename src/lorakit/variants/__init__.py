"""Registry of LoRA variants: strategies that take over one adapter's forward and merge in a ``LoraLayer``.

A variant is one file in this package that builds a ``Variant`` and calls ``register_variant``; nothing else
changes to add one. ``select`` reads the ``LoraConfig`` (which variant, if any, a config asks for) and
``options`` the per-layer settings it needs (hashable, stored in ``LayerSpec.variant_options``); the layer
then calls ``init`` / ``forward`` / ``merge`` for the adapters created with it.

    y = base(x) + Σ_adapters  variant.forward(layer, adapter, x, y)   (plain LoRA: y + s·B A dropout(x))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..errors import explain
from ..kinds import Kind

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..layer import LayerSpec, LoraLayer


@dataclass(frozen=True)
class Variant:
    """One variant strategy; ``LoraLayer`` calls it for the adapters created with it.

    Attributes:
        init: (layer, adapter, A, B, s) -> None or {"lora_A" / "lora_B": module}; checks the layer and registers the
            variant's modules for the adapter about to be added (A, B: its placed, initialised factor weights).
            Runs before anything else of the adapter is registered, so a refusal leaves the layer unchanged;
            a returned module replaces that factor (BD-LoRA's compact block-diagonal factor).
        forward: (layer, adapter, x, y) -> y with the adapter applied; y is the running output.
        merge: (layer, adapter, W, sign) -> W with the adapter merged (+1) or unmerged (−1); W is a float32
            view of the base weight in its own layout; return a new tensor, never change W in place.
        shapes: (kind, base) -> {container: shape of its module's ``.weight``}, to plan state-dict keys.
        dense: (layer, adapter) -> (A (r, K), B (out, r)) as dense matrices, where the stored factors are not;
            None: the factor weights themselves.
        bind: spec -> the Variant for one layer's settings (BD-LoRA's factor and N); None: this Variant as is.
        select: config -> whether a LoraConfig asks for this variant (``use_dora``, ``use_bdlora``, ...).
        options: (module name, config) -> hashable per-layer settings, kept in ``LayerSpec.variant_options``.
        context: ModelCall -> a context manager entered around one ``PeftModel.forward`` / ``generate`` call,
            for variants whose forward depends on the whole input, not just a layer's x (aLoRA reads the
            invocation tokens in ``input_ids``); it may pop its own keyword arguments from ``call.kwargs``.
    """

    init: Callable[[LoraLayer, str, Tensor, Tensor, float], dict[str, nn.Module] | None]
    forward: Callable[[LoraLayer, str, Tensor, Tensor], Tensor]
    merge: Callable[[LoraLayer, str, Tensor, float], Tensor]
    shapes: Callable[[Kind, nn.Module], dict[str, tuple[int, ...]]]
    dense: Callable[[LoraLayer, str], tuple[Tensor, Tensor]] | None = None
    bind: Callable[[LayerSpec], Variant] | None = None
    select: Callable[[LoraConfig], bool] | None = None
    options: Callable[[str, LoraConfig], tuple[Any, ...]] | None = None
    context: Callable[[ModelCall], contextlib.AbstractContextManager[None]] | None = None


@dataclass
class ModelCall:
    """One call of ``PeftModel.forward`` / ``generate`` as ``Variant.context`` sees it.

    Attributes:
        peft_config: adapter name -> LoraConfig. active_adapters: the active adapter names.
        adapter_names: one adapter name per row (a mixed batch), or None.
        args / kwargs: the call's arguments; a context pops the keyword arguments it owns from ``kwargs``.
        generate: the call is ``generate`` (else ``forward``).
    """

    peft_config: dict[str, LoraConfig]
    active_adapters: list[str]
    adapter_names: list[str] | None
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    generate: bool = False


def call_context(call: ModelCall) -> contextlib.ExitStack:
    """Every registered variant's ``context`` for ``call``, entered in registration order."""
    stack = contextlib.ExitStack()
    with stack:
        for variant in VARIANTS.values():
            if variant.context is not None:
                stack.enter_context(variant.context(call))
        return stack.pop_all()


VARIANTS: dict[str, Variant] = {}


def register_variant(name: str, variant: Variant) -> Variant:
    """Add ``variant`` under ``name`` (the value of ``LayerSpec.variant``); returns it.

    Raises:
        ValueError: ``name`` is taken.
    """
    if name in VARIANTS:
        raise ValueError(explain("variant registered twice", where="lorakit.variants", got=name,
                                 fix="give the new variant its own name"))
    VARIANTS[name] = variant
    return variant


def select_variant(config: LoraConfig) -> str | None:
    """The one registered variant ``config`` asks for (None: plain LoRA).

    Raises:
        ValueError: the config turns on two variants that cannot be combined.
    """
    chosen = [name for name, variant in VARIANTS.items() if variant.select is not None and variant.select(config)]
    if len(chosen) > 1:
        raise ValueError(explain("LoRA variants cannot be combined", where="LoraConfig", got=chosen,
                                 expected="at most one of them", fix="turn all but one of them off"))
    return chosen[0] if chosen else None


def variant_options(name: str | None, module_name: str, config: LoraConfig) -> tuple[Any, ...]:
    """The per-layer settings variant ``name`` needs for the module at ``module_name`` (() for none)."""
    variant = VARIANTS[name] if name is not None else None
    return variant.options(module_name, config) if variant is not None and variant.options is not None else ()


def resolve_variant(spec: LayerSpec) -> Variant | None:
    """The Variant that runs an adapter created from ``spec`` (None for plain LoRA)."""
    if spec.variant is None:
        return None
    variant = VARIANTS[spec.variant]
    return variant.bind(spec) if variant.bind is not None else variant


from . import alora, arrow, bdlora, dora  # noqa: E402,F401  (each registers itself)
from .bdlora import BlockDiagonalLinear  # noqa: E402,F401  (PEFT exports it from its lora package)
