"""PEFT's observable behaviour around adapters, side by side with real peft 0.21.2 (issue 14, item 1 and 2).

Each row of SCENARIOS is one function of the library (``peft`` or ``lorakit``, both expose the same names) that
runs a short story on a tiny model and returns what a user can observe: which parameters train, dtypes, the
config object, error and warning messages, files. The test runs it on both and compares the records. Messages
are compared as PEFT's sentence first: lorakit's message must start with PEFT's (it adds its explanation after).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import yaml
from torch import nn

import lorakit


class MLP(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 8, dtype=dtype)
        self.lin1 = nn.Linear(8, 8, dtype=dtype)
        self.lin2 = nn.Linear(8, 4, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def mlp(dtype: torch.dtype = torch.float32) -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP(dtype)


class Said(str):
    """A message: lorakit's must start with PEFT's sentence (lorakit adds its explanation after it)."""


def said(error_or_text: object) -> Said:
    return Said(str(error_or_text))


class Catches(frozenset):
    """The built-in exception types an error is an instance of: lorakit's error must be caught wherever PEFT's is."""


def raised(call: Callable[[], object]) -> tuple[Catches, Said] | None:
    """(built-in exception types, message) of ``call``, or None when it returns."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is part of the record
        builtin = {c.__name__ for c in type(error).__mro__ if c.__module__ == "builtins"}
        return Catches(builtin - {"Exception", "BaseException", "object"}), said(error)
    return None


