"""DoRA (weight-decomposed LoRA, arXiv:2402.09353, as PEFT 0.21.2 runs it). Seen as an (out, K) matrix
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

Under ``torch.compile`` (while Dynamo traces) the forward is ``dora_reference``, plain ops that trace
without a graph break and that inductor fuses, and n is recomputed per call, not cached: the cache's keys
(``data_ptr``, ``_version``) cannot be guarded on. The fused ``ops.dora_`` stays the eager path.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import explain
from ..kinds import DoraSupport, Kind, registered_kinds
from . import Variant, VariantLayer, register_variant

if TYPE_CHECKING:
    from ..kinds import Kind
    from ..config import LoraConfig
    from ..layer import LayerSpec

MAGNITUDE = "lora_magnitude_vector"  # PEFT's container of m (one Magnitude per adapter)


_UNSUPPORTED = DoraSupport(out_dim=0)  # shapes only; dora_init refuses the kind


def _dora_kind(layer: VariantLayer) -> DoraSupport:
    """Raises: ValueError: DoRA is not defined for the layer's kind (``Kind.dora``; PEFT's sentence first)."""
    dora_kind = layer.kind.dora
    if dora_kind is None:
        supported = dict.fromkeys(kind.name for kind in registered_kinds() if kind.dora is not None)
        raise ValueError(f"{layer.kind.name} does not support DoRA (yet), please set use_dora to False. "
                         + explain("use_dora=True is not supported", where=f"a {layer.kind.name} target",
                                   expected=f"one of {', '.join(supported)}",
                                   fix="exclude these modules or set use_dora=False"))
    return dora_kind


def _magnitude_shape(dora_kind: DoraSupport, out_features: int, base: nn.Module) -> tuple[int, ...]:
    if dora_kind.spatial:
        return (1, out_features) + (1,) * (cast(Tensor, base.weight).dim() - 2)  # (1, out, 1, ...)
    return (out_features,)


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
        return row_norm(W, A.flatten(1), B.flatten(1), s, W_sq)  # A (r, K), B (out, r), whatever the factor layout
    L = (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(W.shape[0], -1)  # (out, in/g·k)
    n: Tensor = torch.linalg.vector_norm(W.to(A.dtype) + s * L, dim=1)
    return n


def _key(*tensors: Tensor) -> tuple[Any, ...]:
    return tuple((t.data_ptr(), t._version) for t in tensors)


class Magnitude(nn.Module):
    """DoRA's m for one adapter: ``weight`` in PEFT's shape, and a cache of n (not part of the state dict)."""

    def __init__(self, m: Tensor, dora_kind: DoraSupport) -> None:
        super().__init__()
        self.weight = nn.Parameter(m)
        self.dora_kind = dora_kind
        self.merged_norm: Tensor | None = None  # n at merge time, for unmerge (PEFT caches it the same way)
        self._row_sq: tuple[tuple[Any, ...], Tensor] | None = None  # (key of W, ‖W_i‖²)
        self._norm: tuple[tuple[Any, ...], Tensor] | None = None  # (key of W, A, B, s, mode, n), eval mode only

    def train(self, mode: bool = True) -> Magnitude:
        if mode:
            self._row_sq = self._norm = None
        return super().train(mode)

    def norm(self, layer: VariantLayer, A: Tensor, B: Tensor, s: float) -> Tensor:
        """n = ‖W + s·B A‖ per row of ``layer``'s base weight, detached, (out,); cached in eval mode."""
        if torch.compiler.is_compiling():  # no cache: data_ptr and _version keys would break the graph
            with torch.no_grad():
                return weight_norm(layer.kind.matrix(layer.base_layer), A, B, s)
        weight = layer.kind.weight(layer.base_layer)  # the stored tensor (codes for a quantized base): cache key
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


# ---- DoRA ------------------------------------------------------------------------------------------------------
def dora_init(layer: VariantLayer, adapter_name: str, A: Tensor, B: Tensor, s: float) -> None:
    """m = ‖W + s·B A‖ per output row, in the factors' dtype and PEFT's shape.

    Raises:
        ValueError: the layer's kind has no DoRA (``Kind.dora`` is None), or it is a grouped conv.
    """
    dora_kind = _dora_kind(layer)
    with torch.no_grad():
        m = weight_norm(layer.kind.matrix(layer.base_layer), A, B, s)
    shape = _magnitude_shape(dora_kind, layer.out_features, layer.base_layer)
    layer.container(MAGNITUDE)[adapter_name] = Magnitude(m.reshape(shape), dora_kind)


