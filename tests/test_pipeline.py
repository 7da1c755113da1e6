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


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_pretrained_walks_the_model_at_most_twice(name: str, tmp_path) -> None:
    model, config = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config).save_pretrained(tmp_path)
        fresh, _ = _build(name)
        with counted_walks(fresh) as walks:
            PeftModel.from_pretrained(fresh, tmp_path)
    assert 1 <= walks[0] <= 2, walks[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_add_and_load_adapter_walk_the_model_at_most_twice(name: str, tmp_path) -> None:
    model, config = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config).save_pretrained(tmp_path)
        fresh, _ = _build(name)
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