def warned(call: Callable[[], object], pattern: str) -> list[Said]:
    """The warnings of ``call`` whose message matches ``pattern`` (the library's own, not torch's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return sorted({said(w.message) for w in caught if re.search(pattern, str(w.message))})


def trainable(model: nn.Module) -> list[str]:
    return sorted(name for name, param in model.named_parameters() if param.requires_grad)


def lora_dtypes(model: nn.Module) -> list[tuple[str, str]]:
    return sorted((name, str(param.dtype)) for name, param in model.named_parameters() if "lora_" in name)


# ---- the scenarios ------------------------------------------------------------------------------------------
def add_adapter_autocast(lib, dtype: torch.dtype, autocast: bool):
    model = lib.get_peft_model(mlp(dtype), lib.LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0", "lin1"]), autocast_adapter_dtype=autocast)
    return lora_dtypes(model)


def load_autocast(lib, tmp_path: Path, autocast: bool, low_cpu_mem_usage: bool):
    model = lib.get_peft_model(mlp(torch.bfloat16), lib.LoraConfig(target_modules=["lin0"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"]))
    model.save_pretrained(tmp_path)
    loaded = lib.PeftModel.from_pretrained(mlp(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
    loaded.load_adapter(tmp_path / "other", "other", autocast_adapter_dtype=autocast,
                        low_cpu_mem_usage=low_cpu_mem_usage)
    return lora_dtypes(loaded), sorted({p.device.type for p in loaded.parameters()})


def delete_last_adapter(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"]))
    model.set_adapter("other")
    model.delete_adapter("other")
    record = [dict(model.peft_config).keys() == {"default"}, model.active_adapters]
    model.delete_adapter("default")
    unknown = raised(lambda: model.delete_adapter("nope"))
    return record + [model.peft_config, model.active_adapters, unknown]


def disable_adapter_restores(lib, start: str):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0", "lin1"]))
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    if start == "disabled":
        model.base_model.disable_adapter_layers()
    elif start == "mixed":
        layers[0].enable_adapters(False)

    def enter_exit():
        with model.disable_adapter():
            assert all(layer.disable_adapters for layer in layers)

    messages = warned(enter_exit, "enabled and others")
    return messages, [layer.disable_adapters for layer in layers]


def disable_with_bias_warns(lib, bias: str):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], bias=bias))

    def enter_exit():
        with model.disable_adapter():
            pass

    return warned(enter_exit, "disabling adapter layers with bias")


def second_bias_refused(lib, first: str, second: str):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], bias=first))
    error = raised(lambda: model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"], bias=second)))
    return error, sorted(model.peft_config), sorted(n for n, _ in model.named_parameters() if ".other." in n)


def delete_merged_refused(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"], init_lora_weights=False))
    model.merge_adapter()
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    error = raised(lambda: model.delete_adapter("default"))
    state = [list(layer.merged_adapters) for layer in layers], sorted(model.peft_config)
    model.delete_adapter("other")  # not merged: allowed, and the merged one stays merged
    return error, state, sorted(model.peft_config), [list(layer.merged_adapters) for layer in layers]


def merge_twice_warns(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    first = warned(model.merge_adapter, "merg")
    again = warned(model.merge_adapter, "merg")
    more = warned(lambda: model.merge_adapter(["default", "other"]), "merg")
    as_string = raised(lambda: model.merge_adapter("other"))
    return first, again, more, as_string


def tuner_passes_attributes(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"]))
    tuner = model.base_model
    return tuner.lin1 is tuner.model.lin1, tuner.lin0 is tuner.model.lin0, hasattr(tuner, "no_such_attribute")


def shared_modules_to_save(lib, second_saves: str):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=[second_saves]))
    error = raised(lambda: model.base_model.set_adapter(["default", "other"]))
    wrapper = model.base_model.model.lin2
    return error, wrapper.active_adapters, model.active_adapters


def saved_module_active_adapters(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"]))
    wrapper = model.base_model.model.lin2
    record = [wrapper.active_adapters]
    model.set_adapter("other")
    record.append(wrapper.active_adapters)
    model.base_model.set_adapter(["other", "default"])
    return record + [wrapper.active_adapters, wrapper.active_adapter]


def load_requires_grad(lib, tmp_path: Path, first_trainable: bool, second_trainable: bool):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    model.save_pretrained(tmp_path)
    loaded = lib.PeftModel.from_pretrained(mlp(), tmp_path, is_trainable=first_trainable)
    record = [trainable(loaded)]
    result = loaded.load_adapter(tmp_path, adapter_name="other", is_trainable=second_trainable)
    record.append(trainable(loaded))
    loaded.add_adapter("third", lib.LoraConfig(target_modules=["lin1"]))
    record.append(trainable(loaded))
    return record, list(result.missing_keys), list(result.unexpected_keys), loaded.training


def from_pretrained_keeps_config(lib, tmp_path: Path, is_trainable: bool):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    config = lib.LoraConfig(target_modules=["lin0"], r=8)
    loaded = lib.PeftModel.from_pretrained(mlp(), tmp_path, config=config, is_trainable=is_trainable)
    held = loaded.peft_config["default"]
    return held is config, held.inference_mode, sorted(held.target_modules), trainable(loaded)


def set_requires_grad(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"]), adapter_name="a")
    model.add_adapter("b", lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["lin2"]))
    record = [trainable(model)]
    model.set_requires_grad("b")
    record.append(trainable(model))
    model.set_requires_grad(["a", "b"], requires_grad=False)
    record.append(trainable(model))
    model.set_adapter("b", inference_mode=True)
    record.append(trainable(model))
    return record


def base_model_state_dict(lib):
    base = mlp()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["lin2"]))
    extracted = lib.get_base_model_state_dict(model)
    same = all(torch.equal(original[k], extracted[k]) for k in original)
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(1.0)
    result = lib.set_base_model_state_dict(model, original, strict=False)
    restored = lib.get_base_model_state_dict(model)
    back = all(torch.equal(original[k], restored[k]) for k in original)
    strict = raised(lambda: lib.set_base_model_state_dict(model, {**original, "extra.weight": torch.zeros(1)}))
    lora_untouched = sorted(n for n, p in model.named_parameters() if "lora_" in n and bool((p == 1.0).all()))
    return sorted(extracted) == sorted(original), same, back, list(result.missing_keys), \
        list(result.unexpected_keys), strict is not None and sorted(strict[0]), lora_untouched


def inject_in_model(lib, low_cpu_mem_usage: bool):
    model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"], use_dora=True), mlp(),
                                        low_cpu_mem_usage=low_cpu_mem_usage)
    devices = sorted((name, param.device.type) for name, param in model.named_parameters())
    return type(model).__name__, devices, trainable(model)


def peft_state_dict_roundtrip(lib):
    source = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    state = lib.get_peft_model_state_dict(source)
    target = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"]))
    result = lib.set_peft_model_state_dict(target, state)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    return sorted(result.missing_keys), list(result.unexpected_keys), torch.equal(source(x), target(x))


def model_card(lib, tmp_path: Path, existing: bool):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"]))
    if existing:
        (tmp_path / "README.md").write_text("---\nmeta: hello\n---\nThis is a model card\n")
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    header = yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1))
    return header, "This is a model card" in text, len(text) > 1000, "Framework versions" in text


def layers_follow_active(lib, saves: bool):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"]))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0", "lin1"],
                                              modules_to_save=["lin2"] if saves else None))
    modules = [model.base_model.lin0, model.base_model.lin1, model.base_model.lin2]
    record = []
    for name in ("default", "other", "default"):
        model.set_adapter(name)
        record.append([getattr(m, "active_adapters", None) for m in modules] + [trainable(model)])
    return record


class ConfigLike:
    """A config object with ``to_dict`` only (as transformers' configs have), model_type read from it."""

    def __init__(self, model_type: str) -> None:
        self.model_type_in_dict = model_type

    def to_dict(self) -> dict:
        return {"model_type": self.model_type_in_dict}


def default_targets(lib, model_type: str | None, default: object):
    model = mlp()
    if model_type is not None:
        model.config = ConfigLike(model_type)
    table = (lib.tuners.lora.model.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING if lib is peft
             else lorakit.targeting.DEFAULT_TARGETS)
    if default is not None:
        table[model_type] = default
    try:
        error = raised(lambda: lib.get_peft_model(model, lib.LoraConfig()))
        if error is not None:
            return error
        return model.targeted_module_names if hasattr(model, "targeted_module_names") else None
    finally:
        table.pop(model_type, None)


def default_targets_applied(lib, default: object):
    model = mlp()
    model.config = ConfigLike("foobar_arch")
    table = (lib.tuners.lora.model.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING if lib is peft
             else lorakit.targeting.DEFAULT_TARGETS)
    table["foobar_arch"] = default
    try:
        model = lib.get_peft_model(model, lib.LoraConfig())
        return model.targeted_module_names, model.peft_config["default"].target_modules
    finally:
        table.pop("foobar_arch", None)


def duplicate_adapter_name(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False), "existing")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    error = raised(lambda: model.add_adapter("existing", lib.LoraConfig(target_modules=["lin0"], r=4)))
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return error, same, model.peft_config["existing"].r


