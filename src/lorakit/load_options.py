"""The keywords of ``from_pretrained`` / ``load_adapter`` / ``save_pretrained`` beyond the common ones.

PEFT's methods take ``**kwargs`` that they pass on (Hub download keywords, accelerate dispatch options, ...).
lorakit accepts every one PEFT documents and either honours it or refuses it with an error that names it;
nothing is dropped silently. Honoured: ``subfolder``, ``torch_device`` (the device the file is read onto),
``key_mapping`` (regex renames of the file's keys), ``use_safetensors`` (False reads ``adapter_model.bin``),
``ignore_mismatched_sizes=False`` and every Hub download keyword (``revision``, ``cache_dir``, ``token``, ...).
``ephemeral_gpu_offload`` goes into the adapter's ``runtime_config`` (see config.LoraRuntimeConfig). Refused:
accelerate's offloading options (``device_map``, ``max_memory``, ``offload_*``) for a model dispatched with CPU /
disk offload (for any other model they do nothing, in PEFT too).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from .hub import resolve_folder

# accelerate dispatch of a CPU / disk offloaded model (PEFT's load_adapter): not run by lorakit
_OFFLOAD = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")


@dataclass(frozen=True)
class LoadOptions:
    owner: str
    subfolder: str | None
    torch_device: str | None
    use_safetensors: bool | None
    hub_kwargs: dict[str, Any]

    @classmethod
    def parse(cls, owner: str, ephemeral_gpu_offload: bool, key_mapping: dict[str, str] | None,
              kwargs: dict[str, Any], model: object = None) -> LoadOptions:
        """Split ``kwargs``; refuse what lorakit does not run. ``ephemeral_gpu_offload`` is the caller's to record
        on the adapter's config (``runtime_config``); it is taken here so that every loader names the same keywords.

        The offloading options act only on a model accelerate dispatched with CPU or disk offload
        (``hf_device_map`` naming "disk", or "cpu" next to another device); a model on one device has nothing
        to dispatch, so they change nothing there (PEFT re-dispatches it onto the same device).

        Raises:
            NotImplementedError: an offloading option for an offloaded ``model``.
            ValueError: ``ignore_mismatched_sizes=True`` (lorakit never loads a tensor of another shape).
            TypeError: a keyword no loader takes (from ``hub.resolve_folder``).
        """
        kwargs = dict(kwargs)
        offload = [name for name in _OFFLOAD if kwargs.pop(name, None) is not None]
        devices = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
        offloaded = "disk" in devices or ("cpu" in devices and len(devices) > 1)  # a model all on CPU is not
        if offload and offloaded:
            raise NotImplementedError(f"{owner}: {offload} dispatch a CPU/disk offloaded model with accelerate, which "
                                      "lorakit does not do; dispatch the base model before loading the adapter")
        if kwargs.pop("ignore_mismatched_sizes", False):
            raise ValueError(f"{owner}(ignore_mismatched_sizes=True) is not supported: lorakit refuses an adapter whose "
                             "tensors do not fit the model (the error lists each one) instead of leaving those layers "
                             "at their initial values; resize the model (e.g. resize_token_embeddings) to match")
        if key_mapping is not None and not isinstance(key_mapping, dict):
            raise TypeError(f"{owner}: key_mapping must be a dict {{regex: replacement}}, got {type(key_mapping).__name__}")
        return cls(owner=owner, subfolder=kwargs.pop("subfolder", None), torch_device=kwargs.pop("torch_device", None),
                   use_safetensors=kwargs.pop("use_safetensors", None), hub_kwargs=kwargs)

    def folder(self, model_id: str | os.PathLike[str]) -> Path:
        return resolve_folder(model_id, self.subfolder, self.hub_kwargs, self.owner)


def remap_keys(tensors: dict[str, Tensor], key_mapping: dict[str, str] | None) -> dict[str, Tensor]:
    """PEFT's ``key_mapping``: on each key without its ``base_model.model.`` prefix, the first regex that matches
    is substituted (``re.subn``); the prefix is put back.

    Raises:
        ValueError: a key without the ``base_model.`` prefix every adapter file has.
    """
    if not key_mapping:
        return tensors
    remapped = {}
    for key, value in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"key_mapping: the adapter key {key!r} does not start with 'base_model.' as PEFT's "
                             "file keys do; key_mapping applies to PEFT-format adapter files")
        key = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            renamed, count = re.subn(pattern, replacement, key)
            if count:
                key = renamed
                break
        remapped[prefix + key] = value
    return remapped


def save_state_dict(kwargs: dict[str, Any]) -> dict[str, Tensor] | None:
    """``save_pretrained``'s ``**kwargs``: PEFT reads ``state_dict`` (the PeftModel's full state dict, e.g. the one
    transformers' Trainer gathers) and takes the adapter tensors from it instead of the live model.
    ``max_shard_size`` is accepted as from transformers' ``push_to_hub``: adapter files are never sharded.

    Raises:
        TypeError: any other keyword.
    """
    other = sorted(set(kwargs) - {"state_dict", "max_shard_size"})
    if other:
        raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {other}; it takes PEFT's "
                        "save_directory, safe_serialization, selected_adapters, save_embedding_layers, "
                        "is_main_process, path_initial_model_for_weight_conversion and state_dict")
    return kwargs.get("state_dict")
