"""QA-LoRA (``use_qalora``) against real PEFT: plain LoRA on non-GPTQ targets, pooled A on GPTQ layers.

The GPTQ rows need gptqmodel (7.6 runs on CPU, but pins numpy 2.2.6 and needs optimum, so it is not in the dev
environment): they run where it is installed (README, "QA-LoRA") and are skipped with that reason elsewhere.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import lorakit  # noqa: E402
from lorakit.errors import LoraWarning  # noqa: E402
from lorakit.variants.qalora import pooled  # noqa: E402
from variant_parity import assert_gradients_match  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4], [3, 3, 100, 17, 8, 6, 42, 120]])


def test_pooling_is_group_mean_times_groups():
    x = torch.arange(24.0).reshape(2, 12)
    expected = torch.stack([x[:, 4 * j:4 * j + 4].mean(-1) * 3 for j in range(3)], dim=-1)
    torch.testing.assert_close(pooled(x, 4), expected, atol=0, rtol=0)


def test_non_gptq_targets_get_plain_lora_as_in_peft_and_a_warning():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    config = dict(target_modules=["0", "2"], use_qalora=True, qalora_group_size=16, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with pytest.warns(LoraWarning, match="QA-LoRA runs on GPTQ layers only"):
        ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    assert ours.base_model.model[0].lora_A["default"].weight.shape == (8, 64)
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


# ---- GPTQ layers (gptqmodel) -------------------------------------------------------------------------------------
def _gptq_available() -> bool:
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401
    except Exception:
        return False
    return True


gptq = pytest.mark.skipif(not _gptq_available(), reason="gptqmodel + optimum not installed (gptqmodel 7.6 pins "
                          "numpy 2.2.6, so it lives in its own venv; README 'QA-LoRA' says how to run these)")


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory):
    """A tiny Llama quantized by gptqmodel (4 bits, groups of 32) on CPU, with SmolLM2's tokenizer files."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import shutil

    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.app.embedded import default_model_folder

    base, out = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("gptq")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False)).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_folder() / name, base)
    model = GPTQModel.load(str(base), QuantizeConfig(bits=4, group_size=32), device="cpu")
    torch.manual_seed(0)
    model.quantize([{"input_ids": torch.randint(0, 128, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
                    for _ in range(8)])
    model.save(str(out))
    return out


def load_gptq(folder):
    from gptqmodel import GPTQModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPTQModel.load(str(folder), device="cpu").model


def gptq_pair(folder, **config):
    config = dict(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **config)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load_gptq(folder), peft.LoraConfig(**config))
    ours = lorakit.get_peft_model(load_gptq(folder), lorakit.LoraConfig(**config))
    assert not lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs)).unexpected_keys
    return theirs, ours


@gptq
@pytest.mark.parametrize("config", [dict(use_qalora=True, qalora_group_size=16),
                                    dict(use_qalora=True, qalora_group_size=32, use_rslora=True),
                                    dict()], ids=["qalora-16", "qalora-32-rslora", "plain"])
def test_gptq_outputs_gradients_and_shapes_equal_peft(gptq_checkpoint, config):
    theirs, ours = gptq_pair(gptq_checkpoint, **config)
    q_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj
    q_ours = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert q_ours.lora_A["default"].weight.shape == q_theirs.lora_A["default"].weight.shape
    theirs.train(), ours.train()
    out_theirs, out_ours = theirs(IDS).logits.float(), ours(IDS).logits.float()
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-2, rtol=1e-2)  # bf16 compute in both
    out_theirs.square().mean().backward()
    out_ours.square().mean().backward()
    assert_gradients_match(theirs, ours, atol=1e-3, rtol=2e-2)


@gptq
def test_gptq_merge_is_refused_and_the_adapter_round_trips_with_peft(gptq_checkpoint, tmp_path):
    theirs, ours = gptq_pair(gptq_checkpoint, use_qalora=True, qalora_group_size=16)
    with pytest.raises(NotImplementedError):
        ours.merge_adapter()
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(load_gptq(gptq_checkpoint), tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits.float(), theirs(IDS).logits.float(), atol=1e-2, rtol=1e-2)
