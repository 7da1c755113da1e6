"""A transformers model's own adapter API on lorakit: ``add_adapter``, ``load_adapter``, ``from_pretrained``.

transformers' ``PreTrainedModel.add_adapter / load_adapter / set_adapter / ...`` (its ``PeftAdapterMixin``) put
peft's layers into the model itself. lorakit registers, for each of those methods, a version that runs on
lorakit when

- ``add_adapter`` gets a ``lorakit.LoraConfig``;
- ``load_adapter`` is called and peft is not installed, or gets a ``lorakit.LoraConfig`` as ``peft_config``;
- the model already carries lorakit adapters (then every method of the API does).

Such a model keeps the lorakit ``PeftModel`` managing its layers at ``model._lorakit_peft`` (a plain attribute,
not a submodule: the layers are the model's own), shares its ``peft_config`` dict, and sets
``_hf_peft_config_loaded`` as transformers does, so ``save_pretrained`` writes an adapter folder (PEFT's
format) and gradient checkpointing keeps input gradients. Without peft, ``from_pretrained(adapter_dir)`` (on
an ``AutoModel*`` class or a model class) loads the base named in ``adapter_config.json`` and then the
adapter, as transformers does with peft; adapter folders must then be local (there is no hub download).
Everything else goes to transformers' own code unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from ..codec import PREFIX, decode, layout_of
from ..config import LoraConfig
from ..errors import explain
from ..hotswap import (check_hotswap_configs_compatible, hotswap_adapter, hotswap_adapter_from_state_dict,
                       prepare_model_for_compiled_hotswap)
from ..io import CONFIG_NAME, adapter_state_dict
from ..model import PeftModel, get_peft_model
from .hooks import replace


def peft_available() -> bool:
    from transformers.utils.import_utils import is_peft_available

    available: bool = is_peft_available()  # its untyped decorators hide transformers' `-> bool`
    return available


def lorakit_of(model: nn.Module) -> PeftModel | None:
    """The lorakit PeftModel managing ``model``'s adapters (added through transformers' API), else None."""
    return vars(model).get("_lorakit_peft")


def managed(model: nn.Module) -> PeftModel:
    """``lorakit_of(model)`` where the dispatch guarantees there is one."""
    peft_model = lorakit_of(model)
    assert peft_model is not None, "dispatched to lorakit without lorakit adapters"
    return peft_model


def _attach(model: nn.Module, peft_model: PeftModel) -> None:
    object.__setattr__(model, "_lorakit_peft", peft_model)  # not a submodule: it wraps this very model
    setattr(model, "peft_config", peft_model.peft_config)  # the same dict, as peft's tuner shares its own
    setattr(model, "_hf_peft_config_loaded", True)


def _detach(model: nn.Module) -> None:
    del vars(model)["_lorakit_peft"]
    delattr(model, "peft_config")
    setattr(model, "_hf_peft_config_loaded", False)


def _refuse_mixing(model: nn.Module) -> None:
    if getattr(model, "_hf_peft_config_loaded", False) and lorakit_of(model) is None:
        raise ValueError(explain("this model already holds peft adapters; lorakit cannot add its own next to them",
                                 fix="use a peft config here, or lorakit adapters on a fresh model"))


# ---- the adapter API, on lorakit ---------------------------------------------------------------------------
def add_adapter(self: nn.Module, adapter_config: Any, adapter_name: str | None = None) -> None:
    """Add a trainable adapter and make it the active one (transformers' semantics)."""
    name = adapter_name or "default"
    peft_model = lorakit_of(self)
    if peft_model is None:
        _refuse_mixing(self)
        _attach(self, get_peft_model(self, adapter_config, name))
    elif name in peft_model.peft_config:
        raise ValueError(f"Adapter with name {name} already exists. Please use a different name.")
    else:
        peft_model.add_adapter(name, adapter_config)
    # active; trainable unless its config is for inference (a load with is_trainable=False), as PEFT injects it
    managed(self).set_adapter(name, inference_mode=bool(getattr(adapter_config, "inference_mode", False)))


def load_adapter(self: nn.Module, peft_model_id: str | None = None, adapter_name: str | None = None,
                 peft_config: Any = None, adapter_state_dict: dict[str, Tensor] | None = None, low_cpu_mem_usage: bool = False,
                 is_trainable: bool = False, hotswap: bool | str = "auto", local_files_only: bool = False,
                 adapter_kwargs: dict[str, Any] | None = None, load_config: Any = None, **kwargs: Any) -> Any:
    """Load a local adapter folder (or ``peft_config`` + ``adapter_state_dict``) as ``adapter_name``.

    The first adapter is active; later ones are added inactive (``set_adapter``). Download options
    (``local_files_only``, ``load_config``'s hub fields, ``adapter_kwargs`` but ``subfolder``) and
    ``low_cpu_mem_usage`` have nothing to act on for a local folder.
    """
    name = adapter_name or "default"
    peft_model = lorakit_of(self)
    loaded = peft_model is not None and name in peft_model.peft_config
    if hotswap == "auto":  # after enable_peft_hotswap, loading under a loaded adapter's name swaps it
        hotswap = bool(getattr(self, "_hotswap_enabled", False)) and loaded
    if hotswap:
        if not loaded:
            raise ValueError("To hotswap an adapter, there must already be an existing adapter with the same "
                             "adapter name.")
        _hotswap(managed(self), name, peft_model_id, peft_config, adapter_state_dict, adapter_kwargs)
        return _load_info()
    if loaded:
        raise ValueError(f"Adapter with name {name} already exists. Please use a different name.")
    _refuse_mixing(self)
    if peft_config is not None or adapter_state_dict is not None:
        _load_state_dict(self, name, peft_config, adapter_state_dict, is_trainable)
    else:
        folder = _local_folder(peft_model_id, adapter_kwargs)
        if peft_model is None:
            _attach(self, PeftModel.from_pretrained(self, folder, adapter_name=name, is_trainable=is_trainable))
        else:
            peft_model.load_adapter(folder, name, is_trainable=is_trainable)
    prepare = getattr(self, "_prepare_peft_hotswap_kwargs", None)
    if prepare and getattr(self, "_hotswap_enabled", False):  # enable_peft_hotswap(target_rank=...) came first
        prepare_model_for_compiled_hotswap(managed(self), config=managed(self).peft_config, **prepare)
    return _load_info()


def _load_info() -> Any:
    from transformers.utils.loading_report import LoadStateDictInfo

    return LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())


