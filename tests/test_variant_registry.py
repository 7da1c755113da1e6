"""Adding a variant is one file: a toy variant defined here only, registered, runs forward / merge / save / load.

The toy ("gain") scales plain LoRA's update by a trainable per-adapter scalar g kept in a container it adds to
the layer (``lora_toy_gain``), so the one per-adapter state mechanism is exercised end to end:

    y = base(x) + g · s · B A x,        merge: W ← W + g · s · B A

Also here: variants reach layers through ``VariantLayer`` only (no ``layer._private``, no ``__dict__`` /
``_modules``), the registry imports no variant, and config.py imports no feature module (sub-configs register).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
from functools import partial

import pytest
import torch
from torch import Tensor, nn

import lorakit
from lorakit.config import SUBCONFIGS, LoraConfig
from lorakit.variants import VARIANTS, BufferDict, Variant, VariantLayer, register_variant
from models import build, example_inputs

SRC = pathlib.Path(lorakit.__file__).parent
VARIANT_FILES = sorted(p for p in (SRC / "variants").glob("*.py"))
GAIN = "lora_toy_gain"
TOL = dict(rtol=1e-5, atol=1e-6)


@dataclasses.dataclass
class ToyConfig(LoraConfig):
    """A LoraConfig with the toy's one setting (a real variant adds its field to LoraConfig, as PEFT does)."""

    toy_gain: float | None = None


def _init(gain: float, layer: VariantLayer, adapter: str, A: Tensor, B: Tensor, s: float) -> None:
    gains = layer.add_container(GAIN, nn.ParameterDict())
    gains[adapter] = nn.Parameter(torch.full((1,), gain, dtype=A.dtype, device=A.device))


def _forward(layer: VariantLayer, adapter: str, x: Tensor, y: Tensor) -> Tensor:
    return y + layer.branch(adapter, x) * layer.scaling[adapter] * layer.container(GAIN)[adapter]


def _dense(layer: VariantLayer, adapter: str) -> tuple[Tensor, Tensor]:
    A, B = layer.factors(adapter)
    return A.weight, B.weight * layer.container(GAIN)[adapter]


def _merge(layer: VariantLayer, adapter: str, W: Tensor, sign: float) -> Tensor:
    return W + sign * layer.get_delta_weight(adapter).to(W.device)  # s·B(gA) through ``dense``


def _toy(gain: float) -> Variant:
    return Variant(init=partial(_init, gain), forward=_forward, merge=_merge, dense=_dense,
                   shapes=lambda kind, base: {GAIN: {"": (1,)}}, containers=(GAIN,),
                   bind=lambda spec: _toy(*spec.variant_options),
                   select=lambda config: getattr(config, "toy_gain", None) is not None,
                   options=lambda name, config: (float(config.toy_gain),))


@pytest.fixture
def toy():
    register_variant("toy", _toy(1.0))
    yield
    del VARIANTS["toy"]


def _model(gain: float = 2.5, **kwargs) -> lorakit.PeftModel:
    config = ToyConfig(target_modules=["lin1", "lin2"], r=4, lora_alpha=8, toy_gain=gain,
                       init_lora_weights=False, **kwargs)  # B random: a non-zero update
    return lorakit.get_peft_model(build("mlp", seed=0), config)


def _reference(model: lorakit.PeftModel, gain: float) -> Tensor:
    """The toy's math on the model's own factors: lin(x) + g·s·B A x per targeted layer."""
    net, layers = build("mlp", seed=0), dict(model.base_model.model.named_modules())
    hooks = []
    for name in ("lin1", "lin2"):
        layer = layers[name]
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        hooks.append(getattr(net, name).register_forward_hook(
            lambda mod, args, out, A=A, B=B, s=s: out + gain * s * (args[0] @ A.T @ B.T)))
    with torch.no_grad():
        out = net(**example_inputs("mlp"))
    for hook in hooks:
        hook.remove()
    return out


