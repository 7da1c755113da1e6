"""Where ``trainable_token_indices`` puts its wrappers: (model, config, LoRA plan) -> {path: TokenTarget}.

Rules (PEFT 0.21.2, learnt by running it):

1. A list of ids means the input embedding (``get_input_embeddings()``; "embed_tokens" without one). A dict
   ``{name: ids}`` names modules by ``path.endswith(name)``; a name matching nothing is an error.
2. A name that is also a ``modules_to_save`` entry is refused (PEFT's ValueError), and so is a module that
   LoRA adapts or that is trained in full (PEFT's TypeError "cannot be applied to modules of type").
3. With tied input/output embeddings, the output head follows the input embedding: it gets a wrapper whose
   D is the embedding's (``tied_to``), unless the dict gives the two sides different ids (then each trains
   its own rows; with ``ensure_weight_tying=True`` that is an error). A head that LoRA adapts keeps its
   LoRA layer; the tied wrapper goes around that layer's ``base_layer``.

Planning never changes the model; ``inject_tokens`` applies the plan, ``planned_token_shapes`` predicts the
state-dict keys it creates (for validating a file before loading it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .config import LoraConfig
from .errors import explain, warn
from .layer import LoraLayer
from .saved_modules import ModulesToSaveWrapper
from .targeting import TargetPlan
from .ties import tied_embeddings
from .trainable_tokens import TrainableTokensWrapper

DELTA = "token_adapter.trainable_tokens_delta"
BASE = "token_adapter.base_layer"


@dataclass(frozen=True)
class TokenTarget:
    """The rows one wrapper trains; ``tied_to``: the path of the wrapper whose D it shares (None: its own)."""

    indices: tuple[int, ...]
    tied_to: str | None = None


Candidates = Sequence[tuple[str, nn.Module]]


def _path_of(candidates: Candidates, module: object) -> str | None:
    return next((path for path, m in candidates if m is module and path), None)


def _check_indices(value: object) -> dict[str, list[int]] | list[int]:
    def ids(v: object) -> bool:
        return isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    if ids(value) or (isinstance(value, dict) and all(isinstance(k, str) and ids(v) for k, v in value.items())):
        return value  # type: ignore[return-value]
    raise ValueError(explain("invalid trainable_token_indices", where="LoraConfig", got=value,
                             expected="a list of token ids, or a dict {module name: list of token ids}",
                             fix="e.g. trainable_token_indices=[32000, 32001] or {'embed_tokens': [32000]}"))


def _requested(model: nn.Module, value: dict[str, list[int]] | list[int], candidates: Candidates
               ) -> dict[str, list[int]]:
    if isinstance(value, dict):
        return dict(value)
    getter = getattr(model, "get_input_embeddings", None)
    path = _path_of(candidates, getter()) if callable(getter) else None
    return {path or "embed_tokens": list(value)}


def _resolve(model: nn.Module, name: str, candidates: Candidates) -> list[str]:
    """Outermost module paths ending with ``name`` (lorakit's own internals are not candidates).

    Raises:
        ValueError: PEFT's "Target modules ... not found" when nothing matches.
    """
    paths = [path for path, _ in candidates if path.endswith(name)]
    paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    if not paths:
        raise ValueError(f"Target modules {{{name!r}}} not found in the base model. Please check the target modules "
                         "and try again. " + explain("a trainable_token_indices entry matches no module",
                                                     where=type(model).__name__, got=name,
                                                     fix="name the embedding as it appears in named_modules(), "
                                                         "e.g. 'embed_tokens'"))
    return paths


def _check_module(model: nn.Module, path: str, config: LoraConfig, plan: TargetPlan) -> None:
    """Refuse a target LoRA adapts or trains in full, or that has no (vocab, dim) weight.

    Raises:
        TypeError: PEFT's "trainable_token_indices cannot be applied to modules of type ..." sentence first.
    """
    module = model.get_submodule(path)
    base = module.original_module if isinstance(module, TrainableTokensWrapper) else module
    clash = (path in plan.layers or path in plan.modules_to_save or isinstance(module, (LoraLayer, ModulesToSaveWrapper))
             or any(path.startswith(p + ".") for p in plan.modules_to_save))
    if clash or not isinstance(base, (nn.Embedding, nn.Linear)):
        kind = LoraLayer if path in plan.layers else ModulesToSaveWrapper if path in plan.modules_to_save else type(base)
        raise TypeError(f"trainable_token_indices cannot be applied to modules of type {kind} (at {path!r}). "
                        "Trainable tokens replace rows of a plain nn.Embedding (or of the nn.Linear head tied to "
                        "it); a module that LoRA adapts or that modules_to_save trains in full cannot also take "
                        "them. Drop it from target_modules / modules_to_save, or train its tokens in another adapter")


def plan_tokens(model: nn.Module, config: LoraConfig, plan: TargetPlan, candidates: Candidates, *,
                quiet: bool = False) -> dict[str, TokenTarget]:
    """The wrappers ``config`` asks for, input embedding first (see the module docstring); ``quiet``: no warning.

    ``candidates``: ``targeting.candidate_modules(model)``, the model's one walk.

    Raises:
        ValueError: invalid ids, an unmatched name, a name also in modules_to_save, or mismatched ids on tied
            layers with ``ensure_weight_tying=True``. TypeError: a module that cannot take trainable tokens.
    """
    if config.trainable_token_indices is None:
        return {}
    requested = _requested(model, _check_indices(config.trainable_token_indices), candidates)
    for name in requested:
        if name in (config.modules_to_save or ()):
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but '
                             "not both.")
    tied = _tied_paths(model, candidates)
    if tied is None and config.ensure_weight_tying and not quiet:
        warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). Weight "
             "tying will not be applied for trainable_token_indices. (Each named layer trains its own rows.)")
    targets: dict[str, TokenTarget] = {}
    named_output: list[str] = []
    for name, ids in requested.items():
        for path in _resolve(model, name, candidates):
            if tied is not None and path == tied[1]:
                named_output.append(path)
            targets[path] = TokenTarget(tuple(ids))
    if tied is None or tied[0] not in targets:
        for path in targets:
            _check_module(model, path, config, plan)
        return targets
    embedding, head = tied
    mismatch = head in named_output and targets[head].indices != targets[embedding].indices
    if mismatch and config.ensure_weight_tying:
        raise ValueError("Cannot ensure weight tying when different token indices are specified for tied layers. "
                         f"Conflicting layers: {embedding}: {list(targets[embedding].indices)}, {head}: "
                         f"{list(targets[head].indices)}. Please use the same indices for all tied layers or set "
                         "ensure_weight_tying=False.")
    if not mismatch:
        targets.pop(head, None)
        adapted = head in plan.layers or isinstance(model.get_submodule(head), LoraLayer)
        targets[f"{head}.base_layer" if adapted else head] = TokenTarget(targets[embedding].indices, embedding)
    for path, target in targets.items():
        if target.tied_to is None or not path.endswith(".base_layer"):  # (a LoRA head's base: LoRA checked it)
            _check_module(model, path, config, plan)
    return targets


def _tied_paths(model: nn.Module, candidates: Candidates) -> tuple[str, str] | None:
    """(input embedding path, output head path) as they sit in the model now, when the two share a weight."""
    if tied_embeddings(model, candidates) is None:
        return None
    embedding, head = (_path_of(candidates, getattr(model, getter)())
                       for getter in ("get_input_embeddings", "get_output_embeddings"))
    return (embedding, head) if embedding is not None and head is not None else None


def inject_tokens(model: nn.Module, adapter_name: str, targets: dict[str, TokenTarget],
                  active_adapters: list[str]) -> list[TrainableTokensWrapper]:
    """Wrap (or extend) each target, frozen and following the model's active adapters; returns the wrappers.

    Raises:
        ValueError: a head tied to the embedding by an earlier adapter, asked to train its own rows now.
    """
    wrappers: list[TrainableTokensWrapper] = []
    for path, target in targets.items():
        module = model.get_submodule(path)
        source = model.get_submodule(target.tied_to) if target.tied_to else None
        tied = source.token_adapter if isinstance(source, TrainableTokensWrapper) else None
        if isinstance(module, TrainableTokensWrapper):
            if (module.token_adapter.tied_adapter is None) != (tied is None):
                raise ValueError(explain(f"{path!r} already holds trainable tokens {'tied' if tied is None else 'un'}"
                                         "tied to the input embedding; a new adapter cannot change that",
                                         fix="give this adapter the same ids for the tied layers"))
            module.update(adapter_name, list(target.indices))
        else:
            module = TrainableTokensWrapper(module, adapter_name, list(target.indices), tied)
            module.set_adapter(active_adapters, trainable=False)
            model.set_submodule(path, module)
        wrappers.append(module)
    return wrappers


def planned_token_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], targets: dict[str, TokenTarget],
                         adapter_name: str, prefix: str) -> None:
    """Add to ``shapes`` (model keys with ``prefix``) the keys the wrappers of ``targets`` will have."""
    for path, target in targets.items():
        stem = f"{prefix}{path}"
        if not any(key.startswith(f"{stem}.{BASE}.") for key in shapes):
            for key in [k for k in shapes if k.startswith(stem + ".")]:
                shapes[f"{stem}.{BASE}.{key[len(stem) + 1:]}"] = shapes.pop(key)
        dim = shapes[f"{stem}.{BASE}.weight"][1]  # (vocab, dim) for the embedding and its tied head alike
        shapes[f"{stem}.{DELTA}.{adapter_name}"] = (len(target.indices), dim)
