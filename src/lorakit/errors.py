"""Error and warning types, and the one helper that formats messages.

Every message lorakit raises follows one template: what failed, where, what we got, what was
expected, how to fix it (STYLE.md section 7). ``explain`` assembles those parts so call sites
stay one line each and no part gets forgotten.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import warnings
from collections.abc import Iterable

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class LoraWarning(UserWarning):
    """Category of every warning lorakit emits, so users can filter them in one line."""


def warn(message: str) -> None:
    """Emit a LoraWarning attributed to the first caller outside lorakit (the user's line)."""
    level = 2
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, LoraWarning, stacklevel=level)


class UnknownArgumentError(ValueError, TypeError):
    """A misspelt keyword argument.

    It is a ``ValueError`` (lorakit's validation errors all are) and also a ``TypeError``, which is what
    Python and PEFT raise for an unexpected keyword argument, so code written for either keeps working.
    """


def explain(what: str, *, where: str = "", got: object = None, expected: str = "", fix: str = "") -> str:
    """Join the parts of an error message: ``what [in where]: got X; expected Y. Fix.``"""
    message = what
    if where:
        message += f" in {where}"
    details = []
    if got is not None:
        details.append(f"got {got!r}")
    if expected:
        details.append(f"expected {expected}")
    if details:
        message += ": " + "; ".join(details)
    if fix:
        message += ". " + fix
    return message


# Names people type for a LoraConfig field, mapped to the field (difflib cannot guess "rank" -> "r").
ALIASES = {
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "target_modules_regex": "target_modules",
    "exclude": "exclude_modules",
    "rslora": "use_rslora",
    "dora": "use_dora",
    "init": "init_lora_weights",
    "init_weights": "init_lora_weights",
    "task": "task_type",
}


def suggest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    choices = list(choices)
    if name in ALIASES and ALIASES[name] in choices:
        return ALIASES[name]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_argument(owner: str, name: str, choices: Iterable[str]) -> UnknownArgumentError:
    """The error for ``owner(name=...)`` when ``name`` is not one of ``choices``."""
    guess = suggest(name, choices)
    hint = f"did you mean {guess!r}?" if guess else f"valid arguments are {', '.join(sorted(choices))}"
    return UnknownArgumentError(f"{owner}: unknown argument {name!r}; {hint}")


# ---- the silent failures lorakit turns into errors or warnings (tests/test_errors.py triggers each) -----------
@dataclasses.dataclass(frozen=True)
class Guard:
    when: str
    outcome: str


GUARDS: dict[str, Guard] = {
    "no_trainable_parameters": Guard("get_peft_model", "LoraWarning naming why (inference_mode, disabled, no layer)"),
    "frozen_adapter_trained": Guard("first forward in train mode with grad on, after from_pretrained(is_trainable="
                                    "False)", "LoraWarning: pass is_trainable=True"),
    "adapter_not_learning": Guard("check_training(model) / LoraTrainingCheckCallback after N optimizer steps",
                                  "LoraWarning listing layers whose lora_B (or lora_embedding_A) is still all zero"),
    "saved_file_incomplete": Guard("save_pretrained, before the new folder replaces the old one",
                                   "AdapterSaveError (tensor count, names, shapes, dtypes, empty tensors, file size); "
                                   "the old folder stays"),
    "merge_changed_outputs": Guard("merge_and_unload(check=True, probe=...)", "LoraWarning above the dtype's "
                                   "precision; the number is on model.lorakit_merge_check"),
    "tied_embedding_trained": Guard("get_peft_model with one side of tied embeddings trained",
                                    "LoraWarning; ensure_weight_tying=True ties the adapters as PEFT does"),
    "new_tokens_not_saved": Guard("save_pretrained with a resized vocabulary",
                                  "save_embedding_layers='auto' saves the embeddings (PEFT); False: LoraWarning"),
    "different_base_model": Guard("from_pretrained / load_adapter",
                                  "LoraWarning when base_model_name_or_path differs and every shape fits; otherwise "
                                  "the name joins the one aggregated AdapterLoadError"),
}


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message lists every problem."""
