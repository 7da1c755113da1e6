"""The signature ``PeftModel.forward`` shows: the wrapped model's forward plus ``adapter_names``.

``PeftModel.forward(*args, adapter_names=None, **kwargs)`` passes everything through, so tools that read the
signature (transformers' ``Trainer`` keeps only the dataset columns the forward accepts; ``generate``
validates its model kwargs) would see no argument names at all. Each PeftModel therefore gets a bound
``forward`` whose ``__signature__`` is ``(<the wrapped model's forward parameters>, *, adapter_names=None)``:
the same code, only the signature that ``inspect.signature`` reports is per instance.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from torch import nn

_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
_ADAPTER_NAMES = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)


def forward_signature(wrapped_forward: Any) -> inspect.Signature | None:
    """``(self, <wrapped_forward's parameters>, *, adapter_names=None)``; None if it has no signature."""
    try:
        parameters = list(inspect.signature(wrapped_forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if all(p.name != "adapter_names" for p in parameters):
        at = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
        parameters.insert(at, _ADAPTER_NAMES)
    if any(p.name == "self" for p in parameters):
        return None
    return inspect.Signature([_SELF, *parameters])


def bind_forward_signature(peft_model: nn.Module, wrapped: nn.Module) -> None:
    """Give ``peft_model`` its own bound ``forward`` that reports ``forward_signature(wrapped.forward)``.

    The function is a copy of ``type(peft_model).forward`` (same code and defaults), bound as a method so
    ``copy.deepcopy`` rebinds it to the copy. Without a readable wrapped signature nothing changes.
    """
    signature = forward_signature(wrapped.forward)
    if signature is None:
        return
    function = type(peft_model).forward
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__, copy.__doc__, copy.__module__ = function.__qualname__, function.__doc__, function.__module__
    copy.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect.signature
    vars(peft_model)["forward"] = types.MethodType(copy, peft_model)
