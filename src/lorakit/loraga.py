"""LoRA-GA (Wang et al., "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv:2407.05000), as
PEFT 0.21.2 runs it: ``preprocess_loraga`` + ``LoraConfig(init_lora_weights="lora_ga", lora_ga_config=...)``.

LoRA-GA starts the adapter where one step of full fine-tuning would go. ``preprocess_loraga`` runs the
user's ``train_step`` (forward + backward over a few batches) with only the targeted Linear / Conv1D weights
requiring grad, and keeps the average gradient of each, G = (Σ ∂L/∂W) / n_backward, on the layer
(``_peft_loraga_grad``, in the weight's own layout). The init then takes a randomised SVD of G (out, in):

    G ≈ U S Vᵀ,  q = min(4r, out, in), 4 power iterations (torch.svd_lowrank), the first 2r triplets kept
    direction picks r indices I_A for A and r indices I_B for B among 0..2r−1:
        "ArB2r": I_A = 0..r−1, I_B = r..2r−1     "A2rBr": I_A = r..2r−1, I_B = 0..r−1
        "ArBr":  I_A = 1, 3, ..., I_B = 0, 2, ...  "random": I_A = I_B = r indices of randperm(2r)
    A = V[:, I_A]ᵀ  (r, in),   B = U[:, I_B] diag(S[I_B])  (out, r)
    scale: "stable": B ← B · d^¼ / √γ   (d: the stored weight's first dimension, out for Linear, in for
                                         GPT-2 Conv1D, as PEFT reads it; γ = stable_gamma)
           "weight_svd": B ← B · σ₁(W) / S[I_B][0]   (σ₁ from svd_lowrank(W, q=r); skipped if S[I_B][0] = 0)
           "gd_scale": A ← A / s, B ← B / s      "unit": unchanged
    W_res = W − s·B A   so that  W_res + s·B A == W: the adapted model starts as the base model.

Layers without a gradient (an adapter loaded from a file, Embedding or convolution targets) get LoRA's default
init, as in PEFT. Saved adapters convert to plain LoRA like PiSSA's (``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from .calibrate import calibrated_targets
from .config import register_subconfig
from .errors import explain
from .inits import InitRequest, InitResult, default, register_init

if TYPE_CHECKING:
    from .config import LoraConfig

GRAD_ATTRIBUTE = "_peft_loraga_grad"  # PEFT's name: code written for PEFT reads it


@dataclass
class LoraGAConfig:
    """LoRA-GA's settings (PEFT's ``LoraGAConfig``, same fields and defaults).

    Attributes:
        direction: which singular vectors go to A and to B: "ArB2r" (default), "A2rBr", "ArBr" or "random".
        scale: "stable" (default), "weight_svd", "gd_scale" or "unit" (module docstring).
        stable_gamma: γ of the "stable" scale.
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = 16


register_subconfig("lora_ga_config", LoraGAConfig, lambda values: LoraGAConfig(**values))  # unknown keys refused


# LoraGAConfig.direction -> r -> (I_A, I_B) among the first 2r singular triplets (module docstring)
DIRECTIONS: dict[str, Callable[[int], tuple[Tensor | slice, Tensor | slice]]] = {
    "ArB2r": lambda r: (slice(0, r), slice(r, 2 * r)),
    "A2rBr": lambda r: (slice(r, 2 * r), slice(0, r)),
    "ArBr": lambda r: (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),
    "random": lambda r: (torch.randperm(2 * r)[:r],) * 2,  # the same r random indices for A and B
}


def _indices(direction: str, r: int) -> tuple[Tensor | slice, Tensor | slice]:
    """(I_A, I_B) for ``direction`` (``DIRECTIONS``)."""
    if direction not in DIRECTIONS:
        raise ValueError(explain("invalid LoraGAConfig.direction", got=direction,
                                 expected="'ArBr', 'A2rBr', 'ArB2r' or 'random'"))
    return DIRECTIONS[direction](r)


