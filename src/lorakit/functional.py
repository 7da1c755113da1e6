"""PEFT's functional API: LoRA injected into a plain model, and the base model's own state dict.

``inject_adapter_in_model(config, model)`` swaps the targeted modules of ``model`` for ``LoraLayer``s, in
place, and returns ``model`` itself (no ``PeftModel`` around it): for code that manages the wrapping itself
(transformers' ``add_adapter``, diffusers).

The base model's state dict is the wrapped model's minus every adapter tensor, under the keys the model had
before injection: ``<path>.base_layer.weight`` is ``<path>.weight`` again, ``<path>.original_module.weight``
(modules_to_save) too. ``set_base_model_state_dict`` loads such a dict back, so base weights saved before
``get_peft_model`` (or by another tool) load into the adapted model.
"""

from __future__ import annotations

import dataclasses
import re
from collections import namedtuple
from typing import Any

import torch
from torch import Tensor, nn

from .codec import PREFIX, parse_key
from .config import LoraConfig
from .layer import LoraLayer
from .plan import check_config
from .saved_modules import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper
from .tuner import LoraModel

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """Inject adapter ``adapter_name`` into ``model`` in place and return it (PEFT's ``inject_adapter_in_model``).

    The adapter is active and trainable, the rest of the model frozen, as after ``get_peft_model``.
    ``low_cpu_mem_usage``: the factors are created empty on the meta device, for a load to fill
    (``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``). ``state_dict``: only its keys are read; the
    modules holding LoRA tensors in it (file keys, ``<path>.lora_A.weight``, or model keys) become the
    targets, for checkpoints saved without their ``target_modules``.

    Raises:
        ValueError: a non-LoRA config, no targets, or a ``state_dict`` with no LoRA key.
    """
    check_config(peft_config)
    if state_dict is not None:
        paths = sorted({parsed.path.removeprefix(PREFIX) for key in state_dict if (parsed := parse_key(key))})
        if not paths:
            raise ValueError("inject_adapter_in_model: state_dict holds no LoRA key (lora_A / lora_B / "
                             "lora_embedding_A ...), so no target can be read from it; pass state_dict=None and set "
                             "peft_config.target_modules instead")
        paths = [re.sub(rf"\.{re.escape(adapter_name)}$", "", path) for path in paths]
        peft_config = dataclasses.replace(peft_config, target_modules=paths)
    tuner = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return tuner.model


def _original_key(model: nn.Module, key: str) -> str | None:
    """The key ``key`` (of the adapted model's state dict) had before injection; None for an adapter tensor."""
    parts, kept = key.split("."), []
    module: nn.Module | None = model
    for part in parts[:-1]:
        if isinstance(module, LoraLayer):
            if part != "base_layer":
                return None  # lora_A, lora_B, lora_magnitude_vector, ...: the adapter's own
        elif isinstance(module, ModulesToSaveWrapper):
            if part != "original_module":
                return None  # modules_to_save.<adapter>: the adapter's trained copy
        elif isinstance(module, (TrainableTokensWrapper, TrainableTokensLayer)):
            if part not in ("token_adapter", "base_layer"):
                return None  # trainable_tokens_delta.<adapter>: the adapter's rows
        else:
            kept.append(part)
        module = module._modules.get(part) if module is not None else None
    return ".".join([*kept, parts[-1]])


def _base_keys(peft_model: Any) -> dict[str, str]:
    """{key in the adapted model's state dict: the key the base model had}, adapter tensors left out."""
    model = peft_model.base_model.model
    originals = {key: _original_key(model, key) for key in model.state_dict(keep_vars=True)}
    return {key: original for key, original in originals.items() if original is not None}


def get_base_model_state_dict(model: Any) -> dict[str, Tensor]:
    """The base model's state dict (adapter tensors left out), under the keys it had before injection.

    Merged adapters are part of the weights then (``merge_adapter``); unmerge first for the pristine base.
    """
    state = model.base_model.model.state_dict()
    return {original: state[key] for key, original in _base_keys(model).items()}


def set_base_model_state_dict(model: Any, state_dict: dict[str, Tensor],
                              strict: bool = True) -> IncompatibleKeys:
    """Load a base-model state dict (keys as before injection) into the adapted model; adapters are untouched.

    Returns ``(missing_keys, unexpected_keys)`` in the base model's keys.

    Raises:
        RuntimeError: ``strict`` and keys missing or unexpected (torch's wording); nothing is loaded then.
    """
    to_adapted = {original: key for key, original in _base_keys(model).items()}
    unexpected = [key for key in state_dict if key not in to_adapted]
    missing = [key for key in to_adapted if key not in state_dict]
    if strict and (missing or unexpected):
        errors = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + (
            [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else [])
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors)
                           + "\n\t(keys are the base model's own, as get_base_model_state_dict returns them)")
    adapted = {to_adapted[key]: value for key, value in state_dict.items() if key in to_adapted}
    with torch.no_grad():
        model.base_model.model.load_state_dict(adapted, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


__all__ = ["inject_adapter_in_model", "get_base_model_state_dict", "set_base_model_state_dict"]