def _hotswap(peft_model: PeftModel, name: str, model_id: str | None, config: Any, tensors: dict[str, Tensor] | None,
             adapter_kwargs: dict[str, Any] | None) -> None:
    """transformers' ``load_adapter(hotswap=True)``: the weights (and scalings) of adapter ``name`` are replaced in
    place by lorakit.hotswap, so a compiled model does not recompile."""
    if tensors is None:
        hotswap_adapter(peft_model, _local_folder(model_id, adapter_kwargs), name)
        return
    config = LoraConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(config, LoraConfig):
        raise ValueError(explain("load_adapter(hotswap=True, adapter_state_dict=...) needs the adapter's peft_config",
                                 got=type(config).__name__, expected="a lorakit.LoraConfig"))
    check_hotswap_configs_compatible(peft_model.peft_config[name], config)
    keyed = _file_keys(tensors)
    mapping, _ = decode(list(keyed), layout_of(peft_model.base_model.model), name)
    state = {mapping.get(key, key): value for key, value in keyed.items()}
    hotswap_adapter_from_state_dict(peft_model, state, name, config)


def _load_state_dict(model: nn.Module, name: str, config: Any, tensors: dict[str, Tensor] | None, is_trainable: bool) -> None:
    """transformers' ``load_adapter(peft_config=..., adapter_state_dict=...)``: PEFT file keys, validated."""
    config = LoraConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(config, LoraConfig) or tensors is None:
        raise ValueError(explain("load_adapter without a folder needs both peft_config and adapter_state_dict",
                                 got=f"peft_config={type(config).__name__}, adapter_state_dict="
                                     f"{type(tensors).__name__}",
                                 expected="a lorakit.LoraConfig and a dict of tensors"))
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    keyed = _file_keys(tensors)
    peft_model = lorakit_of(model)
    if peft_model is None:  # plan, check, apply, copy (PeftModel.from_tensors): a misfit changes nothing
        _attach(model, PeftModel.from_tensors(model, config, keyed, name, "adapter_state_dict", is_trainable))
    else:
        peft_model.add_from_tensors(config, keyed, name, "adapter_state_dict", is_trainable)
    managed(model).set_adapter(name, inference_mode=not is_trainable)  # active, as transformers' add_adapter


def _file_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' adapter keys (PEFT's file keys without ``base_model.model.``) as PEFT's file keys."""
    return {key if key.startswith(PREFIX) else PREFIX + key: value for key, value in tensors.items()}


def _local_folder(model_id: str | os.PathLike[str] | None, adapter_kwargs: dict[str, Any] | None) -> str:
    """The local adapter folder ``model_id`` (in ``adapter_kwargs["subfolder"]`` when given)."""
    subfolder = (adapter_kwargs or {}).get("subfolder")
    folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    if model_id is None or not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(explain(f"no {CONFIG_NAME} in {folder!r}", where="load_adapter (lorakit)",
                                 expected="a local adapter folder written by save_pretrained",
                                 fix="for a hub repository, download it first (huggingface_hub.snapshot_download)"))
    return folder


def set_adapter(self: nn.Module, adapter_name: str | list[str]) -> None:
    """Activate one adapter, or several whose outputs add."""
    managed(self).set_adapter(adapter_name)


def disable_adapters(self: nn.Module) -> None:
    managed(self).base_model.disable_adapter_layers()


def enable_adapters(self: nn.Module) -> None:
    managed(self).base_model.enable_adapter_layers()


