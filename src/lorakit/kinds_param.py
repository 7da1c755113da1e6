"""LoRA on a module's ``nn.Parameter`` rather than on the module (PEFT's ``target_parameters``, ``lora.ParamWrapper``).

The way to adapt the experts of mixture-of-experts models, which keep all experts in one 3-D parameter and
never call an nn.Linear. For a parameter W of the module M and each active adapter a:

    2-D  W: (out, in)           A: (r, in)       B: (out, r)       ΔW = B A
    3-D  W: (E, out, in)        A: (E·r, in)     B: (out, r·E)     ΔW[e] = B_e A_e
         W: (E, in, out)        (M.is_transposed, e.g. GPT-OSS's experts)            ΔW[e] = (B_e A_e)ᵀ
         with A_e = A[e·r : (e+1)·r]  (r, in)   and   B_e = B.reshape(out, r, E)[:, :, e]  (out, r)

    M'(x) = M(x) with W + Σ_a s_a · ΔW_a standing in for W for the length of the call

M's forward is a black box (a loop over experts, grouped matmuls, ``x @ W``), so the update goes into the
weight, as in PEFT (which uses ``torch.nn.utils.parametrize``): the parameter itself is never written, the
replacement is differentiable in A and B (and in W where W trains), and it is put back when the call returns.

Layout, keys and rules follow PEFT 0.21.2 (learned by running it):
- the wrapper is a LoRA layer of kind "ParamWrapper" (repr ``lora.ParamWrapper(parameter_name='...')``) that
  takes M's place; A and B are nn.Linear(in, E·r) and nn.Linear(E·r, out) in ``lora_A`` / ``lora_B``.
- several targeted parameters of one module nest, the first in M's own parameter order innermost:
  ``experts.base_layer.lora_A`` (gate_up_proj) inside ``experts.lora_A`` (down_proj).
- ``target_parameters`` entries match the full parameter name exactly or as a dot-bounded suffix;
  ``layers_to_transform`` and ``exclude_modules`` do not filter them; rank/alpha patterns see the full name.
- refused, with PEFT's sentences: lora_dropout != 0, use_dora, lora_bias, 1-D or 4-D parameters, mixed-adapter
  batches, a parameter of a module that target_modules also adapts, and a second adapter that targets another
  set of parameters than the first.
- lorakit also refuses inits that decompose W (PiSSA, OLoRA, ...) on 3-D parameters, where PEFT 0.21.2 fails
  with an AttributeError.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import LoraConfig
from .errors import explain
from .inits import INITS
from .kinds import Kind, _linear_factors
from .kinds_mha import added_adapters, effective_weight, weights_replaced
from .layer import LayerSpec, LoraLayer

NAME = "ParamWrapper"


@dataclass(frozen=True)
class ParamTarget:
    """One targeted parameter: ``<path>.<parameter_name>`` gets the adapter described by ``spec``."""

    path: str  # the module that owns the parameter
    parameter_name: str
    spec: LayerSpec

    @property
    def full_name(self) -> str:
        return f"{self.path}.{self.parameter_name}"


# ---- the Kind: one per parameter name, its functions see the wrapper's base (the owner or a nested wrapper) ---
def owner(module: nn.Module) -> nn.Module:
    """The module that holds the parameter: ``module`` with every LoRA wrapper around it taken off."""
    while isinstance(module, LoraLayer):
        module = module.base_layer
    return module


def _transposed(module: nn.Module, W: Tensor) -> bool:
    """True for a 3-D weight stored (E, in, out): the owner says so with ``is_transposed`` (GPT-OSS)."""
    return W.dim() == 3 and bool(getattr(module, "is_transposed", False))


def _features(parameter_name: str, base: nn.Module) -> tuple[int, int]:
    """(in, out) of one expert's matrix (of the matrix itself for a 2-D parameter)."""
    module = owner(base)
    W = getattr(module, parameter_name)
    if _transposed(module, W):
        return W.shape[-2], W.shape[-1]
    return W.shape[-1], W.shape[-2]


def _experts(W: Tensor) -> int:
    return W.shape[0] if W.dim() == 3 else 1


