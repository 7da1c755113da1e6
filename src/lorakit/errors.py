"""Error and warning types, and the one helper that formats messages.

Every message lorakit raises follows one template: what failed, where, what we got, what was
expected, how to fix it (STYLE.md section 7). ``explain`` assembles those parts so call sites
stay one line each and no part gets forgotten.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Iterable

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class LoraWarning(UserWarning):
    """Category of every warning lorakit emits, so users can filter them in one line."""


def warn(message: str) -> None:
    """Emit a LoraWarning attributed to the first caller outside lorakit (the user's line)."""
    level, frame = 2, sys._getframe(1)
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
