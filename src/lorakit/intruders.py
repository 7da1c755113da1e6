"""Intruder-dimension reduction: post-process a trained LoRA adapter to forget less (PEFT's
``peft.tuners.lora.intruders.reduce_intruder_dimension``; Shuttleworth et al., "LoRA vs Full Fine-tuning: An
Illusion of Equivalence", arXiv:2410.21228).

LoRA fine-tuning adds high-ranking singular vectors to W that are nearly orthogonal to all of W's own, the
"intruder dimensions"; scaling them down recovers pre-training behaviour at some cost in the new task. Per layer,
with W the base weight and ΔW = s·B A in W's stored layout:

    W = U Σ Vᵀ,   W' = W + ΔW = U' Σ' V'ᵀ                                  (thin SVDs)
    c_i = max_j |u'_iᵀ u_j|                                               (best cosine match of u'_i in W)
    I = { i < top_k : c_i < ε }                                           (the intruders among the top-k)
    W_mit = W' + (λ − 1) Σ_{i∈I} σ'_i u'_i v'_iᵀ                           (keep λ of each intruder)
    ΔW_mit / s = Ũ S̃ Ṽᵀ,   B_new = Ũ_r √S̃_r,   A_new = √S̃_r Ṽ_rᵀ           (back to rank r, s split out)

The result goes into a new adapter (the old one is kept) that becomes the active one; layers without intruders
get the old factors unchanged. Where the stored layout is (in, out) (GPT-2's Conv1D) or (num, dim) (Embedding),
B A is ΔWᵀ / s, so the roles of Ũ and Ṽ swap; the detection runs on W as stored, as in PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from .combine import factor_weights
from .errors import explain
from .layer import LoraLayer, named_lora_layers
from .quant import dense_weight, is_quantized

if TYPE_CHECKING:
    from .model import PeftModel

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _base_matrix(layer: LoraLayer) -> Tensor:
    """W as stored, float32 for half precision or a quantized base (deq(Q)), in its own dtype otherwise."""
    if is_quantized(layer.base_layer):
        return dense_weight(layer.base_layer)
    W = cast(Tensor, layer.base_layer.weight).detach()
    return W.float() if W.dtype in HALF_DTYPES else W


def intruders(W: Tensor, W_merged: Tensor, top_k: int, threshold_epsilon: float) -> tuple[list[int], Tensor, Tensor,
                                                                                           Tensor]:
    """(I, U', Σ', V'ᵀ): the indices i < top_k whose left singular vector of W' matches none of W's (cosine < ε)."""
    U_base = torch.linalg.svd(W, full_matrices=False)[0]
    U, S, Vh = torch.linalg.svd(W_merged, full_matrices=False)
    cosine = (U.T @ U_base).abs().max(dim=1).values
    return torch.where(cosine[:top_k] < threshold_epsilon)[0].tolist(), U, S, Vh


def mitigated_factors(W: Tensor, delta: Tensor, scaling: float | Tensor, r: int, transposed: bool, top_k: int,
                      threshold_epsilon: float, mitigation_lambda: float) -> tuple[int, Tensor | None, Tensor | None]:
    """(number of intruders, A_new (r, ·), B_new (·, r)) for ΔW = ``delta`` (scaled, W's layout); the factors are
    None when no intruder is found."""
    W_merged = W + delta
    found, U, S, Vh = intruders(W, W_merged, top_k, threshold_epsilon)
    if not found:
        return 0, None, None
    intruder = (U[:, found] * S[found]) @ Vh[found]  # Σ_{i∈I} σ'_i u'_i v'_iᵀ
    delta_mitigated = (W_merged + (mitigation_lambda - 1) * intruder - W) / scaling
    U_d, S_d, Vh_d = torch.linalg.svd(delta_mitigated, full_matrices=False)
    root = S_d[:r].sqrt()
    left, right = U_d[:, :r] * root, root[:, None] * Vh_d[:r]  # left @ right = the rank-r part of ΔW_mit / s
    A, B = (left.T, right.T) if transposed else (right, left)  # B A = (ΔW_mit / s)ᵀ for a transposed layout
    return len(found), A, B


def _check(peft_model: PeftModel, old_adapter_name: str) -> list[tuple[str, LoraLayer]]:
    if getattr(peft_model, "peft_type", None) != "LORA":
        raise ValueError("The provided model is not using LoRA and is therefore not supported.")
    if old_adapter_name not in peft_model.peft_config:
        raise ValueError(explain(f"reduce_intruder_dimension: no adapter {old_adapter_name!r}",
                                 expected=f"one of {list(peft_model.peft_config)}"))
    layers = named_lora_layers(peft_model, old_adapter_name)
    for name, layer in layers:
        if old_adapter_name in layer._variants or cast(Tensor, layer.base_layer.weight).dim() != 2:
            raise NotImplementedError(explain(
                f"reduce_intruder_dimension: {name} cannot be processed; nothing was changed",
                got=f"lora.{layer.kind.name}" + (" with a variant (DoRA, BD-LoRA)" if layer._variants else ""),
                expected="plain LoRA on a 2-D weight (Linear, GPT-2 Conv1D, Embedding)"))
    return layers


def reduce_intruder_dimension(peft_model: PeftModel, old_adapter_name: str = "default",
                              new_adapter_name: str = "intruder_reduced", top_k: int = 10,
                              threshold_epsilon: float = 0.5, mitigation_lambda: float = 0.75,
                              logging_sink: Callable[..., object] | None = print) -> None:
    """Add ``new_adapter_name``: ``old_adapter_name`` with its intruder dimensions scaled by ``mitigation_lambda``
    (module docstring), and make it the active adapter. ``top_k`` singular directions of W' are examined and those
    whose best cosine with W's is below ``threshold_epsilon`` count as intruders. ``logging_sink`` receives one
    line per layer and a last line; None: silence.

    Raises:
        ValueError: not a LoRA model (PEFT's sentence), or an unknown ``old_adapter_name``.
        NotImplementedError: a layer with a variant adapter or a conv weight; checked before anything changes.
    """
    sink = logging_sink if logging_sink is not None else (lambda *args, **kwargs: None)
    layers = _check(peft_model, old_adapter_name)
    peft_model.add_adapter(new_adapter_name, peft_model.peft_config[old_adapter_name])
    with torch.no_grad():
        for name, layer in layers:
            A_old, B_old = factor_weights(layer, old_adapter_name)
            A_new, B_new = factor_weights(layer, new_adapter_name)
            W = _base_matrix(layer)
            delta = layer.get_delta_weight(old_adapter_name).to(W.dtype)
            count, A, B = mitigated_factors(W, delta, layer.scaling[old_adapter_name], layer.r[old_adapter_name],
                                       layer.kind.embedding or layer.kind.weight_is_in_out, top_k,
                                       threshold_epsilon, mitigation_lambda)
            if A is None or B is None:  # (both are None together)
                sink(f"{name}: No intruders")
                A, B = A_old, B_old
            else:
                sink(f"{name}: Intruders: {count}")
            A_new.copy_(A)
            B_new.copy_(B)
    sink(f"Enabling new adapter {new_adapter_name}")
    peft_model.set_adapter(new_adapter_name)
