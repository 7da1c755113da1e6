"""lorakit/training_checks.py: each test fails without its check (errors.GUARDS: no_trainable_parameters,
frozen_adapter_trained, adapter_not_learning)."""

from __future__ import annotations

from types import SimpleNamespace
import warnings

import pytest
import torch
from checks_support import LLAMA, lora_warnings, messages, saved  # noqa: F401  (saved: a fixture)
from models import build, example_inputs

from lorakit import LoraConfig, LoraWarning, PeftModel, check_training, get_peft_model
from lorakit.layer import LoraLayer


# ---- zero trainable parameters ------------------------------------------------------------------------------
def test_inference_mode_config_warns_nothing_trains():
    found = lora_warnings(lambda: get_peft_model(build("llama"), LoraConfig(inference_mode=True, **LLAMA)))
    assert any("0 trainable parameters" in m and "inference_mode=True" in m for m in found), found


def test_normal_config_does_not_warn_about_trainable():
    found = lora_warnings(lambda: get_peft_model(build("llama"), LoraConfig(**LLAMA)))
    assert not any("trainable parameters" in m for m in found), found


@pytest.mark.parametrize("is_trainable, train_mode, grad, warned", [
    (False, True, True, True),      # the silent failure: a training step on a frozen adapter
    (True, True, True, False),
    (False, False, True, False),    # evaluation
    (False, True, False, False),    # train mode under no_grad (e.g. MC dropout)
])
def test_training_step_on_frozen_load(saved, is_trainable, train_mode, grad, warned):
    model = PeftModel.from_pretrained(build("llama"), saved, is_trainable=is_trainable)
    model.train(train_mode)
    inputs = example_inputs("llama")

    def step():
        with torch.set_grad_enabled(grad):
            model(**inputs)
            model(**inputs)

    found = [m for m in lora_warnings(step) if "is_trainable=True" in m]
    assert len(found) == (1 if warned else 0), found  # once, not per forward


# ---- an adapter that does not learn -------------------------------------------------------------------------
def _loss(model) -> torch.Tensor:
    inputs = example_inputs("llama")
    return model(**inputs, labels=inputs["input_ids"]).loss


@pytest.mark.parametrize("optimizer_after_peft, lr, stuck", [(True, 0.1, 0), (False, 0.1, 4), (True, 0.0, 4)])
def test_check_training_finds_layers_that_did_not_move(optimizer_after_peft, lr, stuck):
    base = build("llama")
    early = torch.optim.SGD(base.parameters(), lr=lr)  # the classic bug: built before get_peft_model
    model = get_peft_model(base, LoraConfig(**LLAMA))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr) if optimizer_after_peft else early
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model).backward()
        optimizer.step()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = check_training(model, steps=2)
    layers = [p for p, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 and len(found) == stuck
    assert all(f.split(" ")[0] in layers for f in found)
    assert bool(stuck) == any("after 2 optimizer step(s)" in m for m in messages(record))


def test_trainer_callback_checks_once_after_n_steps():
    from lorakit.app.hf_trainer import LoraTrainer, LoraTrainingCheckCallback

    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    callback = LoraTrainingCheckCallback(after_steps=3)
    callback.on_step_end(None, SimpleNamespace(global_step=2), None, model=model)
    assert callback.found is None
    with pytest.warns(LoraWarning, match="after 3 optimizer step"):
        callback.on_step_end(None, SimpleNamespace(global_step=3), None, model=SimpleNamespace(module=model))
    assert len(callback.found) == 4
    callback.on_train_end(None, SimpleNamespace(global_step=9), None, model=model)  # no second report
    assert len(callback.found) == 4
    assert "LoraTrainingCheckCallback" in LoraTrainer.__doc__
