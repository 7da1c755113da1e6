"""Stage 2 of the pipeline: ``apply(model, plan, ...)``, the only step that changes the model.

It wraps each planned layer in a ``LoraLayer`` (or extends the one there), injects target_parameters, wraps
modules_to_save and trainable tokens, ties the tied side, and freezes the base model for a first adapter.
A failure anywhere puts the model back as it was (``_rollback``): replaced modules go back, the adapter is
dropped where it is new, and weights a residual init rewrote in place are restored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from .inits import INITS
from .kinds_param import inject_parameters
from .layer import LoraLayer
from .plan import AdapterModule, Plan, holders, holds
from .saved_modules import ModulesToSaveWrapper
from .ties import Ties, unwrapped
from .token_plan import inject_tokens


def apply(model: nn.Module, plan: Plan, active_adapters: list[str], autocast_adapter_dtype: bool = True
          ) -> list[AdapterModule]:
    """Inject ``plan`` into ``model``, frozen; returns every adapter module it made or extended.

    Raises:
        whatever a layer or init raises (e.g. a variant refusing a layer); the model is then as before.
    """
    before = _modules_at(model, _touched_paths(model, plan))
    kept = holders(list(before.items()), plan.adapter_name)  # held this name already (another PeftModel's): not ours
    weights = _residual_weights([before[path] for path in plan.targets.layers], plan)
    try:
        injected = _inject(model, plan, active_adapters, autocast_adapter_dtype)
    except BaseException:
        _rollback(model, before, plan.adapter_name, weights, kept)
        raise
    if plan.first:
        _freeze_base(model, plan.candidates)
    return injected


def _inject(model: nn.Module, plan: Plan, active: list[str], autocast_adapter_dtype: bool) -> list[AdapterModule]:
    name, targets = plan.adapter_name, plan.targets
    injected: list[AdapterModule] = []
    for path, spec in targets.layers.items():
        draws = plan.draws_init(spec)
        device = "meta" if plan.low_cpu_mem_usage and not draws else None
        module = model.get_submodule(path)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, targets.kinds[path])
            module._active_adapter = list(active)  # follows the model (PEFT), holds none of them
            model.set_submodule(path, module)
        module.update_layer(name, spec, autocast_adapter_dtype=autocast_adapter_dtype, device=device,
                            initialise=draws)
        if plan.low_cpu_mem_usage and device is None:  # variants and data-driven inits are built, then emptied
            module.move_adapter_to_meta(name)
        for param in module.adapter_parameters(name):
            param.requires_grad_(False)
        injected.append(module)
    injected += inject_parameters(model, list(targets.parameters), name, active, autocast_adapter_dtype,
                                  plan.low_cpu_mem_usage)
    for path in targets.modules_to_save:
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(name)
        else:
            wrapper = ModulesToSaveWrapper(module, name)
            wrapper.set_adapter(active, trainable=False)  # follows the model, new copy frozen
            model.set_submodule(path, wrapper)
            module = wrapper
        injected.append(module)
    injected += inject_tokens(model, name, dict(plan.tokens), active)
    tie_adapters(model, name, plan.ties)
    return injected


def _freeze_base(model: nn.Module, candidates: Iterable[tuple[str, nn.Module]]) -> None:
    """Freeze the base model (the new adapters were frozen as they were made; set_adapter re-enables them)."""
    listed = list(candidates)
    if any(isinstance(module, LoraLayer) for _, module in listed):
        model.requires_grad_(False)  # LoRA layers from an earlier get_peft_model: walk everything
        return
    for _, module in listed:  # the base's own modules, listed before wrapping
        for param in module._parameters.values():
            if param is not None:
                param.requires_grad_(False)


def tie_adapters(model: nn.Module, adapter_name: str, ties: Ties | None) -> None:
    """Make the output embedding's trained copy (or LoRA factors) share the input embedding's tensors.

    modules_to_save: one weight for both copies. LoRA: the embedding's ΔE = (B_e A_e)ᵀ with A_e (r, vocab),
    B_e (hidden, r); the output layer's ΔW = B A (vocab, hidden) equals ΔE when A = B_eᵀ and B = A_eᵀ.
    """
    if ties is None:
        return
    source, tied = model.get_submodule(ties.input_path), model.get_submodule(ties.output_path)
    if ties.how == "modules_to_save":
        source_copy = cast(ModulesToSaveWrapper, source).modules_to_save[adapter_name]
        cast(ModulesToSaveWrapper, tied).modules_to_save[adapter_name].weight = source_copy.weight
        return
    embedding, head = cast(LoraLayer, source), cast(LoraLayer, tied)
    A_e, B_e = embedding.lora_embedding_A[adapter_name], embedding.lora_embedding_B[adapter_name]
    head.lora_A[adapter_name].weight = nn.Parameter(B_e.t(), requires_grad=B_e.requires_grad)
    head.lora_B[adapter_name].weight = nn.Parameter(A_e.t(), requires_grad=A_e.requires_grad)


# ---- a failed injection changes nothing --------------------------------------------------------------------
def _touched_paths(model: nn.Module, plan: Plan) -> list[str]:
    """Every path ``_inject`` may replace or extend (companions of a layer too), outermost first."""
    targets = plan.targets
    companions = [f"{path}.{attribute}" for path, kind in targets.kinds.items() if kind.companions is not None
                  for attribute in kind.companions(unwrapped(model.get_submodule(path)))]
    paths = [*targets.layers, *companions, *(t.path for t in targets.parameters), *targets.modules_to_save,
             *plan.tokens]
    return sorted(dict.fromkeys(paths), key=lambda path: path.count("."))


def _modules_at(model: nn.Module, paths: list[str]) -> dict[str, nn.Module]:
    """{path: module there now}; a path inside a wrapper the plan adds (a tied head's base) is left out."""
    found = {}
    for path in paths:
        try:
            found[path] = model.get_submodule(path)
        except AttributeError:
            continue  # dropped with its new wrapper on rollback
    return found


def _residual_weights(modules: Iterable[nn.Module], plan: Plan) -> dict[Tensor, Tensor]:
    """{weight: copy} of the targets of an init that rewrites W in place (``Init.residual``: PiSSA, OLoRA, LoftQ,
    CorDA, LoRA-GA); an init that only reads W (MiCA) leaves nothing to restore."""
    if not INITS[plan.config.init_method.name].residual:
        return {}
    weights = (getattr(unwrapped(module), "weight", None) for module in modules)
    return {weight: weight.detach().clone() for weight in weights if isinstance(weight, Tensor)}


def _rollback(model: nn.Module, before: dict[str, nn.Module], adapter_name: str, weights: dict[Tensor, Tensor],
              kept: set[str]) -> None:
    """Put ``before``'s modules back and drop ``adapter_name`` where it is new (not from the paths in ``kept``)."""
    for path, module in before.items():
        if model.get_submodule(path) is not module:
            model.set_submodule(path, module)  # a wrapper added by the failed injection
        if path in kept:
            continue  # held this adapter name before the injection (another PeftModel's): not ours to drop
        for layer in _wrappers(module):
            if holds(layer, adapter_name):
                layer.delete_adapter(adapter_name)
    with torch.no_grad():
        for weight, copy in weights.items():
            weight.copy_(copy)


def _wrappers(module: nn.Module) -> list[nn.Module]:
    """``module`` and the LoRA layers nested in its ``base_layer`` chain (target_parameters stack them)."""
    chain = [module]
    while isinstance(chain[-1], LoraLayer):
        chain.append(chain[-1].base_layer)
    return chain
