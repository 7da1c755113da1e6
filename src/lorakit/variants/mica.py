"""MiCA (Minor Component Adaptation, arXiv:2604.01694, as PEFT 0.21.2 runs it): ``init_lora_weights="mica"``.

The update is confined to the base weight's minor left-singular subspace: with W = U Σ Vᵀ (out, K),
σ_1 ≥ ... ≥ σ_k, k = min(out, K),

    B = U[:, k−r:]  (out, r), the r left singular vectors of the smallest σ, frozen
    A = 0           (r, K), the only factor that trains
    y = base(x) + s·B A dropout(x)      ΔW = s·B A = 0 at init, so W stays as it is

W is ``Kind.matrix``: (out, in) for Linear and GPT-2 Conv1D (stored (in, out)), (dim, num) for an Embedding
(whose B is then (dim, r) and A (r, num)). Forward and merge are plain LoRA's; only which factor trains
differs, which the layer keeps through set_adapter / set_requires_grad (``LoraLayer.freeze``). PEFT runs
MiCA on Linear, Conv1D and Embedding layers and refuses convolutions; r must not exceed k.

The init is registered in the init registry (``inits.register_init``) and the variant here, in one file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import explain
from ..inits import InitRequest, InitResult, register_init
from . import Variant, VariantLayer, plain_forward, plain_merge, register_variant

if TYPE_CHECKING:
    from ..kinds import Kind


MICA_KINDS = ("Linear", "Conv1D", "Embedding")  # the kinds PEFT 0.21.2 has a MiCA variant for


def _refuse_kind(kind: str) -> None:
    """Raises: ValueError: MiCA on a kind PEFT has no MiCA variant for (PEFT's sentence first)."""
    if kind and kind not in MICA_KINDS:
        raise ValueError("Invalid or unsupported variant combination: ('mica',). "
                         + explain("init_lora_weights='mica' is not supported", where=f"a {kind} target",
                                   expected=f"one of {', '.join(MICA_KINDS)}",
                                   fix="exclude these modules (exclude_modules) or use another init"))


@register_init("mica", needs_weight=True)
def mica(request: InitRequest) -> InitResult:
    """B = the r minor left singular vectors of W (out, K), A = 0 (module docstring).

    Raises:
        ValueError: a convolution target, or r > min(out, K) (PEFT's sentence first).
    """
    _refuse_kind(request.kind or ("Embedding" if request.embedding else ""))
    W = request.weight
    assert W is not None, "mica is registered with needs_weight=True"
    out, K = W.shape
    if request.r > min(out, K):
        if request.embedding:  # PEFT names the embedding's own (num, dim) shape
            peft = (f"MiCA requires `r` <= min(num_embeddings, embedding_dim) but got r={request.r} for an embedding "
                    f"layer with weight shape {(K, out)} (max usable r is {min(out, K)}).")
        else:
            peft = (f"MiCA requires `r` <= min(in_features, out_features) but got r={request.r} for a layer with "
                    f"weight shape {(out, K)} (max usable r is {min(out, K)}).")
        raise ValueError(peft + " " + explain("r is too large for init_lora_weights='mica'",
                                              where=f"a {request.kind or 'layer'} with weight {(out, K)}",
                                              expected=f"r <= {min(out, K)}", fix="lower r (or its rank_pattern)"))
    U = torch.linalg.svd(W, full_matrices=False)[0]  # (out, k), columns by descending σ
    return InitResult(A=torch.zeros(request.r, K), B=U[:, -request.r:].contiguous())


def _b_container(layer: VariantLayer) -> str:
    return "lora_embedding_B" if layer.kind.embedding else "lora_B"


def _mica_init(layer: VariantLayer, adapter_name: str, A: Tensor, B: Tensor, s: float) -> None:
    """Mark B frozen for this adapter (it never trains); the factors were written by the ``mica`` init.

    Over a half-precision base, B is rounded to the base dtype (then kept in the adapter's float32), as
    PEFT writes MiCA's factors in the base dtype before it upcasts the adapter.
    """
    _refuse_kind(layer.kind.name)
    base_dtype = layer.kind.matrix(layer.base_layer).dtype
    if base_dtype in (torch.float16, torch.bfloat16) and B.dtype != base_dtype:
        with torch.no_grad():
            B.copy_(B.to(base_dtype))
    layer.freeze(adapter_name, _b_container(layer))
    B.requires_grad_(False)


def _mica_shapes(kind: Kind, base: nn.Module) -> dict[str, tuple[int, ...]]:
    return {}  # only lora_A / lora_B (or lora_embedding_A / _B): nothing beyond LoRA's keys


register_variant("mica", Variant(init=_mica_init, forward=plain_forward, merge=plain_merge, shapes=_mica_shapes,
                                 select=lambda config: config.init_method.name == "mica"))