def mixed_batch_errors(lib, case: str):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    x = torch.randn(3, 8)
    names = {"length": ["default", "other"], "unknown": ["default", "does-not-exist", "other-does-not-exist"]}
    if case == "training":
        model.train()
    if case == "merged":
        model.merge_adapter()
    return raised(lambda: model(x, adapter_names=names.get(case, ["default", "other", "__base__"])))


def lora_bias_without_base_bias(lib, safe_merge: bool):
    base = mlp()
    base.lin0 = nn.Linear(8, 8, bias=False)
    model = None

    def make():
        nonlocal model
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["lin0"], lora_bias=True))

    warnings_seen = warned(make, "lora_bias")
    weight = model.base_model.model.lin0.base_layer.weight.clone()
    error = raised(lambda: model.merge_adapter(safe_merge=safe_merge))
    return warnings_seen, error, torch.equal(weight, model.base_model.model.lin0.base_layer.weight)


def safe_merge_nan(lib):
    model = lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lin0.lora_A["default"].weight[0, 0] = float("nan")
    weight = model.base_model.model.lin0.base_layer.weight.clone()
    error = raised(lambda: model.merge_adapter(safe_merge=True))
    return error, torch.equal(weight, model.base_model.model.lin0.base_layer.weight)


def set_adapter_trains_a_loaded_adapter(lib, tmp_path: Path, inference_mode: bool):
    """PEFT's set_adapter makes the adapter trainable unless set_adapter(..., inference_mode=True), whatever
    the adapter's config says (a load without is_trainable records inference_mode=True)."""
    lib.get_peft_model(mlp(), lib.LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path)
    loaded = lib.PeftModel.from_pretrained(mlp(), tmp_path)
    loaded.load_adapter(tmp_path, adapter_name="other")
    record = [trainable(loaded)]
    loaded.set_adapter("other", inference_mode=inference_mode)
    record.append(trainable(loaded))
    loaded.base_model.set_adapter("default")
    return record + [trainable(loaded), loaded.peft_config["other"].inference_mode]