def active_adapters(self: nn.Module) -> list[str]:
    return list(managed(self).active_adapters)


def get_adapter_state_dict(self: nn.Module, adapter_name: str | None = None,
                           state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapter's tensors keyed as transformers keys them (PEFT's file keys without ``base_model.model.``)."""
    peft_model = managed(self)
    name = adapter_name or peft_model.active_adapters[0]
    state = None if state_dict is None else {PREFIX + k: v for k, v in state_dict.items()}
    return {k[len(PREFIX):]: v for k, v in adapter_state_dict(peft_model, name, state=state).items()}


def delete_adapter(self: nn.Module, adapter_names: list[str] | str) -> None:
    """Delete adapters; deleting all of them puts the model's plain layers back, as transformers does."""
    peft_model = managed(self)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in peft_model.peft_config]
    if missing:
        raise ValueError(f"The following adapter(s) are not present and cannot be deleted: {', '.join(missing)}")
    if set(names) >= set(peft_model.peft_config):  # all of them: the model goes back to its plain layers
        peft_model.base_model.unload()
        _detach(self)
        return
    for name in names:
        peft_model.delete_adapter(name)


def _claims_add(self: nn.Module, adapter_config: Any = None, *args: Any, **kwargs: Any) -> bool:
    return lorakit_of(self) is not None or isinstance(adapter_config, LoraConfig)


def _claims_load(self: nn.Module, *args: Any, **kwargs: Any) -> bool:
    return (lorakit_of(self) is not None or isinstance(kwargs.get("peft_config"), LoraConfig)
            or not peft_available())


def _claims_managed(self: nn.Module, *args: Any, **kwargs: Any) -> bool:
    return lorakit_of(self) is not None


# method name -> (lorakit's version, when lorakit runs it instead of transformers')
ADAPTER_API = {
    "add_adapter": (add_adapter, _claims_add),
    "load_adapter": (load_adapter, _claims_load),
    "set_adapter": (set_adapter, _claims_managed),
    "disable_adapters": (disable_adapters, _claims_managed),
    "enable_adapters": (enable_adapters, _claims_managed),
    "active_adapters": (active_adapters, _claims_managed),
    "get_adapter_state_dict": (get_adapter_state_dict, _claims_managed),
    "delete_adapter": (delete_adapter, _claims_managed),
}


def _dispatch(ours: Any, claims: Any) -> Any:
    def wrap(original: Any) -> Any:
        def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return (ours if claims(self, *args, **kwargs) else original)(self, *args, **kwargs)
        return method
    return wrap


# ---- from_pretrained(adapter_dir) without peft -------------------------------------------------------------
def local_adapter(path: Any) -> tuple[str, str] | None:
    """(adapter folder, base model) when ``path`` is a local adapter folder, else None.

    The base is the adapter's ``base_model_name_or_path``, or the folder itself when it also holds a model.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return None
    if os.path.isfile(os.path.join(path, "config.json")):
        return str(path), str(path)
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    if not base:
        raise ValueError(explain(f"{CONFIG_NAME} in {str(path)!r} names no base_model_name_or_path",
                                 fix="load the base model yourself, then model.load_adapter(folder)"))
    return str(path), base


def register_adapter_api(module: ModuleType) -> None:
    for name, (ours, claims) in ADAPTER_API.items():
        replace(module.PeftAdapterMixin, name, _dispatch(ours, claims))

    def wrap_maybe_load(original: Any) -> Any:
        def maybe_load_adapters(pretrained_model_name_or_path: Any, download_kwargs: Any, **adapter_kwargs: Any) -> Any:
            if peft_available() or pretrained_model_name_or_path is None:
                return original(pretrained_model_name_or_path, download_kwargs, **adapter_kwargs)
            adapter_path = adapter_kwargs.pop("_adapter_model_path", None)
            found = None if adapter_path is not None else local_adapter(pretrained_model_name_or_path)
            if found is not None:
                adapter_path, pretrained_model_name_or_path = found
            return adapter_path, pretrained_model_name_or_path, adapter_kwargs
        return maybe_load_adapters

    replace(module, "maybe_load_adapters", wrap_maybe_load)


def register_auto_loading(module: ModuleType) -> None:
    def wrap(original: Any) -> Any:
        def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
            found = None if peft_available() or kwargs.get("config") is not None \
                else local_adapter(pretrained_model_name_or_path)
            if found is not None and found[0] != found[1]:
                adapter_kwargs = {**(kwargs.pop("adapter_kwargs", None) or {}), "_adapter_model_path": found[0]}
                return original(cls, found[1], *model_args, adapter_kwargs=adapter_kwargs, **kwargs)
            return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        return from_pretrained

    # Each AutoModel* class holds its own copy of the method (transformers' ``auto_class_update``): classes made
    # from now on copy the registered one; those made already are registered one by one.
    pending = [module._BaseAutoModelClass]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "from_pretrained" in vars(cls):
            replace(cls, "from_pretrained", wrap)
