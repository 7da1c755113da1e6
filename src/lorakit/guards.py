"""Guards: PEFT's silent failures turned into errors or ``LoraWarning``s, one small function each.

``GUARDS`` is the table (name -> when it runs, what it does); the README's reliability section shows it and
``tests/test_guards.py`` has one test per entry that fails without the guard. Every guard is cheap: it runs
at most once per call it guards (never per forward on the common path) and reads no tensor data it does not
need (the save check parses the safetensors header only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import explain, warn
from .inits import NEEDS_WEIGHT
from .layer import LoraLayer
from .saved_modules import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensWrapper
from .targeting import TargetPlan, resolve_targets


# ---- a failed injection changes nothing --------------------------------------------------------------------
def _residual_weights(model: nn.Module, config: LoraConfig) -> dict[Tensor, Tensor]:
    """{weight: copy} of the targets of an init that rewrites W in place (PiSSA, OLoRA, LoftQ, CorDA)."""
    if config.init_method.name not in NEEDS_WEIGHT:
        return {}
    try:
        plan = resolve_targets(model, config)
    except ValueError:
        return {}  # the injection fails before touching anything
    layers = (_unwrapped(model.get_submodule(path)) for path in plan.layers)
    return {layer.weight: layer.weight.detach().clone() for layer in layers
            if isinstance(getattr(layer, "weight", None), Tensor)}


def _holders(model: nn.Module, adapter_name: str) -> set[str]:
    """Paths of the LoRA layers and modules_to_save wrappers that hold ``adapter_name``."""
    return {path for path, module in model.named_modules()
            if (isinstance(module, LoraLayer) and adapter_name in module.r)
            or (isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save)
            or (isinstance(module, TrainableTokensWrapper) and adapter_name in module._adapters)}


def _undo(model: nn.Module, before: dict[str, nn.Module], adapter_name: str, weights: dict[Tensor, Tensor],
          kept: set[str]) -> None:
    """Put ``before``'s modules back and drop ``adapter_name`` where it is new (not from the paths in ``kept``)."""
    for path, module in sorted(before.items(), key=lambda item: item[0].count(".")):
        if path and model.get_submodule(path) is not module:
            model.set_submodule(path, module)  # a wrapper added by the failed injection
        elif path in kept:
            continue  # held this adapter name before the injection (another PeftModel's): not ours to drop
        elif isinstance(module, LoraLayer) and adapter_name in module.r:
            module.delete_adapter(adapter_name)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            del module.modules_to_save[adapter_name]
        elif isinstance(module, TrainableTokensWrapper) and adapter_name in module._adapters:
            module.delete_adapter(adapter_name)
    with torch.no_grad():
        for weight, copy in weights.items():
            weight.copy_(copy)


def rollback_on_error(inject: Callable[..., None]) -> Callable[..., None]:
    """Decorate ``LoraModel.inject_adapter``: on any error, undo a half-done injection, then re-raise.

    Replaced modules are put back and the new adapter is dropped from layers that already had others; residual
    inits rewrite W in place, so only for them the targets' weights are copied first. Layers that held the
    adapter's name before (a second ``get_peft_model`` on one base) keep it.
    """
    @functools.wraps(inject)
    def guarded(tuner: nn.Module, adapter_name: str, config: LoraConfig, *args: object, **kwargs: object) -> None:
        if adapter_name in getattr(tuner, "peft_config", ()):  # refused before anything changes: nothing to undo
            return inject(tuner, adapter_name, config, *args, **kwargs)
        before = dict(tuner.model.named_modules())
        kept = _holders(tuner.model, adapter_name)
        weights = _residual_weights(tuner.model, config)
        try:
            inject(tuner, adapter_name, config, *args, **kwargs)
        except BaseException:
            _undo(tuner.model, before, adapter_name, weights, kept)
            raise
    return guarded


# ---- get_peft_model on a model that already has adapters ------------------------------------------------------
PEFT_SECOND_TIME = ("You are trying to modify a model with PEFT for a second time. If you want to reload the model "
                    "with a different config, make sure to call `.unload()` before.")


def check_second_injection(model: nn.Module, adapter_name: str) -> None:
    """``get_peft_model`` on a model whose layers already hold LoRA adapters (an earlier ``get_peft_model``).

    PEFT warns and injects anyway; with the same adapter name it overwrites the earlier PeftModel's adapter
    in the layers both share. lorakit warns the same and adds a new name next to the old ones, but refuses a
    name the layers already hold, before anything changes, so the first PeftModel keeps its adapter.
    """
    if not any(isinstance(module, LoraLayer) for module in model.modules()):
        return
    taken = sorted(_holders(model, adapter_name))
    if taken:
        raise ValueError(explain(
            f"{PEFT_SECOND_TIME} lorakit refuses it: an earlier get_peft_model put an adapter named "
            f"{adapter_name!r} into this model's layers ({len(taken)}, e.g. {taken[0]!r}), which both PeftModels "
            "would share, so the new one would overwrite it", expected="an adapter name the layers do not hold",
            fix="Pass another adapter_name (the layers then hold both), call add_adapter(name, config) on the "
                "first PeftModel, or start again from its .unload()"))
    warn(f"{PEFT_SECOND_TIME} The model already contains LoRA layers; the new adapter {adapter_name!r} is added "
         "next to the existing ones, in the layers both PeftModels share")


