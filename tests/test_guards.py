"""The injection's guards, now stages of the pipeline: tied embeddings (ties.py, planned; PEFT parity for
ensure_weight_tying) and a failed injection rolled back (apply.py). The other checks' tests live with their
modules: test_training_checks, test_save_checks, test_merge_check, test_io_checks; the GUARDS table's in
test_errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from checks_support import LLAMA, lora_warnings, randomize
from models import build
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, get_peft_model


# ---- tied embeddings ----------------------------------------------------------------------------------------
def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


TIE_CASES = {
    "modules_to_save lm_head": dict(modules_to_save=["lm_head"], target_modules=["q_proj"]),
    "modules_to_save embed_tokens": dict(modules_to_save=["embed_tokens"], target_modules=["q_proj"]),
    "target lm_head": dict(target_modules=["q_proj", "lm_head"]),
    "target embed_tokens": dict(target_modules=["q_proj", "embed_tokens"]),
}


@pytest.mark.parametrize("case", TIE_CASES)
def test_training_one_side_of_tied_embeddings_warns(case):
    found = lora_warnings(lambda: get_peft_model(tied_llama(), LoraConfig(r=2, **TIE_CASES[case])))
    assert any("ensure_weight_tying=True" in m for m in found), found
    found = lora_warnings(lambda: get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["q_proj"])))
    assert not any("ties its input and output" in m for m in found)


def _trained(lib, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(tied_llama(), lib.LoraConfig(r=2, ensure_weight_tying=True, **TIE_CASES[case]))
    return model


@pytest.mark.parametrize("case", TIE_CASES)
def test_ensure_weight_tying_matches_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    ours, theirs = _trained(lorakit, case), _trained(peft, case)
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    # one SGD step: the two sides stay one matrix
    ours.train()
    x = torch.randint(0, 64, (2, 6))
    ours(input_ids=x, labels=x).loss.backward()
    with torch.no_grad():
        for p in ours.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    ours.eval()
    embed, head = ours.get_base_model().get_input_embeddings(), ours.get_base_model().get_output_embeddings()
    if "modules_to_save" in case:
        assert embed.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    else:
        delta_embed = (embed.lora_embedding_B["default"] @ embed.lora_embedding_A["default"]).T
        delta_head = head.lora_B["default"].weight @ head.lora_A["default"].weight
        torch.testing.assert_close(delta_head, delta_embed, rtol=0, atol=0)
        assert delta_head.abs().max() > 0
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    configs = [json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("ours", "theirs")]
    for field in ("target_modules", "modules_to_save", "ensure_weight_tying"):
        left, right = configs[0][field], configs[1][field]
        assert (sorted(left) if isinstance(left, list) else left) == (sorted(right) if isinstance(right, list) else right)
    keys = [sorted(load_file(tmp_path / n / "adapter_model.safetensors")) for n in ("ours", "theirs")]
    assert keys[0] == keys[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
        back = lorakit.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        want = ours(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, want)
        torch.testing.assert_close(back(input_ids=x).logits, want)


def test_ensure_weight_tying_without_tied_embeddings_warns():
    found = lora_warnings(lambda: get_peft_model(build("llama"), LoraConfig(ensure_weight_tying=True, **LLAMA)))
    assert any("no tied embeddings" in m for m in found), found


# ---- a failed injection changes nothing ---------------------------------------------------------------------
def test_failed_second_adapter_is_rolled_back():
    """PiSSA with r=20 fits q_proj (32x32) but not k_proj (16x32, after q_proj): the layers injected before the
    failure lose the half-made adapter and get their rewritten weights back; the first adapter is untouched."""
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    config = LoraConfig(r=20, target_modules=["q_proj", "k_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="r=20 is too large"):
        model.add_adapter("second", config)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(**LLAMA))  # refused up front: 'default' must survive
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert list(model.peft_config) == ["default"]
