"""The PEFT codec's key grammar (lorakit/codec.py): ``parse_key`` is the one parser of adapter keys."""

from __future__ import annotations

import pytest

from lorakit.codec import AdapterKey, parse_key, with_adapter_name

P = "base_model.model."

# key -> (path, container, rest, role) or None
KEYS = {
    P + "model.layers.0.q_proj.lora_A.weight": (P + "model.layers.0.q_proj", "lora_A", ("weight",), "A"),
    P + "q.lora_B.weight": (P + "q", "lora_B", ("weight",), "B"),
    P + "q.lora_B.bias": (P + "q", "lora_B", ("bias",), "bias"),
    P + "emb.lora_embedding_A": (P + "emb", "lora_embedding_A", (), "A"),
    P + "emb.lora_embedding_B": (P + "emb", "lora_embedding_B", (), "B"),
    P + "q.lora_magnitude_vector": (P + "q", "lora_magnitude_vector", (), "magnitude"),
    "q.lora_A.default.weight": ("q", "lora_A", ("default", "weight"), None),  # a model key: no file role
    P + "q.lora_magnitude_vector.weight": (P + "q", "lora_magnitude_vector", ("weight",), None),
    P + "attn.base_layer.out_proj.lora_A.weight": (P + "attn.base_layer.out_proj", "lora_A", ("weight",), "A"),
    P + "q.base_layer.weight": None,
    P + "lm_head.modules_to_save.default.weight": None,
    "lora_A.weight": None,  # a container needs a path in front of it
}


@pytest.mark.parametrize("key", KEYS)
def test_parse_key(key):
    want = KEYS[key]
    parsed = parse_key(key)
    if want is None:
        assert parsed is None
    else:
        assert parsed == AdapterKey(*want[:3]) and parsed.role == want[3]


@pytest.mark.parametrize("key, expected", [
    (P + "q.lora_A.weight", P + "q.lora_A.other.weight"),
    (P + "emb.lora_embedding_B", P + "emb.lora_embedding_B.other"),
    (P + "q.lora_unknown.weight", P + "q.lora_unknown.other.weight"),  # PEFT's "lora_" prefix rule
    (P + "q.base_layer.weight", P + "q.base_layer.weight"),
])
def test_with_adapter_name(key, expected):
    assert with_adapter_name(key, "other") == expected