def test_toy_forward_and_state_follow_the_toy_math(toy):
    model = _model(2.5).eval()
    layer = model.base_model.model.lin1
    assert layer.container(GAIN)["default"].item() == 2.5 and GAIN in layer.adapter_layer_names
    with torch.no_grad():
        out = model(**example_inputs("mlp"))
    torch.testing.assert_close(out, _reference(model, 2.5), **TOL)
    assert layer.container(GAIN)["default"].requires_grad  # it trains with its adapter
    assert any(p is layer.container(GAIN)["default"] for p in layer.adapter_parameters("default"))
    keys = lorakit.get_peft_model_state_dict(model)
    assert "base_model.model.lin1.lora_toy_gain" in keys and "base_model.model.lin2.lora_toy_gain" in keys
    assert "base_model.model.lin1.lora_toy_gain.default" in model.state_dict()


def test_toy_merge_and_unmerge(toy):
    model = _model(-1.5).eval()
    inputs = example_inputs("mlp")
    with torch.no_grad():
        expected = model(**inputs)
        before = model.base_model.model.lin2.base_layer.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs), expected, **TOL)
        model.unmerge_adapter()
        torch.testing.assert_close(model.base_model.model.lin2.base_layer.weight, before, **TOL)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**inputs), expected, **TOL)


def test_toy_save_load_delete_and_meta(toy, tmp_path):
    model = _model(0.75).eval()
    with torch.no_grad():
        model.base_model.model.lin1.container(GAIN)["default"].fill_(3.0)  # trained: the file must carry it
        expected = model(**example_inputs("mlp"))
    model.save_pretrained(tmp_path)
    config = ToyConfig.from_pretrained(str(tmp_path))
    assert config.toy_gain == 0.75
    loaded = lorakit.PeftModel.from_pretrained(build("mlp", seed=0), str(tmp_path), config=config).eval()
    assert loaded.base_model.model.lin1.container(GAIN)["default"].item() == 3.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**example_inputs("mlp")), expected, **TOL)
    layer = loaded.base_model.model.lin1
    layer.move_adapter_to_meta("default")
    assert layer.container(GAIN)["default"].device.type == "meta"
    loaded.delete_adapter("default")
    assert "default" not in layer.container(GAIN) and "default" not in layer.lora_A


def test_buffer_containers_delete_and_go_to_meta(toy):
    """A BufferDict added through add_container: its entries are saved, go to meta and are deleted like PEFT's."""
    layer = _model().base_model.model.lin1
    buffers = layer.add_container("lora_toy_buffer", BufferDict())
    assert layer.add_container("lora_toy_buffer", BufferDict()) is buffers  # registered once
    buffers["default"] = torch.arange(3.0)
    assert torch.equal(layer.state_dict()["lora_toy_buffer.default"], torch.arange(3.0))
    assert "lora_toy_buffer" in layer.other_param_names  # as PEFT lists VeLoRA's buffers
    layer.move_adapter_to_meta("default")
    assert buffers["default"].device.type == "meta" and buffers["default"].shape == (3,)
    layer.delete_adapter("default")
    assert "default" not in buffers


