"""Activated LoRA (aLoRA, Greenewald et al., arXiv:2504.12397, as PEFT 0.21.2 runs it).

An aLoRA adapter is switched on only from its *invocation sequence* onwards, so the key/value cache of
the prompt before it is the base model's and can be reused across adapters. For row b of a batch of
token ids (length T) and the invocation tokens c_1..c_L (``LoraConfig.alora_invocation_tokens``):

    i_b = the start of the last occurrence of c in ids_b         (none: the adapter stays off in row b)
    o_b = T − i_b                                                 the offset, counted from the row's end
    y[b, t] = base(x)[b, t] + [t ≥ T_x − min(o_b, T_x)] · s·B A dropout(x[b, t])

where T_x is the length of the sequence the layer sees now: the whole prompt in a forward pass, 1 for each
token ``generate`` decodes after its cached prefill (so every generated token of a row with an invocation
gets the adapter). Offsets are computed once per ``PeftModel.forward`` / ``generate`` call from its
``input_ids`` (or taken from an explicit ``alora_offsets=[...]`` argument) and reach the layers through a
context (``Variant.context``), so ``LoraLayer`` stays generic; a layer called outside such a call sees no
offsets and runs the base weights only, as PEFT's layers do without ``alora_offsets``. Under gradient
checkpointing a block is recomputed inside backward, after the call ended; a layer in training mode records
the offsets it ran with and reuses them for that recomputation (one forward per backward, as PEFT requires).
PEFT's helpers ``calculate_alora_offsets`` / ``get_alora_offsets_for_forward`` / ``_generate`` are here too.

aLoRA runs on linear kinds only, and cannot be merged: the update depends on the token position.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import explain, warn
from . import ModelCall, Variant, VariantLayer, register_variant

if TYPE_CHECKING:
    from ..config import LoraConfig

Offsets = list[int | None]  # one offset per row, None where the invocation was not found

# adapter name -> the offsets of the rows that adapter runs on (all rows, or its rows of a mixed batch)
_OFFSETS: ContextVar[dict[str, Offsets] | None] = ContextVar("lorakit_alora_offsets", default=None)
# per layer: the offsets of its last recorded training forward (read when gradient checkpointing recomputes it)
_RECORDED: weakref.WeakKeyDictionary[Any, dict[str, Offsets]] = weakref.WeakKeyDictionary()


def invocation_offsets(input_ids: Tensor, tokens: Sequence[int]) -> Offsets:
    """o_b = T − (start of the last occurrence of ``tokens`` in row b), None where it does not occur.

    Args:
        input_ids: (batch, T) token ids. tokens: the invocation sequence c_1..c_L.
    """
    batch, T = input_ids.shape
    L = len(tokens)
    if L == 0 or L > T:
        return [None] * batch
    pattern = torch.tensor(list(tokens), dtype=input_ids.dtype, device=input_ids.device)
    found = (input_ids.unfold(1, L, 1) == pattern).all(-1)  # (batch, T − L + 1): an occurrence starts at t
    last = (T - L) - found.flip(1).int().argmax(1)  # the last start with a match (if any)
    return [int(T - start) if hit else None for start, hit in zip(last.tolist(), found.any(1).tolist())]


def _row_mask(offsets: Offsets | None, batch: int, T: int, device: torch.device) -> Tensor:
    """(batch, T) bool: True where the adapter is on, i.e. t ≥ T − min(o_b, T)."""
    if offsets is None:
        return torch.zeros(batch, T, dtype=torch.bool, device=device)
    o = torch.tensor([0 if value is None else min(int(value), T) for value in offsets], device=device)
    if len(o) != batch:  # generate repeats each row k times (num_return_sequences)
        if len(o) == 0 or batch % len(o):
            raise ValueError(explain("alora_offsets does not fit the batch", got=f"{len(o)} offsets",
                                     expected=f"one offset per row of the batch ({batch} rows)"))
        o = o.repeat_interleave(batch // len(o))
    return torch.arange(T, device=device)[None, :] >= (T - o)[:, None]


def _alora_forward(layer: VariantLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y with s·B A dropout(x) added at the positions at or after each row's invocation (module docstring)."""
    batch, T = y.shape[0], (y.shape[1] if y.dim() == 3 else 1)
    mapping = _OFFSETS.get()
    if mapping is None and torch._C._current_graph_task_id() != -1:
        # gradient checkpointing recomputes this layer inside backward, after the call's context ended: use the
        # offsets of the forward being recomputed (the last one that recorded its graph here)
        mapping = _RECORDED.get(layer)
    elif mapping is not None and layer.training:  # (reentrant checkpointing runs the first pass without grad)
        _RECORDED[layer] = mapping
    offsets = (mapping or {}).get(adapter_name)
    rows = _row_mask(offsets, batch, T, y.device).reshape(-1).nonzero().squeeze(1)  # flat (b, t) positions
    x_flat, y_flat = x.reshape(batch * T, -1), y.reshape(batch * T, -1)
    delta = layer.branch(adapter_name, x_flat.index_select(0, rows)) * layer.scaling[adapter_name]
    return y_flat.index_add(0, rows, delta.to(y.dtype)).view_as(y)


def _alora_init(layer: VariantLayer, adapter_name: str, A: Tensor, B: Tensor, s: float) -> None:
    """Raises: ValueError: the layer is not a linear kind (PEFT's sentence first)."""
    if not layer.kind.linear_like:
        raise ValueError("Invalid or unsupported variant combination: ('alora_invocation_tokens',) "
                         + explain("aLoRA is not supported", where=f"a {layer.kind.name} target",
                                   expected="Linear / Conv1D targets",
                                   fix="exclude these modules or drop alora_invocation_tokens"))