def _factors(parameter_name: str, base: nn.Module, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
    """A: Linear(in, E·r), B: Linear(E·r, out): every expert's rank-r factors stacked (module docstring)."""
    in_features, out_features = _features(parameter_name, base)
    W = getattr(owner(base), parameter_name)
    return _linear_factors(in_features, out_features, r * _experts(W), lora_bias)


def _delta(parameter_name: str, base: nn.Module, A: Tensor, B: Tensor) -> Tensor:
    """ΔW in the parameter's own layout (module docstring), unscaled."""
    module = owner(base)
    W = getattr(module, parameter_name)
    if W.dim() == 2:
        return B @ A  # (out, in)
    E = W.shape[0]
    r = A.shape[0] // E
    A_e = A.reshape(E, r, A.shape[1])  # (E, r, in)
    B_e = B.reshape(B.shape[0], r, E).permute(2, 0, 1)  # (E, out, r)
    delta = B_e @ A_e  # (E, out, in)
    return delta.transpose(1, 2) if _transposed(module, W) else delta


def _matrix(parameter_name: str, base: nn.Module) -> Tensor:
    W: Tensor = getattr(owner(base), parameter_name)
    if W.dim() != 2:
        raise ValueError(explain("this init method needs one weight matrix to decompose",
                                 where=f"the {W.dim()}-D parameter {parameter_name!r}",
                                 fix="use init_lora_weights=True, False or 'gaussian' with target_parameters"))
    return W


def _set_matrix(parameter_name: str, base: nn.Module, M: Tensor) -> None:
    W = getattr(owner(base), parameter_name)
    W.copy_(M.reshape(W.shape))


def _no_branch(base: nn.Module, x: Tensor, A: object, B: object) -> Tensor:
    """There is no B A x for a parameter: its update only exists in the weight (``_forward``).

    Raises:
        TypeError: always; nothing in lorakit calls it for this kind.
    """
    raise TypeError(explain("lora.ParamWrapper has no input-side LoRA branch", where=type(base).__name__,
                            fix="call the wrapper itself; it runs its base with W + s·ΔW"))


def parameter_name_of(layer: LoraLayer) -> str:
    """The name of the parameter a ParamWrapper adapts (PEFT's ``ParamWrapper.parameter_name``)."""
    name: str = layer.__dict__["parameter_name"]
    return name


def _forward(layer: LoraLayer, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
    """M(x) with W + Σ_active s·ΔW standing in for the targeted parameter (module docstring).

    Raises:
        ValueError: a mixed-adapter batch (``adapter_names``), as PEFT.
    """
    if layer._routes is not None:
        raise ValueError(
            "lora.ParamWrapper does not support mixed adapter batches yet. "
            + explain("adapter_names cannot route rows", where=f"the parameter {parameter_name_of(layer)!r}",
                      fix="its update is applied to the weight, one per call: run each adapter's rows in its own "
                          "call (set_adapter)")
        )
    if layer._disable_adapters:
        layer.unmerge()
        return layer.base_layer(x, *args, **kwargs)
    module, parameter_name = owner(layer.base_layer), parameter_name_of(layer)
    if parametrize.is_parametrized(module, parameter_name):  # W = f(W₀) already: add ΔW after f
        names = added_adapters(layer)
        if not names:
            return layer.base_layer(x, *args, **kwargs)
        delta = layer.get_delta_weight(names[0])
        for name in names[1:]:
            delta = delta + layer.get_delta_weight(name)
        with delta_appended(module, parameter_name, delta):
            return layer.base_layer(x, *args, **kwargs)
    W = effective_weight(layer)  # None when merged or no adapter is active here
    if W is None:
        return layer.base_layer(x, *args, **kwargs)
    with weights_replaced([(module, parameter_name, W)]):
        return layer.base_layer(x, *args, **kwargs)


class _AddDelta(nn.Module):
    """The last step of a parametrization chain for one call: f(W₀) ↦ f(W₀) + s·ΔW."""

    def __init__(self, delta: Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, W: Tensor) -> Tensor:
        return W + self.delta.to(W.dtype)


@contextlib.contextmanager
def delta_appended(module: nn.Module, parameter_name: str, delta: Tensor) -> Iterator[None]:
    """Inside the block, the parametrized ``module.<parameter_name>`` reads f(W₀) + delta; the user's own
    parametrizations stay as they are (torch's remove_parametrizations would drop them all)."""
    chain: nn.ModuleList = module.parametrizations[parameter_name]  # type: ignore[index,assignment]
    chain.append(_AddDelta(delta))
    try:
        yield
    finally:
        del chain[len(chain) - 1]


def _weight(parameter_name: str, base: nn.Module) -> Tensor:
    """The tensor a merge changes: the parameter itself.

    Raises:
        ValueError: the parameter is computed by a torch parametrization, so there is no tensor W to change.
    """
    module = owner(base)
    if parametrize.is_parametrized(module, parameter_name):
        raise ValueError(explain("cannot merge into a parametrized parameter", where=parameter_name,
                                 got="a torch.nn.utils.parametrize parametrization",
                                 fix="keep the adapter unmerged (forward adds ΔW after the parametrization), or "
                                     "remove the parametrization first"))
    W: Tensor = getattr(module, parameter_name)
    return W


@functools.lru_cache(maxsize=None)
def param_kind(parameter_name: str) -> Kind:
    """The Kind of a wrapper around the parameter ``parameter_name`` of its (innermost) base module."""
    return Kind(
        name=NAME,
        features=functools.partial(_features, parameter_name),
        make_factors=functools.partial(_factors, parameter_name),
        branch=_no_branch,
        delta_weight=functools.partial(_delta, parameter_name),
        matrix=functools.partial(_matrix, parameter_name),
        set_matrix=functools.partial(_set_matrix, parameter_name),
        weight=functools.partial(_weight, parameter_name),
        forward=_forward,
        extra_repr=lambda base: f"parameter_name={parameter_name!r},",  # PEFT's repr, comma included
        undrawn_factors=True,  # kinds._linear_factors
    )


# ---- planning: which parameters, checked before anything changes ----------------------------------------------
def _matches(full_name: str, targets: Iterable[str]) -> bool:
    return any(full_name == t or full_name.endswith("." + t) for t in targets)


def wrapper_of(module: nn.Module, parameter_name: str) -> LoraLayer | None:
    """The ParamWrapper for ``parameter_name`` in the chain of wrappers at ``module``, or None."""
    while isinstance(module, LoraLayer):
        if module.kind is param_kind(parameter_name):  # one Kind per parameter name (cached)
            return module
        module = module.base_layer
    return None


def parameter_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters in registration order, parametrized ones (``lin.weight`` computed
    from ``lin.parametrizations.weight.original``) by the name the module shows."""
    names = [name for name, W in module._parameters.items() if W is not None]
    if parametrize.is_parametrized(module):
        names += [name for name in module.parametrizations if name not in names]  # type: ignore[union-attr]
    return names


def resolve_parameters(config: LoraConfig, candidates: list[tuple[str, nn.Module]], module_targets: set[str],
                       spec_for: Callable[[str, LoraConfig], LayerSpec],
                       root: nn.Module | None = None) -> list[ParamTarget]:
    """The parameters ``config.target_parameters`` selects, innermost first (module docstring).

    ``module_targets``: paths target_modules adapts; ``spec_for``: full name -> LayerSpec (targeting.layer_spec);
    ``root``: the model, whose own parameters cannot be targeted.

    Raises:
        ValueError: an option lora.ParamWrapper refuses, a parameter that is not 2-D or 3-D, a parameter of a
            module that target_modules adapts too, or one of the model's own parameters.
    """
    if not config.target_parameters:
        return []
    for name in parameter_names(root) if root is not None else []:
        if name in config.target_parameters:
            raise ValueError(
                f"Targeting an nn.Parameter on the top-level module is not supported (parameter '{name}'). "
                + explain("the wrapper would have to replace the model itself", where=type(root).__name__,
                          fix="move the parameter into a submodule, or wrap the model in a module that holds it")
            )
    found = []
    for path, module in candidates:
        for name in parameter_names(owner(module)):
            W = getattr(owner(module), name)
            if not _matches(f"{path}.{name}", config.target_parameters):
                continue
            if path in module_targets:
                raise ValueError(
                    f"Trying to wrap an `nn.Parameter` of layer '{path}' of type {type(owner(module)).__name__}, "
                    "which is not a valid target. Make sure that this layer is not also targeted with "
                    "`target_modules`. For some models, PEFT will do this automatically, try setting "
                    "`target_modules=[]` to prevent it. "
                    + explain("a module cannot be adapted both as a module and through its parameter",
                              where=path, fix="drop it from target_modules or from target_parameters")
                )
            if W.dim() not in (2, 3):
                raise ValueError(
                    f"lora.ParamWrapper was initialized with {W.dim()} dimensional Parameter, but only 2d and 3d are "
                    "supported. " + explain("cannot adapt this parameter", where=f"{path}.{name}",
                                            got=tuple(W.shape), expected="a 2-D (out, in) or 3-D (E, out, in) weight",
                                            fix="remove it from target_parameters")
                )
            spec = spec_for(f"{path}.{name}", config)
            if W.dim() == 3 and INITS[spec.init.name].needs_weight:
                raise ValueError(explain(f"init_lora_weights={config.init_lora_weights!r} decomposes a weight matrix",
                                         where=f"the 3-D parameter {path}.{name}", got=tuple(W.shape),
                                         fix="use init_lora_weights=True, False or 'gaussian' for expert weights"))
            found.append(ParamTarget(path, name, spec))
    if found:  # PEFT refuses these when it builds a wrapper, so only where a parameter matched
        _check_options(config)
    return found


def _check_options(config: LoraConfig) -> None:
    for field_name, refused, shown in (("lora_dropout", config.lora_dropout != 0, "lora_dropout != 0"),
                                       ("use_dora", bool(config.use_dora), "use_dora=True"),
                                       ("lora_bias", bool(config.lora_bias), "lora_bias=True")):
        if refused:
            raise ValueError(
                f"lora.ParamWrapper does not work with {shown}. "
                + explain(f"{field_name} cannot apply to a parameter", got=getattr(config, field_name),
                          fix=f"leave {field_name} at its default, or target the modules instead of their parameters")
            )


def check_same_parameters(existing: dict[str, LoraConfig], config: LoraConfig) -> None:
    """PEFT's rule: every adapter that sets target_parameters targets the same set of parameters.

    Raises:
        ValueError: ``config`` targets another set than an adapter already there.
    """
    if not config.target_parameters:
        return
    new = sorted(config.target_parameters)
    for name, other in existing.items():
        if other.target_parameters and sorted(other.target_parameters) != new:
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {new} for the new adapter and {sorted(other.target_parameters)} for adapter "
                f"'{name}'. " + explain("the adapters' parameter sets differ",
                                        fix="give the new adapter the same target_parameters")
            )


# ---- injection and the planned key layout ---------------------------------------------------------------------
def inject_parameters(model: nn.Module, targets: list[ParamTarget], adapter_name: str, active: list[str],
                      autocast_adapter_dtype: bool, low_cpu_mem_usage: bool) -> list[LoraLayer]:
    """Give each target ``adapter_name``, wrapping its module (or its outermost wrapper) first where needed."""
    injected = []
    for target in targets:
        module = model.get_submodule(target.path)
        layer = wrapper_of(module, target.parameter_name)
        if layer is None:
            layer = LoraLayer(module, param_kind(target.parameter_name))
            layer.__dict__["parameter_name"] = target.parameter_name  # PEFT's ParamWrapper.parameter_name
            layer._active_adapter = list(active)
            model.set_submodule(target.path, layer)
        layer.update_layer(adapter_name, target.spec, autocast_adapter_dtype=autocast_adapter_dtype)
        if low_cpu_mem_usage:
            layer.move_adapter_to_meta(adapter_name)
        for param in layer.adapter_parameters(adapter_name):
            param.requires_grad_(False)
        injected.append(layer)
    return injected


def plan_parameter_keys(model: nn.Module, targets: list[ParamTarget], adapter_name: str, prefix: str,
                        shapes: dict[str, tuple[int, ...]], lora_paths: set[str]) -> None:
    """Add to ``shapes`` (state-dict key -> shape) the keys ``inject_parameters`` will create; nothing is changed.

    A new wrapper moves every key at its path one ``base_layer`` down, as the nesting does.
    """
    depth: dict[str, int] = {}  # wrappers planned so far at each path
    for target in targets:
        module = model.get_submodule(target.path)
        layer = wrapper_of(module, target.parameter_name)
        if layer is not None:  # a second adapter: the existing wrapper, at its depth below the outermost
            at, current = target.path, module
            while current is not layer:
                at, current = at + ".base_layer", current.base_layer  # type: ignore[assignment]
            at = target.path + ".base_layer" * depth.get(target.path, 0) + at[len(target.path):]
        else:
            stem = prefix + target.path + "."
            for key in [k for k in shapes if k.startswith(stem)]:
                shapes[f"{stem}base_layer.{key[len(stem):]}"] = shapes.pop(key)
            shifted = {p for p in lora_paths if p == target.path or p.startswith(target.path + ".")}
            lora_paths.difference_update(shifted)
            lora_paths.update(target.path + ".base_layer" + p[len(target.path):] for p in shifted)
            depth[target.path] = depth.get(target.path, 0) + 1
            at = target.path
        lora_paths.add(at)
        with torch.device("meta"):
            A, B = param_kind(target.parameter_name).make_factors(owner(module), target.spec.r, False)
        shapes[f"{prefix}{at}.lora_A.{adapter_name}.weight"] = tuple(A.weight.shape)
        shapes[f"{prefix}{at}.lora_B.{adapter_name}.weight"] = tuple(B.weight.shape)
