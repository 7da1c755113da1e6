"""Registry of base-layer kinds: how LoRA attaches to each type of frozen layer.

A ``Kind`` says, for one base type, how big the layer is, how to build its two factors, how the LoRA
branch maps an input, and what dense update ``ΔW = B A`` means in the base weight's own layout.
``LoraLayer`` holds a Kind and never branches on the base type itself.

    Linear      W: (out, in)        A: Linear(in, r)        B: Linear(r, out)        ΔW = B A
    Conv1D      W: (in, out)        A: Linear(in, r)        B: Linear(r, out)        ΔW = (B A)ᵀ     (GPT-2)
    Embedding   W: (num, dim)       A: (r, num)             B: (dim, r)              ΔW = (B A)ᵀ
    ConvNd      W: (out, in/g, *k)  A: ConvNd(in, r, k)     B: ConvNd(r, out, 1)     ΔW = B ×₁ A
    MultiheadAttention  W_in: (3E, E)  A: Linear(E, r)  B: Linear(r, 3E)  ΔW_in = B A, out_proj a nested
                Linear LoRA layer (kinds_mha.py)

Every fact about a kind is a field of its entry, set where the kind is registered: which kinds "all-linear"
selects (``linear_like``), which take ops.py's fused kernels (``fused``), which the data-driven inits calibrate
(``calibrated``), how DoRA reads them (``dora``), where their factors live and how they are placed
(``containers``, ``factor_weights``, ``place_factors``). No other module keeps a table of kind names.

This module is the registry and registers its own four kinds; plug-ins register themselves on import
(kinds_mha.py through kinds_builtin.py, the quantized linears through quant.py / quant_backends.py) and this
module imports none of them. Third-party layers register their own Kind with ``register_kind``; no edit of
lorakit is needed (tests/test_kinds_registry.py does it for a toy layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import explain


# A Kind's functions take a base layer of the type the Kind is registered for (nn.Embedding, Conv1D, ...); since a
# Callable's parameters are contravariant, no single class types them all, so the base is typed Any. Factors
# are modules (nn.Linear, nn.ConvNd) or Parameters (embeddings), also Any.
Base = Any
Factor = Any


def _module_weights(A: nn.Module, B: nn.Module) -> tuple[Tensor, Tensor]:
    return A.weight, B.weight  # type: ignore[return-value]  # factor modules (nn.Linear, nn.ConvNd) hold .weight


def _placed_modules(A: nn.Module, B: nn.Module, device: torch.device | None, dtype: torch.dtype
                    ) -> tuple[nn.Module, nn.Module]:
    weight = A.weight
    assert isinstance(weight, Tensor)
    if (weight.dtype, weight.device) != (dtype, device or weight.device):
        A, B = A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)  # Module.to costs ~20 µs idle
    return A, B


@dataclass(frozen=True)
class DoraSupport:
    """What DoRA (variants/dora.py) needs of a kind that supports it.

    Attributes:
        out_dim: the output axis of the base weight (0 for (out, ...) layouts, 1 for (in, out) / (num, dim)).
        spatial: the output has (N, out, *spatial) layout (ConvNd): m is (1, out, 1, ...).
        weight_only: (base, x) -> W x without bias in x's dtype, the base term on dropped-out input;
            None where PEFT applies no dropout (Embedding).
    """

    out_dim: int
    spatial: bool = False
    weight_only: Callable[[nn.Module, Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Kind:
    """How LoRA wraps one base-layer type.

    Attributes:
        name: label used in messages and in ``LoraLayer.__repr__``.
        features: base -> (in_features, out_features) as PEFT reports them.
        make_factors: (base, r, lora_bias) -> (A, B): modules, or Parameters when ``embedding``.
        branch: (base, x, A, B) -> B A x, unscaled; x is already dropped out.
        delta_weight: (base, A, B) -> ΔW in the base weight's layout, unscaled (weights as tensors).
        embedding: factors live in ``lora_embedding_A/B`` (Parameters) and the branch has no dropout.
        weight_is_in_out: the base weight is stored (in, out), PEFT's ``fan_in_fan_out=True``.
        matrix: base -> W as an (out, in·k) matrix, the layout in which ΔW = B A for every kind (a view
            where possible); inits that decompose W (PiSSA, OLoRA, LoftQ) read it.
        set_matrix: (base, M) -> None, writes an (out, in·k) matrix back into the base weight's own layout.
        weight: base -> the tensor ΔW is added to, in its own layout (``base.weight`` but for
            MultiheadAttention's packed ``in_proj_weight``); merges read and write it.
        forward: (layer, x, args, kwargs) -> the layer's whole output, for kinds whose base never calls a
            hookable sub-layer (kinds_mha.py); None: ``LoraLayer.forward``'s base(x) + Σ s·B A x.
        companions: base -> {attribute: child module} of children that get the same adapters as their own
            LoRA layers, nested at ``<path>.base_layer.<attribute>`` (MultiheadAttention's out_proj).
        attributes: names of the base's attributes the wrapper shows as its own, read through on each
            access (PEFT's lora.MultiheadAttention shows ``batch_first``, ``in_proj_weight``, ...). The names
            become descriptors of LoraLayer when layer.py is imported, so a Kind registered later can only
            show names some built-in kind already shows.
        extra_repr: base -> the text inside the wrapper's repr parentheses (``parameter_name='w'`` for
            kinds_param.py's ParamWrapper, as PEFT prints it).
        linear_like: ``target_modules="all-linear"`` selects it (Linear, Conv1D, quantized linears).
        fused: the branch is B(A(x)) with two bias-capable nn.Linear factors, so ops.py's fused kernels
            (``add_lora_``, ``dora_``) may run it instead of ``branch``.
        undrawn_factors: ``make_factors`` leaves the factor weights undrawn (``_uninitialised_linear``); inits
            that use the RNG draw nn.Linear's kaiming numbers first, so a seed gives PEFT's factors.
        calibrated: the data-driven inits (EVA, CorDA, LoRA-GA) read this kind's inputs or gradient (the
            layers PEFT's lora.Linear wraps); other kinds keep LoRA's default init under them.
        dora: what DoRA needs of this kind; None: DoRA refuses it.
        containers: the layer's attribute names of the A and B containers (PEFT's names).
        factor_weights: (A, B) as made by ``make_factors`` -> their weight tensors (A (r, in, ...), B (out, r, ...)).
        place_factors: (A, B, device, dtype) -> the factors on that device and dtype, as the layer keeps them.
        drops_input: the branch sees ``dropout(x)`` cast to the factors' dtype; False: x as given (embedding ids).
    """

    name: str
    features: Callable[[Base], tuple[int, int]]
    make_factors: Callable[[Base, int, bool], tuple[Factor, Factor]]
    branch: Callable[[Base, Tensor, Factor, Factor], Tensor]
    delta_weight: Callable[[Base, Tensor, Tensor], Tensor]
    embedding: bool = False
    weight_is_in_out: bool = False
    matrix: Callable[[Base], Tensor] = lambda m: m.weight
    set_matrix: Callable[[Base, Tensor], object] = lambda m, M: m.weight.copy_(M.reshape(m.weight.shape))
    weight: Callable[[Base], Tensor] = lambda m: m.weight
    forward: Callable[..., Any] | None = None
    companions: Callable[[Base], dict[str, nn.Module]] | None = None
    attributes: tuple[str, ...] = ()
    extra_repr: Callable[[Base], str] = lambda m: ""
    linear_like: bool = False
    fused: bool = False
    undrawn_factors: bool = False
    calibrated: bool = False
    dora: DoraSupport | None = None
    containers: tuple[str, str] = ("lora_A", "lora_B")
    factor_weights: Callable[[Factor, Factor], tuple[Tensor, Tensor]] = _module_weights
    place_factors: Callable[[Factor, Factor, torch.device | None, torch.dtype], tuple[Factor, Factor]] = _placed_modules
    drops_input: bool = True


KINDS: dict[type, Kind] = {}
# Kinds keyed by "module.QualName" for classes of optional packages (transformers' Conv1D), so that
# lorakit never imports a package just to look a type up.
KINDS_BY_NAME: dict[str, Kind] = {}
# Kinds keyed by the "module.QualName" of a quantized weight's tensor class (torchao), for layers that stay
# nn.Linear but hold a tensor subclass as their weight; looked up before the layer's own class.
WEIGHT_KINDS_BY_NAME: dict[str, Kind] = {}


def register_kind(layer_type: type | str, kind: Kind, *, by_weight: bool = False) -> None:
    """Register ``kind`` for ``layer_type`` (a class, or its 'module.QualName' to avoid an import).

    ``by_weight``: ``layer_type`` names the class of a layer's *weight tensor* (torchao's quantized tensors on a
    plain nn.Linear), looked up before the layer's own class.
    """
    if by_weight:
        assert isinstance(layer_type, str), "a weight's tensor class is registered by its 'module.QualName'"
        WEIGHT_KINDS_BY_NAME[layer_type] = kind
    elif isinstance(layer_type, str):
        KINDS_BY_NAME[layer_type] = kind
    else:
        KINDS[layer_type] = kind


def base_weight(module: nn.Module) -> Tensor:
    """The tensor a merge changes in ``module`` (its Kind's ``weight``; ``module.weight`` for unregistered types)."""
    kind = find_kind(module)
    if kind is not None:
        return kind.weight(module)
    weight = module.weight
    assert isinstance(weight, Tensor), f"{type(module).__name__}.weight is not a tensor"
    return weight


def with_companions(module: nn.Module, kind: Kind) -> list[tuple[nn.Module, Kind]]:
    """(module, kind) and the (child, kind) of each of its companions (``Kind.companions``), LoRA layers unwrapped."""
    found = [(module, kind)]
    for attribute, child in (kind.companions(module) if kind.companions is not None else {}).items():
        child = getattr(child, "base_layer", child)
        found.append((child, kind_for(child, attribute)))
    return found


def registered_kinds() -> Iterator[Kind]:
    """Every registered Kind, once each."""
    seen: set[int] = set()
    for kind in (*KINDS.values(), *KINDS_BY_NAME.values(), *WEIGHT_KINDS_BY_NAME.values()):
        if id(kind) not in seen:
            seen.add(id(kind))
            yield kind


def exposed_attributes() -> set[str]:
    """Every name some registered Kind reads through from its base (``Kind.attributes``)."""
    return {name for kind in registered_kinds() for name in kind.attributes}


def supported_types() -> list[str]:
    """Names of every registered base type, for error messages."""
    return [t.__name__ for t in KINDS] + [name.rsplit(".", 1)[-1] + " (transformers)" for name in KINDS_BY_NAME]


def find_kind(module: nn.Module) -> Kind | None:
    """The Kind of ``module``'s weight's tensor class (``WEIGHT_KINDS_BY_NAME``), else of ``module``'s class or
    its nearest registered base class, or None."""
    weight = module._parameters.get("weight") if WEIGHT_KINDS_BY_NAME else None  # its own, not a wrapper's
    if isinstance(weight, Tensor) and type(weight) not in (Tensor, nn.Parameter):
        for cls in type(weight).__mro__:
            kind = WEIGHT_KINDS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
            if kind is not None:
                return kind
    for cls in type(module).__mro__:
        if cls in KINDS:
            return KINDS[cls]
        kind = KINDS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    return None


def kind_for(module: nn.Module, path: str) -> Kind:
    """The Kind of ``module`` at ``path``.

    Raises:
        ValueError: no Kind is registered for the module's type; the message names the supported types.
    """
    kind = find_kind(module)
    if kind is None:
        raise ValueError(
            explain(
                f"target module {path!r} has unsupported type {type(module).__name__}",
                got=type(module).__name__,
                expected=f"one of {', '.join(supported_types())}",
                fix="narrow target_modules (e.g. to the Linear leaves inside it) or register_kind() your type",
            )
        )
    return kind


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear, transformers' Conv1D and quantized linears: the layers "all-linear" selects."""
    kind = find_kind(module)
    return kind is not None and kind.linear_like


# ---- Linear and GPT-2 Conv1D: the same factors, the weight stored the other way round ---------------------
def _linear_factors(in_features: int, out_features: int, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
    return _uninitialised_linear(in_features, r, False), _uninitialised_linear(r, out_features, lora_bias)


def _uninitialised_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An nn.Linear whose weight is left uninitialised (``torch.empty``); the bias, if any, as nn.Linear's.

    Every init method (inits.py, "none" included) writes both factors right after, so drawing nn.Linear's
    kaiming weights first would only be thrown away: PEFT draws A, B and then A again, which is most of
    its ``get_peft_model`` time at large ranks. Skipping the draw changes no distribution, only which
    random numbers A gets from a given seed. Honours ``torch.device("meta")`` (planned layouts).
    """
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    # straight into the instance and parameter dicts: Module.__setattr__'s checks cost more than the tensors
    layer.__dict__.update(in_features=in_features, out_features=out_features)
    layer._parameters["weight"] = nn.Parameter(torch.empty(out_features, in_features))
    bound = in_features**-0.5
    layer._parameters["bias"] = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None
    return layer


def _linear_branch(base: Base, x: Tensor, A: nn.Module, B: nn.Module) -> Tensor:
    out: Tensor = B(A(x))  # (..., out) = (..., in) Aᵀ Bᵀ
    return out


def _linear_weight_only(base: Base, x: Tensor) -> Tensor:
    return F.linear(x, base.weight.to(x.dtype))  # W (out, in)


def _conv1d_gpt2_weight_only(base: Base, x: Tensor) -> Tensor:
    return F.linear(x, base.weight.T.to(x.dtype))  # transformers' Conv1D stores W as (in, out)


# PEFT's lora.Linear: "all-linear" picks it, ops.py fuses it, data-driven inits calibrate it
_PEFT_LINEAR: dict[str, Any] = dict(linear_like=True, fused=True, undrawn_factors=True, calibrated=True)


register_kind(
    nn.Linear,
    Kind(
        name="Linear",
        features=lambda m: (m.in_features, m.out_features),
        make_factors=lambda m, r, bias: _linear_factors(m.in_features, m.out_features, r, bias),
        branch=_linear_branch,
        delta_weight=lambda m, A, B: B @ A,  # (out, in)
        dora=DoraSupport(out_dim=0, weight_only=_linear_weight_only),
        **_PEFT_LINEAR,
    ),
)

register_kind(
    "transformers.pytorch_utils.Conv1D",
    Kind(
        name="Conv1D",
        features=lambda m: (m.weight.shape[0], m.weight.shape[1]),  # weight is (in, out)
        make_factors=lambda m, r, bias: _linear_factors(m.weight.shape[0], m.weight.shape[1], r, bias),
        branch=_linear_branch,
        delta_weight=lambda m, A, B: (B @ A).T,  # (in, out)
        weight_is_in_out=True,
        matrix=lambda m: m.weight.T,
        set_matrix=lambda m, M: m.weight.copy_(M.T),
        dora=DoraSupport(out_dim=1, weight_only=_conv1d_gpt2_weight_only),
        **_PEFT_LINEAR,
    ),
)


# ---- Embedding: A is a lookup table of rank-r codes, B maps them to the embedding dimension ---------------
def _embedding_factors(m: nn.Embedding, r: int, lora_bias: bool) -> tuple[nn.Parameter, nn.Parameter]:
    if lora_bias:
        raise ValueError(
            explain("lora_bias=True is not supported", where="an nn.Embedding target", got=True,
                    expected="lora_bias=False", fix="an embedding lookup has no bias to learn")
        )
    # PEFT creates both factors with randn; init_lora_weights=True then zeroes A.
    return nn.Parameter(torch.randn(r, m.num_embeddings)), nn.Parameter(torch.randn(m.embedding_dim, r))


def _placed_parameters(A: Tensor, B: Tensor, device: torch.device | None, dtype: torch.dtype
                       ) -> tuple[nn.Parameter, nn.Parameter]:
    placed = [nn.Parameter(factor.detach().to(device=device, dtype=dtype)) for factor in (A, B)]
    return placed[0], placed[1]


def _embedding_branch(m: nn.Embedding, ids: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """A.T[ids] Bᵀ, times the base's ``embed_scale`` when it has one (Gemma's scaled embeddings scale their
    output, so the update of W[ids] must be scaled the same way: (W + ΔW)[ids]·c = base + ΔW[ids]·c)."""
    codes = F.embedding(ids, A.T, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
    out = codes @ B.T  # (..., r) @ (r, dim)
    scale = getattr(m, "embed_scale", None)
    return out if scale is None else out * scale.to(out.dtype)


register_kind(
    nn.Embedding,
    Kind(
        name="Embedding",
        features=lambda m: (m.num_embeddings, m.embedding_dim),
        make_factors=_embedding_factors,
        branch=_embedding_branch,
        delta_weight=lambda m, A, B: (B @ A).T,  # (num, dim)
        embedding=True,
        matrix=lambda m: m.weight.T,  # (dim, num): "out" is the embedding dimension
        set_matrix=lambda m, M: m.weight.copy_(M.T),
        dora=DoraSupport(out_dim=1),  # PEFT applies no dropout to ids, so no W dropout(x) term
        containers=("lora_embedding_A", "lora_embedding_B"),  # Parameters, PEFT's names
        factor_weights=lambda A, B: (A, B),
        place_factors=_placed_parameters,
        drops_input=False,  # PEFT applies no dropout to embedding ids
    ),
)


# ---- ConvNd: A convolves like the base (kernel, stride, padding, dilation), B mixes channels 1x1 ----------
def _conv_factors(m: nn.modules.conv._ConvNd, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
    if r % m.groups:
        raise ValueError(
            f"Targeting a {type(m).__name__} with groups={m.groups} and rank {r}. Currently, support is limited to "
            "conv layers where the rank is divisible by groups. Either choose a different rank or do not target "
            "this specific layer. "
            + explain("rank does not split into the groups", got=f"r={r}", expected=f"a multiple of {m.groups}",
                      fix="set r (or a rank_pattern entry for this layer) to a multiple of groups")
        )
    # the base's own class for torch's convs, else the plain one of its dimension (a subclass may take other arguments)
    conv: Callable[..., nn.Module] = _CONV_BY_DIMS[len(m.kernel_size)]
    if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        conv = type(m)
    # Dilation follows the base so both paths see the same receptive field (PEFT 0.21.2 drops it, which
    # misaligns outputs for dilated convs); groups on B follow PEFT so the factor shapes are identical.
    A = conv(m.in_channels, r, m.kernel_size, m.stride, m.padding, dilation=m.dilation, bias=False)
    B = conv(r, m.out_channels, 1, 1, groups=m.groups, bias=lora_bias)
    return A, B


def _conv_delta_weight(m: nn.modules.conv._ConvNd, A: Tensor, B: Tensor) -> Tensor:
    """ΔW[o, i, *k] = Σ_r B[o, r] A[r, i, *k]  (B is 1x1, so the composition is a contraction over r)."""
    if m.groups != 1:  # B A x mixes all input channels, which no grouped weight (out, in/g, *k) can hold
        raise NotImplementedError(
            "Merging is not supported for _ConvNd layers with groups > 1! "
            + explain("cannot form ΔW", where=f"a {type(m).__name__} with groups={m.groups}",
                      expected="groups=1", fix="keep this adapter unmerged (its LoRA branch reads every input "
                                               "channel, which a grouped convolution's weight cannot express)")
        )
    delta: Tensor = torch.tensordot(B.flatten(1), A, dims=1)  # (out, in, *k)
    return delta


def _conv_weight_only(base: Base, x: Tensor) -> Tensor:
    # _conv_forward honours padding_mode; PEFT calls F.convNd with zero padding (same result for "zeros")
    out: Tensor = base._conv_forward(x, base.weight.to(x.dtype), None)
    return out


_CONV_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_DORA = DoraSupport(out_dim=0, spatial=True, weight_only=_conv_weight_only)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kind(
        _conv,
        Kind(
            name=_conv.__name__,
            features=lambda m: (m.in_channels, m.out_channels),
            make_factors=_conv_factors,
            branch=_linear_branch,
            delta_weight=_conv_delta_weight,
            matrix=lambda m: m.weight.flatten(1),  # (out, in/groups · k...)
            dora=_CONV_DORA,
        ),
    )