def _alora_merge(layer: VariantLayer, adapter_name: str, W: Tensor, sign: float) -> Tensor:
    """Raises: NotImplementedError: always; the update depends on the token position."""
    raise NotImplementedError("aLoRA does not support merging. "
                              + explain(f"adapter {adapter_name!r} is an aLoRA adapter", where=f"lora.{layer.kind.name}",
                                        fix="keep it unmerged: its update is applied only after the invocation tokens"))


def calculate_alora_offsets(peft_config: dict[str, LoraConfig], active_adapter: str, input_ids: Tensor | None,
                            adapter_names: list[str] | None = None) -> Offsets:
    """PEFT's helper: one offset per row (None: no invocation, "__base__", or not an aLoRA adapter).

    Row i uses ``adapter_names[i]`` when given, else ``active_adapter``; an unknown name warns and gets None.
    """
    if input_ids is None:
        return []
    offsets: Offsets = [None] * input_ids.shape[0]
    rows: dict[str, list[int]] = {}
    for row in range(input_ids.shape[0]):
        name = adapter_names[row] if adapter_names and row < len(adapter_names) else active_adapter
        if name == "__base__":
            continue
        if name not in peft_config:
            warn(f"Adapter '{name}' not found in peft_config. Using base model for row {row}.")
            continue
        if getattr(peft_config[name], "alora_invocation_tokens", None) is not None:
            rows.setdefault(name, []).append(row)
    for name, indices in rows.items():
        found = invocation_offsets(input_ids[indices], peft_config[name].alora_invocation_tokens or [])
        for row, offset in zip(indices, found):
            offsets[row] = offset
    return offsets


def is_alora_relevant_in_batch(model: Any, adapter_names: list[str] | None = None) -> bool:
    """PEFT's helper: the active adapter, or one of the rows' adapters, is an aLoRA adapter."""
    names = [n for n in adapter_names or [] if n != "__base__"] + list(model.active_adapters)
    return any(getattr(model.peft_config.get(n), "alora_invocation_tokens", None) for n in names)


def _warn_no_input_ids(generate: bool) -> None:
    """PEFT's warning when no input_ids reach a call with an aLoRA adapter (aLoRA is then off for the call)."""
    warn("Cannot calculate aLoRA offsets during generate as input_ids are not available. Disabling aLoRA."
         if generate else "Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA "
         "for this forward pass.")


def _offsets_kwargs(model: Any, input_ids: Tensor | None, generate: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not is_alora_relevant_in_batch(model, kwargs.get("adapter_names")) or kwargs.get("alora_offsets") is not None:
        return kwargs
    if input_ids is None:
        _warn_no_input_ids(generate)
        return {**kwargs, "alora_offsets": None}
    active = model.active_adapters[0] if model.active_adapters else "default"
    offsets = calculate_alora_offsets(model.peft_config, active, input_ids, kwargs.get("adapter_names"))
    return {**kwargs, "alora_offsets": offsets}


def get_alora_offsets_for_forward(model: Any, input_ids: Tensor | None = None,
                                  inputs_embeds: Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
    """PEFT's helper: ``kwargs`` with ``alora_offsets`` computed from ``input_ids`` where an aLoRA adapter runs."""
    return _offsets_kwargs(model, input_ids, False, kwargs)


def get_alora_offsets_for_generate(model: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """PEFT's helper: as ``get_alora_offsets_for_forward``, reading input_ids from kwargs or the first argument."""
    return _offsets_kwargs(model, _input_ids(args, kwargs), True, kwargs)


def _tokens(call: ModelCall, adapter_name: str) -> Sequence[int] | None:
    return getattr(call.peft_config.get(adapter_name), "alora_invocation_tokens", None)  # None: no such adapter


def _input_ids(args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
    """A call's input_ids, from its keyword or its first argument, as (batch, T)."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], Tensor):
        input_ids = args[0]
    if isinstance(input_ids, Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None, :]
    return input_ids


@contextlib.contextmanager
def _alora_context(call: ModelCall) -> Iterator[None]:
    """Compute each aLoRA adapter's row offsets for this call and show them to the layers inside the block.

    Raises:
        ValueError: beam search with aLoRA adapters (PEFT refuses it too).
    """
    explicit = call.kwargs.pop("alora_offsets", None)
    row_adapters = call.adapter_names
    names = set(row_adapters) if row_adapters is not None else set(call.active_adapters)
    relevant = sorted(name for name in names if _tokens(call, name))
    if not relevant:
        yield
        return
    input_ids = _input_ids(call.args, call.kwargs)
    num_beams = call.kwargs.get("num_beams")
    if isinstance(num_beams, int) and num_beams > 1 and (explicit is not None or input_ids is not None):
        raise ValueError("Beam search not yet supported for aLoRA. "
                         + explain("num_beams > 1 with an aLoRA adapter",
                                   fix="use greedy or sampling decoding (num_beams=1)"))
    mapping: dict[str, Offsets] = {}
    if explicit is None and input_ids is None:
        _warn_no_input_ids(call.generate)
    else:
        for name in relevant:
            if explicit is not None:
                offsets = list(explicit)
            else:
                assert input_ids is not None
                offsets = invocation_offsets(input_ids, _tokens(call, name) or [])
            if row_adapters is not None:  # a mixed batch: the adapter sees only its own rows, in order
                offsets = [offsets[row] for row, row_name in enumerate(row_adapters) if row_name == name]
            mapping[name] = offsets
    token = _OFFSETS.set(mapping)
    try:
        yield
    finally:
        _OFFSETS.reset(token)


register_variant("alora", Variant(init=_alora_init, forward=_alora_forward, merge=_alora_merge,
                                  shapes=lambda kind, base: {}, context=_alora_context,
                                  select=lambda config: config.alora_invocation_tokens is not None))