# ---- the rules that keep a variant one file ---------------------------------------------------------------------
class _Privates(ast.NodeVisitor):
    """``layer._x`` / ``<anything>.__dict__`` / ``<anything>._modules`` accesses in one file."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def visit_Attribute(self, node: ast.Attribute) -> None:
        value = node.value
        if isinstance(value, ast.Name) and value.id == "layer" and node.attr.startswith("_"):
            self.found.append(f"line {node.lineno}: layer.{node.attr}")
        elif node.attr in ("__dict__", "_modules") and not (isinstance(value, ast.Name) and value.id == "self"):
            self.found.append(f"line {node.lineno}: .{node.attr}")
        self.generic_visit(node)


@pytest.mark.parametrize("path", VARIANT_FILES, ids=lambda p: p.name)
def test_variants_use_no_layer_privates(path):
    visitor = _Privates()
    visitor.visit(ast.parse(path.read_text()))
    assert visitor.found == [], f"{path.name} reaches into a layer's privates: {visitor.found}"


def test_the_toy_scan_catches_a_private():
    """The scan above fails on the accesses it forbids (so its passing means something)."""
    visitor = _Privates()
    visitor.visit(ast.parse("def f(layer):\n    layer._branch('a', 1)\n    return layer.__dict__, layer._modules\n"))
    assert len(visitor.found) == 3


MODULES = {".".join(("lorakit", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
           for p in SRC.rglob("*.py")}


def _imported(path: pathlib.Path) -> set[str]:
    """lorakit modules ``path`` imports anywhere (functions included; TYPE_CHECKING blocks skipped): for
    ``from pkg import mod`` the module ``pkg.mod``, for ``from mod import name`` the module ``mod``."""
    tree, package = ast.parse(path.read_text()), "lorakit." + ".".join(path.relative_to(SRC).parent.parts)
    package = package.rstrip(".")
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            names |= {f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names & MODULES


def test_registry_imports_no_variant():
    imported = _imported(SRC / "variants" / "__init__.py")
    variants = {f"lorakit.variants.{p.stem}" for p in VARIANT_FILES if p.stem != "__init__"}
    assert not imported & variants


def _graph() -> dict[str, set[str]]:
    """lorakit module -> the lorakit modules it imports anywhere."""
    return {name: _imported(path) for path in SRC.rglob("*.py")
            for name in [".".join(("lorakit", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")]}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return False


@pytest.mark.parametrize("module", ["lorakit.config", "lorakit.variants",
                                   *(f"lorakit.variants.{p.stem}" for p in VARIANT_FILES if p.stem != "__init__")])
def test_no_import_circle_through_variants_or_config(module):
    """Function-level imports count: nothing ``module`` imports leads back to it."""
    graph = _graph()
    back = [t for t in graph[module] if _reaches(graph, t, module)]
    assert back == [], f"{module} imports {back}, which import {module} back"


@pytest.mark.parametrize("module", ["lorakit.variants", "lorakit.loraga", "lorakit.model", "lorakit.layer"])
def test_config_imports_no_feature_module(module):
    imported = _imported(SRC / "config.py")
    assert not {name for name in imported if name == module or name.startswith(module + ".")}


@pytest.mark.parametrize("field", ["velora_config", "kasa_config", "monteclora_config", "arrow_config",
                                   "lora_ga_config"])
def test_each_feature_registers_its_subconfig_and_a_dict_loads(field):
    """One mechanism: every sub-config is in config.SUBCONFIGS, and its dict (adapter_config.json) becomes it."""
    cls = SUBCONFIGS[field].cls
    config = LoraConfig.from_dict({field: {}})
    assert isinstance(getattr(config, field), cls)
    with pytest.raises(TypeError, match=f"`{cls.__name__}` must be a `{cls.__name__}`, a dict, or None"):
        LoraConfig(**{field: 3})


def test_a_subconfig_dict_with_unknown_keys_warns_and_drops_them():
    with pytest.warns(lorakit.LoraWarning, match="VeloraConfig does not know: \\['surprise'\\]"):
        config = LoraConfig(velora_config={"num_groups": 4, "surprise": 1})
    assert config.velora_config.num_groups == 4


def test_the_variant_surface_shadows_no_base_attribute():
    """LoraLayer's methods for variants must not hide a base attribute the layer shows (MHA's ``dropout``)."""
    from lorakit.kinds import exposed_attributes

    surface = {name for name in dir(VariantLayer) if not name.startswith("_")}
    assert surface >= {"branch", "apply_dropout", "add_container", "container", "factors"}
    assert not surface & exposed_attributes()
