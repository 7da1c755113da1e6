"""Registry of LoRA variants: strategies that take over one adapter's forward and merge in a ``LoraLayer``.

DoRA (weight-decomposed LoRA, arXiv:2402.09353, as PEFT 0.21.2 runs it). Seen as an (out, K) matrix
(``Kind.matrix``: K = in for Linear/Conv1D, num_embeddings for Embedding, in·k for ConvNd), W' = W + s·B A
is split into a learned magnitude m (one entry per output row) and a direction normalised row by row:

    n  = ‖W + s·B A‖ per row, detached                      (out,)   m is initialised to n
    W' = (m / n) ⊙ (W + s·B A)                              rows scaled
    y  = base(x) + (m/n − 1)·(base(x) − bias) + (m/n)·s·B A dropout(x)

When dropout is active (training, p > 0) PEFT recomputes the base term on the dropped input, W·dropout(x)
without bias, and feeds the same dropped input to the LoRA branch. ``y`` is the layer's running output,
so with several active adapters a DoRA adapter also rescales the adapters added before it, as in PEFT;
merging keeps that: W' = (m/n)(W_current + s·ΔW), n taken from the unmerged W. PEFT's m has the shape
that broadcasts against the output: (out,) for Linear/Conv1D/Embedding, (1, out, 1, ...) for ConvNd.

The norm never forms the (out, K) matrix W + s·B A; per row i (the low-rank identity):

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·Σ_j W_ij (BA)_ij + s²·‖(BA)_i‖²
                     = ‖W_i‖² + 2s·((W Aᵀ) ⊙ B)_i· + s²·((B (A Aᵀ)) ⊙ B)_i·
      W (out, K)   A (r, K)   B (out, r)   W Aᵀ (out, r)   A Aᵀ (r, r)

‖W_i‖² is cached per base-weight version, and in eval mode n itself is cached, keyed on the
(storage, ``_version``) of W, A and B, so inference pays for the norm once (PEFT recomputes it every call).
In-place changes made through autograd-visible ops (optimizer steps, ``copy_``, merges, loads) bump
``_version``; a write through ``.data`` does not, and ``train()`` clears the cache for that case.

BD-LoRA (block-diagonal LoRA for multi-LoRA tensor-parallel serving, as PEFT 0.21.2 runs it), Linear and Conv1D only. One factor
of the listed modules is block-diagonal with N blocks, so that a tensor-parallel shard needs no all-gather:
A for row-sharded layers (o_proj, down_proj), B for column-sharded ones (q/k/v, up, gate):

    A = diag(A_1, ..., A_N),  A_i (r/N, in/N)   stored compactly as [A_1; ...; A_N]  (r, in/N)
    B = diag(B_1, ..., B_N),  B_i (out/N, r/N)  stored compactly as [B_1; ...; B_N]  (out, r/N)
    y = base(x) + s·B A dropout(x),  block i of A x = A_i x_i with x = [x_1, ..., x_N] split along in

The compact weight keeps PEFT's key (``lora_A.<name>.weight``). A block-diagonal A starts as
kaiming_uniform_ (a = 0), a block-diagonal B as zeros, as in PEFT; the other factor follows the init.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .errors import explain
from .kinds import Kind

if TYPE_CHECKING:
    from .layer import LayerSpec, LoraLayer


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
    """

    init: Callable[[LoraLayer, str, Tensor, Tensor, float], dict[str, nn.Module] | None]
    forward: Callable[[LoraLayer, str, Tensor, Tensor], Tensor]
    merge: Callable[[LoraLayer, str, Tensor, float], Tensor]
    shapes: Callable[[Kind, nn.Module], dict[str, tuple[int, ...]]]
    dense: Callable[[LoraLayer, str], tuple[Tensor, Tensor]] | None = None
    bind: Callable[[LayerSpec], Variant] | None = None


# ---- DoRA per base kind ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoraKind:
    """What DoRA needs to know of a base kind beyond its ``Kind``.

    Attributes:
        out_dim: the output axis of the base weight (0 for (out, ...) layouts, 1 for (in, out) / (num, dim)).
        spatial: the output has (N, out, *spatial) layout (ConvNd): m is (1, out, 1, ...).
        weight_only: (base, x) -> W x without bias in x's dtype, the base term on dropped-out input;
            None where PEFT applies no dropout (Embedding).
    """

    out_dim: int
    spatial: bool = False
    weight_only: Callable[[nn.Module, Tensor], Tensor] | None = None