def dora_forward(layer: VariantLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + (m/n − 1)·(y − bias) + (m/n)·s·B A x: ops.dora_ (in place on y) where it applies, else the reference.

    ops.dora_ covers Linear and Conv1D without active dropout, lora_bias, autocast or a zero magnitude
    entry, y already in the adapter's dtype; everything else runs ``dora_reference``.
    """
    A, B = layer.factors(adapter_name)
    magnitude = layer.container(MAGNITUDE)[adapter_name]
    if not (ops.FUSED and not torch.compiler.is_compiling() and layer.kind.fused and B.bias is None and layer.dropout_p(adapter_name) == 0
            and y.dtype == A.weight.dtype and ops.autocast_dtype(x) is None
            and bool((magnitude.weight != 0).all())):
        return dora_reference(layer, adapter_name, x, y)
    s = layer.scaling[adapter_name]
    n = magnitude.norm(layer, A.weight, B.weight, s)
    bias = getattr(layer.base_layer, "bias", None)
    x = x if x.dtype == A.weight.dtype else x.to(A.weight.dtype)
    return ops.dora_(y, x, A.weight, B.weight, magnitude.weight, n, None if bias is None else bias.to(y.dtype), s)


def dora_reference(layer: VariantLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + (m/n − 1)·(y − bias) + (m/n)·s·B A x; in training with dropout, W dropout(x) replaces y − bias."""
    A, B = layer.factors(adapter_name)
    s = layer.scaling[adapter_name]
    magnitude = layer.container(MAGNITUDE)[adapter_name]
    A_weight, B_weight = layer.kind.factor_weights(A, B)
    n = magnitude.norm(layer, A_weight, B_weight, s)
    f = magnitude.weight / n.view(magnitude.weight.shape)  # m/n, broadcasts against y
    if not layer.kind.embedding and x.dtype != A_weight.dtype:
        x = x.to(A_weight.dtype)
    weight_only = magnitude.dora_kind.weight_only
    if layer.training and weight_only is not None and layer.dropout_p(adapter_name) > 0:
        x = layer.apply_dropout(adapter_name, x)
        base = weight_only(layer.base_layer, x)  # W dropout(x), no bias
        out: Tensor = y + ((f - 1) * base + f * layer.kind.branch(layer.base_layer, x, A, B) * s)
        return out
    lora = layer.kind.branch(layer.base_layer, x, A, B)  # B A x, unscaled
    # y + (f − 1)(y − bias) + f·s·lora rearranged to f·(y + s·lora) + (1 − f)·bias: two full-size kernels.
    # Under autocast y and lora are both half precision; PEFT's sum is in f's float32, so promote y first.
    if y.dtype != f.dtype:
        y = y.to(torch.promote_types(y.dtype, f.dtype))
    bias = getattr(layer.base_layer, "bias", None)
    if bias is None:
        plain: Tensor = torch.add(y, lora, alpha=s) * f
        return plain
    return torch.addcmul((1 - f) * bias.view(f.shape), f, torch.add(y, lora, alpha=s))


def dora_merge(layer: VariantLayer, adapter_name: str, W: Tensor, sign: float) -> Tensor:
    """Merge: W ← (m/n)(W + s·ΔW) with n from the unmerged base weight. Unmerge: W ← W/(m/n) − s·ΔW."""
    magnitude = layer.container(MAGNITUDE)[adapter_name]
    out_dim = magnitude.dora_kind.out_dim
    delta = layer.get_delta_weight(adapter_name).to(W.device)  # s·ΔW, base layout, float32
    if sign > 0:  # n as forward sees it: from W with the adapters merged before this one taken out
        if layer.merged_adapters:
            base = layer.unmerged_weight().movedim(out_dim, 0).flatten(1)  # (out, K)
        else:
            base = layer.kind.matrix(layer.base_layer)
        A_weight, B_weight = layer.kind.factor_weights(*layer.factors(adapter_name))
        with torch.no_grad():
            magnitude.merged_norm = weight_norm(base.float(), A_weight.float(), B_weight.float(),
                                                layer.scaling[adapter_name])
    if magnitude.merged_norm is None:
        raise ValueError(explain(f"cannot unmerge DoRA adapter {adapter_name!r}", where=f"lora.{layer.kind.name}",
                                 expected="an adapter merged by this layer", fix="merge it first"))
    f = (magnitude.weight.detach().float().flatten() / magnitude.merged_norm).to(W.device)  # (out,)
    f = f.view([-1 if d == out_dim else 1 for d in range(W.dim())])  # along W's output axis
    merged: Tensor = f * (W + delta) if sign > 0 else W / f - delta
    return merged


def dora_shapes(kind: Kind, base: nn.Module) -> dict[str, Any]:
    """{"lora_magnitude_vector": shape of m} for a base layer about to get a DoRA adapter."""
    dora_kind = kind.dora or _UNSUPPORTED  # an unsupported kind is refused at init
    return {MAGNITUDE: _magnitude_shape(dora_kind, kind.features(base)[1], base)}


register_variant("dora", Variant(init=dora_init, forward=dora_forward, merge=dora_merge, shapes=dora_shapes,
                                 select=lambda config: bool(config.use_dora)))
