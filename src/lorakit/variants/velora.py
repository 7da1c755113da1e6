"""VeLoRA (memory-efficient training with rank-1 sub-token projections, arXiv:2405.17991, as PEFT 0.21.2 runs it).

The forward is plain LoRA; only what the A projection keeps for its backward changes. For the rows x_t of the
layer input (T = all leading dims, K = in_features), split each row into G = ``num_groups`` sub-tokens of
D = ⌈K/G⌉ features (zero-padded to G·D), x_t = [x_t1, ..., x_tG], x_tg ∈ R^D, and take one unit vector v ∈ R^D:

    forward   h = A x,   y = base(x) + s·B h                                    (unchanged)
    saved     c_tg = ⟨x_tg, v⟩                        (T, G) instead of x (T, K): a factor D smaller
    backward  x̂_tg = λ·c_tg·v,  x̂_t = first K features of [x̂_t1, ..., x̂_tG]   (λ = ``scale``)
              ∂L/∂A = (∂L/∂h)ᵀ x̂    (r, K),   ∂L/∂x = (∂L/∂h) A   (exact)

B's gradient sees the exact h. v, kept per adapter in the buffer ``lora_velora_embed.<adapter>`` (saved with the
adapter, in the adapter's dtype), follows ``init_type``:

    "random"              v = n/‖n‖, n ~ N(0, I_D) drawn in the base weight's dtype when the adapter is created
    "batch_average"       v = μ/‖μ‖, μ = mean over t, g of x_tg (padding included), at every training forward
    "batch_average_once"  the same, at the first training forward only (v starts at zero)
    a zero μ gives v = 1/√D

"Training forward" means the layer is in training mode with autograd on; otherwise the branch is plain LoRA
and v is untouched. x is the adapter's input after dropout. Merging is plain LoRA's W ± s·B A (v only shapes
gradients). Only Linear and transformers' Conv1D bases take VeLoRA (PEFT's other layers refuse it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_subconfig, strict_init
from ..errors import explain
from . import BufferDict, Variant, VariantLayer, plain_merge, register_variant

if TYPE_CHECKING:
    from ..kinds import Kind
    from ..config import LoraConfig

INIT_TYPES = ("batch_average_once", "batch_average", "random")
EMBED = "lora_velora_embed"  # PEFT's name of the per-adapter buffer container: key <path>.lora_velora_embed.<name>
VELORA_KINDS = ("Linear", "Conv1D")  # the bases PEFT's lora.Linear wraps
# PEFT's refusal for the other layer kinds (by Kind.name); any other kind (bnb's Linear4bit, Linear8bitLt) gets
# "<kind> does not support VeLoRA."
REFUSALS = {
    "Embedding": "Invalid or unsupported variant combination: ('velora_config',)",
    "Conv1d": "VeLoRA does not support adapting conv layers.",
    "Conv2d": "VeLoRA does not support adapting conv layers.",
    "Conv3d": "VeLoRA does not support adapting conv layers.",
    "MultiheadAttention": "MultiheadAttention does not support VeLoRA, please set `velora_config=None`.",
}


@strict_init
@dataclass
class VeloraConfig:
    """VeLoRA's settings (PEFT's ``VeloraConfig``): G = ``num_groups`` sub-tokens per row, λ = ``scale`` on the
    reconstruction, and how v is set, ``init_type`` (module docstring).

    Raises:
        ValueError: num_groups not a positive int, scale not a positive number, or an unknown init_type
            (PEFT's sentence first).
    """

    num_groups: int = 64
    scale: float = 1.0
    init_type: Literal["batch_average", "batch_average_once", "random"] = "batch_average"

    def __post_init__(self) -> None:
        where = "VeloraConfig"
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int):
            raise ValueError(explain("invalid num_groups", where=where, got=self.num_groups, expected="a positive int"))
        if self.num_groups <= 0:
            raise ValueError(f"`num_groups` should be positive, got {self.num_groups}. "
                             + explain("invalid num_groups", where=where, expected="a positive int (G sub-tokens)"))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(explain("invalid scale", where=where, got=self.scale, expected="a positive number"))
        if self.scale <= 0:
            raise ValueError(f"`scale` should be positive, got {self.scale}. "
                             + explain("invalid scale", where=where, expected="a positive number (λ)"))
        if self.init_type not in INIT_TYPES:
            raise ValueError(f"Unsupported `init_type` {self.init_type!r}. Supported values are 'batch_average_once', "
                             "'batch_average', and 'random'. "
                             + explain("invalid init_type", where=where, expected=f"one of {list(INIT_TYPES)}"))


class Embeds(BufferDict):
    """v per adapter (persistent buffers, key ``lora_velora_embed.<adapter>``) and ``initialized``, one flag per
    adapter (has v been set?; PEFT's ``lora_velora_initialized``); deleting an adapter drops both."""

    def __init__(self) -> None:
        super().__init__()
        self.initialized: dict[str, bool] = {}

    def __delitem__(self, adapter_name: str) -> None:
        super().__delitem__(adapter_name)
        self.initialized.pop(adapter_name, None)


# ---- the math --------------------------------------------------------------------------------------------------
def group_dim(in_features: int, num_groups: int) -> int:
    """D = ⌈K/G⌉, the length of one sub-token."""
    return -(-in_features // num_groups)


def sub_tokens(x: Tensor, num_groups: int) -> Tensor:
    """x (..., K) -> (T, G, D): each row zero-padded to G·D features and cut into G sub-tokens."""
    D = group_dim(x.shape[-1], num_groups)
    pad = num_groups * D - x.shape[-1]
    return (F.pad(x, (0, pad)) if pad else x).reshape(-1, num_groups, D)


def unit(v: Tensor) -> Tensor:
    """v/‖v‖ in float32; the all-ones direction 1/√D when v = 0."""
    v = v.float()
    norm: Tensor = torch.linalg.vector_norm(v)
    if norm == 0:
        return torch.full_like(v, 1 / math.sqrt(v.numel()))
    return v / norm


def compress(x: Tensor, v: Tensor, num_groups: int) -> Tensor:
    """c_tg = ⟨x_tg, v⟩: x (..., K), v (D,) -> (T, G), the rank-1 code of every sub-token."""
    return sub_tokens(x, num_groups) @ v


def reconstruct(c: Tensor, v: Tensor, in_features: int, scale: float) -> Tensor:
    """x̂_t = first K features of [λ·c_t1·v, ..., λ·c_tG·v]: c (T, G), v (D,) -> (T, K)."""
    return (c[..., None] * v).reshape(c.shape[0], -1)[:, :in_features] * scale


class VeloraLinear(torch.autograd.Function):
    """y = x Wᵀ + b that keeps c = compress(x, v, G) for backward instead of x (the paper's op on a linear layer).

    Backward: ∂L/∂W = (∂L/∂y)ᵀ reconstruct(c, v, K, λ) (approximate), ∂L/∂x = (∂L/∂y) W (exact),
    ∂L/∂b = Σ_t ∂L/∂y_t. ``apply(x, W, b or None, v, num_groups, scale)``; for LoRA's A, W = A and b = None.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, b: Tensor | None, v: Tensor, num_groups: int,
                scale: float) -> Tensor:
        ctx.x_shape, ctx.x_dtype, ctx.scale = tuple(x.shape), x.dtype, scale
        ctx.b_dtype = None if b is None else b.dtype
        ctx.save_for_backward(compress(x, v.to(x.dtype), num_groups), W, v)  # (T, G), not x (T, K)
        return F.linear(x, W, b)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        c, W, v = ctx.saved_tensors
        dtype = grad_y.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (T, out)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ W.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)  # (T, out) (out, K)
        if ctx.needs_input_grad[1]:
            x_hat = reconstruct(c.to(dtype), v.to(dtype), ctx.x_shape[-1], ctx.scale)  # (T, K)
            grad_W = (g.T @ x_hat).to(W.dtype)  # (out, K)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.b_dtype)
        return grad_x, grad_W, grad_b, None, None, None


# ---- the Variant -----------------------------------------------------------------------------------------------
def _velora_init(num_groups: int, scale: float, init_type: str, layer: VariantLayer, adapter_name: str, A: Tensor,
                 B: Tensor, s: float) -> None:
    """v for the new adapter in ``layer.lora_velora_embed`` (A's dtype and device): random, or zero until the
    first training forward sets it.

    Raises:
        ValueError: the layer is not a Linear / Conv1D (PEFT's sentence first).
    """
    kind = layer.kind.name
    if kind not in VELORA_KINDS:
        raise ValueError(REFUSALS.get(kind, f"{kind} does not support VeLoRA.") + " " + explain(
            "velora_config is not supported", where=f"a {kind} target", expected=f"one of {', '.join(VELORA_KINDS)}",
            fix="exclude these modules or set velora_config=None"))
    D = group_dim(layer.in_features, num_groups)
    if init_type == "random":
        base_dtype = cast(Tensor, layer.base_layer.weight).dtype  # drawn in the base dtype, as PEFT draws it
        v = unit(torch.randn(D, device=A.device, dtype=base_dtype)).to(base_dtype).to(A.dtype)
    else:
        v = torch.zeros(D, device=A.device, dtype=A.dtype)
    embeds = layer.add_container(EMBED, Embeds())
    setattr(layer, "lora_velora_initialized", embeds.initialized)  # PEFT's attribute: the same dict of flags
    embeds[adapter_name] = v
    embeds.initialized[adapter_name] = init_type == "random"


def _embeds(layer: VariantLayer) -> Embeds:
    """The layer's v container (created by ``_velora_init``)."""
    return cast(Embeds, layer.container(EMBED))


def _update_embed(init_type: str, num_groups: int, embeds: Embeds, adapter_name: str, x: Tensor) -> None:
    """v = μ/‖μ‖ over the sub-tokens of this batch ("batch_average"; "batch_average_once" only while unset)."""
    if init_type == "random" or (init_type == "batch_average_once" and embeds.initialized[adapter_name]):
        return
    with torch.no_grad():
        D = group_dim(x.shape[-1], num_groups)
        mu = sub_tokens(x.detach(), num_groups).reshape(-1, D).mean(0)  # (D,)
        old = embeds[adapter_name]
        embeds[adapter_name] = unit(mu).to(device=old.device, dtype=old.dtype)
        embeds.initialized[adapter_name] = True


def _velora_forward(num_groups: int, scale: float, init_type: str, layer: VariantLayer, adapter_name: str, x: Tensor,
                    y: Tensor) -> Tensor:
    """y + s·B A dropout(x); in a training forward A runs through ``VeloraLinear`` after v is updated."""
    A, B = layer.factors(adapter_name)
    x = layer.apply_dropout(adapter_name, x if x.dtype == A.weight.dtype else x.to(A.weight.dtype))
    if layer.training and torch.is_grad_enabled():
        embeds = _embeds(layer)
        _update_embed(init_type, num_groups, embeds, adapter_name, x)
        h = VeloraLinear.apply(x, A.weight, None, embeds[adapter_name], num_groups,  # type: ignore[no-untyped-call]
                               scale)  # torch's Function.apply is untyped
    else:
        h = A(x)
    out: Tensor = y + B(h) * layer.scaling[adapter_name]
    return out


def _velora_shapes(num_groups: int, kind: Kind, base: nn.Module) -> dict[str, Any]:
    return {EMBED: {"": (group_dim(kind.features(base)[0], num_groups),)}}  # a bare buffer: <EMBED>.<adapter>


def _velora_options(name: str, config: LoraConfig) -> tuple[Any, ...]:
    """(num_groups, scale, init_type) of the config's VeloraConfig."""
    velora = config.velora_config
    assert isinstance(velora, VeloraConfig)  # select() chose this variant; LoraConfig coerced a dict
    return (velora.num_groups, velora.scale, velora.init_type)


def _velora_variant(num_groups: int, scale: float, init_type: str) -> Variant:
    """The Variant for one layer's (num_groups, scale, init_type); ``bind``: from ``LayerSpec.variant_options``."""
    return Variant(init=partial(_velora_init, num_groups, scale, init_type),
                   forward=partial(_velora_forward, num_groups, scale, init_type), merge=plain_merge,
                   shapes=partial(_velora_shapes, num_groups),
                   select=lambda config: config.velora_config is not None, options=_velora_options,
                   containers=(EMBED,), bind=lambda spec: _velora_variant(*spec.variant_options))


register_subconfig("velora_config", VeloraConfig)
register_variant("velora", _velora_variant(64, 1.0, "batch_average"))
