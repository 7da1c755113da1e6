"""PEFT's rules for several adapters on one model, each a small check that runs before anything changes.

Each error message starts with PEFT's own sentence (code written against PEFT matches on it), then says in
lorakit's words what to do. The rules:

* at most one adapter may train biases (``bias != "none"``): the biases are the base model's, shared by all
  adapters, so two such adapters would overwrite each other's;
* two active adapters cannot both have a copy of one ``modules_to_save`` module: full copies replace the
  module, they do not add up like LoRA updates, so the forward pass could use only one of them;
* an adapter merged into the base weights cannot be deleted: its update would stay inside W for good;
* merging adapters that are all merged already does nothing, and says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from .config import LoraConfig
from .errors import warn
from .layer import LoraLayer
from .saved_modules import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensWrapper


def check_single_bias(configs: Mapping[str, LoraConfig], new: LoraConfig, owner: str = "LoraModel") -> None:
    """Refuse ``new`` when it and an existing adapter both set ``bias != "none"``.

    Raises:
        ValueError: PEFT's "supports only 1 adapter with bias" error, naming the adapter that has one.
    """
    if new.bias == "none":
        return
    with_bias = [name for name, config in configs.items() if config.bias != "none"]
    if with_bias:
        raise ValueError(
            f"{owner} supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all "
            f"adapters. Adapter {with_bias[0]!r} already has bias={configs[with_bias[0]].bias!r} (the base "
            f"model's biases, shared by every adapter); add this one with bias='none'."
        )


def check_one_saved_copy(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse activating ``names`` together when two of them have a copy of the same modules_to_save module.

    Raises:
        ValueError: PEFT's "Only one adapter can be set at a time for ModulesToSaveWrapper" error, naming the module.
    """
    names = list(names)
    if len(names) < 2:
        return
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            owners = [name for name in names if name in module.modules_to_save]
            if len(owners) > 1:
                module.set_adapter(owners)  # raises PEFT's error, with lorakit's explanation after it
        elif isinstance(module, TrainableTokensWrapper):
            module.check_set_adapter(names)  # trainable tokens: the same rule (PEFT's error)


def merged_adapter_names(layers: Iterable[LoraLayer]) -> list[str]:
    """Adapters merged into at least one layer, in first-merge order."""
    found: dict[str, None] = {}
    for layer in layers:
        found.update(dict.fromkeys(layer.merged_adapters))
    return list(found)


def check_not_merged(layers: Iterable[LoraLayer], adapter_name: str) -> None:
    """Refuse deleting an adapter that is merged into the base weights.

    Raises:
        ValueError: PEFT's "Cannot delete adapter(s) ... while they are merged" error.
    """
    if adapter_name in merged_adapter_names(layers):
        raise ValueError(
            f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first. "
            "Its update is folded into the base weights; call unmerge_adapter() before delete_adapter(), or "
            "merge_and_unload() to keep it in the weights for good."
        )


def adapters_to_merge(layers: list[LoraLayer], requested: list[str] | None, active: list[str]) -> list[str]:
    """The requested adapters (default: the active ones) not merged yet; warns when some or all are merged.

    Raises:
        TypeError: ``adapter_names`` given as one string instead of a list (PEFT raises the same).
    """
    if isinstance(requested, str):
        raise TypeError(f"adapter_names should be a list of strings, got {requested!r}. "
                        f"Pass [{requested!r}] to merge one adapter.")
    names = list(active if requested is None else requested)
    merged = merged_adapter_names(layers)
    if not merged:
        return names
    pending = [name for name in names if name not in merged]
    if pending:
        warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally merging "
             f"{','.join(pending)}.")
    else:
        warn("All adapters are already merged, nothing to do.")
    return pending
