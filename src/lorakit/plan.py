"""Stage 1 of the pipeline: (model, config, adapter name, the adapters already there) -> Plan. Pure.

``plan_adapter`` walks the model once (``targeting.candidate_modules``), runs every check an injection needs
(adapter name, PEFT's one-bias and same-parameters rules, variants' rules, a second ``get_peft_model``,
targeting, trainable tokens, tied embeddings) and returns a frozen ``Plan`` holding every per-module decision.
Nothing is changed: ``apply.apply`` is the only step that mutates the model, and a load validates the file
against this same plan before applying it, so the config checked is the config injected.

    plan = plan_adapter(model, LoraConfig(r=8, target_modules=["q_proj"]), "default")
    print(plan)   # one line per target: path, kind, r, alpha, init, variant
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import TypeGuard

from torch import nn

from .adapter_rules import check_single_bias
from .config import LoraConfig
from .distributed import check_not_sharded
from .errors import explain, warn
from .inits import INITS
from .kinds_param import check_same_parameters
from .layer import LayerSpec, LoraLayer
from .saved_modules import ModulesToSaveWrapper
from .targeting import TargetPlan, candidate_modules, task_modules_to_save
from .ties import Candidates, Ties, resolve_with_ties
from .token_plan import TokenTarget, plan_tokens
from .trainable_tokens import TrainableTokensWrapper
from .variants import check_new_adapter

AdapterModule = LoraLayer | ModulesToSaveWrapper | TrainableTokensWrapper  # what holds an adapter's tensors
RESERVED_ADAPTER_NAMES = {"__base__"}  # "__base__" means "no adapter" in mixed batches (issue 3)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
PEFT_SECOND_TIME = ("You are trying to modify a model with PEFT for a second time. If you want to reload the model "
                    "with a different config, make sure to call `.unload()` before.")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything ``apply`` does, decided: one adapter for one model, after every check.

    ``config`` is the config checked and injected (PEFT's ``ensure_weight_tying`` rewrite applied),
    ``recorded`` what ``peft_config[adapter_name]`` holds afterwards. ``candidates`` is the model's one walk
    (``candidate_modules``), for the later stages' checks. ``weights_follow``: every factor is loaded from a
    validated file right after, so plain inits are not drawn; ``low_cpu_mem_usage``: factors on the meta device.
    """

    adapter_name: str
    config: LoraConfig
    recorded: LoraConfig
    targets: TargetPlan
    tokens: Mapping[str, TokenTarget]
    ties: Ties | None
    candidates: tuple[tuple[str, nn.Module], ...]
    first: bool  # no adapter in the tuner yet: apply freezes the base model
    weights_follow: bool = False
    low_cpu_mem_usage: bool = False

    def draws_init(self, spec: LayerSpec) -> bool:
        """False when the factors of ``spec`` are left uninitialised (a file or a meta-device load fills them)."""
        skip = self.weights_follow or self.low_cpu_mem_usage
        return not (skip and spec.variant is None and INITS[spec.init.name].fresh)

    def __str__(self) -> str:
        def line(path: str, kind: str, spec: LayerSpec) -> str:
            init = spec.init.name if self.draws_init(spec) else f"{spec.init.name} (loaded)"
            return (f"  {path}: {kind}, r={spec.r}, alpha={spec.lora_alpha}, init={init}, "
                    f"variant={spec.variant or 'none'}")
        lines = [f"Plan for adapter {self.adapter_name!r}: {len(self.targets.layers)} layer(s), "
                 f"{len(self.targets.parameters)} parameter(s), {len(self.targets.modules_to_save)} "
                 f"modules_to_save, {len(self.tokens)} trainable-token wrapper(s)"]
        lines += [line(path, self.targets.kinds[path].name, spec) for path, spec in self.targets.layers.items()]
        lines += [line(t.full_name, "parameter", t.spec) for t in self.targets.parameters]
        lines += [f"  {path}: modules_to_save" for path in self.targets.modules_to_save]
        lines += [f"  {path}: trainable tokens {list(t.indices)}" + (f", tied to {t.tied_to}" if t.tied_to else "")
                  for path, t in self.tokens.items()]
        if self.ties is not None:
            lines.append(f"  {self.ties.output_path}: tied to {self.ties.input_path} ({self.ties.how})")
        return "\n".join(lines)


def plan_adapter(model: nn.Module, config: LoraConfig, adapter_name: str,
                 existing: Mapping[str, LoraConfig] | None = None, *, tuner_name: str = "LoraModel",
                 second_injection: bool = False, weights_follow: bool = False, low_cpu_mem_usage: bool = False,
                 quiet: bool = False, targeting_error: Callable[[Exception], Exception] | None = None) -> Plan:
    """Check and plan adapter ``adapter_name`` of ``config`` for ``model``, next to ``existing`` adapters' configs.

    ``second_injection``: ``get_peft_model``'s check for LoRA layers an earlier PeftModel left in the model.
    ``targeting_error``: turns a targeting error (ValueError, TypeError) into the caller's (a load's).

    Raises:
        ValueError: a name in use or invalid, a second adapter with ``bias != "none"``, other target_parameters
            than the adapters there, a variant's rule, or a targeting error (``resolve_targets``).
        TypeError: trainable tokens on a module that cannot take them.
    """
    existing = {} if existing is None else existing
    candidates = tuple(candidate_modules(model))  # the one walk of the model
    check_not_sharded(model, (module for _, module in candidates))
    if adapter_name in existing:
        raise ValueError(f"Adapter with name '{adapter_name}' already exists. "
                         + explain("a second adapter cannot take its name", where=type(model).__name__,
                                   fix="pick another adapter_name or delete_adapter() it first"))
    check_adapter_name(adapter_name, model, candidates)
    if second_injection:
        check_second_injection(adapter_name, candidates)
    check_single_bias(dict(existing), config, tuner_name)
    check_same_parameters(dict(existing), config)
    check_new_adapter({k: v for k, v in existing.items() if v is not config}, config)
    try:
        config, targets, ties = resolve_with_ties(model, config, candidates, quiet=quiet)
        tokens = plan_tokens(model, config, targets, candidates, quiet=quiet)  # trainable_token_indices
    except (ValueError, TypeError) as error:
        if targeting_error is None:
            raise
        raise targeting_error(error) from None
    return Plan(adapter_name=adapter_name, config=config, recorded=recorded_config(config, targets),
                targets=targets, tokens=tokens, ties=ties, candidates=candidates, first=not existing,
                weights_follow=weights_follow, low_cpu_mem_usage=low_cpu_mem_usage)


