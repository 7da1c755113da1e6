"""The pipeline (plan -> apply): how often the user's model is walked, one config for checking and injecting.

Walks are counted as calls of ``nn.Module.named_modules`` on the user's model object itself (``modules()``,
``named_parameters()``, ``parameters()`` and ``requires_grad_`` all go through it; a walk of a module above it
calls it once, as recursion).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from models import tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


# name -> (model builder, config builder)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], LoraConfig]]] = {
    "llama": (tiny_llama, lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "gpt2_conv1d": (tiny_gpt2, lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "sequential_mlp": (_Mlp, lambda: LoraConfig(r=2, target_modules=["net.0", "net.2"])),
    "saves_and_tokens": (tiny_llama, lambda: LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"],
                                                        trainable_token_indices=[1, 2])),
    "all_linear": (tiny_llama, lambda: LoraConfig(r=2, target_modules="all-linear")),
}


@contextlib.contextmanager
def counted_walks(model: nn.Module) -> Iterator[list[int]]:
    """Count ``named_modules`` calls on ``model`` itself inside the block."""
    count = [0]
    original = nn.Module.named_modules

    def counting(self: nn.Module, *args: object, **kwargs: object) -> Iterator[tuple[str, nn.Module]]:
        if self is model:
            count[0] += 1
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    nn.Module.named_modules = counting  # type: ignore[method-assign]
    try:
        yield count
    finally:
        nn.Module.named_modules = original  # type: ignore[method-assign]


def _build(name: str) -> tuple[nn.Module, LoraConfig]:
    make_model, make_config = CASES[name]
    torch.manual_seed(0)
    return make_model(), make_config()


@pytest.mark.parametrize("name", sorted(CASES))
def test_get_peft_model_walks_the_model_at_most_twice(name: str) -> None:
    model, config = _build(name)
    with warnings.catch_warnings(), counted_walks(model) as walks:
        warnings.simplefilter("ignore")
        get_peft_model(model, config)
    assert 1 <= walks[0] <= 2, walks[0]


def _saved_then_fresh(name: str, folder) -> tuple[nn.Module, LoraConfig]:
    """Save case ``name``'s adapter to ``folder``; return a fresh copy of its base model and its config."""
    model, config = _build(name)
    get_peft_model(model, config).save_pretrained(folder)
    return _build(name)[0], config


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_pretrained_walks_the_model_at_most_twice(name: str, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh, _ = _saved_then_fresh(name, tmp_path)
        with counted_walks(fresh) as walks:
            PeftModel.from_pretrained(fresh, tmp_path)
    assert 1 <= walks[0] <= 2, walks[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_add_and_load_adapter_walk_the_model_at_most_twice(name: str, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh, config = _saved_then_fresh(name, tmp_path)
        peft_model = get_peft_model(fresh, CASES[name][1]())
        user_model = peft_model.get_base_model()
        second = CASES[name][1]()
        second.trainable_token_indices = None  # one adapter's tokens per embedding here
        with counted_walks(user_model) as walks:
            peft_model.add_adapter("other", second)
        assert 1 <= walks[0] <= 2, walks[0]
        if config.trainable_token_indices is None:
            with counted_walks(user_model) as walks:
                peft_model.load_adapter(tmp_path, "loaded")
            assert 1 <= walks[0] <= 2, walks[0]


# ---- the plan: pure, printable ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_changes_nothing_and_apply_does_what_it_says(name: str) -> None:
    from lorakit.apply import apply
    from lorakit.layer import LoraLayer
    from lorakit.plan import plan_adapter

    model, config = _build(name)
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_adapter(model, config, "default")
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    text = str(plan).splitlines()
    assert len(text) == 1 + len(plan.targets.layers) + len(plan.targets.modules_to_save) + len(plan.tokens)
    for line, (path, spec) in zip(text[1:], plan.targets.layers.items()):
        assert line == (f"  {path}: {plan.targets.kinds[path].name}, r={spec.r}, alpha={spec.lora_alpha}, "
                        f"init={spec.init.name}, variant=none")
    injected = apply(model, plan, ["default"])
    wrapped = {path for path, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == set(plan.targets.layers)
    assert len(injected) == len(plan.targets.layers) + len(plan.targets.modules_to_save) + len(plan.tokens)


def test_a_failed_apply_leaves_the_model_as_it_was(monkeypatch) -> None:
    from lorakit import apply as apply_module
    from lorakit.plan import plan_adapter

    model, config = _build("saves_and_tokens")
    modules = dict(model.named_modules())
    plan = plan_adapter(model, config, "default")

    def broken(*args: object, **kwargs: object) -> list[nn.Module]:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(apply_module, "inject_tokens", broken)  # after the LoRA layers and modules_to_save
    with pytest.raises(RuntimeError, match="broken on purpose"):
        apply_module.apply(model, plan, ["default"])
    assert dict(model.named_modules()) == modules


# ---- from_pretrained(config=...): one config checked and injected ----------------------------------------------
def _saved_mlp(lib: object, folder: object) -> None:
    torch.manual_seed(0)
    model = _Mlp()
    peft_model = lib.get_peft_model(model, lib.LoraConfig(r=4, lora_alpha=8, target_modules=["net.0"],
                                                          init_lora_weights=False))
    peft_model.save_pretrained(folder)


def _scalings(model: nn.Module) -> dict[str, float]:
    return {path: module.scaling["default"] for path, module in model.named_modules()
            if isinstance(getattr(module, "scaling", None), dict)}


def test_from_pretrained_checks_and_injects_the_callers_config(tmp_path) -> None:
    """The caller's config (alpha 64, not the file's 8) is the one checked against the file and injected, and the
    object the model holds, as in peft 0.21.2."""
    import peft

    import lorakit

    results = {}
    for lib in (lorakit, peft):
        _saved_mlp(lib, tmp_path / lib.__name__)
        torch.manual_seed(1)
        config = lib.LoraConfig(r=4, lora_alpha=64, target_modules=["net.0"])
        loaded = lib.PeftModel.from_pretrained(_Mlp(), tmp_path / lib.__name__, config=config)
        assert loaded.peft_config["default"] is config
        results[lib.__name__] = (_scalings(loaded), loaded(torch.ones(2, 8)))
    assert results["lorakit"][0] == results["peft"][0] == {"base_model.model.net.0": 16.0}
    torch.testing.assert_close(results["lorakit"][1], results["peft"][1])


def test_from_pretrained_refuses_a_file_that_does_not_fit_the_callers_config(tmp_path) -> None:
    """r=8 in the caller's config, r=4 in the file: refused against the config that would be injected, before
    anything changes (peft 0.21.2 injects r=8, then fails on the shapes with the model half changed)."""
    from lorakit.io import AdapterLoadError
    from lorakit.layer import LoraLayer

    import lorakit

    _saved_mlp(lorakit, tmp_path)
    model = _Mlp()
    modules = dict(model.named_modules())
    with pytest.raises(AdapterLoadError, match="the adapter holds 4x8, this model needs 8x8"):
        lorakit.PeftModel.from_pretrained(model, tmp_path, config=lorakit.LoraConfig(r=8, target_modules=["net.0"]))
    assert dict(model.named_modules()) == modules
    assert not any(isinstance(module, LoraLayer) for module in model.modules())


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_load_draws_no_init(name: str, tmp_path) -> None:
    """Every factor follows from the file (Plan.weights_follow): no init is drawn, so the RNG is untouched."""
    model, config = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config).save_pretrained(tmp_path)
        fresh, _ = _build(name)
        before = torch.random.get_rng_state()
        PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), before)
