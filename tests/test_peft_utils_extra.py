"""set_peft_model_state_dict's result and load_peft_weights (issue 15, item 3), side by side with real peft 0.21.2.

Each row of LOADS is a state dict built from a saved adapter (whole, partial, with foreign keys, for a second
adapter, with base tensors); both libraries load it into the same model and the test compares the returned
missing / unexpected keys (as lists: their order too) and every tensor of the model afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import peft
import peft.utils
import pytest
import torch
from torch import nn

import lorakit
from lorakit.io import AdapterLoadError, load_adapter_weights


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 5)
        self.lin1 = nn.Linear(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.lin0(x)))


def net() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


def target(lib: ModuleType) -> nn.Module:
    model = lib.get_peft_model(net(), lib.LoraConfig(target_modules=["lin0", "lin1"], r=2, modules_to_save=["head"]))
    model.add_adapter("b", lib.LoraConfig(target_modules=["lin0"], r=2))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same values in both libraries, whatever order their inits draw in
        for _, param in sorted(model.state_dict(keep_vars=True).items()):
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def source_state() -> dict[str, torch.Tensor]:
    """A saved adapter's file keys with distinct random values (peft's writer: the reference format)."""
    model = peft.get_peft_model(net(), peft.LoraConfig(target_modules=["lin0", "lin1"], r=2, modules_to_save=["head"]))
    generator = torch.Generator().manual_seed(3)
    state = peft.get_peft_model_state_dict(model)
    return {key: torch.randn(value.shape, generator=generator) for key, value in state.items()}


def whole(state: dict) -> tuple[dict, str]:
    return state, "default"


def partial(state: dict) -> tuple[dict, str]:
    return {k: v for k, v in state.items() if "lin0.lora_A" not in k}, "default"


def foreign(state: dict) -> tuple[dict, str]:
    return {"random": torch.zeros(1), **state, "base_model.model.lin9.lora_A.weight": torch.zeros(2, 4)}, "default"


def second_adapter(state: dict) -> tuple[dict, str]:
    # lin1 is not targeted by "b": its keys are unexpected there
    return {k: v for k, v in state.items() if "lora" in k}, "b"


def with_base_tensor(state: dict) -> tuple[dict, str]:
    return {**state, "base_model.model.lin0.base_layer.weight": torch.full((5, 4), 0.5)}, "default"


LOADS: dict[str, Callable[[dict], tuple[dict, str]]] = {f.__name__: f for f in (
    whole, partial, foreign, second_adapter, with_base_tensor)}


def load(lib: ModuleType, make: Callable[[dict], tuple[dict, str]]) -> tuple[list, list, dict]:
    model = target(lib)
    state, adapter_name = make(source_state())
    result = lib.set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    return list(result.missing_keys), list(result.unexpected_keys), model.state_dict()


@pytest.mark.parametrize("make", LOADS.values(), ids=list(LOADS))
def test_set_peft_model_state_dict_result_as_peft(make: Callable[[dict], tuple[dict, str]]) -> None:
    missing, unexpected, tensors = load(lorakit, make)
    peft_missing, peft_unexpected, peft_tensors = load(peft, make)
    assert missing == peft_missing
    assert unexpected == peft_unexpected
    assert list(tensors) == list(peft_tensors)
    for key, value in peft_tensors.items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0, msg=key)


def test_shape_mismatch_refused_and_nothing_changed() -> None:
    model = target(lorakit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = source_state()
    state["base_model.model.lin0.lora_A.weight"] = torch.zeros(3, 4)
    with pytest.raises(AdapterLoadError, match="lin0.lora_A.weight: the adapter holds 3x4"):
        lorakit.set_peft_model_state_dict(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make", [partial, foreign], ids=["partial", "foreign"])
def test_strict_twin_refuses_what_peft_reports(make: Callable[[dict], tuple[dict, str]]) -> None:
    """lorakit's own loaders (checkpoint resume, Trainer) keep refusing an adapter that does not fit."""
    state, adapter_name = make(source_state())
    with pytest.raises(AdapterLoadError, match="missing tensor|unexpected key"):
        load_adapter_weights(target(lorakit), state, adapter_name)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("key_mapping", [None, {"lin0": "lin7"}], ids=["plain", "key_mapping"])