def recorded_config(config: LoraConfig, targets: TargetPlan) -> LoraConfig:
    """A copy of ``config`` saying what will be applied (the user's object is never changed)."""
    kinds_in_out = {targets.kinds[p].weight_is_in_out for p in targets.layers}
    fan_in_fan_out = config.fan_in_fan_out
    if True in kinds_in_out and not fan_in_fan_out:
        warn("fan_in_fan_out=False but the targets are GPT-2 Conv1D layers, whose weight is stored "
             "(in, out); lorakit handles them correctly and records fan_in_fan_out=True")
        fan_in_fan_out = True
    elif fan_in_fan_out and False in kinds_in_out:
        warn("fan_in_fan_out=True but some targets are nn.Linear-like layers storing their weight "
             "(out, in); lorakit ignores the flag for them")
    return dataclasses.replace(config, target_modules=targets.target_modules,
                               modules_to_save=task_modules_to_save(config), fan_in_fan_out=fan_in_fan_out)


def check_adapter_name(name: object, model: nn.Module | None = None, candidates: Candidates | None = None) -> None:
    """Adapter names become module keys, state-dict key segments and folder names: refuse what breaks any.

    ``candidates``: the model's ``candidate_modules`` (``plan_adapter`` passes them with ``model``, which the
    message names); without them only the name itself is checked.

    Raises:
        ValueError: not a non-empty string of letters, digits, '_' and '-'; '__base__'; an attribute name of
            torch's module containers (e.g. 'training'); or a module name inside ``model`` (e.g. 'q_proj'),
            which would make state-dict keys ambiguous.
    """
    valid = isinstance(name, str) and _ADAPTER_NAME.fullmatch(name) and name not in RESERVED_ADAPTER_NAMES
    if not valid or hasattr(nn.ModuleDict(), str(name)) or hasattr(nn.ParameterDict(), str(name)):
        raise ValueError(
            explain("invalid adapter_name", got=name,
                    expected="a non-empty name of letters, digits, '_' and '-', not '__base__' and not an "
                             "attribute of torch.nn.ModuleDict",
                    fix="e.g. adapter_name='default' or 'my_task'")
        )
    if candidates is not None and any(name in path.split(".") for path, _ in candidates):
        raise ValueError(explain(f"adapter_name {name!r} is also a module name in {type(model).__name__}",
                                 fix="pick a name that is not part of any module path, e.g. 'task_a'"))


def holds(module: nn.Module, adapter_name: str) -> TypeGuard[AdapterModule]:
    """``module`` is a LoRA layer or a modules_to_save / trainable-token wrapper that holds ``adapter_name``."""
    return ((isinstance(module, LoraLayer) and adapter_name in module.r)
            or (isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save)
            or (isinstance(module, TrainableTokensWrapper) and adapter_name in module._adapters))


def holders(candidates: Candidates, adapter_name: str) -> set[str]:
    """Paths of the LoRA layers and modules_to_save / trainable-token wrappers that hold ``adapter_name``."""
    return {path for path, module in candidates if holds(module, adapter_name)}


def check_second_injection(adapter_name: str, candidates: Candidates) -> None:
    """``get_peft_model`` on a model whose layers already hold LoRA adapters (an earlier ``get_peft_model``).

    PEFT warns and injects anyway; with the same adapter name it overwrites the earlier PeftModel's adapter
    in the layers both share. lorakit warns the same and adds a new name next to the old ones, but refuses a
    name the layers already hold, before anything changes, so the first PeftModel keeps its adapter.
    """
    if not any(isinstance(module, LoraLayer) for _, module in candidates):
        return
    taken = sorted(holders(candidates, adapter_name))
    if taken:
        raise ValueError(explain(
            f"{PEFT_SECOND_TIME} lorakit refuses it: an earlier get_peft_model put an adapter named "
            f"{adapter_name!r} into this model's layers ({len(taken)}, e.g. {taken[0]!r}), which both PeftModels "
            "would share, so the new one would overwrite it", expected="an adapter name the layers do not hold",
            fix="Pass another adapter_name (the layers then hold both), call add_adapter(name, config) on the "
                "first PeftModel, or start again from its .unload()"))
    warn(f"{PEFT_SECOND_TIME} The model already contains LoRA layers; the new adapter {adapter_name!r} is added "
         "next to the existing ones, in the layers both PeftModels share")


def check_config(config: object) -> None:
    """A LoraConfig whose every feature lorakit runs.

    Raises:
        ValueError: not a lorakit LoraConfig. NotImplementedError: it sets a PEFT feature lorakit does not run.
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(explain("lorakit implements LoRA only", got=type(config).__name__,
                                 expected="a lorakit.LoraConfig", fix="build the config with lorakit.LoraConfig"))
    missing = config.not_yet_supported()
    if missing:
        raise NotImplementedError(f"LoraConfig sets features lorakit does not run yet: {'; '.join(missing)}")
