"""Tied input/output embeddings: finding them, and PEFT's ``ensure_weight_tying`` rewrite of a config.

Part of planning (``plan.py``): nothing here changes the model. ``apply.tie_adapters`` makes the planned tie.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TypeVar

from torch import nn

from .config import LoraConfig
from .errors import warn
from .layer import LoraLayer
from .saved_modules import ModulesToSaveWrapper
from .targeting import TargetPlan, in_list, resolve_targets
from .trainable_tokens import TrainableTokensWrapper

Candidates = Sequence[tuple[str, nn.Module]]


MaybeModule = TypeVar("MaybeModule", bound=nn.Module | None)  # a module in, a module out; None stays None


def unwrapped(module: MaybeModule) -> MaybeModule | nn.Module:
    """The user's module inside a lorakit wrapper (LoraLayer, modules_to_save, trainable tokens), else itself."""
    if isinstance(module, LoraLayer):
        return module.base_layer
    return module.original_module if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)) else module


def tied_embeddings(model: nn.Module, candidates: Candidates) -> tuple[str, str] | None:
    """(input path, output path) when the input and output embeddings share one weight, else None.

    ``candidates``: ``targeting.candidate_modules(model)`` (no walk of the model here).
    """
    getters = [getattr(model, g, None) for g in ("get_input_embeddings", "get_output_embeddings")]
    if not all(callable(g) for g in getters):
        return None
    try:
        layers = [unwrapped(g()) for g in getters]  # type: ignore[misc]
    except (AttributeError, NotImplementedError):
        return None
    weights = [getattr(layer, "weight", None) for layer in layers]
    if weights[0] is None or weights[1] is None or weights[0] is not weights[1]:
        return None
    paths = {id(unwrapped(m)): p for p, m in candidates}
    input_path, output_path = paths.get(id(layers[0])), paths.get(id(layers[1]))
    if input_path is None or output_path is None:
        return None
    return input_path, output_path


@dataclasses.dataclass(frozen=True)
class Ties:
    """How the output embedding follows the input one: "modules_to_save" or "target_modules"."""

    how: str
    input_path: str
    output_path: str


def _retarget(entries: Iterable[str], ties_input: str, ties_output: str) -> list[str]:
    """PEFT's rewrite: drop entries naming the output embedding, add the input embedding's path."""
    kept = [e for e in entries if not in_list(ties_output, [e])]
    return kept + ([ties_input] if ties_input not in kept else [])


def resolve_with_ties(model: nn.Module, config: LoraConfig, candidates: Candidates, *, quiet: bool = False
                      ) -> tuple[LoraConfig, TargetPlan, Ties | None]:
    """``resolve_targets`` plus the tied-embedding warning and PEFT's ``ensure_weight_tying`` rewrite.

    With ``ensure_weight_tying=True`` and tied embeddings, the trained side is moved onto the input embedding
    (config rewritten as PEFT does: ``lm_head`` replaced by e.g. ``model.embed_tokens``) and the output side
    gets an adapter that shares its tensors (``apply.tie_adapters``), so both sides stay one matrix.
    """
    listed = list(candidates)
    tied = tied_embeddings(model, listed)
    saved = tied is not None and any(in_list(path, config.modules_to_save) for path in tied)
    targeted = tied is not None and not isinstance(config.target_modules, str) and any(
        in_list(path, config.target_modules) for path in tied)
    how = "modules_to_save" if saved else "target_modules" if targeted else None
    say = (lambda message: None) if quiet else warn
    if not config.ensure_weight_tying or how is None or tied is None:
        if how and tied is not None and not config.ensure_weight_tying:
            say(f"the model ties its input and output embeddings ({tied[0]}, {tied[1]}) and the adapter trains one "
                f"side ({how}); the other keeps the old weight, which breaks merging and exports. Set "
                "LoraConfig(ensure_weight_tying=True) to train them as one matrix, as PEFT does")
        elif config.ensure_weight_tying and config.trainable_token_indices is None:  # tokens: token_plan.py says
            say("ensure_weight_tying=True but " + ("no tied embeddings were found in the model" if not tied else
                "no tied embedding is in modules_to_save or target_modules") + "; nothing to tie")
        return config, resolve_targets(model, config, listed), None
    entries = _retarget(getattr(config, how), *tied)
    if how == "modules_to_save":
        config = dataclasses.replace(config, modules_to_save=entries)
        plan = resolve_targets(model, config, listed)
        plan = dataclasses.replace(plan, modules_to_save=plan.modules_to_save + [tied[1]])
    else:
        config = dataclasses.replace(config, target_modules=set(entries))
        wider = resolve_targets(model, dataclasses.replace(config, target_modules=set(entries) | {tied[1]}), listed)
        plan = dataclasses.replace(wider, target_modules=resolve_targets(model, config, listed).target_modules)
    return config, plan, Ties(how, *tied)
