"""CorDA (arXiv:2406.05223), PEFT 0.21.2's ``preprocess_corda`` + ``init_lora_weights="corda"``:

1. ``preprocess_corda(model, config, run_model)`` runs on the plain model, before ``get_peft_model``. A
   forward hook on each targeted Linear / Conv1D takes the input x of every call, flattened to (tokens, in),
   scales it by 1/|max(x)| (PEFT's per-call normalisation: the absolute value of the maximum, not the
   maximum absolute value) and adds xᵀx to C; after ``run_model()``, C /= the number of calls. PEFT
   squeezes a batch of one and fails on larger batches; lorakit flattens any batch (equal at batch 1).
   C is accumulated in float64 (PEFT: float32; ``use_float16_for_covariance`` keeps the input dtype, as PEFT).
2. Damping, as PEFT: C' = C + d·mean(diag C)·I with d = 0.01, doubled until ‖C' C'⁻¹ − I‖_F < 0.05
   (checked in float32, PEFT's precision, so the same d is chosen).
3. W C' = U S Vhᵀ (float64 SVD, descending S), V = (Vh C'⁻¹)ᵀ (in, k), so W = U S Vᵀ exactly.
   "ipm" (instruction-previewed) keeps the r largest triplets, "kpm" (knowledge-preserved) the r smallest.
4. The cropped triplets are stored on the module as ``eigens`` (CordaEigens S_WC (r,), U_WC (out, r),
   V_WC (in, r), PEFT's names and cache format); the "corda" init (inits.py) turns them into A, B and
   W_res = W − s·B A, and the layer drops ``eigens`` afterwards, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from .config import CordaConfig, LoraConfig
from .errors import explain
from .targeting import layer_spec
from .calibrate import _first_tensor, calibrated_targets


@dataclasses.dataclass
class CordaEigens:
    """A layer's CorDA triplets: W ≈ U_WC diag(S_WC) V_WCᵀ restricted to the chosen r components."""

    S_WC: Tensor
    U_WC: Tensor
    V_WC: Tensor


class _CovarianceRecorder:
    """Forward hook: C += x̂ᵀx̂ with x̂ = x / |max(x)| for each call; ``calls`` counts them."""

    covariance: Tensor | None  # C, None before the first call

    def __init__(self, half: bool) -> None:
        self.half, self.calls, self.covariance = half, 0, None

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        x = _first_tensor(args, type(module).__name__).detach()
        x = x.reshape(-1, x.shape[-1])
        x = x if self.half else x.double()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError("Invalid value found in input, please check your input data.")
        covariance = x.T @ x  # (in, in)
        self.covariance = covariance if self.covariance is None else self.covariance + covariance
        self.calls += 1


def _collect_covariances(model: nn.Module, targets: dict[str, Any], corda: CordaConfig,
                         run_model: Callable[[], None] | None,
                         hooked_model: nn.Module | None) -> dict[str, Tensor]:
    """{name: C} from ``covariance_file`` if it exists, else by hooking ``hooked_model`` (default ``model``)."""
    path = corda.covariance_file
    if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
        stored: dict[str, Tensor] = torch.load(path, map_location="cpu")
        return stored
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked_model = model if hooked_model is None else hooked_model
    recorders = {n: _CovarianceRecorder(corda.use_float16_for_covariance) for n in targets}
    handles = [hooked_model.get_submodule(n).register_forward_hook(r) for n, r in recorders.items()
               if _has_submodule(hooked_model, n)]
    hooked_model.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    empty = [n for n, r in recorders.items() if r.calls == 0]
    if empty:
        raise ValueError(explain("CorDA saw no input for some targeted layers", got=empty,
                                 fix="make run_model() run a forward pass that reaches every targeted layer"))
    covariances = {n: cast(Tensor, r.covariance) / r.calls for n, r in recorders.items()}  # each saw a call
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(covariances, path)
    return covariances


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _corda_eigens(W: Tensor, C: Tensor, r: int, method: str) -> CordaEigens:
    """Steps 2-3 above for one layer: W (out, in), C (in, in) -> the r largest ("ipm") or smallest ("kpm"),
    new float32 tensors on C's device."""
    n = C.shape[0]
    C32 = C.float()
    damp = 0.01
    while True:  # PEFT's damping search, in PEFT's float32
        fixed32 = C32 + torch.eye(n, device=C.device) * torch.mean(torch.diag(C32)) * damp
        if torch.dist(fixed32 @ torch.linalg.inv(fixed32), torch.eye(n, device=C.device)).item() < 0.05:
            break
        damp *= 2
    C = C.double()
    fixed = C + torch.eye(n, dtype=torch.float64, device=C.device) * torch.mean(torch.diag(C)) * damp
    U, S, Vh = torch.linalg.svd(W.double() @ fixed, full_matrices=False)  # W C' = U S Vh
    V = torch.linalg.solve(fixed, Vh.T)  # (Vh C'⁻¹)ᵀ = C'⁻¹ Vhᵀ (C' symmetric): (in, k)
    keep = slice(None, r) if method == "ipm" else slice(S.shape[0] - r, None)
    return CordaEigens(S_WC=S[keep].float().contiguous(), U_WC=U[:, keep].float().contiguous(),
                       V_WC=V[:, keep].float().contiguous())


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Callable[[], None] | None = None,
                     hooked_model: nn.Module | None = None) -> None:
    """Attach CorDA's ``eigens`` to every Linear / Conv1D target of the plain ``model`` (see the notes above).

    Then ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` builds the adapters from them.
    ``cache_file`` (eigens, PEFT's key format ``{name}.eigens.S_WC``) and ``covariance_file`` ({name: C}) are
    read when they exist and written otherwise. ``prune_temporary_fields=False`` leaves PEFT's temporary
    attributes (covariance_matrix, corda_method, rank) on the modules.

    Raises:
        ValueError: no Linear / Conv1D target, an unknown corda_method, no run_model and no cache or
            covariance file, or a targeted layer that run_model() never reached.
    """
    corda = lora_config.corda_config or CordaConfig()
    targets = calibrated_targets(model, lora_config)
    if not targets:
        raise ValueError(explain("CorDA found no Linear or Conv1D layer to decompose", got=lora_config.target_modules))
    cache = corda.cache_file
    if cache is not None and os.path.exists(cache) and os.path.getsize(cache) > 0:
        stored = torch.load(cache, map_location="cpu")
        for name in targets:
            device = model.get_submodule(name).weight.device
            setattr(model.get_submodule(name), "eigens", CordaEigens(
                *(stored[f"{name}.eigens.{key}"].to(device) for key in ("S_WC", "U_WC", "V_WC"))))
        return
    if corda.corda_method not in ("ipm", "kpm"):
        raise ValueError(explain("invalid corda_method", got=corda.corda_method, expected="'ipm' or 'kpm'"))
    covariances = _collect_covariances(model, targets, corda, run_model, hooked_model)
    for name, kind in targets.items():
        module = model.get_submodule(name)
        W = kind.matrix(module).detach()  # (out, in)
        r = layer_spec(name, lora_config).r
        setattr(module, "eigens", _corda_eigens(W, covariances[name].to(W.device), r, corda.corda_method))
        if not corda.prune_temporary_fields:  # PEFT's leftovers, for code that reads them
            for field, value in (("covariance_matrix", covariances[name]), ("corda_method", corda.corda_method),
                                 ("rank", r)):
                setattr(module, field, value)
    if cache is not None:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        torch.save({f"{name}.eigens.{key}": getattr(model.get_submodule(name).eigens, key)
                    for name in targets for key in ("S_WC", "U_WC", "V_WC")}, cache)
