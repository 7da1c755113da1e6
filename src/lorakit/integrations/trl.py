"""TRL's trainers with lorakit: ``SFTTrainer(model=<lorakit model>)``, ``SFTTrainer(peft_config=lorakit.LoraConfig)``.

Registered by ``lorakit.integrations`` when TRL's modules are imported:

- ``add_fused_lm_head(model)`` (TRL computes per-token log-probabilities from the LM head in chunks by
  replacing a transformers model's ``forward``) is applied to the wrapped transformers model of a lorakit
  PeftModel, as TRL does for peft's. A LoRA on the LM head is refused as TRL refuses it for peft: the fused
  head reads ``lm_head.weight`` directly and would never train the adapter.
- ``SFTTrainer.__init__`` given a ``lorakit.LoraConfig`` as ``peft_config`` (TRL accepts only a
  ``peft.PeftConfig``, and only with peft installed) loads the model if it is a name (TRL's own
  ``create_model_from_path`` with ``args.model_init_kwargs``), seeds with ``args.seed`` as TRL does before
  the adapter init, wraps it with ``lorakit.get_peft_model`` and hands TRL the lorakit model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..config import LoraConfig
from ..layer import LoraLayer
from ..model import PeftModel, get_peft_model
from .hooks import replace


def register_fused_lm_head(module: ModuleType) -> None:
    def wrap(original: Callable[..., None]) -> Callable[..., None]:
        def add_fused_lm_head(model: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(model, PeftModel):
                if isinstance(model.get_output_embeddings(), LoraLayer):
                    raise ValueError(
                        "Applying a PEFT adapter to `lm_head` is not supported: the log-probabilities are computed "
                        "from `lm_head.weight` directly, so the adapter would never be trained. Remove `'lm_head'` "
                        "from your `target_modules`. (lorakit: TRL's fused LM head bypasses the LoRA layer there.)")
                model = model.get_base_model()
            return original(model, *args, **kwargs)
        return add_fused_lm_head

    replace(module, "add_fused_lm_head", wrap)


def register_sft_trainer(module: ModuleType) -> None:
    replace(module.SFTTrainer, "__init__", _lorakit_peft_config)


def _lorakit_peft_config(original: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(original)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        config = bound.arguments.get("peft_config")
        if isinstance(config, LoraConfig):
            bound.arguments["model"] = lorakit_model_for(bound.arguments["model"], bound.arguments.get("args"),
                                                         config, bound.arguments.pop("quantization_config", None))
            bound.arguments["peft_config"] = None
        original(*bound.args, **bound.kwargs)
    return __init__


def lorakit_model_for(model: Any, args: Any, config: LoraConfig, quantization_config: Any) -> PeftModel:
    """``model`` (a transformers model or its name/path) with ``config``'s adapter, as SFTTrainer would build it."""
    from transformers import set_seed

    if isinstance(model, PeftModel):
        raise ValueError("You passed a `PeftModel` instance together with a `peft_config` to the trainer. Please "
                         "first merge and unload the existing adapter, save the resulting base model, and then pass "
                         "that base model along with the new `peft_config` to the trainer.")
    set_seed(getattr(args, "seed", 42))  # TRL seeds before the adapter init, for reproducibility
    if isinstance(model, str):
        from trl.trainer.utils import create_model_from_path

        init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        if quantization_config is not None:
            init_kwargs["quantization_config"] = quantization_config
        if args is not None:
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            args.model_init_kwargs = None  # used here; TRL would warn that an instantiated model ignores them
        model = create_model_from_path(model, **init_kwargs)
    return get_peft_model(model, config)