# ---- tied input/output embeddings ---------------------------------------------------------------------------
def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    if isinstance(module, LoraLayer):
        return module.base_layer
    return module.original_module if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)) else module


def tied_embeddings(model: nn.Module) -> tuple[str, str] | None:
    """(input path, output path) when the input and output embeddings share one weight, else None."""
    getters = [getattr(model, g, None) for g in ("get_input_embeddings", "get_output_embeddings")]
    if not all(callable(g) for g in getters):
        return None
    try:
        layers = [_unwrapped(g()) for g in getters]
    except (AttributeError, NotImplementedError):
        return None
    if any(getattr(layer, "weight", None) is None for layer in layers) or layers[0].weight is not layers[1].weight:
        return None
    paths = {id(_unwrapped(m)): p for p, m in model.named_modules(remove_duplicate=False)}
    return paths.get(id(layers[0])), paths.get(id(layers[1]))


@dataclasses.dataclass(frozen=True)
class Ties:
    how: str  # "modules_to_save" or "target_modules"
    input_path: str
    output_path: str


def _names(path: str, entries: object) -> bool:
    return any(path == e or path.endswith("." + e) for e in (entries or ()))


def _retarget(entries: object, ties_input: str, ties_output: str) -> list[str]:
    """PEFT's rewrite: drop entries naming the output embedding, add the input embedding's path."""
    kept = [e for e in entries if not (ties_output == e or ties_output.endswith("." + e))]
    return kept + ([ties_input] if ties_input not in kept else [])


def resolve_with_ties(model: nn.Module, config: LoraConfig, *, quiet: bool = False,
                      candidates: list[tuple[str, nn.Module]] | None = None
                      ) -> tuple[LoraConfig, TargetPlan, Ties | None]:
    """``resolve_targets`` plus the tied-embedding guard and PEFT's ``ensure_weight_tying`` rewrite.

    With ``ensure_weight_tying=True`` and tied embeddings, the trained side is moved onto the input embedding
    (config rewritten as PEFT does: ``lm_head`` replaced by e.g. ``model.embed_tokens``) and the output side
    gets an adapter that shares its tensors (``tie_adapters``), so both sides stay one matrix.
    """
    tied = tied_embeddings(model)
    saved = tied is not None and any(_names(path, config.modules_to_save) for path in tied)
    targeted = tied is not None and not isinstance(config.target_modules, str) and any(
        _names(path, config.target_modules) for path in tied)
    how = "modules_to_save" if saved else "target_modules" if targeted else None
    say = (lambda message: None) if quiet else warn
    if not config.ensure_weight_tying:
        if how:
            say(f"the model ties its input and output embeddings ({tied[0]}, {tied[1]}) and the adapter trains one "
                f"side ({how}); the other keeps the old weight, which breaks merging and exports. Set "
                "LoraConfig(ensure_weight_tying=True) to train them as one matrix, as PEFT does")
        return config, resolve_targets(model, config, candidates), None
    if how is None:
        if config.trainable_token_indices is not None:  # the tokens' own tie (token_plan.py) says what it does
            return config, resolve_targets(model, config, candidates), None
        say("ensure_weight_tying=True but " + ("no tied embeddings were found in the model" if not tied else
            "no tied embedding is in modules_to_save or target_modules") + "; nothing to tie")
        return config, resolve_targets(model, config, candidates), None
    entries = _retarget(getattr(config, how), *tied)
    config = dataclasses.replace(config, **{how: set(entries) if how == "target_modules" else entries})
    if how == "modules_to_save":
        plan = resolve_targets(model, config, candidates)
        plan = dataclasses.replace(plan, modules_to_save=plan.modules_to_save + [tied[1]])
    else:
        wider = resolve_targets(model, dataclasses.replace(config, target_modules=set(entries) | {tied[1]}),
                                candidates)
        plan = dataclasses.replace(wider, target_modules=resolve_targets(model, config, candidates).target_modules)
    return config, plan, Ties(how, *tied)


def tie_adapters(model: nn.Module, adapter_name: str, ties: Ties | None) -> None:
    """Make the output embedding's trained copy (or LoRA factors) share the input embedding's tensors.

    modules_to_save: one weight for both copies. LoRA: the embedding's ΔE = (B_e A_e)ᵀ with A_e (r, vocab),
    B_e (hidden, r); the output layer's ΔW = B A (vocab, hidden) equals ΔE when A = B_eᵀ and B = A_eᵀ.
    """
    if ties is None:
        return
    source, tied = model.get_submodule(ties.input_path), model.get_submodule(ties.output_path)
    if ties.how == "modules_to_save":
        tied.modules_to_save[adapter_name].weight = source.modules_to_save[adapter_name].weight
        return
    A_e, B_e = source.lora_embedding_A[adapter_name], source.lora_embedding_B[adapter_name]
    tied.lora_A[adapter_name].weight = nn.Parameter(B_e.t(), requires_grad=B_e.requires_grad)
    tied.lora_B[adapter_name].weight = nn.Parameter(A_e.t(), requires_grad=A_e.requires_grad)
