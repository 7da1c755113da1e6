"""One LoRA layer for every base kind: forward, merge, unmerge and the dense update.

For an input x and each active adapter a with factors A_a (r, in), B_a (out, r) and scaling s_a:

    y = base(x) + Σ_a s_a · B_a A_a dropout_a(x)            (shapes: x (..., in) -> y (..., out))

with ``s = lora_alpha / r`` or ``lora_alpha / √r`` (rsLoRA). Merging folds ``s·ΔW`` into the base weight,
``W ← W + s·ΔW`` computed in float32 and cast once; unmerging subtracts in reverse order. What ``ΔW``
and the branch mean for a given base type comes from its ``Kind`` (kinds.py), so this file never
branches on the base type. Quantized bases (issue 6) only change how W is read and written.

An adapter created with a variant (``LayerSpec.variant``, e.g. "dora") is handed to that ``Variant``
(variants.py) for its forward and merge; ``_variants`` maps such adapters to their strategy, and plain
adapters never look it up beyond an empty-dict check.

The attribute names (``base_layer``, ``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``,
``lora_magnitude_vector``, ``lora_dropout``, ``r``, ``lora_alpha``, ``scaling``) are PEFT's, so state-dict
keys match PEFT's key for key.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from . import kinds_builtin, ops, quant_backends  # noqa: F401  (the built-in kinds and backends register on import)
from .config import InitMethod
from .errors import explain, warn
from .inits import INITS, InitRequest, write_factor
from .kinds import Kind, exposed_attributes, kind_for
from .quant import dense_weight, write_weight
from .variants import BufferDict, Variant, entry_parameters, entry_to_meta, plain_merge, resolve_variant

HALF_DTYPES = (torch.float16, torch.bfloat16)
C = TypeVar("C", bound=nn.Module)


class MergeError(ValueError, RuntimeError):
    """A merge that cannot be done; a RuntimeError as PEFT raises, and a ValueError as lorakit's errors are."""