def _linear_weight_only(base: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, base.weight.to(x.dtype))  # W (out, in)


def _conv1d_gpt2_weight_only(base: nn.Module, x: Tensor) -> Tensor:
    return F.linear(x, base.weight.T.to(x.dtype))  # transformers' Conv1D stores W as (in, out)


def _conv_weight_only(base: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    # _conv_forward honours padding_mode; PEFT calls F.convNd with zero padding (same result for "zeros")
    return base._conv_forward(x, base.weight.to(x.dtype), None)


_CONV = DoraKind(out_dim=0, spatial=True, weight_only=_conv_weight_only)
DORA_KINDS: dict[str, DoraKind] = {  # the kinds PEFT 0.21.2 runs DoRA on, by Kind.name
    "Linear": DoraKind(out_dim=0, weight_only=_linear_weight_only),
    "Conv1D": DoraKind(out_dim=1, weight_only=_conv1d_gpt2_weight_only),
    "Embedding": DoraKind(out_dim=1),
    "Conv1d": _CONV,
    "Conv2d": _CONV,
    "Conv3d": _CONV,
}


def _dora_kind(layer: LoraLayer) -> DoraKind:
    """Raises: ValueError: DoRA is not defined for the layer's kind (PEFT's sentence first)."""
    dora_kind = DORA_KINDS.get(layer.kind.name)
    if dora_kind is None:
        raise ValueError(f"{layer.kind.name} does not support DoRA (yet), please set use_dora to False. "
                         + explain("use_dora=True is not supported", where=f"a {layer.kind.name} target",
                                   expected=f"one of {', '.join(DORA_KINDS)}",
                                   fix="exclude these modules or set use_dora=False"))
    return dora_kind


def _magnitude_shape(dora_kind: DoraKind, out_features: int, base: nn.Module) -> tuple[int, ...]:
    if dora_kind.spatial:
        return (1, out_features) + (1,) * (base.weight.dim() - 2)  # (1, out, 1, ...)
    return (out_features,)


def _as_matrices(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    return A.flatten(1), B.flatten(1)  # A (r, K), B (out, r), whatever the factor layout


def row_norm(W: Tensor, A: Tensor, B: Tensor, s: float, W_sq: Tensor | None = None) -> Tensor:
    """n_i = ‖W_i + s·(B A)_i‖ by the low-rank identity (module docstring), in A's dtype.

    Under torch.autocast the products run with autocast off, in A's dtype: the identity subtracts nearly
    equal terms, which bfloat16 would round away (PEFT's norm is float32 as well, on a bf16-rounded B A).

    Args:
        W: (out, K). A: (r, K). B: (out, r). W_sq: ‖W_i‖², (out,), when already known.
    """
    if ops.autocast_dtype(A) is not None:
        with torch.autocast(A.device.type, enabled=False):
            return row_norm(W, A, B, s, W_sq)
    W = W.to(A.dtype)
    if W_sq is None:
        W_sq = torch.linalg.vector_norm(W, dim=1).square()  # (out,)
    cross = ((W @ A.T) * B).sum(1)  # rowdot(W, BA): (out, r) ⊙ (out, r) -> (out,)
    lora_sq = ((B @ (A @ A.T)) * B).sum(1)  # ‖(BA)_i‖²: (out,)
    return (W_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()


def weight_norm(W: Tensor, A: Tensor, B: Tensor, s: float, W_sq: Tensor | None = None) -> Tensor:
    """n_i = ‖W_i + s·L_i‖, (out,), in A's dtype, for factor weights in any layout (W: (out, K) as Kind.matrix).

    L = B A by the low-rank identity (``row_norm``), except for grouped convs (B (out, r/g, 1, ...)), where
    PEFT 0.21.2's DoRA takes L = reshape(B.reshape(out/g, r) @ A.reshape(r, in·k), (out, in/g·k)): the r·in·k
    update of the non-grouped A read in the grouped weight's layout (not the layer's true update, which
    no grouped weight can hold); lorakit computes the same L densely (conv weights are small).
    """
    r = A.shape[0]
    if B.flatten(1).shape[1] == r:
        return row_norm(W, *_as_matrices(A, B), s, W_sq)
    L = (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(W.shape[0], -1)  # (out, in/g·k)
    return torch.linalg.vector_norm(W.to(A.dtype) + s * L, dim=1)


def _key(*tensors: Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


class Magnitude(nn.Module):
    """DoRA's m for one adapter: ``weight`` in PEFT's shape, and a cache of n (not part of the state dict)."""

    def __init__(self, m: Tensor, dora_kind: DoraKind) -> None:
        super().__init__()
        self.weight = nn.Parameter(m)
        self.dora_kind = dora_kind
        self.merged_norm: Tensor | None = None  # n at merge time, for unmerge (PEFT caches it the same way)
        self._row_sq: tuple[tuple, Tensor] | None = None  # (key of W, ‖W_i‖²)
        self._norm: tuple[tuple, Tensor] | None = None  # (key of W, A, B, s, mode, n), eval mode only

    def train(self, mode: bool = True) -> Magnitude:
        if mode:
            self._row_sq = self._norm = None
        return super().train(mode)

    def norm(self, layer: LoraLayer, A: Tensor, B: Tensor, s: float) -> Tensor:
        """n = ‖W + s·B A‖ per row of ``layer``'s base weight, detached, (out,); cached in eval mode."""
        weight = layer.base_layer.weight
        key = _key(weight, A, B) + (s, torch.is_inference_mode_enabled())
        if not self.training and self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        with torch.no_grad():
            W = layer.kind.matrix(layer.base_layer)  # (out, K), a view
            if self._row_sq is None or self._row_sq[0] != _key(weight) or self._row_sq[1].dtype != A.dtype:
                self._row_sq = (_key(weight), torch.linalg.vector_norm(W.to(A.dtype), dim=1).square())
            n = weight_norm(W, A, B, s, self._row_sq[1])
        if not self.training:
            self._norm = (key, n)
        return n


def _factor_weights(layer: LoraLayer, adapter_name: str) -> tuple[Tensor, Tensor]:
    A, B = layer.factors(adapter_name)
    return (A, B) if layer.kind.embedding else (A.weight, B.weight)


# ---- DoRA ------------------------------------------------------------------------------------------------------
def dora_init(layer: LoraLayer, adapter_name: str, A: Tensor, B: Tensor, s: float) -> None:
    """m = ‖W + s·B A‖ per output row, in the factors' dtype and PEFT's shape.

    Raises:
        ValueError: the layer's kind has no DoRA (see ``DORA_KINDS``), or it is a grouped conv.
    """
    dora_kind = _dora_kind(layer)
    with torch.no_grad():
        m = weight_norm(layer.kind.matrix(layer.base_layer), A, B, s)
    shape = _magnitude_shape(dora_kind, layer.out_features, layer.base_layer)
    layer.lora_magnitude_vector[adapter_name] = Magnitude(m.reshape(shape), dora_kind)


def dora_forward(layer: LoraLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + (m/n − 1)·(y − bias) + (m/n)·s·B A x: ops.dora_ (in place on y) where it applies, else the reference.

    ops.dora_ covers Linear and Conv1D without active dropout, lora_bias, autocast or a zero magnitude
    entry, y already in the adapter's dtype; everything else runs ``dora_reference``.
    """
    A, B = layer.factors(adapter_name)
    magnitude = layer.lora_magnitude_vector[adapter_name]
    if not (ops.FUSED and layer.kind.name in ops.FUSED_KINDS and B.bias is None and layer.dropout_p(adapter_name) == 0
            and y.dtype == A.weight.dtype and ops.autocast_dtype(x) is None
            and bool((magnitude.weight != 0).all())):
        return dora_reference(layer, adapter_name, x, y)
    s = layer.scaling[adapter_name]
    n = magnitude.norm(layer, A.weight, B.weight, s)
    bias = getattr(layer.base_layer, "bias", None)
    x = x if x.dtype == A.weight.dtype else x.to(A.weight.dtype)
    return ops.dora_(y, x, A.weight, B.weight, magnitude.weight, n, None if bias is None else bias.to(y.dtype), s)


def dora_reference(layer: LoraLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + (m/n − 1)·(y − bias) + (m/n)·s·B A x; in training with dropout, W dropout(x) replaces y − bias."""
    A, B = layer.factors(adapter_name)
    s = layer.scaling[adapter_name]
    magnitude = layer.lora_magnitude_vector[adapter_name]
    A_weight, B_weight = (A, B) if layer.kind.embedding else (A.weight, B.weight)
    n = magnitude.norm(layer, A_weight, B_weight, s)
    f = magnitude.weight / n.view(magnitude.weight.shape)  # m/n, broadcasts against y
    if not layer.kind.embedding and x.dtype != A_weight.dtype:
        x = x.to(A_weight.dtype)
    dropout = layer.lora_dropout[adapter_name]
    weight_only = magnitude.dora_kind.weight_only
    if layer.training and weight_only is not None and not isinstance(dropout, nn.Identity):
        x = dropout(x)
        base = weight_only(layer.base_layer, x)  # W dropout(x), no bias
        return y + ((f - 1) * base + f * layer.kind.branch(layer.base_layer, x, A, B) * s)
    lora = layer.kind.branch(layer.base_layer, x, A, B)  # B A x, unscaled
    # y + (f − 1)(y − bias) + f·s·lora rearranged to f·(y + s·lora) + (1 − f)·bias: two full-size kernels.
    # Under autocast y and lora are both half precision; PEFT's sum is in f's float32, so promote y first.
    if y.dtype != f.dtype:
        y = y.to(torch.promote_types(y.dtype, f.dtype))
    bias = getattr(layer.base_layer, "bias", None)
    if bias is None:
        return torch.add(y, lora, alpha=s) * f
    return torch.addcmul((1 - f) * bias.view(f.shape), f, torch.add(y, lora, alpha=s))


def dora_merge(layer: LoraLayer, adapter_name: str, W: Tensor, sign: float) -> Tensor:
    """Merge: W ← (m/n)(W + s·ΔW) with n from the unmerged base weight. Unmerge: W ← W/(m/n) − s·ΔW."""
    magnitude = layer.lora_magnitude_vector[adapter_name]
    out_dim = magnitude.dora_kind.out_dim
    delta = layer.get_delta_weight(adapter_name).to(W.device)  # s·ΔW, base layout, float32
    if sign > 0:  # n as forward sees it: from W with the adapters merged before this one taken out
        if layer.merged_adapters:
            base = layer.unmerged_weight().movedim(out_dim, 0).flatten(1)  # (out, K)
        else:
            base = layer.kind.matrix(layer.base_layer)
        A_weight, B_weight = _factor_weights(layer, adapter_name)
        with torch.no_grad():
            magnitude.merged_norm = weight_norm(base.float(), A_weight.float(), B_weight.float(),
                                                layer.scaling[adapter_name])
    if magnitude.merged_norm is None:
        raise ValueError(explain(f"cannot unmerge DoRA adapter {adapter_name!r}", where=f"lora.{layer.kind.name}",
                                 expected="an adapter merged by this layer", fix="merge it first"))
    f = (magnitude.weight.detach().float().flatten() / magnitude.merged_norm).to(W.device)  # (out,)
    f = f.view([-1 if d == out_dim else 1 for d in range(W.dim())])  # along W's output axis
    return f * (W + delta) if sign > 0 else W / f - delta


def dora_shapes(kind: Kind, base: nn.Module) -> dict[str, tuple[int, ...]]:
    """{"lora_magnitude_vector": shape of m} for a base layer about to get a DoRA adapter."""
    dora_kind = DORA_KINDS.get(kind.name, DORA_KINDS["Linear"])  # an unsupported kind is refused at init
    return {"lora_magnitude_vector": _magnitude_shape(dora_kind, kind.features(base)[1], base)}


# ---- BD-LoRA ---------------------------------------------------------------------------------------------------
class BlockDiagonalLinear(nn.Module):
    """y = diag(W_1, ..., W_N) x with ``weight`` = [W_1; ...; W_N], (out, in/N); PEFT's module of the same name."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, *, zero: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(explain("BD-LoRA factor does not split into blocks", got=f"in_features={in_features}, "
                                     f"out_features={out_features}, nblocks={nblocks}",
                                     expected="r and the layer's features divisible by nblocks",
                                     fix="pick r (rank_pattern) and nblocks so that they divide evenly"))
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device, dtype=dtype))
        with torch.no_grad():
            if zero:
                nn.init.zeros_(self.weight)
            else:
                nn.init.kaiming_uniform_(self.weight)  # a = 0, as PEFT

    def forward(self, x: Tensor) -> Tensor:
        N = self.nblocks
        blocks = self.weight.view(N, self.out_features // N, self.in_features // N)  # (N, out/N, in/N)
        y = torch.einsum("...im,inm->...in", x.unflatten(-1, (N, -1)), blocks)  # (..., N, out/N)
        return y.flatten(-2)  # (..., out)

    def dense(self) -> Tensor:
        """diag(W_1, ..., W_N), (out, in)."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))


def _bdlora_init(factor: str | None, nblocks: int, layer: LoraLayer, adapter_name: str, A: Tensor, B: Tensor,
                 s: float) -> dict[str, nn.Module] | None:
    """Replace the block-diagonal factor ("A" or "B"; None: plain LoRA) with a compact BlockDiagonalLinear.

    Raises:
        ValueError: the layer is not Linear / Conv1D, or r or its features are not divisible by nblocks.
    """
    if layer.kind.name not in ("Linear", "Conv1D"):
        raise ValueError(explain("use_bdlora is not supported", where=f"a {layer.kind.name} target",
                                 expected="Linear or Conv1D targets", fix="exclude these modules or drop use_bdlora"))
    placement = dict(device=A.device, dtype=A.dtype)
    if factor == "A":
        return {"lora_A": BlockDiagonalLinear(layer.in_features, A.shape[0], nblocks, zero=False, **placement)}
    if factor == "B":
        return {"lora_B": BlockDiagonalLinear(B.shape[1], layer.out_features, nblocks, zero=True, **placement)}
    return None


def _bdlora_forward(layer: LoraLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + s·B A dropout(x); A and B run their own (block-diagonal) matmuls."""
    return y + layer._branch(adapter_name, x) * layer.scaling[adapter_name]


def _bdlora_merge(layer: LoraLayer, adapter_name: str, W: Tensor, sign: float) -> Tensor:
    """W ± s·B A with the dense block-diagonal factor (``get_delta_weight`` goes through ``dense``)."""
    return W + sign * layer.get_delta_weight(adapter_name).to(W.device)


def _bdlora_dense(layer: LoraLayer, adapter_name: str) -> tuple[Tensor, Tensor]:
    A, B = layer.factors(adapter_name)
    return tuple(m.dense() if isinstance(m, BlockDiagonalLinear) else m.weight for m in (A, B))


def _bdlora_shapes(factor: str | None, nblocks: int, r: int, kind: Kind, base: nn.Module) -> dict:
    in_features, out_features = kind.features(base)
    if factor == "A":
        return {"lora_A": (r, in_features // nblocks)}
    return {"lora_B": (out_features, r // nblocks)} if factor == "B" else {}


def _bdlora_bind(spec: LayerSpec) -> Variant:
    factor, nblocks = spec.bd_factor, spec.nblocks
    return Variant(init=partial(_bdlora_init, factor, nblocks), forward=_bdlora_forward, merge=_bdlora_merge,
                   shapes=partial(_bdlora_shapes, factor, nblocks, spec.r), dense=_bdlora_dense)


VARIANTS: dict[str, Variant] = {
    "dora": Variant(init=dora_init, forward=dora_forward, merge=dora_merge, shapes=dora_shapes),
    "bdlora": Variant(init=partial(_bdlora_init, None, 1), forward=_bdlora_forward, merge=_bdlora_merge,
                      shapes=partial(_bdlora_shapes, None, 1, 0), dense=_bdlora_dense, bind=_bdlora_bind),
}


def resolve_variant(spec: LayerSpec) -> Variant | None:
    """The Variant that runs an adapter created from ``spec`` (None for plain LoRA)."""
    if spec.variant is None:
        return None
    variant = VARIANTS[spec.variant]
    return variant.bind(spec) if variant.bind is not None else variant
