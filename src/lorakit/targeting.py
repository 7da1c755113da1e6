"""Which modules get LoRA, with which rank and alpha: (model, LoraConfig) -> TargetPlan.

Rules (PEFT 0.21.2, contract section 4), applied to every ``named_modules()`` name of the user's model:

1. A module named by ``modules_to_save`` (``name.endswith(entry)``), or inside one, is trained in full
   and never gets LoRA.
2. ``exclude_modules`` wins: a string is ``re.fullmatch``; a list matches exactly or as a dot-bounded suffix.
3. ``target_modules``: a string is ``re.fullmatch`` on the full name; a list matches the exact full name
   (no layer filter) or a dot-bounded suffix ``name.endswith("." + t)``; ``"all-linear"`` is every Linear /
   GPT-2 Conv1D but the output head; ``None`` is the architecture's default (``DEFAULT_TARGETS``).
4. ``layers_to_transform`` keeps suffix matches whose layer index (the ``.<digits>.`` after
   ``layers_pattern``, or after the first dotted segment) is selected; no index means not targeted.
5. ``rank_pattern`` / ``alpha_pattern``: the first key with ``re.match(rf"(.*\\.)?({key})$", name)`` sets
   r / alpha; the rest use ``r`` / ``lora_alpha``.

Targeting never mutates the model; ``model.py`` applies the plan.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from torch import nn

from .config import LoraConfig, TaskType
from .errors import explain, warn
from .kinds import Kind, find_kind, is_linear_like, kind_for
from .kinds_param import ParamTarget, resolve_parameters
from .layer import LayerSpec, LoraLayer
from .saved_modules import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensWrapper
from .variants import select_variant, variant_options

# config.model_type -> default target_modules (PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "opt",
         "bart", "gptj", "gpt_neo", "stablelm", "qwen2_moe", "qwen3_moe", "olmo", "olmo2", "granite", "cohere",
         "starcoder2", "phi3_small", "mllama"],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm"], ["query", "value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon", "blip-2"], ["query_key_value"]),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "chatglm": ["query_key_value"],
}

# Task types whose head is trained in full (PEFT adds these to modules_to_save).
TASK_MODULES_TO_SAVE: dict[str, list[str]] = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


Targets = set[str] | list[str] | str  # resolved target_modules: names (as given, list or set) or one regex
Candidates = Sequence[tuple[str, nn.Module]]  # ``candidate_modules(model)``: the model's one walk


@dataclass(frozen=True)
class TargetPlan:
    """What to inject: a LayerSpec per module path, the modules_to_save paths, the resolved targets."""

    layers: dict[str, LayerSpec]
    kinds: dict[str, Kind]
    modules_to_save: list[str]
    target_modules: Targets | None  # what the saved config records ("all-linear" expanded to full names)
    parameters: tuple[ParamTarget, ...] = ()  # target_parameters, innermost wrapper first (kinds_param.py)


def task_modules_to_save(config: LoraConfig) -> list[str] | None:
    """``config.modules_to_save`` plus the task head names (a new list; the config is not touched)."""
    task = getattr(config.task_type, "value", config.task_type)
    extra = TASK_MODULES_TO_SAVE.get(str(task), [])
    if not extra:
        return config.modules_to_save
    return list(config.modules_to_save or []) + [name for name in extra if name not in (config.modules_to_save or [])]


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` without lorakit's own internals (an existing LoraLayer counts as its base)."""
    found: list[tuple[str, nn.Module]] = []
    hidden: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in hidden):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            hidden.append(name + ".")
        found.append((name, module))
    return found


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base module of an existing LoraLayer (adding a second adapter sees the original layer types)."""
    return module.base_layer if isinstance(module, LoraLayer) else module


def in_list(name: str, entries: Iterable[str] | None) -> bool:
    """``name`` is one of ``entries`` or ends with "." + one (exclude_modules' lists, ties.py's config entries)."""
    return any(name == entry or name.endswith("." + entry) for entry in entries or ())


def _excluded(name: str, exclude: Targets | None) -> bool:
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return in_list(name, exclude)


def layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    """The layer number in ``name``: the ``.<digits>.`` after a layers_pattern (or after any segment)."""
    if not patterns:
        patterns = r"[^.]*"  # no layers_pattern: the index after any segment
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        match = re.match(rf".*\.{pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def _selected_layer(name: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    index = layer_index(name, config.layers_pattern)
    wanted = config.layers_to_transform
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _output_head_names(model: nn.Module, candidates: Candidates | None = None) -> set[str]:
    """Paths of the output embedding (lm_head) that "all-linear" leaves alone (``candidates``: as walked)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    found = model.named_modules() if candidates is None else candidates
    return {name for name, module in found if module is head}


