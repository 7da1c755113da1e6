"""Registry of LoRA variants: strategies that take over one adapter's forward and merge in a ``LoraLayer``.

A variant is one file in this package that builds a ``Variant`` and calls ``register_variant``; nothing else
changes to add one. ``select`` reads the ``LoraConfig`` (which variant, if any, a config asks for) and
``options`` the per-layer settings it needs (hashable, stored in ``LayerSpec.variant_options``); the layer
then calls ``init`` / ``forward`` / ``merge`` for the adapters created with it.

    y = base(x) + Σ_adapters  variant.forward(layer, adapter, x, y)   (plain LoRA: y + s·B A dropout(x))
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..errors import explain, warn
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
            a returned module replaces that factor (BD-LoRA's compact block-diagonal factor). It may add its own
            per-adapter container (``layer.add_container``: KaSA's ``lora_diag``, MonteCLoRA's sampler) and keep a
            factor frozen through set_adapter / set_requires_grad (``layer.freeze``: MiCA's B).
        forward: (layer, adapter, x, y) -> y with the adapter applied; y is the running output.
        merge: (layer, adapter, W, sign) -> W with the adapter merged (+1) or unmerged (−1); W is a float32
            view of the base weight in its own layout; return a new tensor, never change W in place.
        shapes: (kind, base) -> {container: shape of its module's ``.weight``}, to plan state-dict keys.
        dense: (layer, adapter) -> (A (r, K), B (out, r)) as dense matrices, where the stored factors are not;
            None: the factor weights themselves.
        bind: spec -> the Variant for one layer's settings (BD-LoRA's factor and N); None: this Variant as is.
        select: config -> whether a LoraConfig asks for this variant (``use_dora``, ``use_bdlora``, ...).
        options: (module name, config) -> hashable per-layer settings, kept in ``LayerSpec.variant_options``.
        applies: (kind, base layer) -> whether the variant runs on this layer; False: plain LoRA there (QA-LoRA,
            which PEFT runs on GPTQ layers only); None: every layer (a layer it cannot run on refuses in ``init``).
        config: (LoraConfig field, dataclass) when the variant's settings are a sub-config (``velora_config``):
            ``LoraConfig`` turns a dict there into the dataclass, as PEFT accepts one (``coerce_subconfigs``).
        buffers: names of per-adapter containers of bare tensors that ``init`` adds to the layer (a dict-like
            module of persistent buffers): state-dict key ``<container>.<adapter>``, file key ``<container>``;
            ``shapes`` gives their tensors' shapes, and deleting or emptying an adapter covers them.
        containers: names of the per-adapter containers ``init`` adds to a layer (``LoraLayer.add_container``:
            KaSA's ``lora_diag``); the codec reads and writes their keys like PEFT's own containers.
        check_adapters: (existing configs by adapter name, new config) -> None; raises when the new adapter
            cannot join the model's adapters (KaSA's "cannot be combined" rule). Runs for every registered
            variant, whichever the new config selects.
        model_methods: {name: fn(tuner, *args, **kwargs)}: methods the variant adds to ``LoraModel`` (and so to
            ``PeftModel``), PEFT's ``_get_kasa_loss`` and the like.
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
    applies: Callable[[Kind, nn.Module], bool] | None = None
    config: tuple[str, type] | None = None
    buffers: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()
    check_adapters: Callable[[dict[str, LoraConfig], LoraConfig], None] | None = None
    model_methods: dict[str, Callable[..., Any]] = field(default_factory=dict)
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


def buffer_containers() -> tuple[str, ...]:
    """Every registered variant's per-adapter buffer containers (``Variant.buffers``)."""
    return tuple(name for variant in VARIANTS.values() for name in variant.buffers)


def coerce_subconfigs(config: LoraConfig) -> None:
    """Turn a dict in a variant's sub-config field of ``config`` into its dataclass, in place (PEFT's loading).

    Keys the dataclass does not have are dropped with one warning (a file from a newer PEFT).

    Raises:
        TypeError: the field holds something other than None, the dataclass or a dict (PEFT's sentence first).
    """
    for variant in VARIANTS.values():
        if variant.config is None:
            continue
        field_name, config_class = variant.config
        value = getattr(config, field_name)
        if value is None or isinstance(value, config_class):
            continue
        name = config_class.__name__
        if not isinstance(value, dict):
            raise TypeError(f"`{name}` must be a `{name}`, a dict, or None. " + explain(
                f"invalid {field_name}", where="LoraConfig", got=value, expected=f"a {name}, its dict, or None"))
        known = {f.name for f in dataclasses.fields(config_class) if f.init}
        unknown = sorted(set(value) - known)
        if unknown:
            warn(f"LoraConfig.{field_name}: ignoring keys {name} does not know: {unknown}")
        setattr(config, field_name, config_class(**{k: v for k, v in value.items() if k in known}))


def variant_containers() -> tuple[str, ...]:
    """The per-adapter containers the registered variants add to layers (``Variant.containers``)."""
    return tuple(dict.fromkeys(name for variant in VARIANTS.values() for name in variant.containers))


def check_new_adapter(existing: dict[str, LoraConfig], config: LoraConfig) -> None:
    """Run every variant's ``check_adapters`` rule for ``config`` joining the adapters ``existing``.

    Raises:
        ValueError: from a variant's rule.
    """
    for variant in VARIANTS.values():
        if variant.check_adapters is not None:
            variant.check_adapters(existing, config)


def model_method(name: str) -> Callable[..., Any] | None:
    """The ``LoraModel`` method ``name`` some variant adds (``Variant.model_methods``), or None."""
    for variant in VARIANTS.values():
        if name in variant.model_methods:
            return variant.model_methods[name]
    return None


def resolve_variant(spec: LayerSpec, kind: Kind | None = None, base: nn.Module | None = None) -> Variant | None:
    """The Variant that runs an adapter created from ``spec`` on ``base`` (None for plain LoRA)."""
    if spec.variant is None:
        return None
    variant = VARIANTS[spec.variant]
    if variant.applies is not None and kind is not None and not variant.applies(kind, base):
        return None
    return variant.bind(spec) if variant.bind is not None else variant


from . import alora, arrow, bdlora, dora, kasa, mica, monteclora, qalora, velora  # noqa: E402,F401  (each registers itself)
from .bdlora import BlockDiagonalLinear  # noqa: E402,F401  (PEFT exports it from its lora package)
from .kasa import KasaConfig  # noqa: E402,F401
from .monteclora import MontecloraConfig, MontecloraSampler  # noqa: E402,F401
