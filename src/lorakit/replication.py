"""PEFT's ``layer_replication``: stack copies of decoder layers that share their base weights.

For a model with layers L_0 … L_{n−1} and ranges [(s_1, e_1), (s_2, e_2), …] the new stack is

    L_{s_1}, …, L_{e_1 − 1},  L_{s_2}, …, L_{e_2 − 1},  …          (each range half-open, as Python's range)

Every entry is a new module object whose parameters ARE the original layer's (the same tensors, so memory
grows only by the adapters): LoRA layers injected afterwards get their own A and B per copy, and training
changes only those. Buffers are copied. Each copy's ``layer_idx`` attributes (attention caches index by it)
become its new position, and ``config.num_hidden_layers`` the new length (arXiv:2312.15166, "SOLAR" depth
up-scaling; PEFT 0.21.2 behaviour, learned by running it).

The stack is found where PEFT looks (``<model>.model`` first when it exists): ``layers`` (Llama-like),
``bert.encoder.layer`` or ``encoder.layer`` (BERT-like), ``h`` (Falcon's base model). As in PEFT, merging a
replicated model folds every copy's update into the one shared weight.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from .errors import explain

# Attribute paths of the layer stack, tried in order under the model (after PEFT's ``.model`` unwrapping).
LAYER_STACKS = ("layers", "bert.encoder.layer", "encoder.layer", "h")
# Marker in the model's __dict__: (ranges, the ModuleList they made). A load checks the file against the replicated
# model before injecting, and the injection must not replicate a second time; a stack put back since is redone.
APPLIED = "_lorakit_layer_replication"


def _stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the ModuleList of decoder layers.

    Raises:
        ValueError: none of LAYER_STACKS exists (PEFT's sentence first).
    """
    inner = getattr(model, "model", None)
    root: nn.Module = inner if isinstance(inner, nn.Module) else model
    for path in LAYER_STACKS:
        parent_path, _, attribute = path.rpartition(".")
        try:
            parent = root.get_submodule(parent_path) if parent_path else root
        except AttributeError:
            continue
        if isinstance(getattr(parent, attribute, None), nn.ModuleList):
            return parent, attribute
    raise ValueError(
        "Could not locate the layers attribute in the model. Expected Llama, Bert or Falcon compatible "
        "architectures. " + explain("layer_replication needs a stack of decoder layers", where=type(model).__name__,
                                    expected=f"a ModuleList at one of {list(LAYER_STACKS)} (under .model if any)",
                                    fix="remove layer_replication, or replicate the layers of this model yourself")
    )


def shared_copy(layer: nn.Module) -> nn.Module:
    """A new module like ``layer`` (buffers and plain attributes copied) holding ``layer``'s own Parameters."""
    memo = {id(param): param for param in layer.parameters()}
    return copy.deepcopy(layer, memo)


def _check_ranges(ranges: Sequence[Sequence[int]], length: int) -> list[tuple[int, int]]:
    """The ranges as (start, end) pairs inside 0 … length.

    Raises:
        ValueError: a range that is not two integers 0 <= start < end <= length.
    """
    checked = []
    for entry in ranges:
        if len(entry) != 2 or not all(isinstance(v, int) for v in entry) or not 0 <= entry[0] < entry[1] <= length:
            raise ValueError(explain("invalid layer_replication range", got=list(entry),
                                     expected=f"[start, end] with 0 <= start < end <= {length} (the model's layers)",
                                     fix="give half-open ranges of existing layer indices, e.g. [[0, 4], [2, 6]]"))
        checked.append((entry[0], entry[1]))
    return checked


def replicate_layers(model: nn.Module, ranges: Sequence[Sequence[int]]) -> Callable[[], None]:
    """Replace the layer stack of ``model`` by the copies ``ranges`` asks for (module docstring), once per model.

    Returns a function that puts the original stack and ``num_hidden_layers`` back (a no-op when the stack was
    already replicated with these ranges).

    Raises:
        ValueError: no layer stack found, or an invalid range (nothing is changed then).
    """
    wanted = [list(entry) for entry in ranges]
    parent, attribute = _stack(model)
    layers = getattr(parent, attribute)
    applied = model.__dict__.get(APPLIED)
    if applied is not None and applied[0] == wanted and applied[1] is layers:
        return lambda: None
    new_layers = nn.ModuleList(shared_copy(layers[index]) for start, end in _check_ranges(ranges, len(layers))
                               for index in range(start, end))
    for position, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position  # type: ignore[assignment]
    setattr(parent, attribute, new_layers)
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if count is not None:
        config.num_hidden_layers = len(new_layers)  # type: ignore[union-attr]
    model.__dict__[APPLIED] = (wanted, new_layers)

    def undo() -> None:
        setattr(parent, attribute, layers)
        if count is not None:
            config.num_hidden_layers = count  # type: ignore[union-attr]
        if applied is None:
            model.__dict__.pop(APPLIED, None)
        else:
            model.__dict__[APPLIED] = applied
    return undo


@contextlib.contextmanager
def replicated(model: nn.Module, ranges: Sequence[Sequence[int]] | None) -> Iterator[None]:
    """Replicate for the block (nothing when ``ranges`` is empty); an error inside puts the model back as it was."""
    undo = replicate_layers(model, ranges) if ranges else (lambda: None)
    try:
        yield
    except BaseException:
        undo()
        raise