@dataclass(frozen=True)
class LayerSpec:
    """Everything one layer needs to hold one adapter; built by targeting.py from a LoraConfig."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    lora_bias: bool = False
    init: InitMethod = InitMethod("default")
    variant: str | None = None  # a key of variants.VARIANTS ("dora", "bdlora", ...), None for plain LoRA
    variant_options: tuple[Any, ...] = ()  # the variant's per-layer settings (Variant.options)

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA (arXiv:2312.03732)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def adapter_dtype(base_layer: nn.Module, kind: Kind) -> torch.dtype:
    """float32 for half-precision or non-float (quantized) bases, else the base's own dtype (PEFT's autocast).

    ``kind``: read its ``weight`` where the base has no ``.weight`` (a ParamWrapper's expert parameter).
    """
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        with contextlib.suppress(ValueError, AttributeError):
            weight = kind.weight(base_layer)
    if weight is None or not weight.is_floating_point() or weight.dtype in HALF_DTYPES:
        return torch.float32
    dtype: torch.dtype = weight.dtype
    return dtype


def expand_rows(rows: Tensor, batch: int, routed_batch: int) -> Tensor:
    """Rows of a batch routed as ``routed_batch`` rows, seen in a batch of ``batch = routed_batch·k`` rows.

    ``generate`` repeats each row k times for beams / num_return_sequences (``repeat_interleave``), so
    routed row i becomes rows i·k ... i·k + k − 1.

    Raises:
        ValueError: ``batch`` is not a multiple of ``routed_batch``.
    """
    if batch == routed_batch:
        return rows
    if batch % routed_batch:
        raise ValueError(explain("adapter_names does not fit the batch", got=f"{routed_batch} names",
                                 expected=f"one name per row of the batch ({batch} rows)"))
    k = batch // routed_batch
    return (rows[:, None] * k + torch.arange(k, device=rows.device)).flatten()


Routes = tuple[int, list[tuple[str, Tensor]]]  # a mixed batch, set by the tuner: (routed rows, [(adapter, rows)])


def run_routed(routing: Routes, x: Tensor, run: Callable[[str, Tensor], Tensor]) -> Tensor | None:
    """out[rows_a] = run(a, x[rows_a]) for each adapter a of a mixed batch and its rows (``expand_rows``), for
    wrappers whose adapters replace the module rather than add to it; None for a batch with no routes."""
    routed_batch, routes = routing
    out: Tensor | None = None
    for name, rows in routes:
        rows = expand_rows(rows.to(x.device), x.shape[0], routed_batch)
        part = run(name, x.index_select(0, rows))
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out = out.index_copy(0, rows, part)
    return out


def contiguous_run(rows: Tensor) -> tuple[int, int] | None:
    """(i, j) when ``rows`` is i, i + 1, ..., j − 1 (a slice of the batch), else None."""
    if rows.numel() == 0:
        return None
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 != rows.numel():
        return None
    return (first, last + 1) if bool((rows.diff() == 1).all()) else None


def _promoted(y: Tensor, A: Tensor, B: Tensor, bias: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(A, B, bias, y) in the dtype of ``y + branch`` (torch's promotion), the dtype ops.add_lora_ writes y in."""
    dtype = torch.promote_types(y.dtype, A.dtype)
    if A.dtype != dtype:
        A, B, bias = A.to(dtype), B.to(dtype), None if bias is None else bias.to(dtype)
    return A, B, bias, y if y.dtype == dtype else y.to(dtype)


class LoraLayer(nn.Module):
    """Wraps a frozen ``base_layer`` and adds one low-rank update per adapter (see the module docstring).

    Raises:
        ValueError: from ``update_layer`` for an invalid adapter (duplicate name, lora_bias on an Embedding).
    """

    # PEFT's names of the per-adapter containers and settings (code written for PEFT walks them)
    adapter_layer_names: tuple[str, ...] = (
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names: tuple[str, ...] = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "lora_bias")

    kind: Kind
    in_features: int
    out_features: int
    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    use_dora: dict[str, bool]
    lora_bias: dict[str, bool]
    _variants: dict[str, Variant]
    frozen_peft_weight_names: dict[str, tuple[str, ...]]
    merged_adapters: list[str]
    _active_adapter: list[str]
    _routes: Routes | None
    rounding_error: float | None

    def __init__(self, base_layer: nn.Module, kind: Kind) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's m (variants.Magnitude)
        in_features, out_features = kind.features(base_layer)
        # Plain (non-tensor, non-module) state goes straight into __dict__: nn.Module.__setattr__'s checks cost
        # more than the rest of a layer's construction, and get_peft_model builds one layer per target.
        self.__dict__.update(
            kind=kind,
            in_features=in_features,
            out_features=out_features,
            fan_in_fan_out=kind.weight_is_in_out,
            r={},  # adapter name -> rank; likewise lora_alpha, scaling, use_dora, lora_bias
            lora_alpha={},
            scaling={},
            use_dora={},
            lora_bias={},
            _variants={},  # adapters that run through a variant strategy
            frozen_peft_weight_names={},  # adapter -> containers its variant keeps frozen (see ``freeze``)
            merged_adapters=[],
            _active_adapter=[],
            _disable_adapters=False,
            # mixed batch, set by the tuner: (rows in the routed batch, [(adapter name, row indices)])
            _routes=None,
            rounding_error=None,  # quantized base: largest output change of a requantization
        )

    def _get_name(self) -> str:  # repr as PEFT prints it: lora.Linear(...)
        return f"lora.{self.kind.name}"

    def extra_repr(self) -> str:
        return self.kind.extra_repr(self.base_layer)

    # ---- adapters ----------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, spec: LayerSpec, *, autocast_adapter_dtype: bool = True,
                     device: str | torch.device | None = None, initialise: bool = True) -> None:
        """Create adapter ``adapter_name``: factors, dropout, scaling, initialised per ``spec.init``.

        The factors live on the base layer's device (or on ``device``: "meta" for empty factors a load will
        fill, PEFT's ``low_cpu_mem_usage``), in float32 when the base is half precision (or in the base dtype
        when ``autocast_adapter_dtype`` is False), in the base dtype otherwise. ``initialise=False``: the factors
        are left as allocated (a validated file fills every one right after).
        """
        if adapter_name in self.r:
            raise ValueError(
                explain(f"adapter {adapter_name!r} already exists", where=f"lora.{self.kind.name}",
                        fix="pick another adapter_name or delete_adapter() the old one first")
            )
        if spec.lora_bias and getattr(self.base_layer, "bias", None) is None:
            warn(f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__} has no "
                 "bias. This means that merging LoRA weights won't be possible. (The bias trains in lora_B and stays "
                 "a separate term; merge_and_unload will refuse this adapter.)")
        kind, init = self.kind, INITS[spec.init.name]
        with torch.device(device) if device is not None else contextlib.nullcontext():
            A, B = kind.make_factors(self.base_layer, spec.r, spec.lora_bias)
        A_weight, B_weight = kind.factor_weights(A, B)
        weight, options = None, spec.init.options
        if init.needs_weight and initialise:
            weight = kind.matrix(self.base_layer).detach().float()
        if init.attached and initialise:  # what a preprocess step left on the base layer (Init.attached)
            options = {**options, **{key: self._take_attached(attribute) for attribute, key in init.attached.items()}}
        result = None if not initialise else init(  # not: a file fills them (plan.draws_init)
            InitRequest(
                A_shape=tuple(A_weight.shape),
                B_shape=tuple(B_weight.shape),
                r=spec.r,
                scaling=spec.scaling,
                embedding=kind.embedding,
                options=options,
                weight=weight,
                kind=kind.name,
                undrawn=kind.undrawn_factors,
                calibrated=kind.calibrated,
                weight_is_in_out=kind.weight_is_in_out,
            )
        )
        with torch.no_grad():
            if result is not None:
                write_factor(A_weight, result.A, init.fresh)
                write_factor(B_weight, result.B, init.fresh)
                if getattr(B, "bias", None) is not None and init.zeroes_bias:
                    B.bias.zero_()
                if result.base_weight is not None:  # residual inits: W <- W_res, cast once to the base dtype
                    base_weight = self.kind.matrix(self.base_layer)
                    self.kind.set_matrix(self.base_layer, result.base_weight.to(base_weight.dtype))
        reference = next(self.base_layer.parameters(), None)
        dtype = adapter_dtype(self.base_layer, self.kind)
        if not autocast_adapter_dtype and reference is not None and reference.is_floating_point():
            dtype = reference.dtype
        if device is None and reference is not None:
            device = reference.device
        A, B = kind.place_factors(A, B, torch.device(device) if device is not None else None, dtype)
        variant = resolve_variant(spec, kind, self.base_layer)
        if variant is not None:  # it may refuse this layer, so it runs before anything is registered
            replaced = variant.init(self, adapter_name, *kind.factor_weights(A, B), spec.scaling) or {}
            A, B = replaced.get("lora_A", A), replaced.get("lora_B", B)
            self._variants[adapter_name] = variant
        containers: dict[str, Any] = self._modules
        containers[kind.containers[0]][adapter_name], containers[kind.containers[1]][adapter_name] = A, B
        self.lora_dropout[adapter_name] = nn.Dropout(spec.lora_dropout) if spec.lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = spec.r
        self.lora_alpha[adapter_name] = spec.lora_alpha
        self.scaling[adapter_name] = spec.scaling
        self.use_dora[adapter_name] = spec.variant == "dora"
        self.lora_bias[adapter_name] = spec.lora_bias
        self._update_companions(adapter_name, spec, autocast_adapter_dtype, initialise)

    def _take_attached(self, attribute: str) -> object:
        """Pop ``attribute`` off the base layer; a tensor in the base weight's layout comes as the (out, in·k) matrix."""
        value = self.base_layer.__dict__.pop(attribute, None)
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(value, Tensor) and isinstance(weight, Tensor) and value.shape == weight.shape:
            return self.kind.matrix(types.SimpleNamespace(weight=value))  # Kind.matrix reads only .weight
        return value

    # ---- companions: child layers that get this layer's adapters (Kind.companions, e.g. MHA's out_proj) ------
    def _update_companions(self, adapter_name: str, spec: LayerSpec, autocast_adapter_dtype: bool,
                           initialise: bool) -> None:
        """Give each companion child ``adapter_name`` too, wrapping it in a LoraLayer of its own kind first."""
        if self.kind.companions is None:
            return
        for attribute, child in self.kind.companions(self.base_layer).items():
            if not isinstance(child, LoraLayer):
                child = LoraLayer(child, kind_for(child, attribute))
                child._active_adapter = list(self._active_adapter)
                setattr(self.base_layer, attribute, child)
            child.update_layer(adapter_name, spec, autocast_adapter_dtype=autocast_adapter_dtype, initialise=initialise)

    def companions(self) -> list[LoraLayer]:
        """The companion LoRA layers inside this layer's base; they follow its adapter and merge calls."""
        if self.kind.companions is None:
            return []
        return [child for child in self.kind.companions(self.base_layer).values() if isinstance(child, LoraLayer)]

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable tensors of one adapter in this layer."""
        if adapter_name not in self.r:
            return []
        params = []
        for container in self._containers():
            if adapter_name in container:
                params += entry_parameters(container[adapter_name])
        return params + [p for child in self.companions() for p in child.adapter_parameters(adapter_name)]

    def trainable_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """``adapter_parameters`` less those its variant keeps frozen (``frozen_peft_weight_names``, MiCA's B)."""
        frozen_names = self.frozen_peft_weight_names.get(adapter_name, ())
        frozen = {id(p) for name in frozen_names for p in self._entry_parameters(name, adapter_name)}
        return [p for p in self.adapter_parameters(adapter_name) if id(p) not in frozen]

    def _entry_parameters(self, container_name: str, adapter_name: str) -> list[nn.Parameter]:
        container = getattr(self, container_name, None)
        if container is None or adapter_name not in container:
            return []
        return entry_parameters(container[adapter_name])

    def _containers(self) -> list[Any]:
        """The per-adapter containers: PEFT's ``adapter_layer_names`` and the buffer containers variants added."""
        buffers = [self._modules[n] for n in self.other_param_names if isinstance(self._modules.get(n), BufferDict)]
        return [getattr(self, name) for name in self.adapter_layer_names if hasattr(self, name)] + buffers

    # ---- the surface variants use (variants.VariantLayer) ----------------------------------------------------
    def add_container(self, name: str, container: C) -> C:
        """Register a variant's per-adapter container once and return the one held (variants/__init__.py).

        An ``nn.ParameterDict`` / ``nn.ModuleDict`` joins ``adapter_layer_names`` (KaSA's ``lora_diag``), a
        ``BufferDict`` ``other_param_names`` (VeLoRA's ``lora_velora_embed``), as in PEFT; either way its entries
        train, move, save and delete with their adapter.
        """
        held = self._modules.get(name)
        if held is not None:
            return cast(C, held)
        setattr(self, name, container)
        if isinstance(container, BufferDict):
            self.other_param_names = (*self.other_param_names, name)
        else:
            self.adapter_layer_names = (*self.adapter_layer_names, name)
        return container

    def container(self, name: str) -> Any:
        """The per-adapter container ``name`` (``lora_magnitude_vector``, or one added by ``add_container``)."""
        if name not in self.adapter_layer_names and name not in self.other_param_names:
            raise AttributeError(f"lora.{self.kind.name} has no per-adapter container {name!r}")
        return getattr(self, name)

    def apply_dropout(self, adapter_name: str, x: Tensor) -> Tensor:
        """The adapter's dropout applied to x (identity without dropout and in eval mode)."""
        return cast(Tensor, self.lora_dropout[adapter_name](x))

    def freeze(self, adapter_name: str, container_name: str) -> None:
        """Keep ``container_name``'s entry of ``adapter_name`` frozen whatever set_adapter asks (PEFT's
        ``frozen_peft_weight_names``: MiCA trains A only)."""
        names = self.frozen_peft_weight_names.get(adapter_name, ())
        if container_name not in names:
            self.frozen_peft_weight_names[adapter_name] = (*names, container_name)
        for param in self._entry_parameters(container_name, adapter_name):
            param.requires_grad_(False)

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter this layer holds (PEFT's BaseTunerLayer method, read by code written for PEFT)."""
        return list(self.r)

    def move_adapter_to_meta(self, adapter_name: str) -> None:
        """Replace every tensor of ``adapter_name`` by an empty one on the meta device, for a load to fill
        (PEFT's ``low_cpu_mem_usage``); dtypes, shapes and ``requires_grad`` stay."""
        for container in self._containers():
            if adapter_name in container:
                entry_to_meta(container, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every tensor and setting of ``adapter_name`` from this layer."""
        for container in (self.lora_dropout, *self._containers()):
            if adapter_name in container:
                del container[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_dora, self.lora_bias, self._variants,
                      self.frozen_peft_weight_names):
            table.pop(adapter_name, None)
        self._active_adapter = [name for name in self._active_adapter if name != adapter_name]
        for child in self.companions():
            child.delete_adapter(adapter_name)

    def set_adapter(self, adapter_names: str | list[str], *, trainable: bool = True) -> None:
        """Make ``adapter_names`` the active adapters; only theirs train (when ``trainable``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.r:
            for param in self.adapter_parameters(name):
                param.requires_grad_(False)
            for param in self.trainable_parameters(name) if trainable and name in names else []:
                param.requires_grad_(True)  # what its variant keeps frozen stays frozen (MiCA's B)
        self._active_adapter = names
        for child in self.companions():
            child.set_adapter(names, trainable=trainable)

    @property
    def active_adapters(self) -> list[str]:
        active = self._active_adapter  # a str too when code written for PEFT sets PEFT's private attribute
        return [active] if isinstance(active, str) else list(active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the LoRA branch on or off; trainability is left as it is."""
        self._disable_adapters = not enabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, so code that reads ``module.weight`` keeps working (as with PEFT)."""
        weight: Tensor = self.base_layer.weight  # type: ignore[assignment]  # every kind with a .weight holds a tensor
        return weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- forward -----------------------------------------------------------------------------------------
    def factors(self, adapter_name: str) -> tuple[Any, Any]:
        """(A, B) of one adapter from the kind's containers (``Kind.containers``): modules for linear and conv
        kinds, Parameters for embeddings."""
        A_name, B_name = self.kind.containers
        return self._modules[A_name][adapter_name], self._modules[B_name][adapter_name]  # type: ignore[index]

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        """y = base(x) + Σ_active s · B A dropout(x); the base output alone when disabled or merged."""
        if self.kind.forward is not None:  # a kind whose update lives in its weights (kinds_mha.py)
            output: Tensor = self.kind.forward(self, x, args, kwargs)
            return output
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            base_output: Tensor = self.base_layer(x, *args, **kwargs)
            return base_output
        y: Tensor = self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return y
        if self._routes is not None:
            return self._mixed_batch(x, y)
        if ops.FUSED and self.kind.fused:  # compile traces ops.py's traceable twin (ops.py)
            return self._fused(x, y)
        result_dtype = y.dtype
        variants = self._variants
        for name in self._active_adapter:
            if name in self.scaling:
                if variants and name in variants:  # y is the running output, as PEFT hands it to variants
                    y = variants[name].forward(self, name, x, y)
                else:
                    y = y + self.branch(name, x) * self.scaling[name]
        return y if y.dtype == result_dtype else y.to(result_dtype)

    def _fused(self, x: Tensor, y: Tensor) -> Tensor:
        """The forward above through ops.add_lora_: each adapter adds into y in place (ops.py).

        PEFT's dtypes: a half-precision y is promoted once to the adapters' dtype (as ``y + branch``
        promotes it), summed there and cast back at the end; x is cast once per adapter dtype. Under
        ``torch.autocast`` the factors are lowered to autocast's dtype d first (F.linear's cast in PEFT's
        ``lora_A(x)``), so x, h and y are all d (ops.py, "Mixed precision").
        """
        result_dtype, variants, inputs = y.dtype, self._variants, {x.dtype: x}
        lower = ops.autocast_dtype(x)  # None unless autocast is on for x's device
        for name in self._active_adapter:
            if name not in self.scaling:
                continue
            if variants and name in variants:
                y = variants[name].forward(self, name, x, y)
                continue
            if isinstance(self.scaling[name], Tensor):  # hotswap.py's tensor scaling: GEMM alphas take numbers only
                y = y + self.branch(name, x) * self.scaling[name]
                continue
            A, B_weight, bias = self._fused_factors(name, lower)
            if y.dtype != A.dtype:  # y + branch in the promoted dtype, as PEFT's sum
                A, B_weight, bias, y = _promoted(y, A, B_weight, bias)
            if A.dtype not in inputs:
                inputs[A.dtype] = x.to(A.dtype)
            y = ops.add_lora_(y, inputs[A.dtype], A, B_weight, bias, self.scaling[name], self.dropout_p(name))
        return y if y.dtype == result_dtype else y.to(result_dtype)

    def _fused_factors(self, name: str, lower: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """A, B and B's bias of a ``Kind.fused`` adapter (both factors nn.Linear), lowered to autocast's dtype
        ``lower`` when autocast is on (F.linear's cast in PEFT's ``lora_A(x)``)."""
        A: nn.Linear = self.lora_A[name]  # type: ignore[assignment]  # ModuleDict's stub types entries as Module
        B: nn.Linear = self.lora_B[name]  # type: ignore[assignment]
        if lower is None:
            return A.weight, B.weight, B.bias
        return ops.lowered(lower, A.weight, B.weight, B.bias)

    def dropout_p(self, adapter_name: str) -> float:
        """The dropout probability adapter ``adapter_name`` applies now: 0 in eval mode or without dropout."""
        dropout = self.lora_dropout[adapter_name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def branch(self, adapter_name: str, x: Tensor) -> Tensor:
        """B A dropout(x), unscaled, in the adapter's dtype: the reference path, the kinds ops.py leaves, and
        what variants call (``variants.VariantLayer.branch``)."""
        A, B = self.factors(adapter_name)
        if not self.kind.drops_input:  # embedding ids: PEFT applies no dropout to them
            return self.kind.branch(self.base_layer, x, A, B)
        inputs = x if x.dtype == A.weight.dtype else x.to(A.weight.dtype)
        return self.kind.branch(self.base_layer, self.lora_dropout[adapter_name](inputs), A, B)

    def _mixed_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """Each row gets its own adapter: y[rows_a] += s_a · B_a A_a x[rows_a], one sub-batch per adapter.

        Rows of one adapter that form a contiguous run (``generate`` and most callers group them) are
        slices: x[i:j] is read and y[i:j] written in place, with no gather or scatter; other row sets are
        gathered once and added back with one ``index_add_``. Runs with autograd recording take the
        out-of-place reference (``index_select`` / ``index_add``).
        """
        assert self._routes is not None  # forward calls this only with routes set
        routed_batch, routes = self._routes
        in_place = not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)) and ops.FUSED
        result_dtype, lower = y.dtype, ops.autocast_dtype(x)
        for name, rows in routes:
            if name not in self.scaling:  # "__base__", or an adapter that does not target this layer
                continue
            rows = expand_rows(rows.to(x.device), x.shape[0], routed_batch)
            if name in self._variants:  # PEFT refuses DoRA here; lorakit runs the variant on its rows
                y_rows = self._variants[name].forward(self, name, x.index_select(0, rows), y.index_select(0, rows))
                y = y.index_copy(0, rows, y_rows.to(y.dtype))
                continue
            if not (in_place and self.kind.fused) or isinstance(self.scaling[name], Tensor):
                delta = self.branch(name, x.index_select(0, rows)) * self.scaling[name]
                y = y.index_add(0, rows, delta.to(y.dtype))
                continue
            A, B_weight, bias = self._fused_factors(name, lower)
            A, B_weight, bias, y = _promoted(y, A, B_weight, bias)
            if not y.is_contiguous():
                y = y.contiguous()
            inputs = x if x.dtype == A.dtype else x.to(A.dtype)
            run = contiguous_run(rows)
            if run is not None:
                ops.add_lora_(y[run[0]:run[1]], inputs[run[0]:run[1]], A, B_weight, bias, self.scaling[name])
            else:
                delta = ops.add_lora_(y.new_zeros(len(rows), *y.shape[1:]), inputs.index_select(0, rows),
                                      A, B_weight, bias, self.scaling[name])
                y.index_add_(0, rows, delta)
        return y if y.dtype == result_dtype else y.to(result_dtype)

    # ---- merge -------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """s · ΔW in the base weight's layout, in float32 (for DoRA too: PEFT's get_delta_weight ignores m)."""
        A_weight, B_weight = self.kind.factor_weights(*self.factors(adapter_name))
        variant = self._variants.get(adapter_name)
        if variant is not None and variant.dense is not None:  # compact factors (BD-LoRA)
            A_weight, B_weight = variant.dense(self, adapter_name)
        return self.kind.delta_weight(self.base_layer, A_weight.float(), B_weight.float()) * self.scaling[adapter_name]

    def _merged_weight(self, adapter_name: str, W: Tensor, sign: float) -> Tensor:
        """W ± s·ΔW for a plain adapter, the variant's merge (+1) or unmerge (−1) otherwise; W is float32."""
        variant = self._variants.get(adapter_name)
        merge = plain_merge if variant is None else variant.merge
        return merge(self, adapter_name, W, sign)

    def unmerged_weight(self) -> Tensor:
        """The base weight with every merged adapter taken out, in float32 and its own layout (W is unchanged)."""
        W = dense_weight(self.base_layer, self.kind)  # deq(Q) for a quantized base (quant.py)
        for name in reversed(self.merged_adapters):
            W = self._merged_weight(name, W, -1.0)
        return W

    def _apply_delta(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
        bias = getattr(self.base_layer, "bias", None)
        if self.lora_bias.get(adapter_name) and bias is None:  # refused before the weight changes
            raise MergeError(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias. "
                + explain(f"adapter {adapter_name!r} has lora_bias but the base layer has no bias",
                          where=f"lora.{self.kind.name}", fix="keep the adapter unmerged")
            )
        with torch.no_grad():
            new_weight = self._merged_weight(adapter_name, dense_weight(self.base_layer, self.kind), sign)
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken. "
                    + explain(f"merging adapter {adapter_name!r} gives NaN or inf weights",
                              where=f"lora.{self.kind.name}", fix="the base weights were left unchanged; retrain or "
                                                                   "reload the adapter")
                )
            rounding = write_weight(self.base_layer, new_weight, self.kind)  # requantizes a quantized base: the rounding
            if rounding is not None:
                self.rounding_error = max(rounding, self.rounding_error or 0.0)
            if self.lora_bias.get(adapter_name):
                assert bias is not None  # refused above
                B: nn.Linear = self.lora_B[adapter_name]  # type: ignore[assignment]  # lora_bias: an nn.Linear B
                bias.copy_((bias.float() + sign * B.bias.float() * self.scaling[adapter_name]).to(bias.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W ← W + s·ΔW for each adapter (default: the active ones), in float32, cast once."""
        for name in adapter_names if adapter_names is not None else self._active_adapter:
            if name in self.scaling and name not in self.merged_adapters:
                self._apply_delta(name, +1.0, safe_merge)
                self.merged_adapters.append(name)
        for child in self.companions():
            child.merge(safe_merge, adapter_names)

    def unmerge(self) -> None:
        """Undo merges, last merged first: W ← W − s·ΔW."""
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1.0)
        for child in self.companions():
            child.unmerge()


def named_lora_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoraLayer]]:
    """(path, layer) of every LoraLayer in ``model``, in module order; with ``adapter_name``, those holding it."""
    return [(path, module) for path, module in model.named_modules()
            if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.r)]


class BaseAttribute:
    """A base-layer attribute read through the wrapper (``Kind.attributes``); a nested LoRA layer is shown unwrapped.

    Raises:
        AttributeError: the layer's kind does not show ``name``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layer: LoraLayer | None, owner: type) -> object:
        if layer is None:
            return self
        if self.name not in layer.kind.attributes:
            raise AttributeError(f"'{type(layer).__name__}' object has no attribute '{self.name}'")
        value = getattr(layer.base_layer, self.name)
        return value.base_layer if isinstance(value, LoraLayer) else value


for _name in sorted(exposed_attributes()):  # the kinds registered by lorakit itself (kinds.py, kinds_mha.py)
    if not hasattr(LoraLayer, _name):
        setattr(LoraLayer, _name, BaseAttribute(_name))
