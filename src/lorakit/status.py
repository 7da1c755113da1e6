"""Adapter state, per layer and for the whole model: PEFT's ``get_layer_status`` / ``get_model_status``.

Each adapter layer (a ``LoraLayer`` or a ``ModulesToSaveWrapper``) reports one ``TunerLayerStatus``; the model's
``TunerModelStatus`` folds them, a field being ``"irregular"`` where the layers disagree:

    enabled           = the one value all layers share, else "irregular"
    active_adapters   = the one list all layers share, else "irregular" ([] without layers)
    merged_adapters   = sorted(⋃ merged), unless a layer holds one of those adapters unmerged: "irregular"
    requires_grad[a]  = True / False when every layer says so for adapter a, else "irregular"
    devices[a]        = sorted(⋃ device types of a's tensors)

Field names, values and their order are PEFT 0.21.2's (code and tests written for PEFT compare them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from torch import Tensor, nn

from .layer import LoraLayer
from .saved_modules import ModulesToSaveWrapper

Irregular = Literal["irregular"]
IRREGULAR: Irregular = "irregular"
T = TypeVar("T")
ADAPTER_MODULES = (LoraLayer, ModulesToSaveWrapper)


@dataclass
class TunerLayerStatus:
    """The adapter state of one adapter layer (PEFT's dataclass, same fields in the same order)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The adapter state of a whole model (PEFT's dataclass, same fields in the same order)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _shared(values: Iterable[T], default: T | Irregular = IRREGULAR) -> T | Irregular:
    """The one value all of ``values`` share, else "irregular"; ``default`` when there are none."""
    distinct = set(values)
    if not distinct:
        return default
    return distinct.pop() if len(distinct) == 1 else IRREGULAR


def _adapter_tensors(module: nn.Module) -> dict[str, list[Tensor]]:
    """{adapter name: its tensors in this layer}, walked through PEFT's ``adapter_layer_names`` containers.

    Every adapter a container names gets an entry, also one without tensors (e.g. an Identity dropout).
    """
    tensors: dict[str, list[Tensor]] = defaultdict(list)
    for container_name in getattr(module, "adapter_layer_names"):
        container = getattr(module, container_name)
        if isinstance(container, nn.ModuleDict):
            for name, child in container.items():
                tensors[name].extend(child.parameters())
        elif isinstance(container, nn.ParameterDict):
            for name, param in container.items():
                tensors[name].append(param)
    return tensors


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    tensors = _adapter_tensors(module)
    return TunerLayerStatus(
        name=name,
        module_type=repr(module).partition("(")[0],  # "lora.Linear", "ModulesToSaveWrapper", as PEFT prints them
        enabled=not module.disable_adapters,
        active_adapters=list(getattr(module, "active_adapters")),
        merged_adapters=list(getattr(module, "merged_adapters", [])),  # a saved-module copy is never merged
        requires_grad={adapter: _shared((p.requires_grad for p in params), default=True)
                       for adapter, params in tensors.items()},
        available_adapters=sorted(tensors),
        devices={adapter: sorted({p.device.type for p in params}) for adapter, params in tensors.items()},
        quantization_backend=_backend_name(module),
    )


def _backend_name(module: nn.Module) -> str | None:
    """The ``backend_name`` of a ``quantization_backend`` object set on the layer (PEFT's attribute; peft 0.21.2's
    LoRA layers carry none, bnb ones included, so this is None unless code written for PEFT attached one)."""
    backend = getattr(module, "quantization_backend", None)
    return None if backend is None else backend.backend_name


# The PeftModel classes (model.py registers them; it imports this module, so this one cannot import it).
PEFT_MODEL_CLASSES: list[type[nn.Module]] = []


def _is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, tuple(PEFT_MODEL_CLASSES))


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared tensor once; a 4-bit weight counts numel·2·bytes."""
    trainable = total = 0
    for _, param in module.named_parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
            count *= 2 * param.element_size()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _tuner_of(model: nn.Module) -> nn.Module:
    return model.base_model if _is_peft_model(model) else model  # type: ignore[return-value]


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One ``TunerLayerStatus`` per adapter layer of ``model`` (a PeftModel, its tuner, or a model with adapters
    injected), in module order; names are relative to the tuner (``model.lin0`` for a PeftModel, as in PEFT).

    Raises:
        ValueError: ``model`` holds no adapter layer (PEFT's sentence first).
    """
    found = [_layer_status(name, module) for name, module in _tuner_of(model).named_modules()
             if isinstance(module, ADAPTER_MODULES)]
    if not found:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model. (lorakit: no LoraLayer or ModulesToSaveWrapper in "
                         f"{type(model).__name__}; call get_peft_model or inject_adapter_in_model first.)")
    return found


def _merged(layers: list[TunerLayerStatus]) -> Union[list[str], Irregular]:
    """The adapters merged somewhere, or "irregular" when a layer holds one of them unmerged."""
    merged = set().union(*(status.merged_adapters for status in layers))
    for status in layers:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged:
            return IRREGULAR
    return sorted(merged)


def _model_identity(model: nn.Module) -> tuple[str, str, dict[str, str], tuple[int, int]]:
    """(base_model_type, adapter_model_type, peft_types, (trainable, total)) as PEFT reports them."""
    if _is_peft_model(model):
        peft_model: Any = model  # a PeftModel (model.py's class, registered in PEFT_MODEL_CLASSES)
        tuner = peft_model.base_model
        return (type(peft_model.get_base_model()).__name__, type(tuner).__name__,
                {name: "LORA" for name in tuner.peft_config}, peft_model.get_nb_trainable_parameters())
    try:
        from transformers import PreTrainedModel
    except ImportError:  # without transformers no model can be one
        PreTrainedModel = ()  # type: ignore[assignment,misc]
    base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
    return base_type, "None", {}, count_parameters(model)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of ``model`` folded over its layers (see the module docstring).

    ``base_model_type`` is the user's model class for a PeftModel or a transformers model, else "other";
    ``adapter_model_type`` is "LoraModel" for a PeftModel, else "None" (PEFT's string).

    Raises:
        ValueError: ``model`` holds no adapter layer.
    """
    layers = get_layer_status(model)
    base_type, adapter_type, peft_types, (trainable, total) = _model_identity(model)
    active = _shared(tuple(status.active_adapters) for status in layers)
    requires_grad: dict[str, list[Union[bool, Irregular]]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for status in layers:
        for adapter, value in status.requires_grad.items():
            requires_grad[adapter].append(value)
        for adapter, types in status.devices.items():
            devices[adapter].update(types)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_shared(status.enabled for status in layers),
        active_adapters=IRREGULAR if active == IRREGULAR else list(active),
        merged_adapters=_merged(layers),
        requires_grad={adapter: _shared(values) for adapter, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(status.available_adapters for status in layers))),
        devices={adapter: sorted(types) for adapter, types in devices.items()},
        quantization_backend=_shared(status.quantization_backend for status in layers),
    )
