"""KaSA (knowledge-aware singular-value adaptation, arXiv:2412.06071, as PEFT 0.21.2 runs it), nn.Linear only.

Adding the adapter truncates the frozen base weight once, destructively, to its top k − r singular
components (k = min(out, in)); the update is then parametrised in SVD form with a learned diagonal ΔΣ
(``lora_diag``, r entries) between A and B:

    W = U Σ Vᵀ,  W ← U[:, :k−r] Σ[:k−r] V[:, :k−r]ᵀ     (the r smallest, "noisy" components dropped; needs r < k)
    ΔW = s · B diag(ΔΣ) A        A (r, in)  B (out, r)  ΔΣ (r,) ~ N(0, 1) at init, B = 0 so ΔW = 0
    y  = W x + b + s · B (ΔΣ ⊙ A dropout(x))

Disabling or unloading the adapter keeps the truncated W (PEFT's ``KasaConfig`` says so too), and an
adapter without KaSA cannot share a model with a KaSA adapter. The paper's two regularisers are a
model-level method the user adds to the task loss (``LoraModel._get_kasa_loss``, summed over layers):

    β·‖ΔΣ‖²  +  γ·(‖BᵀB − I‖_F + ‖A Aᵀ − I‖_F)      (float32)

The file key of ΔΣ is ``<path>.lora_diag`` (model key ``<path>.lora_diag.<adapter>``), as PEFT writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import register_subconfig, strict_init
from ..errors import explain
from . import Variant, VariantLayer, adapter_entries, plain_merge, register_variant

if TYPE_CHECKING:
    from ..kinds import Kind
    from ..config import LoraConfig


@strict_init
@dataclass
class KasaConfig:
    """KaSA's settings (PEFT's ``KasaConfig``): the weights of the two regularisers in ``_get_kasa_loss``.

    Attributes:
        beta: weight of β‖ΔΣ‖² (default 1e-4). gamma: weight of γ(‖BᵀB − I‖ + ‖AAᵀ − I‖) (default 1e-3).

    Raises:
        ValueError: a negative coefficient (PEFT's sentence first).
    """

    beta: float = 1e-4
    gamma: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative. " + explain(
                    f"invalid KasaConfig.{name}", got=getattr(self, name), expected="a coefficient >= 0"))


register_subconfig("kasa_config", KasaConfig)
CONTAINER = "lora_diag"


def _check_layer(layer: VariantLayer, r: int) -> None:
    """Raises: ValueError: not an nn.Linear (PEFT's sentences first), or r >= min(out, in)."""
    if layer.kind.weight_is_in_out:
        raise ValueError("KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target nn.Linear "
                         "layers. " + explain("kasa_config is not supported", where=f"a {layer.kind.name} target",
                                              fix="exclude these modules or drop kasa_config"))
    if layer.kind.name != "Linear":
        raise ValueError("Invalid or unsupported variant combination: ('kasa_config',). "
                         + explain("kasa_config is not supported", where=f"a {layer.kind.name} target",
                                   expected="nn.Linear targets", fix="exclude these modules or drop kasa_config"))
    k = min(layer.in_features, layer.out_features)
    if r >= k:
        raise ValueError(f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k}) so that at "
                         "least one singular component of the base weight is preserved after truncation. "
                         + explain("r is too large for KaSA", where=f"a Linear({layer.in_features}, "
                                   f"{layer.out_features})", expected=f"r < {k}", fix="lower r (or its rank_pattern)"))


def truncate(W: Tensor, r: int) -> Tensor:
    """U[:, :k−r] Σ[:k−r] V[:, :k−r]ᵀ of W (out, in), in float32: W without its r smallest singular components."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    keep = min(W.shape) - r
    truncated: Tensor = (U[:, :keep] * S[:keep]) @ Vh[:keep]
    return truncated


def _kasa_init(layer: VariantLayer, adapter_name: str, A: Tensor, B: Tensor, s: float) -> None:
    """ΔΣ ~ N(0, 1) (r,) in A's dtype and device, then W ← its rank-(k − r) truncation, cast once to W's dtype."""
    r = A.shape[0]
    _check_layer(layer, r)
    diags = layer.add_container(CONTAINER, nn.ParameterDict())
    diag = nn.Parameter(torch.randn(r, device=A.device, dtype=A.dtype))
    base = layer.base_layer
    with torch.no_grad():
        W = layer.kind.matrix(base)
        layer.kind.set_matrix(base, truncate(W, r).to(W.dtype))
    diags[adapter_name] = diag


def _kasa_forward(layer: VariantLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + s · B (ΔΣ ⊙ A dropout(x))."""
    A, B = layer.factors(adapter_name)
    x = x if x.dtype == A.weight.dtype else x.to(A.weight.dtype)
    h = A(layer.apply_dropout(adapter_name, x)) * layer.container(CONTAINER)[adapter_name]  # (..., r)
    out: Tensor = y + B(h) * layer.scaling[adapter_name]
    return out


def _kasa_dense(layer: VariantLayer, adapter_name: str) -> tuple[Tensor, Tensor]:
    """(A, B diag(ΔΣ)): get_delta_weight is then s · B diag(ΔΣ) A."""
    diag = layer.container(CONTAINER)[adapter_name]
    A, B = layer.factors(adapter_name)
    return A.weight, B.weight * diag


def _kasa_shapes(r: int, kind: Kind, base: nn.Module) -> dict[str, Any]:
    return {CONTAINER: {"": (r,)}}  # <path>.lora_diag.<adapter>, a bare Parameter


def _check_adapters(existing: dict[str, LoraConfig], config: LoraConfig) -> None:
    """Raises: ValueError: a KaSA and a non-KaSA adapter on one model (PEFT's sentence first)."""
    new = config.kasa_config is not None
    for name, other in existing.items():
        if (other.kasa_config is not None) is not new:
            raise ValueError(
                "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base weights: "
                f"the new adapter {'uses' if new else 'does not use'} KaSA but adapter '{name}' "
                f"{'does not' if new else 'does'}. " + explain(
                    "KaSA and non-KaSA adapters on one model", where=f"adapter {name!r}",
                    fix="give every adapter of this model a kasa_config, or none of them"))


def kasa_loss(tuner: Any, adapter_names: str | list[str] | None = None) -> Tensor | float:
    """Σ over KaSA layers of β‖ΔΣ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) for ``adapter_names`` (default: the active
    adapters), β and γ from each adapter's KasaConfig; 0.0 when no layer matches (PEFT's ``_get_kasa_loss``)."""
    total: Tensor | float = 0.0
    for layer, name, entry in adapter_entries(tuner, CONTAINER, adapter_names):
        config = tuner.peft_config[name].kasa_config
        diag, A, B = entry.float(), layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
        eye = torch.eye(diag.shape[0], device=diag.device)
        orthogonality = torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye)
        total = total + config.beta * diag.square().sum() + config.gamma * orthogonality
    return total


# merge: W ± s · B diag(ΔΣ) A (``dense``) into the truncated W; unmerging gives the truncated W back, as in PEFT.
# bind: the Variant for one layer of rank r (``shapes`` needs r).
KASA: Variant = register_variant("kasa", Variant(
    init=_kasa_init, forward=_kasa_forward, merge=plain_merge, shapes=partial(_kasa_shapes, 0), dense=_kasa_dense,
    bind=lambda spec: replace(KASA, shapes=partial(_kasa_shapes, spec.r)),
    select=lambda config: config.kasa_config is not None, containers=(CONTAINER,),
    check_adapters=_check_adapters, model_methods={"_get_kasa_loss": kasa_loss}))
