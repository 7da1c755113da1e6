"""Registry of LoRA variants: strategies that take over one adapter's forward and merge in a ``LoraLayer``.

A variant is one file that builds a ``Variant`` and calls ``register_variant`` (lorakit's own are imported by
``variants/builtin.py``); nothing else changes to add one. ``select`` reads the ``LoraConfig`` (which variant,
if any, a config asks for) and ``options`` the per-layer settings it needs (hashable, stored in
``LayerSpec.variant_options``); the layer then calls ``init`` / ``forward`` / ``merge`` for the adapters
created with it, handing itself over as a ``VariantLayer``: the whole surface a variant may use.

    y = base(x) + Σ_adapters  variant.forward(layer, adapter, x, y)   (plain LoRA: y + s·B A dropout(x))

A variant's per-adapter state lives in containers it registers on the layer (``VariantLayer.add_container``):
an ``nn.ParameterDict`` / ``nn.ModuleDict`` (KaSA's ``lora_diag``, MonteCLoRA's sampler) or a ``BufferDict`` of
bare tensors (VeLoRA's ``lora_velora_embed``). Each is named in ``Variant.containers``, so the adapter codec
knows its keys, and the layer treats it like PEFT's own containers: its entries train, move, change dtype,
go to the meta device, save and delete with their adapter. State-dict key ``<container>.<adapter>[.<rest>]``,
adapter-file key ``<container>[.<rest>]``.

This module imports no variant (they import it) and no layer (the layer imports it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from ..errors import explain

if TYPE_CHECKING:
    from ..kinds import Kind
    from ..config import LoraConfig
    from ..layer import LayerSpec

C = TypeVar("C", bound=nn.Module)


class VariantLayer(Protocol):
    """What a variant sees of a ``LoraLayer``: public names only (PEFT's attributes and a few methods).

    Attributes (read only): kind: the base layer's ``Kind``. base_layer: the wrapped layer. in_features /
    out_features: its sizes. training: train or eval mode. r / scaling: adapter -> rank / s. merged_adapters:
    the adapters merged into the base weight, in order.
    """

    @property
    def kind(self) -> Kind: ...
    @property
    def base_layer(self) -> nn.Module: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def training(self) -> bool: ...
    @property
    def r(self) -> dict[str, int]: ...
    @property
    def scaling(self) -> dict[str, float]: ...
    @property
    def merged_adapters(self) -> list[str]: ...

    def factors(self, adapter_name: str) -> tuple[Any, Any]:
        """(A, B): modules (linear and conv kinds) or Parameters (embeddings)."""
        ...

    def branch(self, adapter_name: str, x: Tensor) -> Tensor:
        """B A dropout(x), unscaled, in the adapter's dtype (plain LoRA's branch)."""
        ...

    def apply_dropout(self, adapter_name: str, x: Tensor) -> Tensor:
        """The adapter's dropout applied to x (identity without dropout or in eval mode)."""
        ...

    def dropout_p(self, adapter_name: str) -> float:
        """The dropout probability the adapter applies now (0 in eval mode)."""
        ...

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """s·ΔW in the base weight's layout, float32 (through ``Variant.dense`` where the variant has one)."""
        ...

    def unmerged_weight(self) -> Tensor:
        """The base weight with every merged adapter taken out, float32."""
        ...

    def add_container(self, name: str, container: C) -> C:
        """Register a per-adapter container once (module docstring); returns the one the layer holds."""
        ...

    def container(self, name: str) -> Any:
        """The per-adapter container ``name`` (PEFT's, e.g. ``lora_magnitude_vector``, or one a variant added)."""
        ...

    def freeze(self, adapter_name: str, container_name: str) -> None:
        """Keep ``container_name``'s entry of the adapter frozen whatever set_adapter asks (MiCA's B)."""
        ...


class BufferDict(nn.Module):
    """Per-adapter bare tensors kept as buffers, used as a dict: state-dict key ``<container>.<adapter>``.

    A ``VariantLayer.add_container`` container for state that does not train (VeLoRA's v), persistent; with
    ``persistent=False`` the tensors follow ``.to()`` but stay out of state dicts (trainable tokens' originals).
    """

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self._persistent = persistent

    def __getitem__(self, adapter_name: str) -> Tensor:
        value = self._buffers[adapter_name]
        assert value is not None
        return value

    def __setitem__(self, adapter_name: str, value: Tensor) -> None:
        self.register_buffer(adapter_name, value, persistent=self._persistent)

    def __delitem__(self, adapter_name: str) -> None:
        del self._buffers[adapter_name]

    def __contains__(self, adapter_name: object) -> bool:
        return adapter_name in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._buffers))  # a snapshot: entries may be deleted while iterating

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> list[str]:
        return list(self._buffers)

    def items(self) -> list[tuple[str, Tensor]]:
        return [(name, self[name]) for name in self._buffers]

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {tuple(value.shape)} {value.dtype}" for name, value in self.items())


def entry_parameters(entry: object) -> list[nn.Parameter]:
    """The Parameters of one container entry: itself, a module's parameters, none for a buffer."""
    if isinstance(entry, nn.Parameter):
        return [entry]
    return list(entry.parameters()) if isinstance(entry, nn.Module) else []


