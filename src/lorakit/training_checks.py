"""Does the adapter train? Warnings for PEFT's silent "nothing learns" failures (errors.GUARDS).

* ``get_peft_model`` produced 0 trainable parameters (``check_trainable``): inference_mode, every target
  excluded, or everything frozen.
* A model loaded with ``is_trainable=False`` (PEFT's default) runs a training forward
  (``frozen_load_flag`` arms ``check_frozen_training``, which PeftModel.forward calls once).
* After N optimizer steps a LoRA update ΔW = s·B·A is still exactly 0 (``check_training``): the zero-initialised
  factor (lora_B; lora_embedding_A for embeddings) never got a gradient.

Each check reads ``requires_grad`` flags (and, for ``check_training``, one ``any()`` per factor), once per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .combine import factor_weights
from .errors import warn
from .layer import LoraLayer, named_lora_layers

if TYPE_CHECKING:
    from .model import PeftModel


def _any_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())  # stops at the first (adapters come early)


# ---- zero trainable parameters --------------------------------------------------------------------------------
def _why_frozen(peft_model: PeftModel) -> str:
    tuner = peft_model.base_model
    active = tuner.active_adapters
    if any(tuner.peft_config[name].inference_mode for name in active):
        return (f"adapter(s) {active} have inference_mode=True (e.g. a config read from a saved adapter_config.json); "
                "build the config with inference_mode=False")
    if not any(name in layer.r for layer in tuner.lora_layers() for name in active):
        return f"no layer holds the active adapter(s) {active}: every target was excluded; check target_modules"
    return "every adapter parameter has requires_grad=False (frozen after get_peft_model?); call set_adapter(name)"


def check_trainable(peft_model: PeftModel) -> None:
    """Warn when ``get_peft_model`` produced a model in which nothing trains (PEFT trains nothing silently)."""
    if not _any_trainable(peft_model):
        warn(f"the PeftModel has 0 trainable parameters: {_why_frozen(peft_model)}")


def frozen_load_flag(peft_model: PeftModel, is_trainable: bool) -> None:
    """Arm ``check_frozen_training`` for the first training-mode forward of a frozen-loaded adapter."""
    peft_model._lorakit_frozen_load = not is_trainable


def check_frozen_training(peft_model: PeftModel) -> None:
    """First training-mode forward of a model loaded with ``is_trainable=False``: warn if nothing can learn."""
    peft_model._lorakit_frozen_load = False  # once
    if not _any_trainable(peft_model):
        warn("training step on an adapter loaded with from_pretrained(..., is_trainable=False) (PEFT's default): "
             "it has 0 trainable parameters, so nothing will learn. Load it with "
             "PeftModel.from_pretrained(model, path, is_trainable=True) to continue training")


# ---- an adapter that does not learn --------------------------------------------------------------------------
def check_training(model: nn.Module, steps: int | None = None) -> list[str]:
    """``path (adapter)`` of every trainable LoRA layer whose update ΔW = s·B·A is still exactly zero.

    After N optimizer steps a zero-initialised factor (lora_B; lora_embedding_A for embeddings) that is still
    all zero means the layer never got a gradient: parameters missing from the optimizer, lr 0, or inputs that
    never reach the layer. Warns (LoraWarning) when the list is not empty.
    """
    found = []
    for path, layer in named_lora_layers(model):
        for name in layer.r:
            factors = factor_weights(layer, name)  # lora_A/B's weights, or the embedding factors
            if any(f.requires_grad for f in factors) and any(not f.detach().any() for f in factors):
                found.append(f"{path} ({name})")
    if found:
        after = f"after {steps} optimizer step(s)" if steps is not None else "now"
        warn(f"{len(found)} LoRA layer(s) still have an all-zero factor {after}, so they have not learned: "
             f"{found[:5]}{' ...' if len(found) > 5 else ''}. Check that the optimizer was built after "
             "get_peft_model and holds these parameters, that the learning rate is not 0, and that the inputs "
             "reach these layers")
    return found
