"""get_layer_status / get_model_status (issue 15, item 1), side by side with real peft 0.21.2.

Each row of STORIES puts a tiny model in some adapter state through the public API of ``lib`` (``peft`` or
``lorakit``: the same names) and returns the object whose status is read; the test compares every field of
every layer's and the model's status dataclass (as dicts), and the field names and order of the dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit.status import TunerLayerStatus, TunerModelStatus


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(self.emb(ids))))))


def net() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


def two_adapters(lib: ModuleType) -> nn.Module:
    model = lib.get_peft_model(net(), lib.LoraConfig(target_modules=["emb", "lin0", "lin1"], r=2,
                                                     modules_to_save=["head"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"], r=3))
    return model


def merged(lib: ModuleType) -> nn.Module:
    model = two_adapters(lib)
    model.merge_adapter()  # head keeps its unmerged copy: "irregular"
    return model


def merged_plain(lib: ModuleType) -> nn.Module:
    model = lib.get_peft_model(net(), lib.LoraConfig(target_modules=["lin0", "lin1"]))
    model.merge_adapter()
    return model


def other_active(lib: ModuleType) -> nn.Module:
    model = two_adapters(lib)
    model.set_adapter("other")
    return model


def both_active(lib: ModuleType) -> nn.Module:
    model = lib.get_peft_model(net(), lib.LoraConfig(target_modules=["lin0", "lin1"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"], r=3))
    model.base_model.set_adapter(["default", "other"])
    return model


def disabled_one_layer(lib: ModuleType) -> nn.Module:
    model = two_adapters(lib)
    layer = model.base_model.model.lin0
    layer.enable_adapters(False)
    # peft's layer.enable_adapters(False) also freezes the layer's factors, lorakit's leaves them: not the subject here
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    return model


def grad_irregular(lib: ModuleType) -> nn.Module:
    model = two_adapters(lib)
    model.base_model.model.lin0.lora_A["default"].weight.requires_grad_(False)  # one tensor of one layer
    model.base_model.model.lin1.lora_A["default"].requires_grad_(False)
    model.base_model.model.lin1.lora_B["default"].requires_grad_(False)
    return model


def inference(lib: ModuleType) -> nn.Module:
    model = two_adapters(lib)
    model.base_model.set_adapter("default", inference_mode=True)
    return model


def tuner_only(lib: ModuleType) -> nn.Module:
    return two_adapters(lib).base_model  # not a PeftModel: base_model_type "other", adapter_model_type "None"


def injected(lib: ModuleType) -> nn.Module:
    return lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"]), net())


def deleted(lib: ModuleType) -> nn.Module:
    model = two_adapters(lib)
    model.delete_adapter("other")
    return model


STORIES: dict[str, Callable[[ModuleType], nn.Module]] = {f.__name__: f for f in (
    two_adapters, merged, merged_plain, other_active, both_active, disabled_one_layer, grad_irregular, inference,
    tuner_only, injected, deleted)}


def statuses(lib: ModuleType, story: Callable[[ModuleType], nn.Module]) -> tuple[list[dict], dict]:
    model = story(lib)
    layers = [dataclasses.asdict(status) for status in lib.get_layer_status(model)]
    return layers, dataclasses.asdict(lib.get_model_status(model))


@pytest.mark.parametrize("story", STORIES.values(), ids=list(STORIES))
def test_status_as_peft(story: Callable[[ModuleType], nn.Module]) -> None:
    ours, theirs = statuses(lorakit, story), statuses(peft, story)
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]


@pytest.mark.parametrize("story", [two_adapters, merged], ids=["two_adapters", "merged"])
def test_methods_equal_functions(story: Callable[[ModuleType], nn.Module]) -> None:
    model = story(lorakit)
    assert model.get_layer_status() == lorakit.get_layer_status(model)
    assert model.get_model_status() == lorakit.get_model_status(model)


@pytest.mark.parametrize("ours, theirs", [(TunerLayerStatus, peft.peft_model.TunerLayerStatus),
                                          (TunerModelStatus, peft.peft_model.TunerModelStatus)])
def test_dataclass_fields_as_peft(ours: type, theirs: type) -> None:
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]


@pytest.mark.parametrize("function", ["get_layer_status", "get_model_status"])
def test_plain_model_refused_as_peft(function: str) -> None:
    with pytest.raises(ValueError) as theirs:
        getattr(peft, function)(net())
    with pytest.raises(ValueError) as ours:
        getattr(lorakit, function)(net())
    assert str(ours.value).startswith(str(theirs.value))


def test_status_follows_changes() -> None:
    """The status is read live: disabling, merging and trainability show in the next call."""
    model = two_adapters(lorakit)
    assert model.get_model_status().enabled is True
    with model.disable_adapter():
        assert model.get_model_status().enabled is False
    model.base_model.set_requires_grad("other", True)
    assert model.get_model_status().requires_grad == {"default": True, "other": True}
    model.merge_adapter()
    layers = {status.name: status for status in model.get_layer_status()}
    assert layers["model.lin0"].merged_adapters == ["default"] and layers["model.head"].merged_adapters == []
    model.unmerge_adapter()
    assert model.get_model_status().merged_adapters == []


class Bnb8bitBackend:  # what code written for PEFT attaches: an object with a backend_name
    backend_name = "bnb 8bit"


def test_quantization_backend_attribute_read_as_peft() -> None:
    reports = {}
    for lib in (peft, lorakit):
        model = lib.get_peft_model(net(), lib.LoraConfig(target_modules=["lin0", "lin1"]))
        model.base_model.model.lin0.quantization_backend = Bnb8bitBackend()
        reports[lib] = ([s.quantization_backend for s in model.get_layer_status()],
                        model.get_model_status().quantization_backend)
    assert reports[lorakit] == reports[peft] == (["bnb 8bit", None], "irregular")


def test_active_adapter_set_as_a_string() -> None:
    """PEFT's layers accept a str in _active_adapter (its tests set one to make an irregular model)."""
    model = two_adapters(lorakit)
    model.base_model.model.lin0._active_adapter = "other"
    assert model.base_model.model.lin0.active_adapters == ["other"]
    assert model.get_model_status().active_adapters == "irregular"
