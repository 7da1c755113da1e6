"""lorakit registered with transformers, TRL and accelerate: lorakit models work where PEFT's do.

transformers and TRL recognise PEFT by ``isinstance(x, peft.PeftModel)`` / ``peft.PeftConfig`` (only when peft
is importable) and run their PEFT code paths on that. lorakit never imports peft, so it registers itself at
those few points instead. ``install()`` (run by ``import lorakit``) only sets post-import hooks: nothing is
imported until the user imports transformers or TRL, and then each module below is adjusted right after it
executes. Every registration dispatches on lorakit's own types and calls the original otherwise, so peft
models, plain models and lorakit models coexist in one process, with or without peft installed.

    module hooked                       what lorakit registers (file)
    transformers.trainer_utils          ``_is_peft_model`` is true for a lorakit PeftModel (trainer.py)
    transformers.trainer                ``Trainer`` saves / resumes / reloads the best lorakit adapters (trainer.py)
    transformers.distributed.fsdp       ``update_fsdp_plugin_peft`` leaves a lorakit model to accelerate's policy
    transformers.integrations.peft      the model's adapter API takes lorakit configs; adapter folders load
                                        without peft (transformers.py)
    transformers.models.auto.auto_factory  ``AutoModel*.from_pretrained(adapter_dir)`` without peft
    trl.trainer.utils                   TRL's fused LM head goes on the wrapped model of a lorakit model (trl.py)
    trl.trainer.sft_trainer             ``SFTTrainer(peft_config=lorakit.LoraConfig(...))`` (trl.py)

``PeftModel.forward`` reports the wrapped model's parameters as its signature (signature.py), so
tools that keep only the arguments a forward accepts need no registration at all.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .hooks import Hook, when_imported

# module imported by the user -> "lorakit integration module:function" run on it right after it executes
HOOKS: dict[str, str] = {
    "transformers.trainer_utils": "trainer:register_trainer_utils",
    "transformers.trainer": "trainer:register_trainer",
    "transformers.distributed.fsdp": "trainer:register_fsdp",
    "transformers.integrations.peft": "transformers:register_adapter_api",
    "transformers.models.auto.auto_factory": "transformers:register_auto_loading",
    "trl.trainer.utils": "trl:register_fused_lm_head",
    "trl.trainer.sft_trainer": "trl:register_sft_trainer",
}


def _lazy(target: str) -> Hook:
    file, _, function = target.partition(":")

    def hook(module: ModuleType) -> None:
        getattr(importlib.import_module(f"{__name__}.{file}"), function)(module)

    return hook


_INSTALLED: list[bool] = []


def install() -> None:
    """Register every hook in ``HOOKS``, once per process."""
    if _INSTALLED:
        return
    _INSTALLED.append(True)
    for module_name, target in HOOKS.items():
        when_imported(module_name, _lazy(target))