def plain_forward(layer: VariantLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + s·B A dropout(x): plain LoRA's forward, for variants that change only init or training (MiCA, BD-LoRA)."""
    return y + layer.branch(adapter_name, x) * layer.scaling[adapter_name]


def plain_merge(layer: VariantLayer, adapter_name: str, W: Tensor, sign: float) -> Tensor:
    """W ± s·ΔW: plain LoRA's merge (+1) or unmerge (−1); ΔW through ``Variant.dense`` where the variant has one."""
    return W + sign * layer.get_delta_weight(adapter_name).to(W.device)


def entry_to_meta(container: Any, adapter_name: str) -> None:
    """Replace one container entry by an empty tensor on the meta device (dtype, shape, requires_grad kept)."""
    old = container[adapter_name]
    if isinstance(old, nn.Parameter):
        container[adapter_name] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad)
    elif isinstance(old, Tensor):
        container[adapter_name] = torch.empty_like(old, device="meta")
    else:
        old.to("meta")


@dataclass(frozen=True)
class Variant:
    """One variant strategy; ``LoraLayer`` calls it for the adapters created with it (as a ``VariantLayer``).

    Attributes:
        init: (layer, adapter, A, B, s) -> None or {"lora_A" / "lora_B": module}; checks the layer and registers the
            variant's modules for the adapter about to be added (A, B: its placed, initialised factor weights).
            Runs before anything else of the adapter is registered, so a refusal leaves the layer unchanged;
            a returned module replaces that factor (BD-LoRA's compact block-diagonal factor). It may add its own
            per-adapter container (``layer.add_container``, named in ``containers``) and keep a factor frozen
            through set_adapter / set_requires_grad (``layer.freeze``: MiCA's B).
        forward: (layer, adapter, x, y) -> y with the adapter applied; y is the running output.
        merge: (layer, adapter, W, sign) -> W with the adapter merged (+1) or unmerged (−1); W is a float32
            view of the base weight in its own layout; return a new tensor, never change W in place.
        shapes: (kind, base) -> {container: shape of its module's ``.weight``, or {rest: shape} for the keys
            ``<container>.<adapter>.<rest>`` ("" rest: the bare tensor ``<container>.<adapter>``)}, to plan state-dict
            keys.
        dense: (layer, adapter) -> (A (r, K), B (out, r)) as dense matrices, where the stored factors are not;
            None: the factor weights themselves.
        bind: spec -> the Variant for one layer's settings (BD-LoRA's factor and N); None: this Variant as is.
        select: config -> whether a LoraConfig asks for this variant (``use_dora``, ``use_bdlora``, ...).
        options: (module name, config) -> hashable per-layer settings, kept in ``LayerSpec.variant_options``.
        applies: (kind, base layer) -> whether the variant runs on this layer; False: plain LoRA there (QA-LoRA,
            which PEFT runs on GPTQ layers only); None: every layer (a layer it cannot run on refuses in ``init``).
        containers: names of the per-adapter containers ``init`` adds to a layer (``add_container``: KaSA's
            ``lora_diag``, VeLoRA's ``lora_velora_embed``); the codec reads and writes their keys like PEFT's own
            containers (module docstring). A variant's sub-config (``velora_config``) is registered with
            ``config.register_subconfig`` by the variant's file.
        check_adapters: (existing configs by adapter name, new config) -> None; raises when the new adapter
            cannot join the model's adapters (KaSA's "cannot be combined" rule). Runs for every registered
            variant, whichever the new config selects.
        model_methods: {name: fn(tuner, *args, **kwargs)}: methods the variant adds to ``LoraModel`` (and so to
            ``PeftModel``), PEFT's ``_get_kasa_loss`` and the like.
        context: ModelCall -> a context manager entered around one ``PeftModel.forward`` / ``generate`` call,
            for variants whose forward depends on the whole input, not just a layer's x (aLoRA reads the
            invocation tokens in ``input_ids``); it may pop its own keyword arguments from ``call.kwargs``.
    """

    init: Callable[[VariantLayer, str, Tensor, Tensor, float], dict[str, nn.Module] | None]
    forward: Callable[[VariantLayer, str, Tensor, Tensor], Tensor]
    merge: Callable[[VariantLayer, str, Tensor, float], Tensor]
    shapes: Callable[[Kind, nn.Module], dict[str, Any]]
    dense: Callable[[VariantLayer, str], tuple[Tensor, Tensor]] | None = None
    bind: Callable[[LayerSpec], Variant] | None = None
    select: Callable[[LoraConfig], bool] | None = None
    options: Callable[[str, LoraConfig], tuple[Any, ...]] | None = None
    applies: Callable[[Kind, nn.Module], bool] | None = None
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
    args: tuple[Any, ...]
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


def adapter_entries(tuner: Any, container: str, adapter_names: str | list[str] | None
                    ) -> Iterator[tuple[Any, str, Any]]:
    """(layer, adapter, entry) for each entry of the per-adapter ``container`` in ``tuner``'s LoRA layers that
    belongs to ``adapter_names`` (default: the active adapters): what a variant's model-level loss sums over
    (KaSA's ``_get_kasa_loss``, MonteCLoRA's ``_get_monteclora_loss``)."""
    if adapter_names is None:
        names = tuner.active_adapters
    else:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for layer in tuner.lora_layers():
        entries = getattr(layer, container, None)
        if entries is not None:
            yield from ((layer, name, entries[name]) for name in names if name in entries)


def resolve_variant(spec: LayerSpec, kind: Kind, base: nn.Module) -> Variant | None:
    """The Variant that runs an adapter created from ``spec`` on ``base`` (None for plain LoRA)."""
    if spec.variant is None:
        return None
    variant = VARIANTS[spec.variant]
    if variant.applies is not None and not variant.applies(kind, base):
        return None
    return variant.bind(spec) if variant.bind is not None else variant