def _model_type(model: nn.Module) -> object:
    """``config.model_type``, read as PEFT reads it: from ``config.to_dict()`` when the config has one."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        values = to_dict()
        if isinstance(values, dict):
            return values.get("model_type")
    return getattr(config, "model_type", None)


def _default_targets(model: nn.Module) -> list[str] | str:
    """The architecture's default target_modules: a list of names, or a regex string (matched in full)."""
    model_type = _model_type(model)
    if isinstance(model_type, str) and model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(
        "Please specify `target_modules` or `target_parameters`in `peft_config` (PEFT's message). "
        + explain(
            "target_modules=None but lorakit has no default targets for this model",
            where=type(model).__name__,
            got=model_type,
            expected=f"a config.model_type among {sorted(DEFAULT_TARGETS)}",
            fix=f"pass target_modules explicitly, e.g. {usable_names(model)[:4]} or 'all-linear'",
        )
    )


def usable_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of modules LoRA can wrap, Linear-like first: what target_modules could say."""
    linear: dict[str, None] = {}
    other: dict[str, None] = {}
    for name, module in candidate_modules(model):
        base = _unwrapped(module)
        if find_kind(base) is not None:
            (linear if is_linear_like(base) else other).setdefault(name.rsplit(".", 1)[-1], None)
    return list(linear) + list(other)


def _matches(name: str, targets: Targets, config: LoraConfig) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:  # an exact full name is taken as is, without the layer filter
        return True
    return any(name.endswith("." + t) for t in targets) and _selected_layer(name, config)


def _first_pattern(name: str, patterns: dict[str, float] | None) -> float | None:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def layer_spec(name: str, config: LoraConfig) -> LayerSpec:
    """The r, alpha and other settings ``config`` gives the module at ``name`` (rank/alpha patterns applied).

    Raises:
        ValueError: from the variant's per-layer options (e.g. BD-LoRA's lists) or from combining variants.
    """
    r = _first_pattern(name, config.rank_pattern)
    alpha = _first_pattern(name, config.alpha_pattern)
    variant = select_variant(config)
    return LayerSpec(
        r=config.r if r is None else cast(int, r),
        lora_alpha=config.lora_alpha if alpha is None else alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        lora_bias=config.lora_bias,
        init=config.init_method,
        variant=variant,
        variant_options=variant_options(variant, name, config),
    )


def _warn_unused_patterns(config: LoraConfig, names: list[str]) -> None:
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name):
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in names):
                warn(
                    f"{field_name} entry {key!r} matches no targeted module; targeted modules look like "
                    f"{names[:3]}. Fix the regex or remove the entry."
                )


def _saved_paths(candidates: list[tuple[str, nn.Module]], entries: list[str] | None) -> list[str]:
    """Outermost modules whose name ends with a modules_to_save entry (PEFT: plain ``endswith``)."""
    paths: list[str] = []
    for name, _ in candidates:
        if entries and any(name.endswith(entry) for entry in entries):
            if not any(name.startswith(path + ".") for path in paths):
                paths.append(name)
    return paths


def _warn_unmatched_saves(config: LoraConfig, paths: list[str]) -> None:
    for entry in config.modules_to_save or []:
        if not any(path.endswith(entry) for path in paths):
            warn(f"modules_to_save entry {entry!r} matches no module; it is ignored")


def _resolve_target_modules(model: nn.Module, config: LoraConfig, candidates: Candidates) -> Targets:
    targets = config.target_modules
    if targets is None and config.target_parameters:  # parameters only: no architecture defaults (PEFT)
        return set()
    if targets is None:
        defaults = _default_targets(model)
        return defaults if isinstance(defaults, str) else set(defaults)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        heads = _output_head_names(model, candidates)
        task = getattr(config.task_type, "value", config.task_type)
        if not heads and task == TaskType.SEQ_CLS.value:  # a classifier head is trained in full, not adapted
            heads = {name for name, _ in candidates if name.rsplit(".", 1)[-1] in TASK_MODULES_TO_SAVE[task]}
        return {name for name, module in candidates if is_linear_like(_unwrapped(module)) and name not in heads}
    return targets


def resolve_targets(model: nn.Module, config: LoraConfig, candidates: Candidates | None = None) -> TargetPlan:
    """Apply the module docstring's rules to ``model`` (``candidates``: its ``candidate_modules``, if known).

    Raises:
        ValueError: nothing matched (listing names that would), everything matched was excluded, a
            matched module has an unsupported type, or target_modules=None on an unknown architecture.
    """
    candidates = candidate_modules(model) if candidates is None else list(candidates)
    save_entries = task_modules_to_save(config)
    saved = _saved_paths(candidates, save_entries)
    _warn_unmatched_saves(config, saved)
    targets = _resolve_target_modules(model, config, candidates)
    layers: dict[str, LayerSpec] = {}
    kinds: dict[str, Kind] = {}
    excluded_hits = []
    owned: set[str] = set()  # companions of a target (MultiheadAttention's out_proj) get LoRA through it
    for name, module in candidates:
        if any(name == path or name.startswith(path + ".") for path in saved):
            continue
        if not _matches(name, targets, config):
            continue
        if _excluded(name, config.exclude_modules):
            excluded_hits.append(name)
            continue
        kinds[name] = module.kind if isinstance(module, LoraLayer) else kind_for(module, name)
        layers[name] = layer_spec(name, config)
        companions = kinds[name].companions
        if companions is not None:
            owned.update(f"{name}.{child}" for child in companions(_unwrapped(module)))
    for name in owned.intersection(layers):
        del layers[name], kinds[name]
    _warn_unreached_companions(candidates, layers)
    parameters = resolve_parameters(config, candidates, set(layers), layer_spec, root=model)
    if not layers and not _parameters_stand_alone(config, targets, parameters):
        raise _nothing_matched(model, config, targets, excluded_hits)
    if layers and config.target_parameters and not parameters:
        warn(f"target_parameters={set(config.target_parameters)} were set but no parameter was matched.")
    _warn_unused_patterns(config, list(layers) + [target.full_name for target in parameters])
    recorded = None if config.target_modules is None and config.target_parameters else targets  # PEFT keeps None
    return TargetPlan(layers=layers, kinds=kinds, modules_to_save=saved, target_modules=recorded,
                      parameters=tuple(parameters))


# ---- target_parameters next to target_modules (kinds_param.py does the matching) --------------------------------
def _parameters_stand_alone(config: LoraConfig, targets: Targets, parameters: list[ParamTarget]) -> bool:
    """True when no module matched but the plan is still valid (PEFT 0.21.2's rules, learned by running it).

    Raises:
        ValueError: target_parameters was the only target and matches nothing (PEFT's sentence first).
    """
    if not config.target_parameters:
        return False
    if not parameters:
        if config.target_modules is None:
            raise ValueError(
                "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                "these arguments. " + explain("target_parameters matches no parameter",
                                              got=sorted(config.target_parameters),
                                              fix="give full parameter names, or dot-bounded suffixes such as "
                                                  "'mlp.experts.gate_up_proj'")
            )
        return False
    if targets:  # target_modules was set but matched nothing: PEFT only warns when parameters matched
        warn(f"target_modules={targets} were set but no module was matched.")
    return True


def _warn_unreached_companions(candidates: list[tuple[str, nn.Module]], layers: dict[str, LayerSpec]) -> None:
    """Warn for a target that is a companion of an untargeted parent (MultiheadAttention's out_proj): the parent
    reads the child's weight directly and never calls its forward, so LoRA there would never run."""
    parents = dict(candidates)
    for name in layers:
        parent_path, _, attribute = name.rpartition(".")
        parent = parents.get(parent_path)
        if parent is None or parent_path in layers:
            continue
        kind = find_kind(_unwrapped(parent))
        if kind is not None and kind.companions is not None and attribute in kind.companions(_unwrapped(parent)):
            warn(f"target {name!r} is the {attribute} of a {kind.name} that is not targeted: the {kind.name} never "
                 f"calls its forward, so this LoRA has no effect (as in PEFT). Target {parent_path!r} instead, which "
                 f"adapts {attribute} too, or exclude {name!r}.")


def _nothing_matched(model: nn.Module, config: LoraConfig, targets: object, excluded: list[str]) -> ValueError:
    if excluded:
        return ValueError(
            explain(
                "every module matched by target_modules is excluded by exclude_modules",
                where=type(model).__name__,
                got=sorted(excluded)[:5],
                fix="narrow exclude_modules so at least one target remains",
            )
        )
    shown = sorted(targets) if isinstance(targets, set) else targets
    layer_note = ""
    if config.layers_to_transform is not None:
        layer_note = (f" (with layers_to_transform={config.layers_to_transform} and "
                      f"layers_pattern={config.layers_pattern}: check the layer indices and pattern)")
    return ValueError(
        f"Target modules {shown} not found in the base model {type(model).__name__}{layer_note}. "
        f"Modules LoRA can wrap here have names ending in: {usable_names(model)[:20]}. "
        "Please check the target modules and try again."
    )
