"""Adapter folders on disk: PEFT-format save, and a load that validates everything before it touches the model.

A folder holds ``adapter_config.json`` (``json.dumps(indent=2, sort_keys=True)``) and
``adapter_model.safetensors`` (metadata ``{"format": "pt"}``); the adapter named "default" lives in the
folder itself, any other in ``<folder>/<name>/``. Writes are atomic (atomic.py); reads never unpickle
(``.bin`` only through ``torch.load(weights_only=True)``); key mapping is codec.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .version import __version__ as _lorakit_version
from .atomic import replace_folder
from .codec import PREFIX, Layout, decode, embedding_paths, encode, layout_of, planned_layout, required_keys
from .config import PEFT_VERSION_WRITTEN, LoraConfig
from .errors import AdapterLoadError as AdapterLoadError, explain, warn  # re-exported: lorakit.io.AdapterLoadError
from .functional import IncompatibleKeys
from .hub import ADAPTER_FILES
from .layer import LoraLayer
from .load_options import LoadOptions, remap_keys
from .plan import Plan
from .save_checks import embedding_layers_to_save, verify_saved

if TYPE_CHECKING:
    from .model import PeftModel

CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME = ADAPTER_FILES  # PEFT's names: adapter_config.json, adapter_model.*
# PEP 440 local label: PEFT reads it as its own version, and the file still says who wrote it.
PEFT_VERSION_TAG = f"{PEFT_VERSION_WRITTEN}+lorakit.{_lorakit_version}"


# ---- config -------------------------------------------------------------------------------------------------
def config_json(config: LoraConfig, model: nn.Module) -> str:
    """adapter_config.json as PEFT writes it: every field, inference_mode true, auto_mapping without a task."""
    data = config.to_dict()
    data["inference_mode"] = True
    data["peft_version"] = PEFT_VERSION_TAG
    if data.get("task_type") is None:
        data["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return json.dumps(data, indent=2, sort_keys=True)


def read_config(folder: str | os.PathLike[str]) -> LoraConfig:
    """Read and validate ``<folder>/adapter_config.json``.

    Raises:
        AdapterLoadError: missing, unreadable, not JSON, not LoRA, or with an invalid field.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(explain(f"no {CONFIG_NAME}", where=str(folder), fix="point at a folder written by "
                                       "save_pretrained (an adapter not named 'default' sits in <folder>/<name>)"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return LoraConfig.from_dict(data, source=str(path))
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise AdapterLoadError(f"cannot read adapter config {path}: {error}") from None


# ---- weights ------------------------------------------------------------------------------------------------
def read_weights(folder: str | os.PathLike[str], device: str | torch.device | None = None,
                 use_safetensors: bool | None = None) -> dict[str, Tensor]:
    """The adapter tensors of ``folder`` on ``device`` (default CPU): safetensors if present, else ``.bin``
    without unpickling code (``use_safetensors``: True or False picks the file; None: safetensors first).

    Raises:
        AdapterLoadError: no weights file, a truncated or corrupted file, or non-tensor content.
    """
    folder = Path(folder)
    device = "cpu" if device is None else str(device)
    if (folder / SAFETENSORS_NAME).is_file() and use_safetensors is not False:
        path = folder / SAFETENSORS_NAME
        try:
            tensors = load_file(path, device=device)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise AdapterLoadError(f"{path} is truncated or corrupted ({error}); re-save or re-download it") from None
    elif (folder / BIN_NAME).is_file() and use_safetensors is not True:
        path = folder / BIN_NAME
        try:
            tensors = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            raise AdapterLoadError(f"{path} is not a plain tensor file ({type(error).__name__}: {error}); lorakit "
                                   "loads .bin files with weights_only=True and never runs pickled code") from None
    else:
        raise AdapterLoadError(explain("no adapter weights", where=str(folder),
                                       expected=f"{SAFETENSORS_NAME} or {BIN_NAME}"))
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in tensors.items()):
        raise AdapterLoadError(f"{path} does not hold a flat dict of named tensors")
    return tensors


def adapter_model_keys(peft_model: PeftModel, adapter_name: str = "default",
                       save_embedding_layers: bool | str = "auto",
                       state: dict[str, Tensor] | None = None) -> dict[str, str]:
    """{model key: file key} of every tensor PEFT writes for ``adapter_name`` (``state``: see layout_of)."""
    model = peft_model.base_model.model
    config = peft_model.peft_config[adapter_name]
    if save_embedding_layers == "auto" and config.trainable_token_indices is not None:
        save_embedding_layers = False  # PEFT: trainable tokens exist to save only their rows
    return encode(layout_of(model, state), adapter_name, config.bias,
                  embedding_paths(model, config.target_modules, save_embedding_layers))


def adapter_state_dict(peft_model: PeftModel, adapter_name: str = "default",
                       save_embedding_layers: bool | str = "auto",
                       state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The tensors PEFT writes for ``adapter_name``, under their file keys (PEFT's get_peft_model_state_dict).

    ``state`` (model keys, e.g. gathered from a sharded model by distributed.py) replaces the model's own.
    """
    if state is None:  # one walk of the model serves both the key mapping and the tensors
        own = peft_model.base_model.model.state_dict(keep_vars=True)
        mapping = adapter_model_keys(peft_model, adapter_name, save_embedding_layers, own)
        state = {PREFIX + k: v for k, v in own.items()}
    else:
        mapping = adapter_model_keys(peft_model, adapter_name, save_embedding_layers)
    seen, out = set(), {}
    for model_key, file_key in mapping.items():
        tensor = state[model_key].detach()
        pointer = tensor.untyped_storage().data_ptr()
        # safetensors refuses shared or strided storage; copy only when needed (tied weights, views)
        out[file_key] = tensor.contiguous().clone() if pointer in seen or not tensor.is_contiguous() else tensor
        seen.add(pointer)
    return out


# (adapter name, file-keyed tensors, config) -> (tensors, config) to write instead, e.g. convert.py's conversion
Transform = Callable[[str, dict[str, Tensor], LoraConfig], tuple[dict[str, Tensor], LoraConfig]]


def save_adapters(peft_model: PeftModel, save_directory: str | os.PathLike[str], selected_adapters: list[str] | None,
                  safe_serialization: bool, save_embedding_layers: bool | str,
                  transform: Transform | None = None,
                  gathered: dict[str, dict[str, Tensor]] | None = None) -> list[str]:
    """Write the selected adapters (default: all) into one folder, atomically (PEFT's save_pretrained).

    Returns the names written. ``transform`` rewrites each adapter's tensors and config before writing;
    ``gathered`` gives each adapter's file-keyed tensors ready-made (a sharded model's, distributed.py).
    """
    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise ValueError(explain(f"cannot save unknown adapter(s) {unknown}",
                                 expected=f"names among {list(peft_model.peft_config)}"))
    model = peft_model.base_model.model
    save_embedding_layers = embedding_layers_to_save(peft_model, save_embedding_layers)
    files = {}
    for name in names:
        tensors = (gathered[name] if gathered is not None
                   else adapter_state_dict(peft_model, name, save_embedding_layers))
        tensors = {k: v.to("cpu") for k, v in tensors.items()}
        config = peft_model.peft_config[name]
        if transform is not None:
            tensors, config = transform(name, tensors, config)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
        files[name] = (config_json(config, model), tensors)

    def write(folder: Path) -> None:
        for name, (config_text, tensors) in files.items():
            target = folder if name == "default" else folder / name
            target.mkdir(parents=True, exist_ok=True)
            (target / CONFIG_NAME).write_text(config_text, encoding="utf-8")
            if safe_serialization:
                save_file(tensors, str(target / SAFETENSORS_NAME), metadata={"format": "pt"})
            else:
                torch.save(tensors, target / BIN_NAME)
            verify_saved(target / (SAFETENSORS_NAME if safe_serialization else BIN_NAME), tensors)

    replace_folder(save_directory, write, owned=(CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME))
    return names


# ---- load ---------------------------------------------------------------------------------------------------
def _non_finite(tensors: dict[str, Tensor]) -> list[str]:
    """Sorted keys of the floating-point tensors holding NaN or inf.

    A float64 sum of a float32 / half tensor cannot overflow (|x| < 3.5e38, far fewer than 1e270 elements), so it
    is finite exactly when every element is: one reduction per tensor, no boolean copy of each tensor.
    """
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    sums = torch.stack([t.sum(dtype=torch.float64) for _, t in floats])
    return sorted(k for (k, _), finite in zip(floats, torch.isfinite(sums).tolist(), strict=True) if not finite)


def check_tensors(tensors: dict[str, Tensor], layout: Layout, adapter_name: str, source: str,
                  strict: bool) -> tuple[dict[str, str], list[str]]:
    """({file key: model key}, [file keys with no place in the model]); ``strict``: those keys and missing adapter
    tensors are problems too. Shapes and dtypes are always checked; one error lists every problem.

    Raises:
        AdapterLoadError: shape mismatches or non-float tensors (and, when ``strict``, unexpected or missing keys).
    """
    mapping, unexpected = decode(list(tensors), layout, adapter_name)
    # a key for a LoRA layer of another adapter that this adapter's config does not target (found by fuzzing)
    unexpected += [key for key, model_key in mapping.items() if model_key not in layout.shapes]
    mapping = {key: model_key for key, model_key in mapping.items() if model_key in layout.shapes}
    problems = []
    if strict:
        problems += [f"unexpected key {key} (no such module or tensor in this model)" for key in sorted(unexpected)]
        missing = required_keys(layout, adapter_name) - set(mapping.values())
        problems += [f"missing tensor for {key}" for key in sorted(missing)]
    for file_key, model_key in sorted(mapping.items()):
        got, want = tuple(tensors[file_key].shape), layout.shapes[model_key]
        if got != want:
            problems.append(f"{file_key}: the adapter holds {_shape(got)}, this model needs {_shape(want)} "
                            f"(trained for a different base model, or a different r)")
        if not tensors[file_key].is_floating_point():
            problems.append(f"{file_key}: dtype {tensors[file_key].dtype} is not a floating-point type")
    non_finite = _non_finite(tensors)
    if non_finite and not problems:
        warn(f"adapter {source!r} holds NaN or inf values in {len(non_finite)} tensor(s), e.g. {non_finite[:3]}; "
             "the model's outputs will be NaN/inf where they are used (PEFT loads such files silently too)")
    if problems:
        shown = problems[:25] + ([f"... and {len(problems) - 25} more"] if len(problems) > 25 else [])
        raise AdapterLoadError(f"cannot load adapter {source!r} as {adapter_name!r}; nothing was changed. "
                               f"{len(problems)} problem(s):\n  " + "\n  ".join(shown))
    return mapping, unexpected


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def _short_name(name: object) -> str:
    return str(name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


def base_model_mismatch(model: nn.Module, config: LoraConfig) -> str | None:
    """A sentence when the adapter names another base model than ``model`` (both known), else None.

    Names are compared by their last path component, so a local copy of a hub model matches its hub id.
    """
    mine = getattr(getattr(model, "config", None), "_name_or_path", None)
    theirs = config.base_model_name_or_path
    if not mine or not theirs:
        return None
    if _short_name(mine) == _short_name(theirs):
        return None
    return f"the adapter was trained on base model {theirs!r}, this model is {mine!r}"


def read_adapter(folder: str | os.PathLike[str], is_trainable: bool, config: LoraConfig | None = None,
                 device: str | torch.device | None = None, key_mapping: dict[str, str] | None = None,
                 use_safetensors: bool | None = None) -> tuple[LoraConfig, dict[str, Tensor]]:
    """(config, tensors under their file keys) of an adapter folder; nothing is checked against a model yet.

    ``config``: the config to inject instead of the folder's (``check_against_plan`` checks the tensors against
    the plan made from it). The returned config has ``inference_mode = not is_trainable``.
    """
    config = read_config(folder) if config is None else config
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    return config, remap_keys(read_weights(folder, device, use_safetensors), key_mapping)


def check_against_plan(model: nn.Module, plan: Plan, tensors: dict[str, Tensor], folder: str | os.PathLike[str]
                       ) -> dict[str, Tensor]:
    """The file's tensors keyed by model key, once checked against the layout ``plan`` will give ``model``.

    Raises:
        AdapterLoadError: every missing, unexpected or misshapen tensor, in one message (nothing is changed).
    """
    other_base = base_model_mismatch(model, plan.config)
    layout = planned_layout(model, plan.targets, plan.adapter_name, dict(plan.tokens))
    try:
        mapping = check_tensors(tensors, layout, plan.adapter_name, str(folder), strict=True)[0]
    except AdapterLoadError as error:
        raise AdapterLoadError(f"{error}\n  {other_base}" if other_base else str(error)) from None
    if other_base:
        warn(f"{other_base}; every tensor shape fits, so it was loaded. Check that this is intended")
    return {mapping[k][len(PREFIX):]: v for k, v in tensors.items()}


def load_tensors(model: nn.Module, tensors: dict[str, Tensor], adopt: bool = False) -> None:
    """Copy validated tensors into ``model`` (cast to each parameter's dtype and device).

    Each key goes straight to its parameter or buffer: ``load_state_dict`` would visit every module of
    the model for a few adapter tensors. ``adopt``: the tensors were just read from a file and belong to
    no one else, so a parameter of the same dtype, device and shape takes the tensor itself (no copy).
    """
    with torch.no_grad():
        for key, value in tensors.items():
            module_path, _, name = key.rpartition(".")
            module = model.get_submodule(module_path)
            target = getattr(module, name)  # check_tensors() guarantees it exists
            if target.is_meta:  # created empty (low_cpu_mem_usage): the loaded tensor becomes the parameter
                value = value.to(dtype=target.dtype, device=_home_device(model, module_path, value.device))
                if name in module._buffers:  # a variant's buffer (VeLoRA's v, MonteCLoRA's sampler) stays a buffer
                    module._buffers[name] = value
                else:
                    setattr(module, name, nn.Parameter(value, requires_grad=target.requires_grad))
            elif adopt and (value.dtype, value.device, value.shape) == (target.dtype, target.device, target.shape) \
                    and value.is_contiguous():
                target.data = value
            else:
                target.copy_(value)


def _home_device(model: nn.Module, module_path: str, default: torch.device) -> torch.device:
    """The device of the base layer of the LoRA layer that holds ``module_path``."""
    parts = module_path.split(".")
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end]))
        if isinstance(module, LoraLayer):
            reference = next((p for p in module.base_layer.parameters() if not p.is_meta), None)
            return reference.device if reference is not None else default
    return default


# ---- PEFT's functional API ------------------------------------------------------------------------------------
def get_peft_model_state_dict(model: PeftModel, state_dict: dict[str, Tensor] | None = None,
                              adapter_name: str = "default",
                              unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, Tensor]:
    """PEFT's ``get_peft_model_state_dict``: the adapter's tensors under their file keys.

    ``state_dict``: the PeftModel's full state dict to take the tensors from (default: the live model's).
    ``unwrap_compiled``: a ``torch.compile``d PeftModel is read through its ``_orig_mod``.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    return adapter_state_dict(model, adapter_name, save_embedding_layers, state=state_dict)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> IncompatibleKeys:
    """PEFT's ``set_peft_model_state_dict``: load file-keyed tensors into ``adapter_name``, as PEFT does.

    Every key that has a place in the model is loaded (base tensors too, as PEFT's ``load_state_dict`` would);
    the others are left out. Returns torch's ``(missing_keys, unexpected_keys)`` as PEFT 0.21.2 does:
    ``missing_keys``, the PeftModel's state-dict keys not loaded (base weights included), in state-dict order;
    ``unexpected_keys``, the given keys that have no place, as given, in the order torch's module walk meets them.
    Factors created empty on the meta device (``low_cpu_mem_usage``) are replaced by the loaded tensors, whatever
    this flag says. ``load_adapter_weights`` is the strict twin lorakit's own loaders use.

    Raises:
        AdapterLoadError: shape mismatches or non-float tensors; nothing is changed then.
        ValueError: ``ignore_mismatched_sizes=True`` (lorakit never loads a tensor of another shape).
    """
    return _set_state_dict(model, peft_model_state_dict, adapter_name, ignore_mismatched_sizes, strict=False)


def load_adapter_weights(model: PeftModel, peft_model_state_dict: dict[str, Tensor],
                         adapter_name: str = "default") -> IncompatibleKeys:
    """``set_peft_model_state_dict`` that refuses unknown keys and missing adapter tensors too (resuming a
    checkpoint, Trainer's resume): one error lists every problem, and nothing is changed then.

    Raises:
        AdapterLoadError: unexpected keys, missing adapter tensors, shape mismatches or non-float tensors.
    """
    return _set_state_dict(model, peft_model_state_dict, adapter_name, False, strict=True)


def _set_state_dict(model: PeftModel, tensors: dict[str, Tensor], adapter_name: str,
                    ignore_mismatched_sizes: bool, strict: bool) -> IncompatibleKeys:
    if ignore_mismatched_sizes:
        raise ValueError("set_peft_model_state_dict(ignore_mismatched_sizes=True) is not supported: lorakit refuses "
                         "tensors that do not fit (the error lists each one); resize the model to match")
    user_model = model.base_model.model
    layout = layout_of(user_model)
    mapping, unexpected = check_tensors(tensors, layout, adapter_name, "state dict", strict=strict)
    loaded = {mapping[k][len(PREFIX):]: v for k, v in tensors.items() if k in mapping}
    load_tensors(user_model, loaded)
    missing = [PREFIX + key for key in user_model.state_dict(keep_vars=True) if key not in loaded]
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=_walk_order(user_model, unexpected, tensors))


def _walk_order(model: nn.Module, keys: list[str], tensors: dict[str, Tensor]) -> list[str]:
    """``keys`` in the order torch's ``load_state_dict`` reports unexpected keys: by the module (in the PeftModel's
    ``named_modules`` order) where the key leaves the model, then by their order in ``tensors``."""
    roots = ["", "base_model", PREFIX[:-1]]
    walk = roots + [PREFIX + name for name, _ in model.named_modules() if name]
    index = {path: i for i, path in enumerate(walk)}
    position = {key: i for i, key in enumerate(tensors)}

    def leaves_at(key: str) -> int:
        parts, deepest = key.split("."), 0
        for end in range(1, len(parts)):
            path = ".".join(parts[:end])
            if path in index:
                deepest = index[path]
        return deepest

    return sorted(keys, key=lambda key: (leaves_at(key), position[key]))


def load_peft_weights(model_id: str | os.PathLike[str], device: str | None = None,
                      key_mapping: dict[str, str] | None = None, **hf_hub_download_kwargs: object) -> dict[str, Tensor]:
    """PEFT's ``load_peft_weights``: the adapter file of ``model_id`` (a folder, or a Hub repo) as a dict of
    tensors under its file keys, on ``device`` (default: CPU, PEFT's ``infer_device()`` on a machine without an
    accelerator). ``adapter_model.safetensors`` is read first, else ``adapter_model.bin`` without unpickling
    code. ``key_mapping``: PEFT's regex renames (load_options.remap_keys). Hub keywords (``subfolder``,
    ``revision``, ``token``, ...) as ``from_pretrained`` takes them.

    Raises:
        lorakit.io.AdapterLoadError: no weights file, or a damaged one. TypeError: an unknown keyword.
    """
    options = LoadOptions.parse("load_peft_weights", False, key_mapping, dict(hf_hub_download_kwargs))
    return remap_keys(read_weights(options.folder(model_id), device), key_mapping)
