"""``LoraTrainer``: a ``transformers.Trainer`` that also checks that every LoRA layer learns.

A plain ``transformers.Trainer`` (and TRL's trainers) already handles lorakit models once lorakit is imported
(``lorakit.integrations.trainer``): dataset columns by the wrapped model's ``forward`` signature,
adapter-only checkpoints in PEFT format (``checkpoint-N/adapter_model.safetensors``), and exact resume with
``train(resume_from_checkpoint=...)``. ``LoraTrainer`` adds one thing: a ``LoraTrainingCheckCallback``.

Usage: ``LoraTrainer(model=get_peft_model(model, config), args=TrainingArguments(...), ...)``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..training_checks import check_training
from ..model import PeftModel


class LoraTrainingCheckCallback(TrainerCallback):
    """Calls ``lorakit.check_training`` once, after ``after_steps`` optimizer steps (or at the end if sooner).

    It warns (LoraWarning) about LoRA layers whose update is still exactly zero, i.e. layers that never learn.
    """

    def __init__(self, after_steps: int = 10) -> None:
        self.after_steps = after_steps
        self.done = False
        self.found: list[str] | None = None

    def _check(self, state: Any, model: torch.nn.Module | None) -> None:
        model = getattr(model, "module", model)  # DDP / accelerate wrappers
        if self.done or not isinstance(model, PeftModel) or state.global_step == 0:
            return
        self.done = True
        self.found = check_training(model, steps=state.global_step)

    def on_step_end(self, args: object, state: Any, control: object, model: torch.nn.Module | None = None,
                    **kwargs: object) -> None:
        if state.global_step >= self.after_steps:
            self._check(state, model)

    def on_train_end(self, args: object, state: Any, control: object, model: torch.nn.Module | None = None,
                     **kwargs: object) -> None:
        self._check(state, model)


class LoraTrainer(Trainer):
    """``transformers.Trainer`` plus a ``LoraTrainingCheckCallback`` (warns when a LoRA layer has not moved
    after 10 optimizer steps). Checkpoints and resume are Trainer's own, as registered by lorakit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(LoraTrainingCheckCallback())
