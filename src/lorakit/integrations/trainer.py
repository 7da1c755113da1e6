"""transformers.Trainer with lorakit models: PEFT's code paths, adapter-only checkpoints, exact resume.

Registered by ``lorakit.integrations`` when transformers' trainer modules are imported:

- ``_is_peft_model(model)`` is also true for a lorakit PeftModel, so Trainer inspects and unwraps it as it
  does a peft model (forward signature, label names, loss kwargs, the label-smoothing shift, NEFTune).
- ``Trainer._save`` writes a lorakit model with ``save_pretrained``: a PEFT adapter folder
  (adapter_config.json + adapter_model.safetensors, other adapters in subfolders), which also avoids the
  "tensors share memory" refusal of a full state dict with tied embeddings.
- ``Trainer._load_from_checkpoint`` / ``_load_best_model`` put the saved adapters back into the live
  adapters (validated), so ``train(resume_from_checkpoint=...)`` continues exactly.
- A transformers model whose adapters lorakit manages (``model.add_adapter(lorakit.LoraConfig(...))``) is
  saved and resumed the same way (transformers itself restores no adapter weights on resume for such a model).
- ``update_fsdp_plugin_peft`` (peft's wrap policy for FSDP) is skipped for lorakit models.

Anything that is not a lorakit model goes to transformers' own code unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..io import read_weights, load_adapter_weights
from ..model import PeftModel
from .hooks import replace
from .transformers import lorakit_of


def lorakit_model(trainer: Any, model: nn.Module | None = None) -> PeftModel | None:
    """The lorakit PeftModel a Trainer trains (unwrapped from DDP / accelerate / compile), or the one managing
    the adapters of a transformers model (``add_adapter``, see transformers.py), else None."""
    model = trainer.model if model is None else model
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
    return model if isinstance(model, PeftModel) else lorakit_of(model)


def register_trainer_utils(module: ModuleType) -> None:
    def wrap(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
        def _is_peft_model(model: Any) -> bool:
            return isinstance(model, PeftModel) or original(model)
        return _is_peft_model

    replace(module, "_is_peft_model", wrap)


def register_fsdp(module: ModuleType) -> None:
    def wrap(original: Callable[..., None]) -> Callable[..., None]:
        def update_fsdp_plugin_peft(model: Any, accelerator: Any) -> None:
            if not isinstance(model, PeftModel):  # peft's wrap policy needs peft's classes
                original(model, accelerator)
        return update_fsdp_plugin_peft

    replace(module, "update_fsdp_plugin_peft", wrap)


def register_trainer(module: ModuleType) -> None:
    for name, wrap in TRAINER_METHODS.items():
        replace(module.Trainer, name, wrap)


def _save(original: Callable[..., None]) -> Callable[..., None]:
    def wrapper(self: Any, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        model = lorakit_model(self)
        if model is None:
            return original(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        from transformers.trainer import TRAINING_ARGS_NAME

        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None
    return wrapper


def load_adapters_into(model: PeftModel, folder: str) -> None:
    """Copy the adapters saved in ``folder`` ("default" there, others in subfolders) into ``model``'s."""
    for name in model.peft_config:
        load_adapter_weights(model, read_weights(folder if name == "default" else os.path.join(folder, name)),
                                  adapter_name=name)


def _load_from_checkpoint(original: Callable[..., None]) -> Callable[..., None]:
    def wrapper(self: Any, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        peft_model = lorakit_model(self, model)
        if peft_model is None:
            return original(self, resume_from_checkpoint, model)
        load_adapters_into(peft_model, resume_from_checkpoint)
        return None
    return wrapper


def _load_best_model(original: Callable[..., None]) -> Callable[..., None]:
    def wrapper(self: Any) -> None:
        peft_model = lorakit_model(self)
        if peft_model is None:
            return original(self)
        load_adapters_into(peft_model, self.state.best_model_checkpoint)
        return None
    return wrapper


TRAINER_METHODS: dict[str, Callable[[Callable[..., None]], Callable[..., None]]] = {
    "_save": _save, "_load_from_checkpoint": _load_from_checkpoint, "_load_best_model": _load_best_model}
