"""transformers.Trainer for lorakit models: adapter-only checkpoints, resume, and the right input columns.

transformers recognises PEFT models by ``isinstance(model, peft.PeftModel)``, which a lorakit model is not
(lorakit never imports peft). A plain ``Trainer`` therefore trains a lorakit model but (1) filters dataset
columns by ``PeftModel.forward``'s generic signature, dropping every column unless
``remove_unused_columns=False``, and (2) writes full-model checkpoints. ``LoraTrainer`` fixes both:

- columns are kept by the wrapped model's ``forward`` signature (as transformers does for PEFT);
- ``checkpoint-N/`` holds the adapters in PEFT format (adapter_config.json + adapter_model.safetensors,
  other adapters in subfolders), plus Trainer's optimizer/scheduler/RNG state as usual;
- ``train(resume_from_checkpoint=...)`` loads those adapters back (validated) before continuing.

Usage: ``LoraTrainer(model=get_peft_model(model, config), args=TrainingArguments(...), ...)``.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from .guards import check_training
from .io import read_weights, set_peft_model_state_dict
from .model import PeftModel


class LoraTrainingCheckCallback(TrainerCallback):
    """Calls ``lorakit.check_training`` once, after ``after_steps`` optimizer steps (or at the end if sooner).

    It warns (LoraWarning) about LoRA layers whose update is still exactly zero, i.e. layers that never learn.
    """

    def __init__(self, after_steps: int = 10) -> None:
        self.after_steps = after_steps
        self.done = False
        self.found: list[str] | None = None

    def _check(self, state: object, model: torch.nn.Module | None) -> None:
        model = getattr(model, "module", model)  # DDP / accelerate wrappers
        if self.done or not isinstance(model, PeftModel) or state.global_step == 0:
            return
        self.done = True
        self.found = check_training(model, steps=state.global_step)

    def on_step_end(self, args: object, state: object, control: object, model: torch.nn.Module | None = None,
                    **kwargs: object) -> None:
        if state.global_step >= self.after_steps:
            self._check(state, model)

    def on_train_end(self, args: object, state: object, control: object, model: torch.nn.Module | None = None,
                     **kwargs: object) -> None:
        self._check(state, model)


class LoraTrainer(Trainer):
    """``transformers.Trainer`` that checkpoints and resumes lorakit adapters only (see module docstring).

    It adds a ``LoraTrainingCheckCallback`` (warns when a LoRA layer has not moved after 10 optimizer steps).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(LoraTrainingCheckCallback())

    def _lorakit_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _set_signature_columns_if_needed(self) -> None:
        model = self._lorakit_model()
        if self._signature_columns is None and model is not None:
            columns = list(inspect.signature(model.get_base_model().forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._lorakit_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        peft_model = self._lorakit_model() if model is None else model
        if not isinstance(peft_model, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in peft_model.peft_config:
            folder = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            set_peft_model_state_dict(peft_model, read_weights(folder), adapter_name=name)
        return None

    def _load_best_model(self) -> None:
        peft_model = self._lorakit_model()
        if peft_model is None:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint, peft_model)
        return None