def test_load_peft_weights_as_peft(tmp_path: Path, safe_serialization: bool, key_mapping: dict | None) -> None:
    saved = target(peft)
    lorakit.set_peft_model_state_dict(target(lorakit), source_state())  # (the files below are peft's)
    peft.set_peft_model_state_dict(saved, source_state())
    saved.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours = lorakit.load_peft_weights(str(tmp_path), key_mapping=key_mapping)
    theirs = peft.utils.load_peft_weights(str(tmp_path), key_mapping=key_mapping)
    assert type(ours) is dict and list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].device == value.device
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


def test_load_peft_weights_subfolder_and_device(tmp_path: Path) -> None:
    model = target(lorakit)
    model.save_pretrained(tmp_path)  # "b" lands in tmp_path / "b"
    tensors = lorakit.load_peft_weights(str(tmp_path), device="cpu", subfolder="b")
    assert sorted(tensors) == ["base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight"]
    torch.testing.assert_close(tensors["base_model.model.lin0.lora_A.weight"],
                               model.base_model.model.lin0.lora_A["b"].weight, rtol=0, atol=0)


def test_load_peft_weights_refuses_a_pickled_object(tmp_path: Path) -> None:
    torch.save({"base_model.model.lin0.lora_A.weight": torch.zeros(2, 4), "code": Path("x")},
               tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="never runs pickled code"):
        lorakit.load_peft_weights(str(tmp_path))


# ---- runtime_config (item 6) ------------------------------------------------------------------------------------
def test_runtime_config_fields_as_peft() -> None:
    import dataclasses

    assert [(f.name, f.default) for f in dataclasses.fields(lorakit.LoraRuntimeConfig)] == \
        [(f.name, f.default) for f in dataclasses.fields(peft.LoraRuntimeConfig)]
    config = lorakit.LoraConfig(target_modules=["lin0"], runtime_config={"ephemeral_gpu_offload": True})
    assert config.runtime_config == lorakit.LoraRuntimeConfig(ephemeral_gpu_offload=True)
    assert "runtime_config" not in config.to_dict()  # never saved, as in peft


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_ephemeral_gpu_offload_recorded_and_harmless_without_dora(tmp_path: Path, how: str) -> None:
    """peft: it only acts on DoRA's init, so a plain adapter loads the same; the flag lands in runtime_config."""
    source = lorakit.get_peft_model(net(), lorakit.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    source.save_pretrained(tmp_path)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    if how == "from_pretrained":
        model = lorakit.PeftModel.from_pretrained(net(), tmp_path, ephemeral_gpu_offload=True)
        name = "default"
    else:
        model = lorakit.PeftModel.from_pretrained(net(), tmp_path)
        model.load_adapter(tmp_path, "again", ephemeral_gpu_offload=True)
        model.set_adapter("again")
        name = "again"
    assert model.peft_config[name].runtime_config.ephemeral_gpu_offload is True
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    if how == "from_pretrained":  # peft's from_pretrained records it the same way
        theirs = peft.PeftModel.from_pretrained(net(), tmp_path, ephemeral_gpu_offload=True)
        assert theirs.peft_config["default"].runtime_config.ephemeral_gpu_offload is True


def test_ephemeral_gpu_offload_with_dora_refused_by_name(tmp_path: Path) -> None:
    """peft moves DoRA's norm to "cuda" (it fails on a CPU-only machine); lorakit refuses the pair by name."""
    config = lorakit.LoraConfig(target_modules=["lin0"], use_dora=True,
                                runtime_config=lorakit.LoraRuntimeConfig(ephemeral_gpu_offload=True))
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload=True with use_dora=True"):
        lorakit.get_peft_model(net(), config)
    lorakit.get_peft_model(net(), lorakit.LoraConfig(target_modules=["lin0"], use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        lorakit.PeftModel.from_pretrained(net(), tmp_path, ephemeral_gpu_offload=True)
    model = lorakit.PeftModel.from_pretrained(net(), tmp_path)
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        model.load_adapter(tmp_path, "again", ephemeral_gpu_offload=True)
    assert list(model.peft_config) == ["default"]