def loraga_factors(G: Tensor, W: Tensor, r: int, s: float, config: dict[str, Any],
                   stored_first_dim: int) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) from the gradient G (out, in) and base weight W (out, in), both float32."""
    U, S, V = torch.svd_lowrank(G, q=min(4 * r, min(G.shape)), niter=4)  # G ≈ U diag(S) Vᵀ
    I_A, I_B = _indices(config.get("direction", "ArB2r"), r)
    U, S, Vh = U[:, : 2 * r], S[: 2 * r], V.T[: 2 * r]
    A, S_B = Vh[I_A], S[I_B]
    B = U[:, I_B] * S_B  # U[:, I_B] diag(S_B)
    scale = config.get("scale", "stable")
    if scale == "stable":
        B = B * (stored_first_dim ** 0.25 / config.get("stable_gamma", 16) ** 0.5)
    elif scale == "weight_svd":
        sigma = torch.svd_lowrank(W, q=r, niter=4)[1]
        if S_B[0] > 0:
            B = B * (sigma[0] / S_B[0])
    elif scale == "gd_scale":
        A, B = A / s, B / s
    elif scale != "unit":
        raise ValueError(explain("invalid LoraGAConfig.scale", got=scale,
                                 expected="'stable', 'weight_svd', 'gd_scale' or 'unit'"))
    return A.contiguous(), B.contiguous()


@register_init("lora_ga", needs_weight=True, attached={GRAD_ATTRIBUTE: "grad"}, residual=True, exact=True,
               data_driven=True)
def lora_ga(request: InitRequest) -> InitResult | None:
    """LoRA-GA's init from the gradient ``preprocess_loraga`` left on the layer (module docstring).

    Raises:
        ValueError: a gradient is there but the LoraConfig has no lora_ga_config (PEFT's sentence first).
    """
    G = request.options.get("grad")
    kind = request.kind or "Linear"
    if G is None or not request.data_driven_applies:  # Kind.calibrated: PEFT's lora.Linear kinds only
        return default(request)
    config = request.options.get("lora_ga_config")
    if config is None:
        raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. Please pass "
                         "lora_ga_config=LoraGAConfig(...) to LoraConfig. "
                         + explain("init_lora_weights='lora_ga' without lora_ga_config", where=f"a {kind} target"))
    W = request.weight
    assert W is not None, "lora_ga is registered with needs_weight=True"
    A, B = loraga_factors(G.detach().float().to(W.device), W, request.r, request.scaling, config,
                          W.shape[1 if request.weight_is_in_out else 0])  # the stored weight's first dim
    # as PEFT: A and B are rounded to the base weight's dtype (G's) first, and W_res is computed from the rounded ones
    A, B = A.to(G.dtype).float(), B.to(G.dtype).float()
    return InitResult(A=A, B=B, base_weight=W - request.scaling * (B @ A))


# ---- preprocess: the average gradient of each targeted weight ------------------------------------------------
def _estimate_gradients(model: nn.Module, targets: list[tuple[str, nn.Module]], train_step: Callable[[], None]) -> None:
    """Attach G = Σ ∂L/∂W / n to each target, n = the backward passes through it during ``train_step``."""
    was_training = model.training
    model.train()
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    counts = dict.fromkeys((module for _, module in targets), 0)

    def count(module: nn.Module, *_: object) -> None:  # backward hook: one more pass through this target
        counts[module] += 1

    handles = []
    for _, module in targets:
        module.weight.requires_grad_(True)
        handles.append(module.register_full_backward_hook(count))
    try:
        with torch.enable_grad():
            train_step()
    finally:
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))
        model.train(was_training)
    for _, module in targets:
        weight = cast(Tensor, module.weight)  # a Linear / Conv1D target's
        if counts[module] > 0 and weight.grad is not None:
            setattr(module, GRAD_ATTRIBUTE, weight.grad.detach() / counts[module])
        weight.grad = None


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config: LoraConfig, train_step: Callable[[], None],
                      cache_file: str | None = None) -> None:
    """Estimate each target's average weight gradient for ``init_lora_weights="lora_ga"`` (PEFT's signature).

    Run it on the plain model before ``get_peft_model(model, lora_config)``. ``train_step()`` runs forward and
    backward passes (gradients accumulate over all of them). With ``cache_file``, an existing non-empty file
    is read instead (``torch.save`` of {"<module>._peft_loraga_grad": G}, PEFT's format) and a new one written.
    ``lora_config.target_modules=None`` is replaced by the architecture's default targets, as in PEFT.

    Raises:
        ValueError: no lora_ga_config, a quantized target, or no Linear / Conv1D target (PEFT's sentences first).
    """
    if lora_config.lora_ga_config is None:
        raise ValueError("If you want to use LoRA-GA, please initialize the LoraConfig with "
                         "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...). "
                         + explain("preprocess_loraga needs lora_config.lora_ga_config", got=None))
    if lora_config.target_modules is None:
        from .targeting import _default_targets

        defaults = _default_targets(model)
        lora_config.target_modules = set(defaults) if not isinstance(defaults, str) else defaults
    try:  # the config's Linear / Conv1D targets (other kinds are skipped)
        targets = [(name, model.get_submodule(name)) for name in calibrated_targets(model, lora_config)]
    except ValueError:  # nothing matched: reported below as "no supported layers"
        targets = []
    for name, module in targets:
        if hasattr(module, "quant_state") or not cast(Tensor, module.weight).is_floating_point():
            raise ValueError(f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. "
                             "LoRA-GA requires full-precision gradients during preprocessing. "
                             + explain("a quantized target", where=name, fix="run preprocess_loraga and "
                                       "get_peft_model on the unquantized model"))
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        device = next(iter(model.parameters())).device
        cache = torch.load(cache_file, map_location=device)
        for name, module in targets:
            setattr(module, GRAD_ATTRIBUTE, cache[f"{name}.{GRAD_ATTRIBUTE}"])
        return
    if not targets:
        raise ValueError("No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear "
                         "and Conv1D layers. Please ensure your model contains at least one of these layer types "
                         "in target_modules. " + explain("no Linear / Conv1D target", got=lora_config.target_modules))
    _estimate_gradients(model, targets, train_step)
    if cache_file is not None:
        cache = {f"{name}.{GRAD_ATTRIBUTE}": getattr(module, GRAD_ATTRIBUTE) for name, module in targets
                 if hasattr(module, GRAD_ATTRIBUTE)}
        os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
        torch.save(cache, cache_file)
