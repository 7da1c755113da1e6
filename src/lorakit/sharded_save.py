"""Saving an FSDP2-sharded PeftModel: every rank gathers the full adapter, rank 0 writes it in PEFT's format.

FSDP2 (``fully_shard``) holds each parameter as a DTensor shard; io's codec maps the unsharded model's keys, so
the adapter is gathered whole first (``full_adapter_state_dict``), then written as ``save_pretrained`` would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from . import io
from .codec import PREFIX
from .errors import explain

if TYPE_CHECKING:
    from .model import PeftModel


def full_adapter_state_dict(peft_model: nn.Module, adapter_name: str = "default",
                            save_embedding_layers: bool | str = "auto") -> dict[str, Tensor]:
    """PEFT file-keyed tensors of ``adapter_name``, gathered whole; every rank must call it.

    Trainable tensors come from ``get_model_state_dict(full_state_dict, cpu_offload, ignore_frozen_params)``,
    which puts them, full and on CPU, on rank 0 only; frozen ones the adapter still saves (an inactive
    adapter, saved embedding layers) are gathered one by one with ``DTensor.full_tensor``, in the same
    order on every rank. Model keys are those of the unsharded model, so io's codec maps them unchanged.
    Returns the full dict on rank 0 and an empty one elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    gathered = get_model_state_dict(peft_model, options=options)
    user_model = cast("PeftModel", peft_model).base_model.model
    local = {PREFIX + k: v for k, v in user_model.state_dict(keep_vars=True).items()}
    trainable = {k for k, v in local.items() if isinstance(v, nn.Parameter) and v.requires_grad}
    state: dict[str, Tensor] = {}
    for key in io.adapter_model_keys(cast("PeftModel", peft_model), adapter_name, save_embedding_layers):
        if key in trainable:
            if key in gathered:
                state[key] = cast(Tensor, gathered[key])  # a full model state dict holds tensors only
            continue
        value = local[key].detach()
        state[key] = (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
    if torch.distributed.get_rank() != 0:
        return {}
    return io.adapter_state_dict(cast("PeftModel", peft_model), adapter_name, save_embedding_layers, state=state)


def save_sharded(peft_model: nn.Module, save_directory: Any, selected_adapters: list[str] | None,
                 safe_serialization: bool, save_embedding_layers: bool | str, is_main_process: bool,
                 path_initial_model_for_weight_conversion: str | None = None) -> None:
    """``save_pretrained`` for a sharded model: every rank gathers, rank 0 writes (if ``is_main_process``).

    Raises:
        ValueError: an unknown adapter in ``selected_adapters`` (from io.save_adapters, on rank 0).
        NotImplementedError: ``path_initial_model_for_weight_conversion`` on a sharded model.
    """
    if path_initial_model_for_weight_conversion is not None:
        raise NotImplementedError(explain(
            "path_initial_model_for_weight_conversion is not supported on an FSDP2-sharded model",
            fix="save the residual-init adapter unconverted, then convert it in one process"))

    configs = cast("PeftModel", peft_model).peft_config
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    names = [n for n in names if n in configs]  # unknown names: io.save_adapters reports them
    gathered = {n: full_adapter_state_dict(peft_model, n, save_embedding_layers) for n in names}
    if is_main_process and torch.distributed.get_rank() == 0:
        io.save_adapters(cast("PeftModel", peft_model), save_directory, selected_adapters, safe_serialization, save_embedding_layers,
                         gathered=gathered)
