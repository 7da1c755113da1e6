"""The internal names the peer suite's shim (shared/peer-suite/peft/_mapping.py) reads from lorakit: a refactor
that moves one breaks PEFT's own test suite run against lorakit, so each stays where the shim looks."""

from __future__ import annotations

import importlib

import pytest
from torch import nn

SHIM_NAMES = [  # (module, attribute, what it must be)
    ("lorakit.targeting", "DEFAULT_TARGETS", dict),
    ("lorakit.model", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", dict),
    ("lorakit.saved_modules", "ModulesToSaveWrapper", type),
    ("lorakit.trainable_tokens", "TrainableTokensWrapper", type),
    ("lorakit.variants", "BlockDiagonalLinear", type),
    ("lorakit.variants", "MontecloraSampler", type),
    ("lorakit.variants", "KasaConfig", type),
    ("lorakit.variants", "MontecloraConfig", type),
    ("lorakit.variants.arrow", "resolve_adapter_source", object),
    ("lorakit.variants.arrow", "TASK_ADAPTER_PREFIX", str),
    ("lorakit.variants.arrow", "GKS_ADAPTER_PREFIX", str),
    ("lorakit.corda", "preprocess_corda", object),
    ("lorakit.hotswap", "hotswap_adapter", object),
    ("lorakit.intruders", "reduce_intruder_dimension", object),
    ("lorakit.status", "get_layer_status", object),
]


@pytest.mark.parametrize(("module", "name", "expected"), SHIM_NAMES, ids=[f"{m}.{n}" for m, n, _ in SHIM_NAMES])
def test_the_shim_finds_its_name(module: str, name: str, expected: type) -> None:
    value = getattr(importlib.import_module(module), name)
    assert isinstance(value, expected)


@pytest.mark.parametrize("name", ["BlockDiagonalLinear", "MontecloraSampler"])
def test_reexported_variant_classes_are_modules(name: str) -> None:
    import lorakit.variants

    assert issubclass(getattr(lorakit.variants, name), nn.Module)


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    import lorakit.variants

    with pytest.raises(AttributeError, match="no_such_name"):
        lorakit.variants.no_such_name  # noqa: B018
