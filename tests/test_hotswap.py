"""Hot-swapping (issue 15, item 2): lorakit.hotswap side by side with peft.utils.hotswap 0.21.2.

Adapters are written by peft (the reference format) with distinct random factors; each row of SWAPS loads one,
optionally prepares it (scalings as tensors, ranks padded), hot-swaps another in and compares the outputs with a
fresh load of the new adapter, in both libraries. Refusals are compared by PEFT's sentence. One compiled run
checks that a swap of rank and alpha triggers no recompilation (``fail_on_recompile``) and gives the fresh output.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

import peft
import peft.utils.hotswap
import pytest
import torch
from torch import nn

import lorakit
import lorakit.hotswap

HOTSWAP = {peft: peft.utils.hotswap, lorakit: lorakit.hotswap}
ADAPTERS = {  # name -> LoraConfig arguments
    "r4": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8),
    "r2": dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=3),
    "r4_other_alpha": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=5),
    "lin0_only": dict(target_modules=["lin0"], r=4, lora_alpha=8),
    "rslora": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, use_rslora=True),
    "head": dict(target_modules=["lin0"], r=4, lora_alpha=8, modules_to_save=["lin1"]),
    "head2": dict(target_modules=["lin0"], r=2, lora_alpha=8, modules_to_save=["lin1"]),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def net() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for index, (name, arguments) in enumerate(ADAPTERS.items()):
        model = peft.get_peft_model(net(), peft.LoraConfig(init_lora_weights=False, **arguments))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for param in peft.get_peft_model_state_dict(model).values():
                param.copy_(torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / name)
    return root


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))

# (loaded adapter, swapped-in adapter, target_rank of prepare_model_for_compiled_hotswap or None: not prepared)
SWAPS = [
    ("r4", "r4_other_alpha", None),
    ("r4", "r4_other_alpha", 4),
    ("r4", "r2", 4),  # smaller rank: padded with zeros
    ("r2", "r4", None),  # larger rank, unprepared: the tensors take the new shape
    ("r2", "r4", 6),
    ("r4", "lin0_only", None),  # lin1 is zeroed
]


def swapped(lib: ModuleType, folders: Path, loaded: str, new: str, target_rank: int | None) -> tuple:
    model = lib.PeftModel.from_pretrained(net(), folders / loaded)
    if target_rank is not None:
        HOTSWAP[lib].prepare_model_for_compiled_hotswap(model, target_rank=target_rank)
    HOTSWAP[lib].hotswap_adapter(model, str(folders / new), adapter_name="default")
    fresh = lib.PeftModel.from_pretrained(net(), folders / new)
    scalings = [type(m.scaling["default"]).__name__ for m in model.modules() if hasattr(m, "scaling")]
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n]
    return model(X), fresh(X), scalings, shapes


@pytest.mark.parametrize("loaded, new, target_rank", SWAPS, ids=[f"{a}->{b}@{r}" for a, b, r in SWAPS])
def test_hotswap_as_peft(folders: Path, loaded: str, new: str, target_rank: int | None) -> None:
    with torch.no_grad():
        ours, ours_fresh, scalings, shapes = swapped(lorakit, folders, loaded, new, target_rank)
        theirs, theirs_fresh, peft_scalings, peft_shapes = swapped(peft, folders, loaded, new, target_rank)
    torch.testing.assert_close(ours, ours_fresh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert (scalings, shapes) == (peft_scalings, peft_shapes)


class ConvNet(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=groups)
        self.lin = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("ranks", [(2, 4), (4, 2)])
def test_conv_hotswap_padded_as_peft(tmp_path: Path, groups: int, ranks: tuple[int, int]) -> None:
    """Conv2d factors padded to the target rank (a grouped conv: A's rank rows block by block), then swapped."""
    def base() -> ConvNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ConvNet(groups)

    for index, r in enumerate(ranks):
        torch.manual_seed(index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: "Merging is not supported" for groups > 1
            model = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["conv", "lin"], r=r, lora_alpha=3,
                                                                init_lora_weights=False))
        model.save_pretrained(tmp_path / str(index))
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for lib in (peft, lorakit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.PeftModel.from_pretrained(base(), tmp_path / "0")
            fresh = lib.PeftModel.from_pretrained(base(), tmp_path / "1")
        with torch.no_grad():
            before = model(x)
            HOTSWAP[lib].prepare_model_for_compiled_hotswap(model, target_rank=4)
            torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
            HOTSWAP[lib].hotswap_adapter(model, str(tmp_path / "1"), adapter_name="default")
            torch.testing.assert_close(model(x), fresh(x), rtol=1e-6, atol=1e-6)
        conv = model.base_model.model.conv
        outputs[lib] = model(x), conv.lora_A["default"].weight, conv.lora_B["default"].weight
    for ours, theirs in zip(outputs[lorakit], outputs[peft]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def refusal(lib: ModuleType, folders: Path, case: str) -> str:
    hotswap = HOTSWAP[lib]
    loaded, new = {"rslora": ("r4", "rslora"), "more_layers": ("lin0_only", "r4"), "merged": ("r4", "r2"),
                   "too_small": ("r4", "r2"), "compiled": ("r4", "r2"), "not_lora": ("r4", "r2")}[case]
    model = lib.PeftModel.from_pretrained(net(), folders / loaded)
    try:
        if case == "merged":
            model.merge_adapter()
        if case == "too_small":
            hotswap.prepare_model_for_compiled_hotswap(model, target_rank=2)
        if case == "compiled":
            model._compiled_call_impl = model._call_impl  # what nn.Module.compile() sets
            hotswap.prepare_model_for_compiled_hotswap(model, target_rank=4)
        if case == "not_lora":
            hotswap.prepare_model_for_compiled_hotswap(net())
        hotswap.hotswap_adapter(model, str(folders / new), adapter_name="default")
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.parametrize("case", ["rslora", "more_layers", "merged", "too_small", "compiled", "not_lora"])
def test_refusals_as_peft(folders: Path, case: str) -> None:
    theirs = refusal(peft, folders, case)
    assert theirs != "no error"
    assert refusal(lorakit, folders, case).startswith(theirs)


def test_hotswap_with_modules_to_save(folders: Path) -> None:
    """The saved module's copy is swapped too (peft 0.21.2 stops with a KeyError on such an adapter)."""
    model = lorakit.PeftModel.from_pretrained(net(), folders / "head")
    lorakit.hotswap.prepare_model_for_compiled_hotswap(model, target_rank=4)
    lorakit.hotswap.hotswap_adapter(model, str(folders / "head2"), adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(model(X), lorakit.PeftModel.from_pretrained(net(), folders / "head2")(X),
                                   rtol=1e-6, atol=1e-6)


def test_merged_refusal_changes_nothing(folders: Path) -> None:
    model = lorakit.PeftModel.from_pretrained(net(), folders / "r4")
    model.merge_adapter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="currently merged"):
        lorakit.hotswap.hotswap_adapter(model, str(folders / "r2"), adapter_name="default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prepare_updates_config_and_keeps_output(folders: Path) -> None:
    model = lorakit.PeftModel.from_pretrained(net(), folders / "r2")
    with torch.no_grad():
        before = model(X)
    config = lorakit.LoraConfig(r=2, rank_pattern={"lin0": 2})
    lorakit.hotswap.prepare_model_for_compiled_hotswap(model, target_rank=6, config=config)
    assert (config.r, config.rank_pattern) == (6, {"lin0": 6})
    assert model.base_model.model.lin0.lora_A["default"].weight.shape == (6, 8)
    assert model.base_model.model.lin0.lora_A["default"].out_features == 6
    assert model.base_model.model.lin0.r["default"] == 2  # the trained rank, as peft keeps it
    with torch.no_grad():
        torch.testing.assert_close(model(X), before, rtol=1e-6, atol=1e-6)


def test_check_compiled_warn(folders: Path) -> None:
    model = lorakit.PeftModel.from_pretrained(net(), folders / "r4")
    model._compiled_call_impl = model._call_impl
    with pytest.warns(UserWarning, match="already compiled"):
        lorakit.hotswap.prepare_model_for_compiled_hotswap(model, check_compiled="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.hotswap.prepare_model_for_compiled_hotswap(model, check_compiled="ignore")


def test_eager_forward_with_tensor_scalings(folders: Path) -> None:
    """After prepare the scalings are tensors: every forward path (fused, mixed batch) reads them."""
    model = lorakit.PeftModel.from_pretrained(net(), folders / "r4")
    model.load_adapter(folders / "r2", adapter_name="other")
    with torch.no_grad():
        before = model(X), model(X, adapter_names=["default", "other", "__base__", "default", "other"])
    lorakit.hotswap.prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert isinstance(model.base_model.model.lin0.scaling["other"], torch.Tensor)
    with torch.no_grad():
        after = model(X), model(X, adapter_names=["default", "other", "__base__", "default", "other"])
    for got, want in zip(after, before):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_hotswap_does_not_recompile(folders: Path) -> None:
    """compile once, swap rank 4 / alpha 8 for rank 2 / alpha 3: no recompilation, the fresh load's output."""
    torch._dynamo.reset()
    model = lorakit.PeftModel.from_pretrained(net(), folders / "r4")
    lorakit.hotswap.prepare_model_for_compiled_hotswap(model, target_rank=4)
    compiled = torch.compile(model)
    with torch.inference_mode():
        first = compiled(X)
    lorakit.hotswap.hotswap_adapter(compiled, str(folders / "r2"), adapter_name="default")
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        second = compiled(X)
    with torch.no_grad():
        torch.testing.assert_close(first, lorakit.PeftModel.from_pretrained(net(), folders / "r4")(X),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, lorakit.PeftModel.from_pretrained(net(), folders / "r2")(X),
                                   rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---- transformers' load_adapter(hotswap=...) / enable_peft_hotswap on a lorakit-managed model ------------------
@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import tiny_llama

    root = tmp_path_factory.mktemp("llama_adapters")
    for seed, (name, r, alpha) in enumerate([("r4", 4, 8), ("r2", 2, 3), ("r8", 8, 8)]):
        config = lorakit.LoraConfig(target_modules=["q_proj", "v_proj"], r=r, lora_alpha=alpha,
                                    init_lora_weights=False)
        torch.manual_seed(seed)
        lorakit.get_peft_model(tiny_llama(), config).save_pretrained(root / name)
    return root


IDS = torch.tensor([[1, 5, 9, 33, 2, 7]])


def llama_with(folder: Path) -> nn.Module:
    """A transformers model given its first adapter through transformers' API (lorakit claims a lorakit config)."""
    from models import tiny_llama

    model = tiny_llama()
    config = lorakit.LoraConfig.from_pretrained(str(folder))
    model.load_adapter(peft_config=config, adapter_state_dict=lorakit.load_peft_weights(str(folder)))
    return model


def fresh_logits(folder: Path) -> torch.Tensor:
    from models import tiny_llama

    with torch.no_grad():
        return lorakit.PeftModel.from_pretrained(tiny_llama(), folder)(input_ids=IDS).logits


def test_transformers_load_adapter_hotswap(llama_adapters: Path) -> None:
    model = llama_with(llama_adapters / "r4")
    with pytest.raises(ValueError, match="To hotswap an adapter, there must already be an existing adapter"):
        model.load_adapter(str(llama_adapters / "r2"), adapter_name="other", hotswap=True)
    with pytest.raises(ValueError, match="Adapter with name default already exists"):
        model.load_adapter(str(llama_adapters / "r2"))  # hotswap="auto" without enable_peft_hotswap: a new load
    model.load_adapter(str(llama_adapters / "r2"), hotswap=True)
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, fresh_logits(llama_adapters / "r2"),
                                   rtol=1e-5, atol=1e-5)


def test_enable_peft_hotswap_pads_and_swaps(llama_adapters: Path) -> None:
    from models import tiny_llama

    model = tiny_llama()
    model.enable_peft_hotswap(target_rank=8)
    config = lorakit.LoraConfig.from_pretrained(str(llama_adapters / "r4"))
    model.load_adapter(peft_config=config, adapter_state_dict=lorakit.load_peft_weights(str(llama_adapters / "r4")))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape[0] == 8 and isinstance(q_proj.scaling["default"], torch.Tensor)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, fresh_logits(llama_adapters / "r4"),
                                   rtol=1e-5, atol=1e-5)
    for name in ("r8", "r2"):  # hotswap="auto": the same name swaps once enable_peft_hotswap was called
        model.load_adapter(str(llama_adapters / name))
        assert q_proj.lora_A["default"].weight.shape[0] == 8
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, fresh_logits(llama_adapters / name),
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="Call `enable_peft_hotswap` before loading the first adapter"):
        model.enable_peft_hotswap(target_rank=8)


def test_peft_model_load_adapter_hotswap(folders: Path) -> None:
    model = lorakit.PeftModel.from_pretrained(net(), folders / "r4")
    lorakit.hotswap.prepare_model_for_compiled_hotswap(model, target_rank=4)
    result = model.load_adapter(folders / "r2", adapter_name="default", hotswap=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    with torch.no_grad():
        torch.testing.assert_close(model(X), lorakit.PeftModel.from_pretrained(net(), folders / "r2")(X),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="To hotswap an adapter, there must already be an existing adapter"):
        model.load_adapter(folders / "r2", adapter_name="other", hotswap=True)


class WithBackbone(nn.Module):
    """A transformers-like model: its own ``base_model`` attribute is its backbone, not a lorakit wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.model = net()

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.mark.parametrize("build", [net, WithBackbone], ids=["plain", "with backbone attribute"])
def test_state_dict_hotswap_on_a_model_holding_the_layers_as_peft(build) -> None:
    """inject_adapter_in_model puts the layers into the user's model itself (diffusers' use of PEFT's hotswap):
    the swap takes the tensors and the new config's scaling, with the same output as peft. A model whose own
    ``base_model`` is its backbone (every transformers model) is not mistaken for a PeftModel."""
    old = dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for library in (peft, lorakit):
        model = library.inject_adapter_in_model(library.LoraConfig(**old), build(), "default")
        state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k)))
                 for k, v in model.state_dict().items() if "lora_" in k}
        HOTSWAP[library].hotswap_adapter_from_state_dict(model, state, "default",
                                                         library.LoraConfig(**dict(old, lora_alpha=16)))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        outputs[library] = model(x)
    torch.testing.assert_close(outputs[lorakit], outputs[peft], atol=1e-6, rtol=1e-6)


def test_state_dict_hotswap_reads_alpha_pattern_against_module_paths() -> None:
    """The new config's alpha_pattern names modules, as at injection: s = 2 / 4 on lin1, 16 / 4 on lin0. (peft
    0.21.2 matches the patterns against full state-dict keys, so "lin1" never matches there: README, differences.)"""
    config = dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False)
    model = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), WithBackbone(), "default")
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    new = lorakit.LoraConfig(**dict(config, lora_alpha=16, alpha_pattern={"lin1": 2}))
    lorakit.hotswap.hotswap_adapter_from_state_dict(model, state, "default", new)
    assert (model.model.lin0.scaling["default"], model.model.lin1.scaling["default"]) == (4.0, 0.5)