SCENARIOS = [
    *[(f"set_adapter_trains_a_loaded_adapter-{i}", set_adapter_trains_a_loaded_adapter, dict(inference_mode=i))
      for i in (False, True)],
    ("duplicate_adapter_name", duplicate_adapter_name, {}),
    *[(f"mixed_batch_errors-{c}", mixed_batch_errors, dict(case=c)) for c in ("length", "unknown", "training",
                                                                              "merged")],
    *[(f"lora_bias_without_base_bias-{m}", lora_bias_without_base_bias, dict(safe_merge=m)) for m in (False, True)],
    ("safe_merge_nan", safe_merge_nan, {}),
    ("default_targets-custom-model", default_targets, dict(model_type=None, default=None)),
    ("default_targets-unknown-type", default_targets, dict(model_type="foobar_arch", default=None)),
    *[(f"default_targets_applied-{type(d).__name__}", default_targets_applied, dict(default=d))
      for d in (["lin0"], "lin1")],
    *[(f"layers_follow_active-{s}", layers_follow_active, dict(saves=s)) for s in (False, True)],
    *[(f"add_adapter_autocast-{d}-{a}", add_adapter_autocast, dict(dtype=getattr(torch, d), autocast=a))
      for d in ("bfloat16", "float16", "float32") for a in (True, False)],
    *[(f"load_autocast-{a}-{low}", load_autocast, dict(autocast=a, low_cpu_mem_usage=low))
      for a in (True, False) for low in (False, True)],
    ("delete_last_adapter", delete_last_adapter, {}),
    *[(f"disable_adapter_restores-{s}", disable_adapter_restores, dict(start=s)) for s in ("enabled", "disabled",
                                                                                          "mixed")],
    *[(f"disable_with_bias_warns-{b}", disable_with_bias_warns, dict(bias=b)) for b in ("none", "all", "lora_only")],
    *[(f"second_bias_refused-{a}-{b}", second_bias_refused, dict(first=a, second=b))
      for a, b in (("all", "all"), ("lora_only", "all"), ("none", "all"), ("all", "none"))],
    ("delete_merged_refused", delete_merged_refused, {}),
    ("merge_twice_warns", merge_twice_warns, {}),
    ("tuner_passes_attributes", tuner_passes_attributes, {}),
    *[(f"shared_modules_to_save-{m}", shared_modules_to_save, dict(second_saves=m)) for m in ("lin2", "lin1")],
    ("saved_module_active_adapters", saved_module_active_adapters, {}),
    *[(f"load_requires_grad-{a}-{b}", load_requires_grad, dict(first_trainable=a, second_trainable=b))
      for a in (False, True) for b in (False, True)],
    *[(f"from_pretrained_keeps_config-{t}", from_pretrained_keeps_config, dict(is_trainable=t)) for t in (False, True)],
    ("set_requires_grad", set_requires_grad, {}),
    ("base_model_state_dict", base_model_state_dict, {}),
    *[(f"inject_in_model-{low}", inject_in_model, dict(low_cpu_mem_usage=low)) for low in (False, True)],
    ("peft_state_dict_roundtrip", peft_state_dict_roundtrip, {}),
    *[(f"model_card-{e}", model_card, dict(existing=e)) for e in (False, True)],
]


def assert_same(ours: object, theirs: object, where: str = "record") -> None:
    """Equal records, where a ``Said`` message of lorakit's must start with PEFT's."""
    if isinstance(theirs, Catches):
        assert isinstance(ours, Catches) and theirs <= ours, f"{where}: {sorted(ours)} do not include {sorted(theirs)}"
    elif isinstance(theirs, Said):
        assert isinstance(ours, str) and ours.startswith(theirs), f"{where}: {ours!r} does not start with {theirs!r}"
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), f"{where}: {ours!r} != {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), f"{where}: {ours!r} != {theirs!r}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


@pytest.mark.parametrize("scenario, kwargs", [pytest.param(f, k, id=i) for i, f, k in SCENARIOS])
def test_same_as_peft(scenario, kwargs, tmp_path):
    needs_path = "tmp_path" in scenario.__code__.co_varnames[:scenario.__code__.co_argcount]
    extra = {"tmp_path": tmp_path / "peft"} if needs_path else {}
    for path in extra.values():
        path.mkdir()
    theirs = scenario(peft, **extra, **kwargs)
    extra = {"tmp_path": tmp_path / "lorakit"} if needs_path else {}
    for path in extra.values():
        path.mkdir()
    ours = scenario(lorakit, **extra, **kwargs)
    assert_same(ours, theirs)
